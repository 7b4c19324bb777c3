//! Checkpoint and restart, agent side (the capture and the restore run in
//! the process, `libkrg::checkpoint`).
//!
//! Checkpoint: the request is routed to the node where the process runs.
//! That agent checks ownership, the capability and every fd (a resource
//! that can never move refuses the request before the process is touched),
//! records the order, and sends the capture signal. The process's handler
//! asks for its order (`CkptOrder`), writes the image and reports
//! (`CkptDone`); the agent answers the command.
//!
//! Restart: the command reads the image's metadata and sends it here; the
//! chosen node starts the image's executable with `KRG_RESTORE` (see
//! `remote::spawn_here`) and the command stays as the restored process's
//! shadow, exactly as for a remote exec.

use super::common::{err, Caller, Handled};
use super::dsm::Dsm;
use super::node::Node;
use super::orders::Orders;
use super::peer::remote::SpawnSpec;
use super::procs::Processes;
use super::remote::Remote;
use super::sched::Scheduler;
use super::streams::Streams;
use libkrg::caps::Caps;
use libkrg::checkpoint::fds::refusal;
use libkrg::proto::{
    CkptAction, CkptDoneInfo, CkptOrder, ErrorKind, ErrorReply, Request, Response, RestartReq,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// Longest a capture may take before the command gives up waiting.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a capture failed when the process went away before it said.
fn ended() -> (ErrorKind, String) {
    (
        ErrorKind::Other,
        "the process ended during the capture".to_string(),
    )
}

/// Why the fds of a local process forbid a capture, read from outside.
fn fd_refusal(kpid: i32) -> Option<String> {
    let dir = std::fs::read_dir(format!("/proc/{kpid}/fd")).ok()?;
    let mut fds: Vec<(i32, String)> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            Some((fd, link.to_string_lossy().into_owned()))
        })
        .collect();
    fds.sort();
    fds.iter().find_map(|(fd, l)| refusal(*fd, l))
}

/// Whether a local process still has its post-copy thread (pages of a
/// migration still coming). By the thread's name, not by an open
/// userfaultfd: krg's shared memory gives a process one too.
fn postcopy_running(kpid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{kpid}/task"))
        .map(|d| {
            d.flatten().any(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim_end() == libkrg::checkpoint::POSTCOPY_THREAD_NAME)
            })
        })
        .unwrap_or(false)
}

/// The personality of a local process, from any of its threads; else why
/// it could not be read.
fn personality(kpid: i32) -> Result<u32, String> {
    let mut why = format!("/proc/{kpid}: no such process");
    for p in super::procs::table::thread_files(kpid, "personality") {
        match std::fs::read_to_string(&p) {
            Ok(s) => match u32::from_str_radix(s.trim(), 16) {
                Ok(v) => return Ok(v),
                Err(_) => why = format!("{}: {s:?}", p.display()),
            },
            Err(e) => why = format!("{}: {e}", p.display()),
        }
    }
    Err(why)
}

/// A live child of a local process, if any (zombies included: the parent
/// still has to reap them here).
fn first_child(kpid: i32) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{kpid}/task")).ok()?;
    for t in tasks.flatten() {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        if let Some(c) = kids.split_whitespace().next().and_then(|c| c.parse().ok()) {
            return Some(c);
        }
    }
    None
}

