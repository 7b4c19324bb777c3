//! The krg agent, one per host: membership and heartbeats with the other
//! agents (tarpc over TCP, key-authenticated), the node's process table, and
//! the local Unix socket that serves application processes and `krg`.
//! See docs/architecture/agent.md.

pub mod auth;
pub mod balance;
pub mod checkpoint;
pub mod children;
pub mod config;
pub mod dsm;
pub mod fifo;
pub mod local;
pub mod parked;
pub mod peer;
pub mod probe;
pub mod procs;
pub mod remote;
pub mod sched;
pub mod seqpacket;
pub mod spawn;
pub mod stay;
pub mod streams;
pub mod sync;
mod sys;
pub mod unix;

use crate::agent::config::Config;
use crate::agent::peer::{GroupKill, Heartbeat, Peer, PeerClient};
use crate::agent::procs::ProcTable;
use libkrg::caps::Caps;
use libkrg::gpid;
use libkrg::proto::{CapsInfo, ErrorReply, NodeStatus, ProcInfo, Request, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tarpc::context;
use tracing::{debug, info, warn};

/// How often heartbeats go out.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// A node silent for this long is shown `down` (well within the 3 s promise).
pub const DOWN_AFTER: Duration = Duration::from_millis(2000);
/// A request about a process of a node silent for less than this is still
/// sent (and fails after the call's deadline if the node is gone): a node
/// starved of CPU for a few seconds misses heartbeats while it runs on
/// (`krg kill` of its process failed at once, "its node 2 is down", in a
/// loaded test run), though `ps` and `status` show it down after 2 s.
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);
/// Deadline of one call to a peer.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Who is calling on the local socket (from SO_PEERCRED).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// Kernel pid in the agent's pid namespace; 0 if not visible from it.
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug)]
struct Member {
    addr: SocketAddr,
    last_seen: Option<Instant>,
    status: Option<NodeStatus>,
    client: Option<PeerClient>,
    busy: bool,
}

impl Member {
    fn new(addr: SocketAddr) -> Member {
        Member {
            addr,
            last_seen: None,
            status: None,
            client: None,
            busy: false,
        }
    }

    fn up(&self) -> bool {
        self.last_seen.is_some_and(|t| t.elapsed() < DOWN_AFTER)
    }

    /// Heard from recently enough to send it a request (see
    /// [`GIVE_UP_AFTER`]).
    fn reachable(&self) -> bool {
        self.last_seen.is_some_and(|t| t.elapsed() < GIVE_UP_AFTER)
    }
}

/// The agent's shared state.
#[derive(Debug)]
pub struct Agent {
    pub cfg: Config,
    cpus: f64,
    procs: Mutex<ProcTable>,
    members: Mutex<HashMap<u32, Member>>,
    /// Configured peers and seeds whose node id is not known yet.
    pending: Mutex<Vec<SocketAddr>>,
    load: Mutex<probe::LoadAvg>,
    /// Processes count cached by the probe (reading /proc per heartbeat
    /// would be wasteful).
    nprocs: Mutex<u32>,
    /// (MemTotal, MemAvailable) in kB, from the same probe.
    mem: Mutex<(u64, u64)>,
    /// The scheduling policy in force and the recent placements.
    sched: sched::Sched,
    /// Checkpoint orders waiting for their processes.
    orders: checkpoint::Orders,
    /// The load balancer's memory (hysteresis).
    balancer: Mutex<balance::State>,
    /// Shared memory segments: those homed here and local copies.
    dsm: dsm::Dsm,
    /// System V semaphore sets homed here.
    sems: sync::Sems,
    /// Shared-memory links to other agents (see `dsm::link`).
    links: Mutex<HashMap<u32, Arc<dsm::link::Link>>>,
    /// The cluster-wide loopback's ports (see `streams`).
    ports: streams::Ports,
    /// TCP connections whose other end is moving (see `streams`).
    moving: streams::Moving,
    /// Ends of children that run elsewhere, for their child shadows here
    /// (see `children`).
    child_ends: children::Ends,
    /// FIFO openers waiting for a partner, at the key home (see `fifo`).
    fifos: fifo::Fifos,
    /// Cluster-wide UNIX socket names (see `unix`).
    unix: unix::UnixNames,
    /// Fds kept open for checkpointed processes (see `parked`).
    parked: parked::Parked,
    /// Listeners kept for processes that moved away, by port: how to ask
    /// each forwarder for its listener back (`agent::parked`).
    forwarders: std::sync::Mutex<HashMap<u16, tokio::sync::oneshot::Sender<parked::Giver>>>,
}

pub(crate) fn err(errno: i32, msg: impl Into<String>) -> ErrorReply {
    ErrorReply {
        errno,
        msg: msg.into(),
    }
}

pub(crate) fn sock_err(what: &str, e: std::io::Error) -> ErrorReply {
    err(libc::EIO, format!("{what}: {e}"))
}

pub(crate) fn ctx() -> context::Context {
    let mut c = context::current();
    c.deadline = Instant::now() + CALL_TIMEOUT;
    c
}

