//! Processes, the agent's side of libkrg's `processes` and `pidcalls`:
//! what local processes ask about their identity, pids, signals and
//! capabilities, and the routing of signals and capabilities to the node
//! that answers for a gpid. The node's table itself is in `table.rs`.

pub mod table;

use table::{read_stat, ProcTable};

use super::common::{ctx, err, Caller, Handled};
use super::dsm::Dsm;
use super::node::Node;
use super::peer::GroupKill;
use super::sched::Scheduler;
use super::stay::Stay;
use libkrg::caps::Caps;
use libkrg::gpid;
use libkrg::proto::{CapsInfo, ErrorReply, ProcInfo, Request, Response};
use std::sync::Arc;
use tracing::{info, warn};

/// A local request about processes (see `Agent::handle_local`).
pub(super) async fn handle(procs: &Arc<Processes>, req: Request, who: Caller) -> Handled {
    match req {
        Request::Hello {
            version,
            caps_env,
            pinned,
        } => procs.hello(who, version, caps_env, pinned).await,
        Request::Whoami => procs.whoami(who),
        Request::Ensure { kpid } => procs.ensure(who, kpid),
        Request::Translate { kpid } => procs.translate(who, kpid),
        Request::TranslateGroup { kpgid } => {
            Ok(Response::Pid(procs.node.procs().group_gpid(kpgid)))
        }
        Request::Resolve { gpid: g } => {
            let k = procs.node.procs().resolve(g).ok_or_else(|| {
                err(
                    libc::ESRCH,
                    format!("pid {g}: not on node {}", procs.node.cfg.node_id),
                )
            })?;
            Ok(Response::Pid(k))
        }
        Request::ResolveRunning { gpid: g } => {
            Ok(Response::Pid(procs.node.procs().resolve_running(g)?))
        }
        Request::Kill { pid, sig } => procs.kill(pid, sig, who.uid).await,
        Request::Ps => Ok(Response::Ps(procs.ps().await)),
        Request::CapGet { gpid: g } => procs.cap_get(g).await,
        Request::CapSet {
            gpid: g,
            spec,
            effective,
            inheritable,
        } => procs.cap_set(g, spec, effective, inheritable, who).await,
        other => Err(super::common::misrouted(&other)),
    }
}

fn valid_signal(sig: i32) -> bool {
    (0..=64).contains(&sig)
}

/// The requests about processes: pids, signals, capabilities, `ps`,
/// and the placement of a program at its exec.
#[derive(Debug)]
pub struct Processes {
    node: Arc<Node>,
    sched: Arc<Scheduler>,
    dsm: Arc<Dsm>,
    stay: Arc<Stay>,
}

impl Processes {
    pub fn new(
        node: Arc<Node>,
        sched: Arc<Scheduler>,
        dsm: Arc<Dsm>,
        stay: Arc<Stay>,
    ) -> Processes {
        Processes {
            node,
            sched,
            dsm,
            stay,
        }
    }

    /// `Hello`: a program starts (or execs) under the library: register
    /// it, and tell it where it should run.
    async fn hello(
        self: &Arc<Self>,
        who: Caller,
        version: u32,
        caps_env: Option<String>,
        pinned: Option<u32>,
    ) -> Result<Response, ErrorReply> {
        if version != libkrg::proto::PROTO_VERSION {
            return Err(err(
                libc::EPROTO,
                format!(
                    "protocol version {version} (agent speaks {})",
                    libkrg::proto::PROTO_VERSION
                ),
            ));
        }
        let kpid = who.kpid()?;
        // A new program: the old one's segment attachments are gone.
        self.dsm.shm_forget(kpid);
        let (gpid, caps, skip) = {
            let mut t = self.node.procs();
            let p = t.register(kpid, Some(caps_env))?;
            let r = (p.gpid, p.caps_eff, p.skip_place);
            if let Some(p) = t.get_mut(r.0) {
                p.skip_place = false;
            }
            r
        };
        let place = if skip || !caps.contains(Caps::DISTANT_FORK) {
            0
        } else {
            self.sched.placement(kpid, pinned)
        };
        let place = self.stay.place_or_stay(gpid, kpid, place).await;
        Ok(Response::Hello {
            gpid,
            node: self.node.cfg.node_id,
            caps: caps.0,
            place: if place == self.node.cfg.node_id {
                0
            } else {
                place
            },
            spread: !self.sched.is_local(),
        })
    }

    /// `Whoami`: a restored image asks who it is (and is capturable from
    /// then on).
    fn whoami(&self, who: Caller) -> Result<Response, ErrorReply> {
        let kpid = who.kpid()?;
        let t = self.node.procs();
        let g = t.translate(kpid).ok_or_else(|| {
            err(
                libc::ESRCH,
                format!("kernel pid {kpid} is not an SSI process"),
            )
        })?;
        drop(t);
        let mut t = self.node.procs();
        let caps = match t.get_mut(g) {
            Some(p) => {
                p.restoring = false;
                p.caps_eff.0
            }
            None => 0,
        };
        Ok(Response::Hello {
            gpid: g,
            node: self.node.cfg.node_id,
            caps,
            place: 0,
            spread: !self.sched.is_local(),
        })
    }

