//! The krg agent, one per host: membership and heartbeats with the other
//! agents (tarpc over TCP, key-authenticated), and the routing of each
//! request of the local socket (application processes and `krg`) to the
//! subsystem that answers it; peers' calls are answered in `peer_server`.
//! See docs/architecture/agent.md.

pub mod balance;
pub mod checkpoint;
pub mod children;
pub mod config;
pub mod dsm;
pub mod fifo;
pub mod local;
pub mod parked;
pub mod peer;
mod peer_server;
pub mod probe;
pub mod procs;
pub mod remote;
pub mod sched;
pub mod seqpacket;
pub mod stay;
pub mod streams;
pub mod sync;
#[allow(unsafe_code)]
mod sys;
pub mod unix;

use crate::agent::config::Config;
use crate::agent::peer::{Heartbeat, PeerClient};
use crate::agent::procs::ProcTable;
use libkrg::gpid;
use libkrg::proto::{ErrorReply, NodeStatus, Request, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
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

impl Caller {
    /// The caller's kernel pid, if this node's pid namespace shows it.
    pub(crate) fn kpid(&self) -> Result<i32, ErrorReply> {
        if self.pid > 0 {
            Ok(self.pid)
        } else {
            Err(err(
                libc::EPERM,
                "caller is not visible in this node's pid namespace",
            ))
        }
    }
}

/// An answer on the local socket, and the descriptors sent after it
/// (`SCM_RIGHTS`) when it announces some.
pub(crate) type Answer = (Response, Vec<OwnedFd>);

/// What a subsystem's `handle` gives back for a local request.
pub(crate) type Handled = Result<Response, ErrorReply>;

/// The same, for a subsystem whose answers may carry descriptors.
pub(crate) type Answered = Result<Answer, ErrorReply>;

/// An answer without descriptors.
fn bare(r: Response) -> Answer {
    (r, Vec::new())
}

/// A request handed to a subsystem that does not serve it (a mistake in
/// `Agent::handle_local`'s routing).
pub(crate) fn misrouted(req: &Request) -> ErrorReply {
    let name = format!("{req:?}");
    let name = name.split([' ', '(', '{']).next().unwrap_or_default();
    err(
        libc::EINVAL,
        format!("{name}: routed to the wrong subsystem"),
    )
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
    ErrorReply::other(errno, msg)
}

pub(crate) fn sock_err(what: &str, e: std::io::Error) -> ErrorReply {
    err(libc::EIO, format!("{what}: {e}"))
}

/// A failed system call's error as an answer, with its errno.
pub(crate) fn os_err(e: std::io::Error) -> ErrorReply {
    err(crate::sys::errno(&e).unwrap_or(libc::EIO), e.to_string())
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

    /// A heartbeat arrived from a peer: it is up, and its scheduling
    /// policy is fetched if newer.
    fn on_heartbeat(self: &Arc<Self>, hb: Heartbeat) -> Heartbeat {
        let (id, version) = (hb.from.id, hb.sched);
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
        let reply = Heartbeat {
            from: self.self_status(),
            known: self.known(),
            sched: self.sched_version(),
        };
        if id != self.cfg.node_id {
            self.sched_sync(id, version);
        }
        reply
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

    /// Serve one request from the local socket: each subsystem answers
    /// its own requests (`handle` in its file). With the answer come the
    /// descriptors it announces, if any.
    pub async fn handle_local(self: &Arc<Self>, req: Request, who: Caller) -> Answer {
        use Request as R;
        let answer = match req {
            R::Hello { .. }
            | R::Whoami
            | R::Ensure { .. }
            | R::Translate { .. }
            | R::TranslateGroup { .. }
            | R::Resolve { .. }
            | R::ResolveRunning { .. }
            | R::Kill { .. }
            | R::Ps
            | R::CapGet { .. }
            | R::CapSet { .. } => procs::handle(self, req, who).await.map(bare),
            R::Status => Ok(bare(Response::Status(self.status()))),
            R::PlaceExec { .. } | R::RemoteExec(_) => {
                remote::handle(self, req, who).await.map(bare)
            }
            R::SchedGet | R::SchedSet { .. } | R::SchedPlace { .. } | R::SchedBalance { .. } => {
                sched::handle(self, req, who).await.map(bare)
            }
            R::MovedChildren | R::ChildShadow { .. } | R::ChildExited { .. } => {
                children::handle(self, req, who).await.map(bare)
            }
            R::Checkpoint { .. }
            | R::Migrate { .. }
            | R::CkptOrder
            | R::CkptDone { .. }
            | R::Restart(_)
            | R::SharedWith { .. } => checkpoint::handle(self, req, who).await.map(bare),
            R::ShmGet { .. }
            | R::ShmAttach { .. }
            | R::ShmMapped { .. }
            | R::ShmFutex { .. }
            | R::ShmOpen { .. }
            | R::ShmUnlink { .. }
            | R::ShmResize { .. }
            | R::ShmFd { .. }
            | R::ShmDetach { .. }
            | R::ShmCtl { .. }
            | R::Ipcs => dsm::handle(self, req, who).await,
            R::SemGet { .. } | R::SemOp { .. } | R::SemCtl { .. } => {
                sync::handle(self, req, who).await.map(bare)
            }
            R::PortBind { .. }
            | R::PortOwner { .. }
            | R::LoopbackPeer { .. }
            | R::NodeAddrs
            | R::StreamFreeze { .. }
            | R::StreamFrozen { .. }
            | R::StreamDrained { .. }
            | R::StreamAwait { .. }
            | R::StreamAttach { .. }
            | R::ShadowRelays(_) => streams::handle(self, req, who).await,
            R::Park { .. }
            | R::Unpark { .. }
            | R::ForwardParked { .. }
            | R::TakeForwarded { .. } => parked::handle(self, req, who).await,
            R::FifoOpen { .. } | R::FifoStand { .. } => fifo::handle(self, req, who).await,
            R::UnixListen { .. } | R::UnixConnect { .. } | R::UnixTake { .. } => {
                unix::handle(self, req, who).await
            }
        };
        answer.unwrap_or_else(|e| bare(Response::Err(e)))
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

    // Other agents.
    tokio::spawn(peer_server::accept(agent.clone(), listener));

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