impl Agent {
    pub fn new(cfg: Config) -> Arc<Agent> {
        let cpus = probe::cpu_capacity(cfg.cpus);
        Arc::new(Agent {
            procs: Mutex::new(ProcTable::new(cfg.node_id)),
            members: Mutex::new(HashMap::new()),
            pending: Mutex::new(cfg.peers.clone()),
            load: Mutex::new(probe::LoadAvg::default()),
            nprocs: Mutex::new(0),
            mem: Mutex::new(probe::memory_kb()),
            sched: sched::Sched::new(),
            orders: checkpoint::Orders::default(),
            balancer: Mutex::new(balance::State::default()),
            dsm: dsm::Dsm::default(),
            sems: sync::Sems::default(),
            links: Mutex::new(HashMap::new()),
            ports: streams::Ports::default(),
            moving: streams::Moving::default(),
            child_ends: children::Ends::default(),
            fifos: fifo::Fifos::default(),
            unix: unix::UnixNames::default(),
            parked: parked::Parked::default(),
            forwarders: Default::default(),
            cpus,
            cfg,
        })
    }

    pub fn node_id(&self) -> u32 {
        self.cfg.node_id
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, ProcTable> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn members(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Member>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node's own line of `krg status`.
    pub fn self_status(&self) -> NodeStatus {
        let (total, free) = *self.mem.lock().unwrap_or_else(|e| e.into_inner());
        NodeStatus {
            id: self.cfg.node_id,
            address: self.cfg.advertise.to_string(),
            up: true,
            cpus: self.cpus,
            load: self.load.lock().unwrap_or_else(|e| e.into_inner()).get(),
            mem_total_kb: total,
            mem_free_kb: free,
            processes: *self.nprocs.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    fn known(&self) -> Vec<(u32, SocketAddr)> {
        let mut v: Vec<(u32, SocketAddr)> =
            self.members().iter().map(|(id, m)| (*id, m.addr)).collect();
        v.push((self.cfg.node_id, self.cfg.advertise));
        v
    }

    fn learn(&self, known: &[(u32, SocketAddr)]) {
        let mut m = self.members();
        for (id, addr) in known {
            if *id == self.cfg.node_id || *id == 0 || *id > gpid::MAX_NODE {
                continue;
            }
            m.entry(*id).or_insert_with(|| {
                info!("learnt of node {id} at {addr}");
                Member::new(*addr)
            });
        }
    }

    /// A heartbeat arrived from a peer.
    fn on_heartbeat(&self, hb: Heartbeat) -> Heartbeat {
        let id = hb.from.id;
        if id != self.cfg.node_id && id != 0 && id <= gpid::MAX_NODE {
            let addr = hb.from.address.parse().ok();
            let mut m = self.members();
            let e = m.entry(id).or_insert_with(|| {
                info!("node {id} joined from {}", hb.from.address);
                Member::new(addr.unwrap_or(self.cfg.advertise))
            });
            if let Some(a) = addr {
                e.addr = a;
            }
            if !e.up() {
                info!("node {id} is up");
            }
            e.last_seen = Some(Instant::now());
            e.status = Some(hb.from);
        }
        self.learn(&hb.known);
        Heartbeat {
            from: self.self_status(),
            known: self.known(),
            sched: self.sched_version(),
        }
    }

    /// An authenticated client for node `id`, connecting if needed.
    async fn client(&self, id: u32) -> Result<PeerClient, ErrorReply> {
        let addr = {
            let m = self.members();
            let mem = m.get(&id).ok_or_else(|| {
                err(
                    libc::ESRCH,
                    format!("node {id} is not a member of the cluster"),
                )
            })?;
            if let Some(c) = &mem.client {
                return Ok(c.clone());
            }
            mem.addr
        };
        let (got, c) = peer::connect(addr, &self.cfg.key, self.cfg.node_id)
            .await
            .map_err(|e| err(libc::EHOSTUNREACH, format!("node {id} at {addr}: {e}")))?;
        if got != id {
            return Err(err(
                libc::EHOSTUNREACH,
                format!("{addr} answered as node {got}, expected node {id}"),
            ));
        }
        if let Some(mem) = self.members().get_mut(&id) {
            mem.client = Some(c.clone());
        }
        Ok(c)
    }

    /// The shared-memory link to node `id`, connecting if needed.
    async fn dsm_link(&self, id: u32) -> Result<Arc<dsm::link::Link>, ErrorReply> {
        let addr = {
            let l = self.links.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(k) = l.get(&id).filter(|k| !k.is_dead()) {
                return Ok(k.clone());
            }
            drop(l);
            self.members().get(&id).map(|m| m.addr).ok_or_else(|| {
                err(
                    libc::ESRCH,
                    format!("node {id} is not a member of the cluster"),
                )
            })?
        };
        let k = dsm::link::Link::connect(addr, &self.cfg.key, self.cfg.node_id, id)
            .await
            .map_err(|e| err(libc::EHOSTUNREACH, format!("node {id} at {addr}: {e}")))?;
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, k.clone());
        Ok(k)
    }

    fn drop_client(&self, id: u32) {
        if let Some(m) = self.members().get_mut(&id) {
            m.client = None;
        }
    }

    /// A call to node `node` (`what`: "key home", say) failed on the way:
    /// its client is dropped (the next call connects again) and the
    /// caller gets `EIO` naming it.
    pub(crate) fn peer_lost(&self, node: u32, what: &str, e: impl std::fmt::Display) -> ErrorReply {
        self.drop_client(node);
        err(libc::EIO, format!("{what} node {node}: {e}"))
    }

    fn up_peers(&self) -> Vec<u32> {
        self.members()
            .iter()
            .filter(|(_, m)| m.up())
            .map(|(id, _)| *id)
            .collect()
    }

    fn is_up(&self, id: u32) -> bool {
        self.members().get(&id).is_some_and(|m| m.up())
    }

    /// Whether a request about one of its processes may go to node `id`.
    fn may_reach(&self, id: u32) -> bool {
        self.members().get(&id).is_some_and(|m| m.reachable())
    }

    /// One round of heartbeats to every known member and pending address.
    fn heartbeat_round(self: &Arc<Self>) {
        let hb = Heartbeat {
            from: self.self_status(),
            known: self.known(),
            sched: self.sched_version(),
        };
        let pending: Vec<SocketAddr> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for addr in pending {
            let me = self.clone();
            tokio::spawn(async move {
                match peer::connect(addr, &me.cfg.key, me.cfg.node_id).await {
                    Ok((id, c)) => {
                        me.pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .retain(|a| *a != addr);
                        let mut m = me.members();
                        let e = m.entry(id).or_insert_with(|| Member::new(addr));
                        e.addr = addr;
                        e.client = Some(c);
                        info!("connected to node {id} at {addr}");
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                        warn!("peer {addr}: {e}")
                    }
                    Err(e) => debug!("peer {addr} not reachable yet: {e}"),
                }
            });
        }
        let ids: Vec<u32> = {
            let mut m = self.members();
            m.iter_mut()
                .filter(|(_, mem)| !mem.busy)
                .map(|(id, mem)| {
                    mem.busy = true;
                    *id
                })
                .collect()
        };
        for id in ids {
            let me = self.clone();
            let hb = hb.clone();
            tokio::spawn(async move {
                let res = match me.client(id).await {
                    Ok(c) => {
                        let mut cx = context::current();
                        cx.deadline = Instant::now() + Duration::from_millis(1000);
                        c.heartbeat(cx, hb).await.map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.msg),
                };
                match res {
                    Ok(reply) if reply.from.id == id => {
                        me.learn(&reply.known);
                        me.sched_sync(id, reply.sched);
                        let mut m = me.members();
                        if let Some(mem) = m.get_mut(&id) {
                            if !mem.up() {
                                info!("node {id} is up");
                            }
                            mem.last_seen = Some(Instant::now());
                            mem.status = Some(reply.from);
                            mem.busy = false;
                        }
                    }
                    other => {
                        if let Err(e) = &other {
                            debug!("heartbeat to node {id} failed: {e}");
                        }
                        me.drop_client(id);
                        let mut m = me.members();
                        if let Some(mem) = m.get_mut(&id) {
                            mem.busy = false;
                        }
                    }
                }
            });
        }
    }

    /// Where a new program of local kernel pid `kpid` should run: the
    /// scheduler's choice (a pin first, if that node is up).
    fn placement(&self, kpid: i32, pinned: Option<u32>) -> u32 {
        if pinned.is_none() && self.sched.is_local() {
            // The default policy: no need to read the program's /proc files
            // on every exec of every SSI process.
            return self.cfg.node_id;
        }
        let argv: Vec<String> = std::fs::read(format!("/proc/{kpid}/cmdline"))
            .map(|b| {
                b.split(|c| *c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let exe = std::fs::read_link(format!("/proc/{kpid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        self.placement_of(kpid, pinned, exe, argv)
    }

    /// [`Agent::placement`] of program `exe` with `argv` (not exec'd yet).
    fn placement_of(&self, kpid: i32, pinned: Option<u32>, exe: String, argv: Vec<String>) -> u32 {
        if pinned.is_none() && self.sched.is_local() {
            return self.cfg.node_id;
        }
        let uid = procs::read_uids(kpid).map(|u| u[0]).unwrap_or(u32::MAX);
        self.place(&sched::PlaceRequest {
            origin_node: self.cfg.node_id,
            uid,
            exe,
            argv,
            pinned,
        })
    }

    /// Every node of the cluster, this one first.
    pub fn status(&self) -> Vec<NodeStatus> {
        let mut v = vec![self.self_status()];
        for (id, m) in self.members().iter() {
            let mut s = m.status.clone().unwrap_or(NodeStatus {
                id: *id,
                address: m.addr.to_string(),
                up: false,
                cpus: 0.0,
                load: 0.0,
                mem_total_kb: 0,
                mem_free_kb: 0,
                processes: 0,
            });
            s.id = *id;
            s.up = m.up();
            if !s.up {
                s.load = 0.0;
                s.processes = 0;
            }
            v.push(s);
        }
        v.sort_by_key(|s| s.id);
        v
    }

    /// Every SSI process of the cluster (nodes that do not answer in time
    /// are left out).
    pub async fn ps(&self) -> Vec<ProcInfo> {
        let mut all = self.procs().ps();
        let calls = self.up_peers().into_iter().map(|id| async move {
            match self.client(id).await {
                Ok(c) => match c.procs(ctx()).await {
                    Ok(v) => v,
                    Err(e) => {
                        warn!("ps: node {id} did not answer: {e}");
                        self.drop_client(id);
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
    fn owner(&self, pid: i32) -> Result<u32, ErrorReply> {
        let node = gpid::node_of(pid).ok_or_else(|| {
            err(
                libc::ESRCH,
                format!("{pid} is not a cluster pid (no SSI process has it)"),
            )
        })?;
        if node != self.cfg.node_id && !self.may_reach(node) {
            let known = self.members().contains_key(&node);
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

    async fn kill_one(&self, pid: i32, sig: i32, uid: u32) -> Result<(), ErrorReply> {
        self.owner(pid)?;
        self.kill_routed(pid, sig, uid, 0).await
    }

    /// Deliver to a gpid wherever it runs: here, where this node knows it
    /// went (it is its origin, or holds its shadow), else ask its origin.
    async fn kill_routed(&self, g: i32, sig: i32, uid: u32, hops: u8) -> Result<(), ErrorReply> {
        if hops > 3 {
            return Err(err(
                libc::ESRCH,
                format!("pid {g}: lost while routing the signal"),
            ));
        }
        let me = self.cfg.node_id;
        let target = {
            let t = self.procs();
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
        if !self.may_reach(target) {
            return Err(err(
                libc::ESRCH,
                format!("pid {g}: its node {target} is down"),
            ));
        }
        let c = self.client(target).await?;
        c.kill(ctx(), g, sig, uid, hops + 1).await.map_err(|e| {
            self.drop_client(target);
            err(libc::EHOSTUNREACH, format!("pid {g}: node {target}: {e}"))
        })?
    }

    async fn kill_group(&self, pgid: i32, sig: i32, uid: u32) -> Result<(), ErrorReply> {
        let mut total = self.procs().kill_group(pgid, sig, uid);
        let calls = self.up_peers().into_iter().map(|id| async move {
            match self.client(id).await {
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

    fn cap_get_local(&self, g: i32) -> Result<CapsInfo, ErrorReply> {
        let t = self.procs();
        let p = t
            .get(g)
            .ok_or_else(|| err(libc::ESRCH, format!("pid {g}: no such process")))?;
        Ok(CapsInfo {
            gpid: g,
            effective: p.caps_eff.0,
            inheritable: p.caps_inh.0,
        })
    }

    fn cap_set_local(
        &self,
        g: i32,
        spec: &str,
        eff: bool,
        inh: bool,
        uid: u32,
    ) -> Result<CapsInfo, ErrorReply> {
        let mut t = self.procs();
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

    /// Serve one request from the local socket, with the descriptors its
    /// answer carries (`ShmAttach`).
    pub async fn handle_local_fds(
        self: &Arc<Self>,
        req: Request,
        who: Caller,
    ) -> (Response, Vec<std::os::fd::OwnedFd>) {
        match req {
            Request::ShmAttach {
                shmid,
                rdonly,
                inherited,
                need_uffd,
            } => match self
                .shm_attach(who, shmid, rdonly, inherited, need_uffd)
                .await
            {
                Ok(r) => r,
                Err(e) => (Response::Err(e), Vec::new()),
            },
            Request::ShmFd { shmid, write } => match self.shm_fd(who, shmid, write).await {
                Ok(r) => r,
                Err(e) => (Response::Err(e), Vec::new()),
            },
            Request::FifoOpen {
                path,
                dev,
                ino,
                write,
                nonblock,
            } => match self
                .fifo_open(fifo::FifoKey { path, dev, ino }, write, nonblock)
                .await
            {
                Ok(r) => r,
                Err(e) => (Response::Err(e), Vec::new()),
            },
            Request::UnixListen { path, dev, ino } => {
                match self
                    .unix_listen(who, fifo::FifoKey { path, dev, ino })
                    .await
                {
                    Ok(r) => (r, Vec::new()),
                    Err(e) => (Response::Err(e), Vec::new()),
                }
            }
            Request::UnixConnect {
                path,
                dev,
                ino,
                pair,
            } => {
                match self
                    .unix_connect(who, fifo::FifoKey { path, dev, ino }, pair)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => (Response::Err(e), Vec::new()),
                }
            }
            Request::UnixTake { id, pair } => match self.unix_take(who, id, pair).await {
                Ok(r) => r,
                Err(e) => (Response::Err(e), Vec::new()),
            },
            Request::StreamAwait { id } => match self.stream_await(id).await {
                Ok(r) => r,
                Err(e) => (Response::Err(e), Vec::new()),
            },
            Request::TakeForwarded { port } => match self.take_forwarded(port).await {
                Ok(r) => r,
                Err(e) => (Response::Err(e), Vec::new()),
            },
            Request::Unpark { id } => match self.unpark(who, id) {
                Ok(r) => r,
                Err(e) => (Response::Err(e), Vec::new()),
            },
            Request::StreamAttach {
                id,
                node,
                pending,
                wr_shut,
                pipe,
                pair,
            } => match async {
                let pair = pair.map(|p| seqpacket::take_pair(who.pid, p)).transpose()?;
                self.stream_attach_with(id, node, pending, wr_shut, pipe, pair)
                    .await
            }
            .await
            {
                Ok(r) => r,
                Err(e) => (Response::Err(e), Vec::new()),
            },
            req => (self.handle_local(req, who).await, Vec::new()),
        }
    }

    /// Serve one request from the local socket.
    pub async fn handle_local(self: &Arc<Self>, req: Request, who: Caller) -> Response {
        match self.handle_local_inner(req, who).await {
            Ok(r) => r,
            Err(e) => Response::Err(e),
        }
    }

    async fn handle_local_inner(
        self: &Arc<Self>,
        req: Request,
        who: Caller,
    ) -> Result<Response, ErrorReply> {
        let need_pid = || {
            if who.pid > 0 {
                Ok(who.pid)
            } else {
                Err(err(
                    libc::EPERM,
                    "caller is not visible in this node's pid namespace",
                ))
            }
        };
        match req {
            Request::Hello {
                version,
                caps_env,
                pinned,
            } => {
                if version != libkrg::proto::PROTO_VERSION {
                    return Err(err(
                        libc::EPROTO,
                        format!(
                            "protocol version {version} (agent speaks {})",
                            libkrg::proto::PROTO_VERSION
                        ),
                    ));
                }
                let kpid = need_pid()?;
                // A new program: the old one's segment attachments are gone.
                self.shm_forget(kpid);
                let (gpid, caps, skip) = {
                    let mut t = self.procs();
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
                    self.placement(kpid, pinned)
                };
                let place = self.place_or_stay(gpid, kpid, place).await;
                Ok(Response::Hello {
                    gpid,
                    node: self.cfg.node_id,
                    caps: caps.0,
                    place: if place == self.cfg.node_id { 0 } else { place },
                    spread: !self.sched.is_local(),
                })
            }
            Request::PlaceExec {
                exe,
                argv,
                caps_env,
                pinned,
            } => {
                let kpid = need_pid()?;
                // The caps the new program will have (its KRG_CAPS).
                let (gpid, caps) = {
                    let mut t = self.procs();
                    let p = t.register(kpid, Some(caps_env))?;
                    (p.gpid, p.caps_eff)
                };
                let place = if caps.contains(Caps::DISTANT_FORK) {
                    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                    self.placement_of(kpid, pinned, s(&exe), argv.iter().map(|a| s(a)).collect())
                } else {
                    0
                };
                let place = self.place_or_stay(gpid, kpid, place).await;
                let remote = place != 0 && place != self.cfg.node_id;
                if let Some(p) = self.procs().get_mut(gpid) {
                    // Here: its Hello is not placed again.
                    p.skip_place = !remote;
                }
                Ok(Response::Hello {
                    gpid,
                    node: self.cfg.node_id,
                    caps: caps.0,
                    place: if remote { place } else { 0 },
                    spread: !self.sched.is_local(),
                })
            }
            Request::RemoteExec(spec) => Ok(Response::Pid(self.remote_exec(who, spec).await?)),
            Request::ShmGet { key, size, flags } => self.shm_get(who, key, size, flags).await,
            Request::ShmAttach { .. } => Err(err(
                libc::EINVAL,
                "ShmAttach answers with descriptors: not on this path",
            )),
            Request::ShmMapped {
                shmid,
                addr,
                len,
                off,
                uffd,
                ..
            } => self.shm_mapped(who, shmid, addr, len, off, uffd),
            Request::ShmFutex { shmid, offset, len } => self.shm_futex(who, shmid, offset, len),
            Request::ShmOpen {
                name,
                oflag,
                mode,
                size,
                init,
            } => self.shm_open(who, name, oflag, mode, size, init).await,
            Request::ShmUnlink { name } => self.shm_unlink(who, name).await,
            Request::ShmResize { shmid, size } => self.shm_resize(who, shmid, size).await,
            Request::ShmFd { .. } => Err(err(
                libc::EINVAL,
                "ShmFd answers with a descriptor: not on this path",
            )),
            Request::ShmDetach { shmid, addr } => Ok(self.shm_detach(who, shmid, addr).await),
            Request::ShmCtl { shmid, cmd, set } => self.shm_ctl(who, shmid, cmd, set).await,
            Request::Ipcs => Ok(self.ipcs().await),
            Request::SemGet { key, nsems, flags } => self.sem_get(who, key, nsems, flags).await,
            Request::SemOp {
                semid,
                ops,
                timeout_ns,
            } => self.sem_op(who, semid, ops, timeout_ns).await,
            Request::SemCtl {
                semid,
                num,
                cmd,
                val,
                array,
                set,
            } => self.sem_ctl(who, semid, num, cmd, val, array, set).await,
            Request::PortBind { port, reuse } => self.port_bind(who, port, reuse).await,
            Request::PortOwner { port, from, v6 } => self.port_owner(port, from, v6).await,
            Request::LoopbackPeer { ip, from, port } => {
                Ok(Response::LoopbackPeer(self.loopback_peer(ip, from, port)))
            }
            Request::NodeAddrs => Ok(self.node_addrs()),
            Request::StreamFreeze {
                conns,
                pipes,
                unix,
                optional,
            } => self.stream_freeze(who, conns, pipes, unix, optional).await,
            Request::StreamFrozen { ids } => self.stream_frozen(&ids),
            Request::SharedWith { links, mems, files } => {
                self.shared_with(who, links, mems, files).await
            }
            Request::ShadowRelays(relays) => self.shadow_relays(who, relays).await,
            Request::MovedChildren => self.moved_children(who),
            Request::ChildShadow { gpid } => self.child_shadow(who, gpid).await,
            Request::ChildExited { kpid, status } => self.child_exited(who, kpid, status).await,
            Request::StreamDrained {
                id,
                pending,
                wr_shut,
                pair,
            } => self.stream_drained(who, id, pending, wr_shut, pair),
            Request::Park { fd, moving } => self.park(who, fd, moving),
            Request::ForwardParked { id, node } => self.forward_parked(who, id, node),
            Request::FifoStand { path, dev, ino } => {
                self.fifo_stand(who.pid, fifo::FifoKey { path, dev, ino })
                    .await
            }
            Request::StreamAwait { .. }
            | Request::Unpark { .. }
            | Request::TakeForwarded { .. }
            | Request::StreamAttach { .. }
            | Request::FifoOpen { .. }
            | Request::UnixListen { .. }
            | Request::UnixConnect { .. }
            | Request::UnixTake { .. } => Err(err(
                libc::EINVAL,
                "a stream descriptor request needs the descriptor-passing path",
            )),
            Request::Ensure { kpid } => {
                let me = need_pid()?;
                if kpid != me {
                    let st = procs::read_stat(kpid).ok_or_else(|| {
                        err(libc::ESRCH, format!("no process with kernel pid {kpid}"))
                    })?;
                    if st.ppid != me {
                        return Err(err(
                            libc::EPERM,
                            format!("kernel pid {kpid} is neither the caller nor its child"),
                        ));
                    }
                }
                Ok(Response::Pid(self.procs().register(kpid, None)?.gpid))
            }
            Request::Translate { kpid } => {
                let t = self.procs();
                // A program started here for a shadow elsewhere has the
                // agent as its kernel parent: it sees its shadow's parent.
                if let Some(v) = t.translate(who.pid).and_then(|g| {
                    let p = t.get(g)?;
                    let st = procs::read_stat(who.pid)?;
                    (kpid == st.ppid).then_some(p.vppid).flatten()
                }) {
                    if v > 0 {
                        return Ok(Response::Pid(v));
                    }
                }
                Ok(Response::Pid(t.translate(kpid).unwrap_or(kpid)))
            }
            Request::TranslateGroup { kpgid } => Ok(Response::Pid(self.procs().group_gpid(kpgid))),
            Request::Resolve { gpid: g } => {
                let k = self.procs().resolve(g).ok_or_else(|| {
                    err(
                        libc::ESRCH,
                        format!("pid {g}: not on node {}", self.cfg.node_id),
                    )
                })?;
                Ok(Response::Pid(k))
            }
            Request::ResolveRunning { gpid: g } => {
                Ok(Response::Pid(self.procs().resolve_running(g)?))
            }
            Request::Kill { pid, sig } => {
                if !(0..=64).contains(&sig) {
                    return Err(err(libc::EINVAL, format!("invalid signal {sig}")));
                }
                if pid > 0 {
                    self.kill_one(pid, sig, who.uid).await?;
                } else if pid < -1 {
                    self.kill_group(-pid, sig, who.uid).await?;
                } else {
                    return Err(err(
                        libc::EINVAL,
                        format!("kill({pid}): the library handles 0 and -1 locally"),
                    ));
                }
                Ok(Response::Ok)
            }
            Request::Ps => Ok(Response::Ps(self.ps().await)),
            Request::Status => Ok(Response::Status(self.status())),
            Request::CapGet { gpid: g } => {
                let node = self.owner(g)?;
                if node == self.cfg.node_id {
                    return Ok(Response::Caps(self.cap_get_local(g)?));
                }
                let c = self.client(node).await?;
                let r = c
                    .cap_get(ctx(), g)
                    .await
                    .map_err(|e| err(libc::EHOSTUNREACH, format!("node {node}: {e}")))??;
                Ok(Response::Caps(r))
            }
            Request::CapSet {
                gpid: g,
                spec,
                effective,
                inheritable,
            } => {
                Caps::apply(Caps::NONE, &spec).map_err(|e| err(libc::EINVAL, e.to_string()))?;
                let node = self.owner(g)?;
                if node == self.cfg.node_id {
                    return Ok(Response::Caps(self.cap_set_local(
                        g,
                        &spec,
                        effective,
                        inheritable,
                        who.uid,
                    )?));
                }
                let c = self.client(node).await?;
                let r = c
                    .cap_set(ctx(), g, spec, effective, inheritable, who.uid)
                    .await
                    .map_err(|e| err(libc::EHOSTUNREACH, format!("node {node}: {e}")))??;
                Ok(Response::Caps(r))
            }
            Request::SchedGet => Ok(Response::Sched(self.sched_info())),
            Request::SchedSet { name, source } => {
                Ok(Response::Sched(self.sched_set(name, source, who).await?))
            }
            Request::SchedPlace {
                count,
                exe,
                argv,
                pinned,
            } => Ok(Response::Placed(
                self.sched_place(count, exe, argv, pinned, who)?,
            )),
            Request::SchedBalance { name } => {
                Ok(Response::Sched(self.sched_balance(name, who).await?))
            }
            Request::Whoami => {
                let kpid = need_pid()?;
                let t = self.procs();
                let g = t.translate(kpid).ok_or_else(|| {
                    err(
                        libc::ESRCH,
                        format!("kernel pid {kpid} is not an SSI process"),
                    )
                })?;
                drop(t);
                let mut t = self.procs();
                let caps = match t.get_mut(g) {
                    Some(p) => {
                        p.restoring = false;
                        p.caps_eff.0
                    }
                    None => 0,
                };
                Ok(Response::Hello {
                    gpid: g,
                    node: self.cfg.node_id,
                    caps,
                    place: 0,
                    spread: !self.sched.is_local(),
                })
            }
            Request::Checkpoint { pid, dir, kill } => {
                let order = libkrg::proto::CkptOrder {
                    action: libkrg::proto::CkptAction::Checkpoint,
                    path: dir,
                    kill,
                    node: 0,
                    streams: Vec::new(),
                    precopy: false,
                };
                Ok(Response::Ckpt(
                    self.checkpoint(pid, order, who.uid, 0).await?,
                ))
            }
            Request::Migrate { pid, node, precopy } => {
                let order = libkrg::proto::CkptOrder::migrate(node, precopy);
                Ok(Response::Ckpt(
                    self.checkpoint(pid, order, who.uid, 0).await?,
                ))
            }
            Request::CkptOrder => Ok(Response::CkptOrder(self.ckpt_order(who))),
            Request::CkptDone { ok, msg, bytes } => {
                self.ckpt_done(who, ok, msg, bytes);
                Ok(Response::Ok)
            }
            Request::Restart(req) => Ok(Response::Ckpt(self.restart(who, req).await?)),
        }
    }
}

/// The tarpc face of the agent.
#[derive(Clone, Debug)]
pub struct PeerServer(pub Arc<Agent>);

impl Peer for PeerServer {
    async fn heartbeat(self, _: context::Context, hb: Heartbeat) -> Heartbeat {
        let (from, version) = (hb.from.id, hb.sched);
        let reply = self.0.on_heartbeat(hb);
        if from != self.0.node_id() {
            self.0.sched_sync(from, version);
        }
        reply
    }

    async fn procs(self, _: context::Context) -> Vec<ProcInfo> {
        self.0.procs().ps()
    }

    async fn kill(
        self,
        _: context::Context,
        g: i32,
        sig: i32,
        uid: u32,
        hops: u8,
    ) -> Result<(), ErrorReply> {
        if !(0..=64).contains(&sig) {
            return Err(err(libc::EINVAL, format!("invalid signal {sig}")));
        }
        self.0.kill_routed(g, sig, uid, hops.max(1)).await
    }

    async fn kill_group(self, _: context::Context, pgid: i32, sig: i32, uid: u32) -> GroupKill {
        if !(0..=64).contains(&sig) {
            return GroupKill::default();
        }
        let (found, sent, error) = self.0.procs().kill_group(pgid, sig, uid);
        GroupKill { found, sent, error }
    }

    async fn cap_get(self, _: context::Context, g: i32) -> Result<CapsInfo, ErrorReply> {
        self.0.cap_get_local(g)
    }

    async fn cap_set(
        self,
        _: context::Context,
        g: i32,
        spec: String,
        eff: bool,
        inh: bool,
        uid: u32,
    ) -> Result<CapsInfo, ErrorReply> {
        self.0.cap_set_local(g, &spec, eff, inh, uid)
    }

    async fn spawn(
        self,
        _: context::Context,
        spec: remote::SpawnSpec,
    ) -> Result<(i32, i32), ErrorReply> {
        self.0.spawn_here(spec).await
    }

    async fn checkpoint(
        self,
        _: context::Context,
        g: i32,
        order: libkrg::proto::CkptOrder,
        uid: u32,
        hops: u8,
    ) -> Result<libkrg::proto::CkptDoneInfo, ErrorReply> {
        self.0.checkpoint(g, order, uid, hops).await
    }

    async fn set_location(self, _: context::Context, g: i32, node: u32) {
        self.0.procs().set_location(g, node);
    }

    async fn child_exited(self, _: context::Context, g: i32, status: i32) {
        self.0.child_ended(g, status);
    }

    async fn fifo_meet(
        self,
        _: context::Context,
        key: fifo::FifoKey,
        node: u32,
        write: bool,
        nonblock: bool,
    ) -> Result<fifo::FifoMatch, ErrorReply> {
        self.0.fifo_meet(key, node, write, nonblock).await
    }

    async fn fifo_expect(self, _: context::Context, id: u64) {
        self.0.expect_connection(id, true);
    }

    async fn fifo_stand(self, _: context::Context, key: fifo::FifoKey, node: u32) {
        self.0.fifo_stand_at_home(key, node).await;
    }

    async fn fifo_feed(self, _: context::Context, key: fifo::FifoKey, id: u64) -> bool {
        self.0.fifo_feed(key, id).await
    }

    async fn fifo_reader_here(self, _: context::Context, key: fifo::FifoKey) -> bool {
        self.0.fifo_reader_here(&key)
    }

    async fn unix_name_set(self, _: context::Context, key: fifo::FifoKey, node: u32) {
        self.0.unix_name_set(key, node);
    }

    async fn unix_name_owner(self, _: context::Context, key: fifo::FifoKey) -> Option<u32> {
        self.0.unix_name_owner(&key)
    }

    async fn unix_stand_in(
        self,
        _: context::Context,
        key: fifo::FifoKey,
        uid: u32,
        gids: Vec<u32>,
        seqpacket: bool,
    ) -> Result<u64, ErrorReply> {
        self.0.unix_stand_in(key, uid, gids, seqpacket).await
    }

    // --- scheduling ---
    async fn sched_get(self, _: context::Context) -> sched::SchedPolicy {
        self.0.sched_policy()
    }

    async fn dsm_home(
        self,
        _: context::Context,
        op: dsm::HomeOp,
    ) -> Result<dsm::HomeReply, ErrorReply> {
        self.0.home_op(op).await
    }

    async fn sem_home(
        self,
        _: context::Context,
        op: sync::SemHomeOp,
    ) -> Result<sync::SemReply, ErrorReply> {
        self.0.sem_home_op(op).await
    }

    async fn port_home(
        self,
        _: context::Context,
        op: streams::PortOp,
    ) -> Result<Option<u32>, ErrorReply> {
        self.0.port_home_op(op).await
    }

    async fn port_probe(self, _: context::Context, port: u16, reuse: bool) -> bool {
        self.0.port_probe(port, reuse).await
    }

    async fn loopback_peer(self, _: context::Context, ip: [u8; 4], from: u16, port: u16, v6: bool) {
        self.0.note_loopback_peer(ip, from, port, v6);
    }

    async fn stream_hold(
        self,
        _: context::Context,
        ends: Vec<streams::End>,
        commit: bool,
    ) -> Result<Vec<libkrg::proto::StreamPeer>, ErrorReply> {
        self.0.stream_hold(ends, commit).await
    }

    async fn stream_call_off(self, _: context::Context, ids: Vec<u64>) {
        self.0.call_off(&ids)
    }

    async fn sched_push(
        self,
        _: context::Context,
        policy: sched::SchedPolicy,
    ) -> Result<libkrg::proto::SchedInfo, ErrorReply> {
        let from = policy.version.node;
        self.0.sched_receive(policy, from)
    }
}

/// Run the agent until it is killed.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state dir {}", cfg.state_dir.display()))?;
    let agent = Agent::new(cfg);
    let listener = tokio::net::TcpListener::bind(agent.cfg.listen)
        .await
        .with_context(|| format!("listening on {}", agent.cfg.listen))?;
    let local = local::bind(&agent.cfg.sock)?;
    std::fs::write(
        agent.cfg.state_dir.join("krg-node.pid"),
        format!("{}\n", std::process::id()),
    )
    .with_context(|| format!("writing pid file in {}", agent.cfg.state_dir.display()))?;
    info!(
        "node {} listening on {} (advertised {}), local socket {}, {} cpus",
        agent.cfg.node_id,
        agent.cfg.listen,
        agent.cfg.advertise,
        agent.cfg.sock.display(),
        agent.cpus
    );

    // Peers.
    let a = agent.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept on {}: {e}", a.cfg.listen);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let a = a.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                match auth::server(&mut s, &a.cfg.key, a.cfg.node_id).await {
                    Ok(id) => {
                        use tokio::io::AsyncReadExt;
                        let mut ch = [0u8; 1];
                        let got =
                            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ch))
                                .await;
                        match (got, ch[0]) {
                            (Ok(Ok(_)), dsm::link::CHANNEL_TARPC) => {
                                debug!("node {id} connected from {addr}");
                                peer::serve(s, PeerServer(a)).await;
                            }
                            (Ok(Ok(_)), dsm::link::CHANNEL_DSM) => {
                                debug!("node {id}: shared memory link from {addr}");
                                dsm::link::serve(s, a, id).await;
                            }
                            (Ok(Ok(_)), dsm::link::CHANNEL_DSM_FAULTS) => {
                                debug!("node {id}: fault connection from {addr}");
                                dsm::link::serve_faults(s, a, id);
                            }
                            (Ok(Ok(_)), streams::CHANNEL_STREAM) => {
                                debug!("node {id}: stream hand-over from {addr}");
                                a.stream_accept(s, id).await;
                            }
                            (Ok(Ok(_)), c) => warn!("node {id} at {addr}: unknown channel {c}"),
                            _ => warn!("node {id} at {addr}: no channel chosen"),
                        }
                    }
                    Err(e) => warn!("refused connection from {addr}: {e}"),
                }
            });
        }
    });

    // The load balancer.
    let a = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(balance::EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            a.balance_round();
        }
    });

    // Heartbeats.
    let a = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            a.heartbeat_round();
        }
    });

    // Probes and the process-table sweep, off the async threads.
    let a = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1000));
        loop {
            tick.tick().await;
            let a2 = a.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let runnable = probe::runnable_tasks();
                a2.load
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .update(runnable, a2.cpus);
                let n = {
                    let mut t = a2.procs();
                    t.sweep();
                    t.live_count()
                };
                *a2.nprocs.lock().unwrap_or_else(|e| e.into_inner()) = n;
                *a2.mem.lock().unwrap_or_else(|e| e.into_inner()) = probe::memory_kb();
            })
            .await;
        }
    });

    local::serve(agent, local).await
}
