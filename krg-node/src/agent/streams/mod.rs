//! Streams, the agent's side: the cluster-wide loopback's port table.
//!
//! A TCP port bound by an SSI process to a loopback or wildcard address is
//! the cluster's, as on one machine: the *port home* (the lowest node id known,
//! like System V keys) records which node holds each port. A bind asks the
//! home to reserve the port; a connection to `127.0.0.1:P` asks where `P`
//! lives. Entries are not removed when the socket closes (no hook sees every
//! way a socket goes away: exit, exec, a child's copy): a reservation held
//! by another node is checked *when it matters*, by asking that node to
//! bind the port itself (`probe`). See docs/architecture/streams.md.

use super::common::{err, sock_err, Answer, Answered, Caller};
use super::node::Node;
use super::orders::{Orders, PEER_PLACED};
use super::peer::streams::{End, PortOp};
use super::peer::CHANNEL_STREAM;
use crate::agent::common::lock;
use libkrg::proto::{ErrorKind, ErrorReply, Request, Response, StreamPeer};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

mod attach;
mod find;
mod handover;
pub mod seqpacket;

use attach::*;
use find::*;
pub(super) use find::{accmode, holders};

/// The streams subsystem: the cluster-wide loopback's ports and the
/// connections whose other end is moving. Stream swaps are ordered
/// through the checkpoint orders.
#[derive(Debug)]
pub struct Streams {
    node: Arc<Node>,
    orders: Arc<Orders>,
    ports: Ports,
    moving: Moving,
}

impl Streams {
    pub fn new(node: Arc<Node>, orders: Arc<Orders>) -> Streams {
        Streams {
            node,
            orders,
            ports: Ports::default(),
            moving: Moving::default(),
        }
    }

    /// Ports whose listener this agent keeps for a process that moved
    /// away (see `Ports::forwarding`).
    pub(crate) fn forwarding(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        lock(&self.ports.forwarding)
    }

    /// The hand-overs held for mover `kpid`, forgotten here.
    pub(crate) fn take_frozen_for(&self, kpid: i32) -> Vec<(u32, u64)> {
        self.moving.take_frozen_for(kpid)
    }
}

/// The port table (used at the home) and the ports this node holds.
#[derive(Debug, Default)]
struct Ports {
    /// At the home: port -> node that holds it. An async mutex: a
    /// reservation that conflicts probes the holder while holding it, so two
    /// binds of one port are decided one after the other.
    table: tokio::sync::Mutex<HashMap<u16, u32>>,
    /// Ports granted to this node (answers a local connection without
    /// asking the home; dropped when a probe finds the port free here).
    held: std::sync::Mutex<HashSet<u16>>,
    /// Ports whose listener this agent keeps for a process that moved
    /// away, passing connections on to it (`agent::parked`): free for that
    /// process to take on its new node.
    forwarding: std::sync::Mutex<HashSet<u16>>,
    /// Clients of other nodes about to connect to a port held here at the
    /// loopback: (their address, their port) -> (this port, `::1`, when
    /// told). Taken by the server's `LoopbackPeer`; forgotten after
    /// [`LOOPBACK_PEER_TTL`].
    loopback_peers: std::sync::Mutex<HashMap<([u8; 4], u16), LoopbackClient>>,
}

/// A loopback client of another node: the port it connects to here,
/// whether it asked for `::1`, when it was told.
type LoopbackClient = (u16, bool, std::time::Instant);

/// How long a client's loopback connection is remembered for its server.
const LOOPBACK_PEER_TTL: std::time::Duration = std::time::Duration::from_secs(120);

impl Ports {
    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        lock(&self.held)
    }
}

/// Whether `port` is bound by anything on this node: try to bind it on the
/// wildcard address ourselves (dual-stack IPv6 first, which conflicts with
/// IPv4 and IPv6 binds alike; IPv4 when the node has no IPv6). `reuse` as
/// the socket that wants the port: with `SO_REUSEADDR` only listeners and
/// sockets bound without it conflict, as the kernel decides for that
/// socket.
pub(crate) fn in_use_here(port: u16, reuse: bool) -> bool {
    use socket2::{Domain, Socket, Type};
    let try_bind = |domain: Domain, addr: SocketAddr| -> Option<bool> {
        let s = Socket::new(domain, Type::STREAM, None).ok()?;
        if domain == Domain::IPV6 {
            s.set_only_v6(false).ok()?;
        }
        s.set_reuse_address(reuse).ok()?;
        match s.bind(&addr.into()) {
            Ok(()) => Some(false),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => Some(true),
            Err(_) => None,
        }
    };
    try_bind(
        Domain::IPV6,
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
    )
    .or_else(|| {
        try_bind(
            Domain::IPV4,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        )
    })
    // If neither family can even open a socket, say "in use": refusing a
    // bind is recoverable, two servers on one port are not.
    .unwrap_or(true)
}