    /// `Ensure`: the gpid of the caller or of its child `kpid`,
    /// registering it if needed.
    fn ensure(&self, who: Caller, kpid: i32) -> Result<Response, ErrorReply> {
        let me = who.kpid()?;
        if kpid != me {
            let st = read_stat(kpid)
                .ok_or_else(|| err(libc::ESRCH, format!("no process with kernel pid {kpid}")))?;
            if st.ppid != me {
                return Err(err(
                    libc::EPERM,
                    format!("kernel pid {kpid} is neither the caller nor its child"),
                ));
            }
        }
        Ok(Response::Pid(self.node.procs().register(kpid, None)?.gpid))
    }

    /// `Translate`: the pid the caller sees for kernel pid `kpid`.
    fn translate(&self, who: Caller, kpid: i32) -> Result<Response, ErrorReply> {
        let t = self.node.procs();
        // A program started here for a shadow elsewhere has the
        // agent as its kernel parent: it sees its shadow's parent.
        if let Some(v) = t.translate(who.pid).and_then(|g| {
            let p = t.get(g)?;
            let st = read_stat(who.pid)?;
            (kpid == st.ppid).then_some(p.vppid).flatten()
        }) {
            if v > 0 {
                return Ok(Response::Pid(v));
            }
        }
        Ok(Response::Pid(t.translate(kpid).unwrap_or(kpid)))
    }

    /// `Kill`: `pid` > 0 a process, < -1 a process group, wherever they
    /// run.
    async fn kill(&self, pid: i32, sig: i32, uid: u32) -> Result<Response, ErrorReply> {
        if !valid_signal(sig) {
            return Err(err(libc::EINVAL, format!("invalid signal {sig}")));
        }
        if pid > 0 {
            self.owner(pid)?;
            self.kill_routed(pid, sig, uid, 0).await?;
        } else if pid < -1 {
            self.kill_group(-pid, sig, uid).await?;
        } else {
            return Err(err(
                libc::EINVAL,
                format!("kill({pid}): the library handles 0 and -1 locally"),
            ));
        }
        Ok(Response::Ok)
    }

    /// Every SSI process of the cluster (nodes that do not answer in time
    /// are left out).
    pub async fn ps(&self) -> Vec<ProcInfo> {
        let mut all = self.node.procs().ps();
        let calls = self.node.up_peers().into_iter().map(|id| async move {
            match self.node.client(id).await {
                Ok(c) => match c.procs(ctx()).await {
                    Ok(v) => v,
                    Err(e) => {
                        warn!("ps: node {id} did not answer: {e}");
                        self.node.drop_client(id);
                        Vec::new()
                    }
                },
                Err(e) => {
                    warn!("ps: {}", e.msg);
                    Vec::new()
                }
            }
        });
        for v in futures::future::join_all(calls).await {
            all.extend(v);
        }
        all.sort_by_key(|p| (p.node, p.pid));
        all
    }

    /// The node that answers for a gpid (its origin node: the one that
    /// knows where it runs).
    pub(super) fn owner(&self, pid: i32) -> Result<u32, ErrorReply> {
        let node = gpid::node_of(pid).ok_or_else(|| {
            err(
                libc::ESRCH,
                format!("{pid} is not a cluster pid (no SSI process has it)"),
            )
        })?;
        if node != self.node.cfg.node_id && !self.node.may_reach(node) {
            let known = self.node.member_addr(node).is_some();
            return Err(err(
                libc::ESRCH,
                if known {
                    format!("pid {pid}: its node {node} is down")
                } else {
                    format!("pid {pid}: no such process (no node {node} in the cluster)")
                },
            ));
        }
        Ok(node)
    }

    /// Deliver to a gpid wherever it runs: here, where this node knows it
    /// went (it is its origin, or holds its shadow), else ask its origin.
    pub(super) async fn kill_routed(
        &self,
        g: i32,
        sig: i32,
        uid: u32,
        hops: u8,
    ) -> Result<(), ErrorReply> {
        if hops > 3 {
            return Err(err(
                libc::ESRCH,
                format!("pid {g}: lost while routing the signal"),
            ));
        }
        let me = self.node.cfg.node_id;
        let target = {
            let t = self.node.procs();
            match t.runs_elsewhere(g) {
                Some(n) if n != me => n,
                _ if t.get(g).is_some() => return t.kill(g, sig, uid),
                _ => {
                    let origin = gpid::node_of(g).unwrap_or(me);
                    if origin == me || hops > 0 {
                        return Err(err(libc::ESRCH, format!("pid {g}: no such process")));
                    }
                    origin
                }
            }
        };
        if !self.node.may_reach(target) {
            return Err(err(
                libc::ESRCH,
                format!("pid {g}: its node {target} is down"),
            ));
        }
        let c = self.node.client(target).await?;
        c.kill(ctx(), g, sig, uid, hops + 1).await.map_err(|e| {
            self.node.drop_client(target);
            err(libc::EHOSTUNREACH, format!("pid {g}: node {target}: {e}"))
        })?
    }