/// Whether `l` names a pipe or a socket by its fd link (`pipe:[N]`,
/// `socket:[N]`), the only things `SharedWith` looks for.
fn inode_link(l: &str) -> bool {
    ["pipe:[", "socket:["].iter().any(|p| {
        l.strip_prefix(p)
            .and_then(|r| r.strip_suffix(']'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Every process of this node but `me` (and the agent) that maps one of
/// `mems` (`(device, inode)`): kernel pids by mapping.
fn mappers(mems: &[(u64, u64)], me: i32) -> HashMap<(u64, u64), Vec<i32>> {
    let mut out: HashMap<(u64, u64), Vec<i32>> = HashMap::new();
    let agent = std::process::id() as i32;
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || pid == agent {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(p.path().join("maps")) else {
            continue;
        };
        for m in libkrg::checkpoint::capture::parse_maps(&text) {
            let k = (m.dev, m.inode);
            if mems.contains(&k) {
                let v = out.entry(k).or_default();
                if !v.contains(&pid) {
                    v.push(pid);
                }
            }
        }
    }
    out
}

/// An fd and its path, with the `(kernel pid, fd)` of the other processes
/// holding its open file description.
type FileSharers = (i32, String, Vec<(i32, i32)>);

/// For each of `files` (`(fd, path)` of kernel pid `me`) the fds of
/// other processes of this node that are the same open file description
/// (`kcmp(KCMP_FILE)`; where kcmp cannot tell, the same file with the same
/// offset and flags is taken as shared): `(fd, path, [(kernel pid, fd)])`,
/// only those shared.
fn file_sharers(me: i32, files: &[(i32, String)]) -> Vec<FileSharers> {
    if files.is_empty() {
        return Vec::new();
    }
    let paths: Vec<String> = files.iter().map(|(_, p)| p.clone()).collect();
    let held = super::streams::holders(&paths);
    let mut out = Vec::new();
    for (fd, path) in files {
        let theirs: Vec<(i32, i32)> = held
            .get(path)
            .into_iter()
            .flatten()
            .filter(|(p, ofd)| *p != me && same_description(me, *fd, *p, *ofd))
            .copied()
            .collect();
        if !theirs.is_empty() {
            out.push((*fd, path.clone(), theirs));
        }
    }
    out
}

/// Whether fd `a` of kernel pid `pa` and fd `b` of `pb` are one open file
/// description.
fn same_description(pa: i32, a: i32, pb: i32, b: i32) -> bool {
    if let Ok(same) = super::sys::same_file(pa, a, pb, b) {
        return same;
    }
    // No kcmp (or not allowed): the same offset and flags, conservatively.
    let info = |p: i32, fd: i32| {
        let t = std::fs::read_to_string(format!("/proc/{p}/fdinfo/{fd}")).ok()?;
        let field = |k: &str| {
            t.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        Some((field("pos:")?, field("flags:")?))
    };
    matches!((info(pa, a), info(pb, b)), (Some(x), Some(y)) if x == y)
}

/// A local request about checkpoint, migration or restart (see
/// `Agent::handle_local`).
pub(super) async fn handle(ckpt: &Arc<Checkpoint>, req: Request, who: Caller) -> Handled {
    match req {
        Request::Checkpoint { pid, dir, kill } => {
            let order = CkptOrder {
                action: CkptAction::Checkpoint,
                path: dir,
                kill,
                node: 0,
                streams: Vec::new(),
                precopy: false,
            };
            Ok(Response::Ckpt(
                ckpt.checkpoint(pid, order, who.uid, 0).await?,
            ))
        }
        Request::Migrate { pid, node, precopy } => {
            let order = CkptOrder::migrate(node, precopy);
            Ok(Response::Ckpt(
                ckpt.checkpoint(pid, order, who.uid, 0).await?,
            ))
        }
        Request::CkptOrder => Ok(Response::CkptOrder(ckpt.orders.ckpt_order(who))),
        Request::CkptDone {
            ok,
            kind,
            msg,
            bytes,
        } => {
            ckpt.orders.ckpt_done(who, ok, kind, msg, bytes);
            Ok(Response::Ok)
        }
        Request::Restart(req) => Ok(Response::Ckpt(ckpt.restart(who, req).await?)),
        Request::SharedWith { links, mems, files } => {
            ckpt.shared_with(who, links, mems, files).await
        }
        other => Err(super::common::misrouted(&other)),
    }
}

/// Checkpoint, migration and restart, the agent's side.
#[derive(Debug)]
pub struct Checkpoint {
    node: Arc<Node>,
    orders: Arc<Orders>,
    streams: Arc<Streams>,
    sched: Arc<Scheduler>,
    dsm: Arc<Dsm>,
    procs: Arc<Processes>,
    remote: Arc<Remote>,
}

/// What a [`Checkpoint`] works with: every subsystem that a capture, a
/// move or a restart touches.
#[derive(Debug)]
pub struct Uses {
    pub node: Arc<Node>,
    pub orders: Arc<Orders>,
    pub streams: Arc<Streams>,
    pub sched: Arc<Scheduler>,
    pub dsm: Arc<Dsm>,
    pub procs: Arc<Processes>,
    pub remote: Arc<Remote>,
}

impl Checkpoint {
    pub fn new(u: Uses) -> Checkpoint {
        Checkpoint {
            node: u.node,
            orders: u.orders,
            streams: u.streams,
            sched: u.sched,
            dsm: u.dsm,
            procs: u.procs,
            remote: u.remote,
        }
    }

    /// `SharedWith` from a process about to be captured: what of `links`
    /// (its own pipes and socketpairs) and `mems` (its shared memory to be
    /// copied) other processes of this node hold too, described for the
    /// refusal.
    async fn shared_with(
        &self,
        who: Caller,
        links: Vec<String>,
        mems: Vec<(u64, u64)>,
        files: Vec<(i32, String)>,
    ) -> Result<Response, ErrorReply> {
        if let Some(l) = links.iter().find(|l| !inode_link(l)) {
            return Err(err(
                libc::EINVAL,
                format!("SharedWith: {l:?} names neither a pipe nor a socket"),
            ));
        }
        let me = who.pid;
        if let Some((fd, p)) = files.iter().find(|(fd, p)| *fd < 0 || !p.starts_with('/')) {
            return Err(err(
                libc::EINVAL,
                format!("SharedWith: fd {fd}: {p:?} is not a file's path"),
            ));
        }
        let (held, mapped, files) = tokio::task::spawn_blocking(move || {
            (
                super::streams::holders(&links),
                mappers(&mems, me),
                file_sharers(me, &files),
            )
        })
        .await
        .map_err(|e| err(libc::EIO, format!("looking for what is shared: {e}")))?;
        let name = |kpid: i32| {
            let comm = std::fs::read_to_string(format!("/proc/{kpid}/comm")).unwrap_or_default();
            let g = self.node.procs().translate(kpid).unwrap_or(kpid);
            format!("pid {g} ({})", comm.trim_end())
        };
        let mut out = Vec::new();
        let mut held: Vec<(String, Vec<(i32, i32)>)> = held.into_iter().collect();
        held.sort();
        for (link, hs) in held {
            let mut others: Vec<i32> = hs.iter().map(|(p, _)| *p).filter(|p| *p != me).collect();
            others.dedup();
            if !others.is_empty() {
                let who: Vec<String> = others.into_iter().map(name).collect();
                out.push(format!(
                    "{link} (both ends are this process's) is held by {} too: after the move it would no longer connect them",
                    who.join(", ")
                ));
            }
        }
        for (fd, path, theirs) in files {
            let who: Vec<String> = theirs
                .into_iter()
                .map(|(p, ofd)| format!("fd {ofd} of {}", name(p)))
                .collect();
            out.push(format!(
                "fd {fd} ({path}): one open file with {}: opened again on the target it would no longer share their offset (writes would overwrite each other); movable once they close it",
                who.join(", ")
            ));
        }
        let mut mapped: Vec<((u64, u64), Vec<i32>)> = mapped.into_iter().collect();
        mapped.sort();
        for ((_, ino), pids) in mapped {
            let who: Vec<String> = pids.into_iter().map(name).collect();
            out.push(format!(
                "shared memory (inode {ino}) is mapped by {} too: after the move it would no longer be shared (anonymous shared memory stays shared across nodes with KRG_CAPS=+dsm-anon)",
                who.join(", ")
            ));
        }
        Ok(Response::Shared(out))
    }

    /// `krg checkpoint` and `krg migrate`: route to the node where `g`
    /// runs.
    pub(super) async fn checkpoint(
        &self,
        g: i32,
        order: CkptOrder,
        uid: u32,
        hops: u8,
    ) -> Result<CkptDoneInfo, ErrorReply> {
        self.procs.owner(g)?;
        if hops > 3 {
            return Err(err(
                libc::ESRCH,
                format!("pid {g}: lost while routing the request"),
            ));
        }
        let me = self.node.node_id();
        let target = {
            let t = self.node.procs();
            match t.runs_elsewhere(g) {
                Some(n) if n != me => n,
                _ if t.get(g).is_some() => me,
                _ => match libkrg::gpid::node_of(g) {
                    Some(o) if o != me && hops == 0 => o,
                    _ => return Err(err(libc::ESRCH, format!("pid {g}: no such process"))),
                },
            }
        };
        // Only the node where it runs knows (a first hop may only guess the
        // gpid's origin, where its shadow is: moving back there is fine).
        if order.action == CkptAction::Migrate && order.node == target && target == me {
            return Err(err(
                libc::EINVAL,
                format!("pid {g} already runs on node {target}"),
            ));
        }
        if target == me {
            return self.checkpoint_local(g, order, uid).await;
        }
        if !self.node.is_up(target) {
            return Err(err(
                libc::EHOSTDOWN,
                format!("pid {g}: node {target} is down"),
            ));
        }
        let c = self.node.client(target).await?;
        let mut cx = tarpc::context::current();
        cx.deadline = Instant::now() + CAPTURE_TIMEOUT + Duration::from_secs(5);
        c.checkpoint(cx, g, order, uid, hops + 1)
            .await
            .map_err(|e| err(libc::EHOSTUNREACH, format!("pid {g}: node {target}: {e}")))?
    }

    /// Checkpoint or migrate a process of this node. A migration that
    /// meets the other end of one of its streams moving at the same time
    /// (it was refused, the process untouched) is tried again once that
    /// one is over: each waits a random while, so one of them goes first.
    pub(super) async fn checkpoint_local(
        &self,
        g: i32,
        order: CkptOrder,
        uid: u32,
    ) -> Result<CkptDoneInfo, ErrorReply> {
        let mut tries = 0;
        loop {
            let r = self.checkpoint_local_once(g, order.clone(), uid).await;
            match r {
                Err(e)
                    if order.action == CkptAction::Migrate
                        && tries < 10
                        && matches!(e.kind, ErrorKind::PeerBusy | ErrorKind::CaptureBusy) =>
                {
                    tries += 1;
                    let ms = rand::random::<u64>() % 300 + 50;
                    debug!("pid {g}: {} (try {tries}); again in {ms} ms", e.msg);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                r => return r,
            }
        }
    }

    async fn checkpoint_local_once(
        &self,
        g: i32,
        order: CkptOrder,
        uid: u32,
    ) -> Result<CkptDoneInfo, ErrorReply> {
        let migrate = order.action == CkptAction::Migrate;
        let (cap, capname) = if migrate {
            (Caps::MIGRATE, "migrate")
        } else {
            (Caps::CHECKPOINT, "checkpoint")
        };
        if migrate && !self.node.is_up(order.node) {
            return Err(err(libc::EHOSTDOWN, format!("node {} is down", order.node)));
        }
        // A process still being restored here is not capturable yet (its
        // handlers are not back): wait a little for it.
        let wait_until = Instant::now() + Duration::from_secs(10);
        while self.node.procs().get(g).is_some_and(|p| p.restoring) && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let kpid = {
            let t = self.node.procs();
            if t.get(g).is_some_and(|p| p.restoring) {
                return Err(err(libc::EBUSY, format!("pid {g}: still being restored")));
            }
            let p = t.get(g).filter(|p| p.running_on.is_none()).ok_or_else(|| {
                err(
                    libc::ESRCH,
                    format!("pid {g}: not running on node {}", self.node.node_id()),
                )
            })?;
            super::procs::table::ProcTable::permitted(p, uid)?;
            if !p.caps_eff.contains(cap) {
                return Err(err(
                    libc::EPERM,
                    format!("pid {g}: the {capname} capability is off (krg capset {g} +{capname})"),
                ));
            }
            p.kpid
        };
        // It must take the capture signal: a program that greeted this
        // agent, or a child forked from one (same library, same handler),
        // but not one that has since exec'd a program without the library
        // (the signal would kill it).
        if !super::procs::table::catches(kpid, libkrg::proto::CKPT_SIGNAL) {
            return Err(err(
                libc::EPERM,
                format!("pid {g}: does not run libkrg (not started under krg, or it exec'd a program without it)"),
            ));
        }
        // A process still receiving pages by post-copy has its
        // userfaultfd and migration stream open (and its handler waits
        // for the last page anyway): wait for its post-copy thread to end
        // (it closes both first).
        if self.node.procs().get(g).is_some_and(|p| p.postcopy) {
            let until = Instant::now() + CAPTURE_TIMEOUT;
            while postcopy_running(kpid) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some(p) = self.node.procs().get_mut(g) {
                p.postcopy = false;
            }
        }
        if let Some(why) = fd_refusal(kpid) {
            return Err(err(libc::EBUSY, format!("pid {g}: {why}")));
        }
        // Cluster shared memory moves with a migration (the restored
        // process attaches it again on its new node), but an image on disk
        // would not hold it: its contents live in the cluster.
        if !migrate {
            if let Some(shmid) = self.dsm.shm_attached(kpid) {
                return Err(err(
                    libc::EBUSY,
                    format!("pid {g}: shared memory segment {shmid} (krg DSM) is attached: its contents are the cluster's, not the process's, and an image would not hold them (migrate the process instead)"),
                ));
            }
        }
        // A migrating parent leaves its children here (they are waited for
        // from its new node through its shadow: see `children`); a killed
        // one would orphan them.
        if order.kill {
            if let Some(child) = first_child(kpid) {
                return Err(err(
                    libc::EBUSY,
                    format!(
                        "pid {g} has child processes (kernel pid {child} here): a checkpoint that ends the parent would orphan them (checkpoint it without --kill, or migrate it)"
                    ),
                ));
            }
        }
        // Unreadable from every thread: the process is exiting.
        let pers = personality(kpid).map_err(|e| {
            err(
                libc::ESRCH,
                if super::procs::table::alive(kpid) {
                    format!("pid {g}: cannot read its personality ({e})")
                } else {
                    format!("pid {g}: exiting")
                },
            )
        })?;
        if pers & libc::ADDR_NO_RANDOMIZE as u32 == 0 {
            return Err(err(
                libc::EINVAL,
                format!("pid {g}: runs with address randomisation (not started under krg)"),
            ));
        }
        let rx = self.orders.order_capture(g, kpid, order.clone())?;
        let started = Instant::now();
        if let Err(e) = self.node.procs().kill(g, libkrg::proto::CKPT_SIGNAL, 0) {
            self.orders.forget(kpid);
            return Err(e);
        }
        debug!("pid {g}: capture signal sent (kernel pid {kpid})");
        // The handler must ask for its order soon; then the capture takes
        // as long as the memory needs.
        // Until it reports, or dies (a process killed during its capture
        // never reports).
        let r = tokio::time::timeout(CAPTURE_TIMEOUT, async {
            let mut rx = rx;
            loop {
                tokio::select! {
                    r = &mut rx => return r,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if !super::procs::table::alive(kpid) {
                            // A report sent just before the end wins.
                            return match rx.try_recv() {
                                Ok(r) => Ok(r),
                                Err(_) => Ok(Err(ended())),
                            };
                        }
                    }
                }
            }
        })
        .await;
        let taken = self.orders.forget(kpid);
        let res = match r {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ended()),
            Err(_) => Err((
                ErrorKind::Other,
                match taken {
                    Some(false) => "the process never answered the capture signal",
                    _ => "the capture did not finish in time",
                }
                .to_string(),
            )),
        };
        let frozen = self.streams.take_frozen_for(kpid);
        if res.is_err() && !frozen.is_empty() {
            self.call_off_everywhere(frozen).await;
        }
        let (bytes, postcopy) = match res {
            Ok(b) => b,
            Err((kind, e)) => {
                if migrate {
                    // It stays here after all.
                    self.node.procs().clear_shadow(g);
                    self.relocate(g, self.node.node_id()).await;
                }
                return Err(ErrorReply::new(libc::EIO, kind, format!("pid {g}: {e}")));
            }
        };
        let ms = started.elapsed().as_millis() as u64;
        if migrate {
            info!(
                "pid {g}: migrated to node {} ({bytes} bytes, {ms} ms{})",
                order.node,
                if postcopy { ", post-copy" } else { "" }
            );
        } else {
            info!(
                "pid {g}: checkpointed to {} ({bytes} bytes, {ms} ms{})",
                String::from_utf8_lossy(&order.path),
                if order.kill { ", killed" } else { "" }
            );
        }
        Ok(CkptDoneInfo {
            pid: g,
            node: if migrate {
                order.node
            } else {
                self.node.node_id()
            },
            bytes,
            ms,
            postcopy,
        })
    }

    /// Tell the origin node of `g` that it runs on `node` now.
    pub(super) async fn relocate(&self, g: i32, node: u32) {
        let origin = libkrg::gpid::node_of(g).unwrap_or(node);
        if origin == self.node.node_id() {
            self.node.procs().set_location(g, node);
        } else if let Ok(oc) = self.node.client(origin).await {
            let _ = oc.set_location(super::common::ctx(), g, node).await;
        }
    }

    /// A failed capture's hand-overs `(node, id)`, called off where they
    /// are held (its peers, frozen for it, would wait a minute for a
    /// connection nobody makes).
    async fn call_off_everywhere(&self, frozen: Vec<(u32, u64)>) {
        let mut by_node: HashMap<u32, Vec<u64>> = HashMap::new();
        for (node, id) in frozen {
            by_node.entry(node).or_default().push(id);
        }
        for (node, ids) in by_node {
            if node == self.node.node_id() {
                self.streams.call_off(&ids);
            } else if let Ok(c) = self.node.client(node).await {
                if let Err(e) = c.stream_call_off(super::common::ctx(), ids).await {
                    debug!("calling hand-overs off on node {node}: {e}");
                }
            }
        }
    }

    /// After a restart where parked connections waited: migrate the
    /// restored process to the node the restart asked for, once it runs
    /// (tried for a while: the restore takes a moment).
    async fn move_once_restored(self: Arc<Self>, g: i32, to: u32, uid: u32) {
        let order = CkptOrder::migrate(to, false);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match self.checkpoint(g, order.clone(), uid, 0).await {
                Ok(_) => {
                    info!("pid {g}: restarted, moved on to node {to} with its connections");
                    return;
                }
                Err(e) if Instant::now() < deadline && e.errno != libc::ESRCH => {
                    debug!("pid {g}: not movable to node {to} yet: {}", e.msg)
                }
                Err(e) => {
                    tracing::warn!(
                        "pid {g}: restarted where its connections waited, but not moved to node {to}: {}",
                        e.msg
                    );
                    return;
                }
            }
        }
    }

    /// `krg restart`: start the image on the chosen node; the caller is the
    /// shadow. Answers the restored process's gpid and node.
    async fn restart(
        self: &Arc<Self>,
        who: Caller,
        req: RestartReq,
    ) -> Result<CkptDoneInfo, ErrorReply> {
        who.kpid()?;
        let up = |n: u32| self.node.is_up(n) || n == self.node.node_id();
        // An image with parked connections is restored where they wait (it
        // takes the same sockets back), then moved where it was asked to go.
        let then =
            (req.parked_on != 0 && req.node != 0 && req.node != req.parked_on).then_some(req.node);
        let node = if req.parked_on != 0 {
            if !up(req.parked_on) {
                return Err(err(
                    libc::EHOSTDOWN,
                    format!(
                        "node {} is down, and the image's connections wait there",
                        req.parked_on
                    ),
                ));
            }
            req.parked_on
        } else if req.node != 0 {
            if !up(req.node) {
                return Err(err(libc::EHOSTDOWN, format!("node {} is down", req.node)));
            }
            req.node
        } else {
            self.sched.placement(who.pid, None)
        };
        if let Some(n) = then {
            if !up(n) {
                return Err(err(libc::EHOSTDOWN, format!("node {n} is down")));
            }
        }
        // The image's gpid comes back if no process has it any more.
        let g = req.gpid;
        let reuse = libkrg::gpid::is_gpid(g) && self.procs.kill_routed(g, 0, 0, 0).await.is_err();
        let (uid, gid, groups) = if who.uid == 0 {
            (req.uid, req.gid, req.groups.clone())
        } else {
            super::remote::creds(who.pid)
                .ok_or_else(|| err(libc::ESRCH, "cannot read the caller's credentials"))?
        };
        let caps = Caps::from_bits(req.caps);
        let spec = SpawnSpec {
            gpid: if reuse { g } else { 0 },
            from: self.node.node_id(),
            uid,
            gid,
            groups,
            caps_eff: caps.0,
            caps_inh: caps.0,
            caps_env: None,
            vppid: 1,
            vpgid: 0,
            shadow: SocketAddr::new(self.node.cfg.advertise.ip(), req.exec.port),
            restore: Some(req.image.clone()),
            children: Vec::new(),
            exec: req.exec,
        };
        let started = Instant::now();
        let (kpid, gpid) = if node == self.node.node_id() {
            self.remote.clone().spawn_here(spec).await?
        } else {
            let c = self.node.client(node).await?;
            let mut cx = tarpc::context::current();
            cx.deadline = Instant::now() + Duration::from_secs(15);
            c.spawn(cx, spec)
                .await
                .map_err(|e| err(libc::EHOSTUNREACH, format!("node {node}: {e}")))??
        };
        self.relocate(gpid, node).await;
        info!(
            "pid {gpid}: restarted from {} on node {node} (kernel pid {kpid} there)",
            String::from_utf8_lossy(&req.image)
        );
        if let Some(to) = then {
            let agent = self.clone();
            let uid = who.uid;
            tokio::spawn(async move { agent.move_once_restored(gpid, to, uid).await });
        }
        Ok(CkptDoneInfo {
            pid: gpid,
            node,
            bytes: 0,
            ms: started.elapsed().as_millis() as u64,
            postcopy: false,
        })
    }
}