/// A local request about the loopback or a moving stream (see
/// `Agent::handle_local`); a stream's new end is a descriptor.
pub(super) async fn handle(streams: &Arc<Streams>, req: Request, who: Caller) -> Answered {
    let r = match req {
        Request::StreamAwait { id } => return streams.stream_await(id).await,
        Request::StreamAttach {
            id,
            node,
            pending,
            wr_shut,
            pipe,
            pair,
        } => {
            let pair = pair.map(|p| seqpacket::take_pair(who.pid, p)).transpose()?;
            return streams
                .stream_attach_with(id, node, pending, wr_shut, pipe, pair)
                .await;
        }
        Request::PortBind { port, reuse } => streams.port_bind(who, port, reuse).await?,
        Request::PortOwner { port, from, v6 } => streams.port_owner(port, from, v6).await?,
        Request::LoopbackPeer { ip, from, port } => {
            Response::LoopbackPeer(streams.loopback_peer(ip, from, port))
        }
        Request::NodeAddrs => streams.node_addrs(),
        Request::StreamFreeze {
            conns,
            pipes,
            unix,
            optional,
        } => {
            streams
                .stream_freeze(who, conns, pipes, unix, optional)
                .await?
        }
        Request::StreamFrozen { ids } => streams.stream_frozen(&ids)?,
        Request::StreamDrained {
            id,
            pending,
            wr_shut,
            pair,
        } => streams.stream_drained(who, id, pending, wr_shut, pair)?,
        Request::ShadowRelays(relays) => streams.shadow_relays(who, relays).await?,
        other => return Err(super::common::misrouted(&other)),
    };
    Ok((r, Vec::new()))
}

impl Streams {
    /// This node, or another node that is up.
    fn alive(&self, node: u32) -> bool {
        node == self.node.node_id() || self.node.is_up(node)
    }

    fn port_home(&self) -> u32 {
        self.node.key_home()
    }

    /// This node's IPv4 address as the other nodes reach it.
    fn my_ipv4(&self) -> Option<[u8; 4]> {
        match self.node.cfg.advertise.ip() {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        }
    }

    pub(crate) fn node_ipv4(&self, node: u32) -> Option<[u8; 4]> {
        if node == self.node.node_id() {
            return self.my_ipv4();
        }
        match self.node.member_addr(node).map(|a| a.ip()) {
            Some(IpAddr::V4(a)) => Some(a.octets()),
            _ => None,
        }
    }

    pub(crate) async fn port_call(self: &Arc<Self>, op: PortOp) -> Result<Option<u32>, ErrorReply> {
        let home = self.port_home();
        if home == self.node.node_id() {
            return self.port_home_op(op).await;
        }
        let c = self.node.client(home).await?;
        c.port_home(super::common::ctx(), op)
            .await
            .map_err(|e| self.node.peer_lost(home, "port home", e))?
    }

    /// At the home: serve a [`PortOp`]. `Reserve` answers `Ok(None)` when
    /// granted; `Owner` answers the holder, if any and up.
    pub(crate) async fn port_home_op(
        self: &Arc<Self>,
        op: PortOp,
    ) -> Result<Option<u32>, ErrorReply> {
        let mut t = self.ports.table.lock().await;
        match op {
            PortOp::Owner { port } => Ok(t.get(&port).copied().filter(|n| self.alive(*n))),
            PortOp::Reserve { port, node, reuse } => {
                if let Some(&holder) = t.get(&port) {
                    if holder != node
                        && self.alive(holder)
                        && self.probe_on(holder, port, reuse).await
                    {
                        return Err(err(
                            libc::EADDRINUSE,
                            format!("TCP port {port} is in use on node {holder}"),
                        ));
                    }
                }
                t.insert(port, node);
                Ok(None)
            }
        }
    }

    /// Whether `port` is in use on `node` (asked while deciding a
    /// reservation). An unreachable node holds nothing.
    pub(crate) async fn probe_on(self: &Arc<Self>, node: u32, port: u16, reuse: bool) -> bool {
        if node == self.node.node_id() {
            return self.port_probe(port, reuse).await;
        }
        let Ok(c) = self.node.client(node).await else {
            return false;
        };
        match c.port_probe(super::common::ctx(), port, reuse).await {
            Ok(b) => b,
            Err(e) => {
                self.node.drop_client(node);
                tracing::warn!("probing port {port} on node {node}: {e}");
                false
            }
        }
    }