    async fn kill_group(&self, pgid: i32, sig: i32, uid: u32) -> Result<(), ErrorReply> {
        let mut total = self.node.procs().kill_group(pgid, sig, uid);
        let calls = self.node.up_peers().into_iter().map(|id| async move {
            match self.node.client(id).await {
                Ok(c) => c
                    .kill_group(ctx(), pgid, sig, uid)
                    .await
                    .unwrap_or_default(),
                Err(_) => GroupKill::default(),
            }
        });
        for g in futures::future::join_all(calls).await {
            total.0 += g.found;
            total.1 += g.sent;
            if g.error.is_some() {
                total.2 = g.error;
            }
        }
        match total {
            (0, _, _) => Err(err(
                libc::ESRCH,
                format!("process group {pgid}: no such process group"),
            )),
            (_, 0, e) => Err(e.unwrap_or_else(|| {
                err(
                    libc::EPERM,
                    format!("process group {pgid}: operation not permitted"),
                )
            })),
            _ => Ok(()),
        }
    }

    /// A peer's `kill`: a signal routed here (`hops` > 0) for `g`.
    pub(super) async fn peer_kill(
        &self,
        g: i32,
        sig: i32,
        uid: u32,
        hops: u8,
    ) -> Result<(), ErrorReply> {
        if !valid_signal(sig) {
            return Err(err(libc::EINVAL, format!("invalid signal {sig}")));
        }
        self.kill_routed(g, sig, uid, hops.max(1)).await
    }

    /// A peer's `kill_group`: signal this node's members of `pgid`.
    pub(super) fn peer_kill_group(&self, pgid: i32, sig: i32, uid: u32) -> GroupKill {
        if !valid_signal(sig) {
            return GroupKill::default();
        }
        let (found, sent, error) = self.node.procs().kill_group(pgid, sig, uid);
        GroupKill { found, sent, error }
    }

    async fn cap_get(&self, g: i32) -> Result<Response, ErrorReply> {
        let node = self.owner(g)?;
        if node == self.node.cfg.node_id {
            return Ok(Response::Caps(self.cap_get_local(g)?));
        }
        let c = self.node.client(node).await?;
        let r = c
            .cap_get(ctx(), g)
            .await
            .map_err(|e| err(libc::EHOSTUNREACH, format!("node {node}: {e}")))??;
        Ok(Response::Caps(r))
    }

    async fn cap_set(
        &self,
        g: i32,
        spec: String,
        effective: bool,
        inheritable: bool,
        who: Caller,
    ) -> Result<Response, ErrorReply> {
        Caps::apply(Caps::NONE, &spec).map_err(|e| err(libc::EINVAL, e.to_string()))?;
        let node = self.owner(g)?;
        if node == self.node.cfg.node_id {
            return Ok(Response::Caps(self.cap_set_local(
                g,
                &spec,
                effective,
                inheritable,
                who.uid,
            )?));
        }
        let c = self.node.client(node).await?;
        let r = c
            .cap_set(ctx(), g, spec, effective, inheritable, who.uid)
            .await
            .map_err(|e| err(libc::EHOSTUNREACH, format!("node {node}: {e}")))??;
        Ok(Response::Caps(r))
    }

    /// The capabilities of `g`, a process of this node.
    pub(super) fn cap_get_local(&self, g: i32) -> Result<CapsInfo, ErrorReply> {
        let t = self.node.procs();
        let p = t
            .get(g)
            .ok_or_else(|| err(libc::ESRCH, format!("pid {g}: no such process")))?;
        Ok(CapsInfo {
            gpid: g,
            effective: p.caps_eff.0,
            inheritable: p.caps_inh.0,
        })
    }

    /// Change the capabilities of `g`, a process of this node, for a
    /// caller of uid `uid`.
    pub(super) fn cap_set_local(
        &self,
        g: i32,
        spec: &str,
        eff: bool,
        inh: bool,
        uid: u32,
    ) -> Result<CapsInfo, ErrorReply> {
        let mut t = self.node.procs();
        let p = t
            .get(g)
            .ok_or_else(|| err(libc::ESRCH, format!("pid {g}: no such process")))?;
        ProcTable::permitted(p, uid)?;
        let p = t.get_mut(g).expect("just found");
        if eff {
            p.caps_eff =
                Caps::apply(p.caps_eff, spec).map_err(|e| err(libc::EINVAL, e.to_string()))?;
        }
        if inh {
            p.caps_inh =
                Caps::apply(p.caps_inh, spec).map_err(|e| err(libc::EINVAL, e.to_string()))?;
        }
        info!(
            "capabilities of {g} set to {} (inheritable {})",
            p.caps_eff, p.caps_inh
        );
        Ok(CapsInfo {
            gpid: g,
            effective: p.caps_eff.0,
            inheritable: p.caps_inh.0,
        })
    }
}
