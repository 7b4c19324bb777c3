//! The core every subsystem shares: this node's configuration and
//! identity, the cluster's membership (heartbeats' bookkeeping, calls to
//! peers), the process table and the load probes. Subsystems hold an
//! `Arc<Node>`; none of them reaches another's state through it.

use super::common::{err, lock, Caller};
use super::config::Config;
use super::peer::{self, Heartbeat, PeerClient};
use super::probe;
use super::procs::table::ProcTable;
use libkrg::gpid;
use libkrg::proto::{ErrorReply, NodeStatus};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tarpc::context;
use tracing::{debug, info, warn};

/// A node silent for this long is shown `down` (well within the 3 s promise).
pub const DOWN_AFTER: Duration = Duration::from_millis(2000);
/// A request about a process of a node silent for less than this is still
/// sent (and fails after the call's deadline if the node is gone): a node
/// starved of CPU for a few seconds misses heartbeats while it runs on
/// (`krg kill` of its process failed at once, "its node 2 is down", in a
/// loaded test run), though `ps` and `status` show it down after 2 s.
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

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

    /// A heartbeat (or its reply) came from it.
    fn heard(&mut self, id: u32, status: NodeStatus) {
        if !self.up() {
            info!("node {id} is up");
        }
        self.last_seen = Some(Instant::now());
        self.status = Some(status);
    }
}

/// This node and what it knows of the cluster.
#[derive(Debug)]
pub struct Node {
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
}

impl Node {
    pub fn new(cfg: Config) -> Node {
        Node {
            cpus: probe::cpu_capacity(cfg.cpus),
            procs: Mutex::new(ProcTable::new(cfg.node_id)),
            members: Mutex::new(HashMap::new()),
            pending: Mutex::new(cfg.peers.clone()),
            load: Mutex::new(probe::LoadAvg::default()),
            nprocs: Mutex::new(0),
            mem: Mutex::new(probe::memory_kb()),
            cfg,
        }
    }

    pub fn node_id(&self) -> u32 {
        self.cfg.node_id
    }

    /// The CPU capacity the probes found (or `--cpus`).
    pub(crate) fn cpus(&self) -> f64 {
        self.cpus
    }

    /// The smoothed load (runnable threads per CPU).
    pub(crate) fn load(&self) -> f64 {
        lock(&self.load).get()
    }

    pub(crate) fn procs(&self) -> MutexGuard<'_, ProcTable> {
        lock(&self.procs)
    }

    /// The caller's gpid (its kernel pid if it has none).
    pub(crate) fn caller_gpid(&self, who: Caller) -> i32 {
        self.procs().translate(who.pid).unwrap_or(who.pid)
    }

    fn members(&self) -> MutexGuard<'_, HashMap<u32, Member>> {
        lock(&self.members)
    }

    /// The probes' round: load, memory, and the process table's sweep
    /// (blocking: it reads /proc).
    pub(crate) fn probe(&self) {
        let runnable = probe::runnable_tasks();
        lock(&self.load).update(runnable, self.cpus);
        let n = {
            let mut t = self.procs();
            t.sweep();
            t.live_count()
        };
        *lock(&self.nprocs) = n;
        *lock(&self.mem) = probe::memory_kb();
    }

    /// This node's own line of `krg status`.
    pub fn self_status(&self) -> NodeStatus {
        let (total, free) = *lock(&self.mem);
        NodeStatus {
            id: self.cfg.node_id,
            address: self.cfg.advertise.to_string(),
            up: true,
            cpus: self.cpus,
            load: self.load(),
            mem_total_kb: total,
            mem_free_kb: free,
            processes: *lock(&self.nprocs),
        }
    }

    pub(crate) fn known(&self) -> Vec<(u32, SocketAddr)> {
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

    /// A heartbeat arrived from a peer: it is up, and the members it
    /// knows are learnt.
    pub(crate) fn on_heartbeat(&self, hb: &Heartbeat) {
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
            e.heard(id, hb.from.clone());
        }
        self.learn(&hb.known);
    }

    /// The address node `id` was last heard at, if it is a member.
    pub(crate) fn member_addr(&self, id: u32) -> Option<SocketAddr> {
        self.members().get(&id).map(|m| m.addr)
    }

    /// The same, or `ESRCH` naming it.
    pub(crate) fn addr_of(&self, id: u32) -> Result<SocketAddr, ErrorReply> {
        self.member_addr(id).ok_or_else(|| {
            err(
                libc::ESRCH,
                format!("node {id} is not a member of the cluster"),
            )
        })
    }

    /// The members that are up, with their addresses.
    pub(crate) fn up_members(&self) -> Vec<(u32, SocketAddr)> {
        self.members()
            .iter()
            .filter(|(_, m)| m.up())
            .map(|(id, m)| (*id, m.addr))
            .collect()
    }

    /// An authenticated client for node `id`, connecting if needed.
    pub(crate) async fn client(&self, id: u32) -> Result<PeerClient, ErrorReply> {
        let addr = {
            let m = self.members();
            if let Some(c) = m.get(&id).and_then(|mem| mem.client.as_ref()) {
                return Ok(c.clone());
            }
            drop(m);
            self.addr_of(id)?
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

    pub(crate) fn drop_client(&self, id: u32) {
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

    pub(crate) fn up_peers(&self) -> Vec<u32> {
        self.up_members().into_iter().map(|(id, _)| id).collect()
    }

    pub(crate) fn is_up(&self, id: u32) -> bool {
        self.members().get(&id).is_some_and(|m| m.up())
    }

    /// Whether a request about one of its processes may go to node `id`.
    pub(crate) fn may_reach(&self, id: u32) -> bool {
        self.members().get(&id).is_some_and(|m| m.reachable())
    }

    /// Where the object of a System V key lives: the lowest node id this
    /// agent has known (down ones included), so that every node finds the
    /// same object for a key.
    pub(crate) fn key_home(&self) -> u32 {
        let m = self.members();
        m.keys()
            .copied()
            .chain(std::iter::once(self.node_id()))
            .min()
            .unwrap_or(self.node_id())
    }

    /// The home of a new or keyed object: here for IPC_PRIVATE.
    pub(crate) fn home_for_key(&self, key: i32) -> u32 {
        if key == libc::IPC_PRIVATE {
            self.node_id()
        } else {
            self.key_home()
        }
    }

    /// One round of heartbeats (`hb`) to every known member and pending
    /// address; `answered(id, reply)` is told each member's reply.
    pub(crate) fn heartbeat_round(
        self: &Arc<Self>,
        hb: Heartbeat,
        answered: impl Fn(u32, &Heartbeat) + Clone + Send + 'static,
    ) {
        let pending: Vec<SocketAddr> = lock(&self.pending).clone();
        for addr in pending {
            let me = self.clone();
            tokio::spawn(async move {
                match peer::connect(addr, &me.cfg.key, me.cfg.node_id).await {
                    Ok((id, c)) => {
                        lock(&me.pending).retain(|a| *a != addr);
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
            let answered = answered.clone();
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
                        answered(id, &reply);
                        if let Some(mem) = me.members().get_mut(&id) {
                            mem.heard(id, reply.from);
                            mem.busy = false;
                        }
                    }
                    other => {
                        if let Err(e) = &other {
                            debug!("heartbeat to node {id} failed: {e}");
                        }
                        me.drop_client(id);
                        if let Some(mem) = me.members().get_mut(&id) {
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
}