    /// On the holder: is `port` still bound here? Forgets it if not. A
    /// listener this agent keeps for a process that moved away does not
    /// count: the process takes the port on its new node.
    pub(crate) async fn port_probe(&self, port: u16, reuse: bool) -> bool {
        let forwarded = lock(&self.ports.forwarding).contains(&port);
        let used = !forwarded
            && tokio::task::spawn_blocking(move || in_use_here(port, reuse))
                .await
                .unwrap_or(true);
        if !used {
            self.ports.held().remove(&port);
        }
        used
    }

    // -- the application's requests ------------------------------------------

    async fn port_bind(
        self: &Arc<Self>,
        _who: Caller,
        port: u16,
        reuse: bool,
    ) -> Result<Response, ErrorReply> {
        let node = self.node.node_id();
        self.port_call(PortOp::Reserve { port, node, reuse })
            .await?;
        self.ports.held().insert(port);
        Ok(Response::Ok)
    }

    async fn port_owner(
        self: &Arc<Self>,
        port: u16,
        from: u16,
        v6: bool,
    ) -> Result<Response, ErrorReply> {
        if self.ports.held().contains(&port) {
            return Ok(Response::PortOwner(None));
        }
        let owner = self.port_call(PortOp::Owner { port }).await?;
        let there = match owner {
            Some(n) if n != self.node.node_id() => self.node_ipv4(n).map(|a| (n, a)),
            _ => None,
        };
        if let (Some((n, _)), Some(me), true) = (there, self.my_ipv4(), from != 0) {
            // Before the client connects: its server then knows it came
            // to the loopback.
            if let Ok(c) = self.node.client(n).await {
                if let Err(e) = c
                    .loopback_peer(super::common::ctx(), me, from, port, v6)
                    .await
                {
                    self.node.drop_client(n);
                    tracing::warn!("telling node {n} of a loopback client: {e}");
                }
            }
        }
        Ok(Response::PortOwner(there))
    }

    /// A client at `ip:from` will connect to `port` here at the loopback.
    pub(crate) fn note_loopback_peer(&self, ip: [u8; 4], from: u16, port: u16, v6: bool) {
        let mut t = lock(&self.ports.loopback_peers);
        let now = std::time::Instant::now();
        t.retain(|_, (_, _, at)| now.duration_since(*at) < LOOPBACK_PEER_TTL);
        t.insert((ip, from), (port, v6, now));
    }

    /// `LoopbackPeer`: whether the connection from `ip:from` to `port` was
    /// made to the loopback (and to `::1`).
    pub(crate) fn loopback_peer(&self, ip: [u8; 4], from: u16, port: u16) -> Option<bool> {
        let mut t = lock(&self.ports.loopback_peers);
        match t.get(&(ip, from)) {
            Some(&(p, v6, at)) if p == port && at.elapsed() < LOOPBACK_PEER_TTL => {
                t.remove(&(ip, from));
                Some(v6)
            }
            _ => None,
        }
    }

    pub(crate) fn node_addrs(&self) -> Response {
        let mut v: Vec<(u32, [u8; 4])> = self
            .node
            .up_members()
            .into_iter()
            .filter_map(|(id, addr)| match addr.ip() {
                IpAddr::V4(a) => Some((id, a.octets())),
                IpAddr::V6(_) => None,
            })
            .collect();
        if let Some(a) = self.my_ipv4() {
            v.push((self.node.node_id(), a));
        }
        v.sort();
        Response::NodeAddrs(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_port_is_in_use_and_a_free_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(in_use_here(port, false));
        assert!(
            in_use_here(port, true),
            "a listener conflicts even with SO_REUSEADDR"
        );
        drop(l);
        assert!(!in_use_here(port, false));
    }

    #[test]
    fn only_pipe_links_and_absolute_paths_name_a_pipe_end() {
        assert!(is_pipe_link("pipe:[4242]"));
        assert!(is_pipe_link("/srv/queue/ff"));
        assert!(!is_pipe_link("pipe:[]"));
        assert!(!is_pipe_link("pipe:[12x]"));
        assert!(!is_pipe_link("socket:[4242]"));
        assert!(!is_pipe_link("anon_inode:[eventfd]"));
        assert!(!is_pipe_link("relative/ff"));
    }
}

// --- moving TCP connections between SSI processes --------------------------
//
// When a process with a TCP connection to another SSI process migrates, both
// ends are frozen: the mover (in its capture) and its peer (a `StreamSwap`
// order). Each shuts down writing and reads its socket to EOF, so what was
// in flight for it is in hand (the mover's goes in its image). The mover's
// new node then connects to the peer's agent on the agents' port (channel
// `CHANNEL_STREAM` after authentication): the two agents exchange the
// pending bytes and each writes the *other* side's into the new connection
// first (so each process reads what it had not read yet, in order), then
// hands its end to its process, which puts it under the old fd number. No
// byte passes through the node the mover left.

/// After the stream id: what the two ends are (bytes: a TCP connection
/// given to both processes; messages: seqpacket sockets, relayed).
const KIND_BYTES: u8 = 0;
const KIND_MESSAGES: u8 = 1;
/// Longest wait for the other side of a hand-over.
pub(crate) const HANDOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest pending data accepted from the other agent (socket buffers
/// are a few MiB).
const MAX_PENDING: u64 = 256 << 20;

/// The holder of one end: `(gpid, kernel pid, fds, node)`, `node` set when
/// it is a shadow relaying the end to its program there; or what else it
/// is.
type Found = Result<(i32, i32, Vec<i32>, Option<u32>), StreamPeer>;
/// What a shadow's relays connect: `(fd, local, peer)` of each.
type Relays = Vec<(i32, String, String)>;

/// A shadow asked to hand one of its relays over: it answers with its
/// relays, then waits for the go (the fd to let go of) or a refusal.
#[derive(Debug)]
pub struct Release {
    relays_tx: tokio::sync::oneshot::Sender<Relays>,
    go_rx: tokio::sync::oneshot::Receiver<Result<i32, String>>,
}

/// Longest wait for a process being placed elsewhere to be started there,
/// or for a program just started to take signal 62.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// What the staying peer had in flight, whether it had shut down
/// writing, and for a seqpacket socket its new socketpair.
type Drained = (Vec<u8>, bool, Option<seqpacket::Pair>);
/// Where the staying peer's end of a new connection is sent.
type FdSender = tokio::sync::oneshot::Sender<std::os::fd::OwnedFd>;

/// A stream held at the staying peer's node until its new connection comes.
#[derive(Debug, Default)]
pub struct Held {
    /// Once the peer is parked: `Err` if it may not be swapped after all.
    frozen_tx: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    frozen_rx: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
    /// The end's fd link and the kernel pids that may hold it (the peer,
    /// the mover): checked again once the peer is parked.
    sole: Option<(String, Vec<i32>)>,
    /// The peer's kernel pid and the fds it held the end at when it was
    /// found: the swap order names them, and they must still hold it once
    /// the peer is parked.
    peer_fds: Option<(i32, Vec<i32>)>,
    drained_tx: Option<tokio::sync::oneshot::Sender<Drained>>,
    drained_rx: Option<tokio::sync::oneshot::Receiver<Drained>>,
    fd_tx: Option<FdSender>,
    fd_rx: Option<tokio::sync::oneshot::Receiver<std::os::fd::OwnedFd>>,
}

impl Held {
    /// Every channel of a hand-over, open.
    fn open() -> Held {
        let (ztx, zrx) = tokio::sync::oneshot::channel();
        let (dtx, drx) = tokio::sync::oneshot::channel();
        let (ftx, frx) = tokio::sync::oneshot::channel();
        Held {
            frozen_tx: Some(ztx),
            frozen_rx: Some(zrx),
            drained_tx: Some(dtx),
            drained_rx: Some(drx),
            fd_tx: Some(ftx),
            fd_rx: Some(frx),
            sole: None,
            peer_fds: None,
        }
    }
}

/// A stream whose other end cannot take part, and why.
pub(crate) fn foreign(why: String) -> StreamPeer {
    StreamPeer::Foreign(ErrorReply::other(libc::EOPNOTSUPP, why))
}

/// What became of a peer ordered to freeze for a hand-over.
enum Frozen {
    Yes,
    /// It may not be swapped after all (why).
    Refused(String),
    /// It ended before it took the order.
    Ended,
    TimedOut,
}

/// Streams being moved (at the staying peer's node), by id.
#[derive(Debug, Default)]
struct Moving {
    held: std::sync::Mutex<HashMap<u64, Held>>,
    next: std::sync::atomic::AtomicU64,
    /// Shadows asked to hand a relay over, by kernel pid.
    releases: std::sync::Mutex<HashMap<i32, Release>>,
    /// Seqpacket relays running here.
    relays: seqpacket::Relays,
    /// The hand-overs held for each mover of this node (kernel pid) while
    /// its capture runs: `(node, stream id)`, called off if it fails.
    frozen_for: std::sync::Mutex<HashMap<i32, Vec<(u32, u64)>>>,
}

impl Moving {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        lock(&self.held)
    }

    fn releases(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Release>> {
        lock(&self.releases)
    }

    /// The hand-overs held for mover `kpid`, forgotten here.
    fn take_frozen_for(&self, kpid: i32) -> Vec<(u32, u64)> {
        lock(&self.frozen_for).remove(&kpid).unwrap_or_default()
    }
}
