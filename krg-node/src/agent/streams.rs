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

use super::{err, sock_err, Agent, Caller};
use libkrg::proto::{ErrorReply, Response, StreamPeer};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// The port table (used at the home) and the ports this node holds.
#[derive(Debug, Default)]
pub struct Ports {
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
    pub(crate) forwarding: std::sync::Mutex<HashSet<u16>>,
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

/// A request to the port home.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum PortOp {
    /// Reserve `port` for `node`.
    Reserve { port: u16, node: u32, reuse: bool },
    /// Who holds `port`.
    Owner { port: u16 },
}

impl Ports {
    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
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

impl Agent {
    /// This node, or another node that is up.
    fn alive(&self, node: u32) -> bool {
        node == self.node_id() || self.is_up(node)
    }

    fn port_home(&self) -> u32 {
        self.key_home()
    }

    /// This node's IPv4 address as the other nodes reach it.
    fn my_ipv4(&self) -> Option<[u8; 4]> {
        match self.cfg.advertise.ip() {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        }
    }

    pub(crate) fn node_ipv4(&self, node: u32) -> Option<[u8; 4]> {
        if node == self.node_id() {
            return self.my_ipv4();
        }
        match self.members().get(&node).map(|m| m.addr.ip()) {
            Some(IpAddr::V4(a)) => Some(a.octets()),
            _ => None,
        }
    }

    pub(crate) async fn port_call(self: &Arc<Self>, op: PortOp) -> Result<Option<u32>, ErrorReply> {
        let home = self.port_home();
        if home == self.node_id() {
            return self.port_home_op(op).await;
        }
        let c = self.client(home).await?;
        c.port_home(super::ctx(), op)
            .await
            .map_err(|e| self.peer_lost(home, "port home", e))?
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
        if node == self.node_id() {
            return self.port_probe(port, reuse).await;
        }
        let Ok(c) = self.client(node).await else {
            return false;
        };
        match c.port_probe(super::ctx(), port, reuse).await {
            Ok(b) => b,
            Err(e) => {
                self.drop_client(node);
                tracing::warn!("probing port {port} on node {node}: {e}");
                false
            }
        }
    }

    /// On the holder: is `port` still bound here? Forgets it if not. A
    /// listener this agent keeps for a process that moved away does not
    /// count: the process takes the port on its new node.
    pub(crate) async fn port_probe(&self, port: u16, reuse: bool) -> bool {
        let forwarded = self
            .ports
            .forwarding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&port);
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

    pub(crate) async fn port_bind(
        self: &Arc<Self>,
        _who: Caller,
        port: u16,
        reuse: bool,
    ) -> Result<Response, ErrorReply> {
        let node = self.node_id();
        self.port_call(PortOp::Reserve { port, node, reuse })
            .await?;
        self.ports.held().insert(port);
        Ok(Response::Ok)
    }

    pub(crate) async fn port_owner(
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
            Some(n) if n != self.node_id() => self.node_ipv4(n).map(|a| (n, a)),
            _ => None,
        };
        if let (Some((n, _)), Some(me), true) = (there, self.my_ipv4(), from != 0) {
            // Before the client connects: its server then knows it came
            // to the loopback.
            if let Ok(c) = self.client(n).await {
                if let Err(e) = c.loopback_peer(super::ctx(), me, from, port, v6).await {
                    self.drop_client(n);
                    tracing::warn!("telling node {n} of a loopback client: {e}");
                }
            }
        }
        Ok(Response::PortOwner(there))
    }

    /// A client at `ip:from` will connect to `port` here at the loopback.
    pub(crate) fn note_loopback_peer(&self, ip: [u8; 4], from: u16, port: u16, v6: bool) {
        let mut t = self
            .ports
            .loopback_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        t.retain(|_, (_, _, at)| now.duration_since(*at) < LOOPBACK_PEER_TTL);
        t.insert((ip, from), (port, v6, now));
    }

    /// `LoopbackPeer`: whether the connection from `ip:from` to `port` was
    /// made to the loopback (and to `::1`).
    pub(crate) fn loopback_peer(&self, ip: [u8; 4], from: u16, port: u16) -> Option<bool> {
        let mut t = self
            .ports
            .loopback_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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
            .members()
            .iter()
            .filter(|(_, m)| m.up())
            .filter_map(|(id, m)| match m.addr.ip() {
                IpAddr::V4(a) => Some((*id, a.octets())),
                IpAddr::V6(_) => None,
            })
            .collect();
        if let Some(a) = self.my_ipv4() {
            v.push((self.node_id(), a));
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

/// Channel byte of a stream hand-over connection (after authentication).
pub const CHANNEL_STREAM: u8 = 2;
/// After the stream id: what the two ends are (bytes: a TCP connection
/// given to both processes; messages: seqpacket sockets, relayed).
const KIND_BYTES: u8 = 0;
const KIND_MESSAGES: u8 = 1;
/// Longest wait for the other side of a hand-over.
const HANDOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest pending data accepted from the other agent (socket buffers
/// are a few MiB).
const MAX_PENDING: u64 = 256 << 20;

/// One end of a moving stream, at its node, as the agents look for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum End {
    /// The TCP connection `(local, peer)` (socket addresses as text, as
    /// that end sees them).
    Tcp(String, String),
    /// A pipe (fd link `pipe:[N]`) or FIFO (its path) of this node;
    /// `mover` (a kernel pid) holds the moving end.
    Pipe { link: String, mover: i32 },
    /// The UNIX stream or seqpacket socket `ino` of this node, held by
    /// `mover`: its peer socket is the other end.
    Unix { ino: u64, mover: i32 },
    /// The process end of seqpacket relay `id` of this node (see
    /// `seqpacket.rs`): the peer of the relay's socket.
    Relay { id: u64 },
}

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
type Drained = (Vec<u8>, bool, Option<super::seqpacket::Pair>);
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
        }
    }
}

/// Why a stream swap was not ordered: the peer is being placed at its
/// exec (its end is relayed by its shadow, then handed over).
pub(crate) const PEER_PLACED: &str =
    "the peer of a moving connection, is being placed on another node";

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
pub struct Moving {
    held: std::sync::Mutex<HashMap<u64, Held>>,
    next: std::sync::atomic::AtomicU64,
    /// Shadows asked to hand a relay over, by kernel pid.
    releases: std::sync::Mutex<HashMap<i32, Release>>,
    /// Seqpacket relays running here.
    pub(crate) relays: super::seqpacket::Relays,
    /// The hand-overs held for each mover of this node (kernel pid) while
    /// its capture runs: `(node, stream id)`, called off if it fails.
    frozen_for: std::sync::Mutex<HashMap<i32, Vec<(u32, u64)>>>,
}

impl Moving {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn releases(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Release>> {
        self.releases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hand-overs held for mover `kpid`, forgotten here.
    pub(crate) fn take_frozen_for(&self, kpid: i32) -> Vec<(u32, u64)> {
        self.frozen_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&kpid)
            .unwrap_or_default()
    }
}

/// A socket address as /proc/net/tcp{,6} spells it (hex, kernel byte
/// order), both forms of an IPv4 address (plain and IPv4-mapped).
fn proc_net_forms(a: &SocketAddr) -> Vec<String> {
    let v4 = |ip: Ipv4Addr| format!("{:08X}:{:04X}", u32::from_ne_bytes(ip.octets()), a.port());
    let v6 = |ip: Ipv6Addr| {
        let o = ip.octets();
        let mut s = String::new();
        for w in o.chunks(4) {
            s.push_str(&format!(
                "{:08X}",
                u32::from_ne_bytes([w[0], w[1], w[2], w[3]])
            ));
        }
        format!("{s}:{:04X}", a.port())
    };
    match a.ip() {
        IpAddr::V4(ip) => vec![v4(ip), v6(ip.to_ipv6_mapped())],
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v) => vec![v4(v), v6(ip)],
            None => vec![v6(ip)],
        },
    }
}

/// The TCP connections of this node: `(local, peer, socket inode)` as
/// /proc/net/tcp{,6} spell them (one read for all the ends asked).
fn tcp_table() -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let t = std::fs::read_to_string(f).unwrap_or_default();
        for line in t.lines().skip(1) {
            let w: Vec<&str> = line.split_whitespace().collect();
            if let (true, Some(ino)) = (w.len() > 9, w.get(9).and_then(|v| v.parse().ok())) {
                out.push((w[1].to_string(), w[2].to_string(), ino));
            }
        }
    }
    out
}

/// The socket inode of the TCP connection `local` -> `peer` in `table`.
fn tcp_inode(
    table: &[(String, String, u64)],
    local: &SocketAddr,
    peer: &SocketAddr,
) -> Option<u64> {
    let (l, p) = (proc_net_forms(local), proc_net_forms(peer));
    table
        .iter()
        .find(|(a, b, _)| l.contains(a) && p.contains(b))
        .map(|(_, _, ino)| *ino)
}

/// A copy of the socket of kernel pid `mover` that is its TCP connection
/// `local` -> `peer` (addresses as the mover sees them).
fn mover_socket(mover: i32, local: &str, peer: &str) -> Result<std::os::fd::OwnedFd, String> {
    let (Ok(l), Ok(p)) = (local.parse::<SocketAddr>(), peer.parse::<SocketAddr>()) else {
        return Err("bad socket address".into());
    };
    let ino = tcp_inode(&tcp_table(), &l, &p).ok_or("no such connection on this node")?;
    let link = format!("socket:[{ino}]");
    let fd = std::fs::read_dir(format!("/proc/{mover}/fd"))
        .map_err(|e| format!("its fds: {e}"))?
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == link.as_str()))
        .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .ok_or("the mover does not hold it")?;
    super::sys::pidfd_getfd(mover, fd).map_err(|e| e.msg)
}

/// Relay kept connection `old` (the moved process's old socket, with the
/// other end's process or kernel on it) and `new` (the moved process's new
/// end) until both directions end: an end of stream one way shuts the
/// other's writing, as the ends themselves would.
async fn relay_kept(old: std::os::fd::OwnedFd, new: std::os::fd::OwnedFd, what: &str) {
    let tcp = |fd: std::os::fd::OwnedFd| {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(s)
    };
    let (mut a, mut b) = match (tcp(old), tcp(new)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("{what}: relaying it: {e}");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut a, &mut b).await {
        Ok((up, down)) => tracing::debug!("{what}: relayed {up} bytes in, {down} out; ended"),
        Err(e) => tracing::debug!("{what}: relay ended: {e}"),
    }
}

/// Every `(kernel pid, fd)` of this node whose fd link is one of `want`
/// (`socket:[N]`, `pipe:[N]`), by link: one walk of /proc for all.
pub(super) fn holders(want: &[String]) -> HashMap<String, Vec<(i32, i32)>> {
    let mut out: HashMap<String, Vec<(i32, i32)>> = HashMap::new();
    // Not the agent's own fds (its many sockets are most of the walk; a
    // stream it holds is in a hand-over, never a process's end).
    let me = std::process::id() as i32;
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        for f in std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(l) = std::fs::read_link(f.path()) else {
                continue;
            };
            let Some(l) = l.to_str().filter(|l| want.iter().any(|w| w == l)) else {
                continue;
            };
            if let Some(fd) = f.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.entry(l.to_string()).or_default().push((pid, fd));
            }
        }
    }
    out
}

/// What each end is: `(description, fd link, mover's kernel pid or 0)`, or
/// why it is not here.
fn links_of(
    ends: &[End],
    relays: &HashMap<u64, u64>,
) -> Vec<Result<(String, String, i32), String>> {
    let table = if ends.iter().any(|e| matches!(e, End::Tcp(..))) {
        tcp_table()
    } else {
        Vec::new()
    };
    let peers = if ends
        .iter()
        .any(|e| matches!(e, End::Unix { .. } | End::Relay { .. }))
    {
        libkrg::streams::unix::peers()
    } else {
        Ok(HashMap::new())
    };
    ends.iter()
        .map(|e| match e {
            End::Tcp(local, peer) => {
                let what = format!("TCP connection {peer} -> {local}");
                let (Ok(l), Ok(p)) = (local.parse::<SocketAddr>(), peer.parse::<SocketAddr>())
                else {
                    return Err(format!("{what}: bad socket address"));
                };
                let ino = tcp_inode(&table, &l, &p)
                    .ok_or_else(|| format!("{what}: no such connection on this node"))?;
                Ok((what, format!("socket:[{ino}]"), 0))
            }
            End::Pipe { link, mover } => Ok((
                format!("{link} of kernel pid {mover}"),
                link.clone(),
                *mover,
            )),
            End::Unix { ino, mover } => {
                let what = format!("UNIX socket socket:[{ino}] of kernel pid {mover}");
                let peer = peers
                    .as_ref()
                    .map_err(|e| format!("{what}: its peer: {e}"))?
                    .get(ino)
                    .copied()
                    .ok_or_else(|| format!("{what}: no peer (not connected?)"))?;
                Ok((what, format!("socket:[{peer}]"), *mover))
            }
            End::Relay { id } => {
                let what = format!("seqpacket relay {id:#x}");
                let peer = relays
                    .get(id)
                    .and_then(|ino| peers.as_ref().ok()?.get(ino).copied())
                    .ok_or_else(|| format!("{what}: not relayed here (any more)"))?;
                Ok((what, format!("socket:[{peer}]"), 0))
            }
        })
        .collect()
}

/// Whether `link` is an fd link a pipe end or FIFO has: `pipe:[N]`, or a
/// FIFO's absolute path.
fn is_pipe_link(link: &str) -> bool {
    link.strip_prefix("pipe:[")
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        || link.starts_with('/')
}

/// Whether the parent of `mover` holds the same end of pipe `link` as
/// `mover` does, at a number above 2: the pipe a shell made for a pipeline,
/// which it closes once it has forked the stage (a shell that shares its
/// own stdin or stdout with a child keeps it, and is not waited for).
fn parent_shares(link: &str, mover: i32, all: &HashMap<String, Vec<(i32, i32)>>) -> bool {
    if mover == 0 || !link.starts_with("pipe:") {
        return false;
    }
    let Some(ppid) = super::procs::read_stat(mover).map(|s| s.ppid) else {
        return false;
    };
    let hs = all.get(link).map(Vec::as_slice).unwrap_or_default();
    let Some(mine) = hs
        .iter()
        .find(|(p, _)| *p == mover)
        .and_then(|(p, fd)| reads(*p, *fd))
    else {
        return false;
    };
    hs.iter()
        .any(|(p, fd)| *p == ppid && *fd > 2 && reads(*p, *fd) == Some(mine))
}

/// Whether fd `fd` of kernel pid `pid` is open read-only (a pipe's read
/// end) or write-only, from its fdinfo; `None` when open both ways (a FIFO
/// opened `O_RDWR` is its own reader and writer).
fn reads(pid: i32, fd: i32) -> Option<bool> {
    match accmode(pid, fd)? {
        libc::O_RDONLY => Some(true),
        libc::O_WRONLY => Some(false),
        _ => None,
    }
}

/// Why the pipe, FIFO or socket `link`, read by kernel pid `mover`, cannot be
/// relayed for it: other processes read it too (`None` if none does).
fn shared_read(link: &str, mover: i32, all: &HashMap<String, Vec<(i32, i32)>>) -> Option<String> {
    let hs = all.get(link)?;
    // O_RDWR (a FIFO opened both ways) reads too. A socket is always open
    // both ways: held as stdout or stderr it is taken as written only.
    let socket = link.starts_with("socket:[");
    let reader = |p: i32, fd: i32| {
        if socket {
            fd != 1 && fd != 2
        } else {
            reads(p, fd) != Some(false)
        }
    };
    let mine: Vec<i32> = hs
        .iter()
        .filter(|(p, fd)| *p == mover && reader(*p, *fd))
        .map(|(_, fd)| *fd)
        .collect();
    let theirs: Vec<(i32, i32)> = hs
        .iter()
        .filter(|(p, fd)| *p != mover && reader(*p, *fd))
        .copied()
        .collect();
    (!mine.is_empty() && !theirs.is_empty()).then(|| {
        format!(
            "fds {mine:?} ({link}): other processes read it too (kernel pid, fd: {theirs:?}); \
             a relay would read ahead of this process and take bytes that are theirs: not movable"
        )
    })
}

/// How fd `fd` of kernel pid `pid` is open (`O_RDONLY`, `O_WRONLY`,
/// `O_RDWR`), from its fdinfo.
pub(super) fn accmode(pid: i32, fd: i32) -> Option<i32> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let flags = t
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())?;
    Some(flags & libc::O_ACCMODE)
}

impl Agent {
    /// The node whose address is `ip`.
    pub(crate) fn node_at(&self, ip: IpAddr) -> Option<u32> {
        // Both ends on this node (a connection made over the loopback).
        if ip.is_loopback() || ip.to_canonical().is_loopback() {
            return Some(self.node_id());
        }
        let v4 = match ip {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => a.to_ipv4_mapped()?,
        };
        match self.node_addrs() {
            Response::NodeAddrs(v) => v
                .into_iter()
                .find(|(_, a)| *a == v4.octets())
                .map(|(n, _)| n),
            _ => None,
        }
    }

    /// `StreamFreeze` from a process being captured (`mover`): find the
    /// SSI process at the other end of each connection (on any node) and
    /// of each pipe (on this node), and have it drain and wait. Every peer
    /// node is checked before any peer is frozen.
    pub(crate) async fn stream_freeze(
        self: &Arc<Self>,
        mover: Caller,
        conns: Vec<(String, String)>,
        pipes: Vec<String>,
        unix: Vec<u64>,
        optional: Vec<bool>,
    ) -> Result<Response, ErrorReply> {
        let (n_conns, n_pipes) = (conns.len(), pipes.len());
        let n = n_conns + n_pipes + unix.len();
        if optional.len() != n {
            return Err(err(
                libc::EINVAL,
                "StreamFreeze: one optional flag per stream",
            ));
        }
        let mut out = vec![StreamPeer::Nobody; n];
        // By peer node: (index, the end as the peer sees it).
        let mut by_node: HashMap<u32, Vec<(usize, End)>> = HashMap::new();
        for (i, (local, peer)) in conns.iter().enumerate() {
            let p: SocketAddr = peer
                .parse()
                .map_err(|_| err(libc::EINVAL, format!("bad socket address {peer:?}")))?;
            match self.node_at(p.ip()) {
                Some(node) => by_node
                    .entry(node)
                    .or_default()
                    .push((i, End::Tcp(peer.clone(), local.clone()))),
                None => out[i] = StreamPeer::Foreign(format!("TCP connection {local} -> {peer}: the peer is not a node of the cluster (connections leaving the cluster do not move)")),
            }
        }
        // A pipe (or FIFO) read by the mover and by other processes too
        // cannot be relayed (a shadow's relay reads ahead of its program:
        // what it takes and the program never reads is lost to the other
        // readers, as in `( head -c 30; read l )`), nor made a connection:
        // the move is refused. Placement is not a move: a program being
        // placed keeps the relay (remote-exec.md, "Pipes between nodes").
        if optional.iter().any(|o| *o) && !self.is_placing(mover.pid) {
            let mut want: Vec<String> = pipes
                .iter()
                .enumerate()
                .filter(|(j, l)| optional[n_conns + j] && is_pipe_link(l))
                .map(|(_, l)| l.clone())
                .collect();
            // A stdin that is a socket (a pipe that became a connection
            // in an earlier move, a relay) is relayed just the same when
            // another process holds it too: `sh -c 'read x; tr ...'`
            // moved twice lost every other line to its shadow's relay.
            if let Some(l) = std::fs::read_link(format!("/proc/{}/fd/0", mover.pid))
                .ok()
                .and_then(|l| l.to_str().map(str::to_string))
                .filter(|l| l.starts_with("socket:["))
            {
                want.push(l);
            }
            if !want.is_empty() {
                let all = holders(&want);
                if let Some(why) = want.iter().find_map(|l| shared_read(l, mover.pid, &all)) {
                    return Err(err(libc::EOPNOTSUPP, why));
                }
            }
        }
        for (j, link) in pipes.into_iter().enumerate() {
            // Only matched against the fd links of this node's processes,
            // the mover's among them (`holder_of`).
            if !is_pipe_link(&link) {
                return Err(err(
                    libc::EINVAL,
                    format!("StreamFreeze: {link:?} is neither a pipe nor a FIFO's path"),
                ));
            }
            by_node.entry(self.node_id()).or_default().push((
                conns.len() + j,
                End::Pipe {
                    link,
                    mover: mover.pid,
                },
            ));
        }
        // A seqpacket socket whose peer is one of this agent's relays: its
        // other end is the process at the relay's other node.
        let relayed: Vec<Option<(u64, u32)>> = if unix.is_empty() || self.moving.relays.count() == 0
        {
            vec![None; unix.len()]
        } else {
            let peers = tokio::task::spawn_blocking(libkrg::streams::unix::peers)
                .await
                .map_err(|e| err(libc::EIO, format!("UNIX socket peers: {e}")))?
                .map_err(|e| sock_err("UNIX socket peers", e))?;
            unix.iter()
                .map(|ino| peers.get(ino).and_then(|p| self.moving.relays.by_inode(*p)))
                .collect()
        };
        for (j, ino) in unix.iter().enumerate() {
            let (node, end) = match relayed[j] {
                Some((id, node)) => (node, End::Relay { id }),
                None => (
                    self.node_id(),
                    End::Unix {
                        ino: *ino,
                        mover: mover.pid,
                    },
                ),
            };
            by_node
                .entry(node)
                .or_default()
                .push((n_conns + n_pipes + j, end));
        }
        // Check everywhere; then freeze the ends that can be.
        let mut take: HashMap<u32, Vec<(usize, End)>> = HashMap::new();
        // TCP connections this agent keeps and relays (their other end
        // cannot take part): index, the mover's socket.
        let mut keep: Vec<(usize, std::os::fd::OwnedFd)> = Vec::new();
        for commit in [false, true] {
            let asked = if commit { &take } else { &by_node };
            let mut found: Vec<(u32, usize, StreamPeer)> = Vec::new();
            for (node, list) in asked {
                let ends: Vec<End> = list.iter().map(|(_, e)| e.clone()).collect();
                let r = if *node == self.node_id() {
                    self.stream_hold(ends, commit).await?
                } else {
                    let c = self.client(*node).await?;
                    c.stream_hold(super::ctx(), ends, commit)
                        .await
                        .map_err(|e| self.peer_lost(*node, "peer", e))??
                };
                found.extend(list.iter().zip(r).map(|((i, _), h)| (*node, *i, h)));
            }
            for (node, i, h) in found {
                if !commit && matches!(h, StreamPeer::Held { .. }) {
                    // It could be held: it is asked again to commit.
                    if let Some(e) = by_node[&node].iter().find(|(k, _)| *k == i) {
                        take.entry(node).or_default().push(e.clone());
                    }
                    continue;
                }
                out[i] = h;
            }
            if !commit {
                // A connection whose other end cannot take part (outside
                // krg or the cluster, shared, or closed) moves all the
                // same: this agent keeps its socket and relays it to the
                // mover's new end. Standard fds stay the shadow's to relay.
                for (i, (local, peer)) in conns.iter().enumerate() {
                    if optional[i] || !matches!(out[i], StreamPeer::Foreign(_)) {
                        continue;
                    }
                    match mover_socket(mover.pid, local, peer) {
                        Ok(fd) => {
                            keep.push((i, fd));
                            out[i] = StreamPeer::Nobody;
                        }
                        Err(e) => tracing::debug!("{local} -> {peer}: not kept: {e}"),
                    }
                }
                // Nothing frozen yet: a stream that must move and cannot
                // fails the whole move here.
                if let Some(why) = out.iter().zip(&optional).find_map(|(o, opt)| match o {
                    StreamPeer::Foreign(w) if !opt => Some(w.clone()),
                    _ => None,
                }) {
                    return Err(err(libc::EOPNOTSUPP, why));
                }
            }
        }
        for (i, fd) in keep {
            let id = self.new_stream_id();
            self.expect_connection(id, false);
            let agent = self.clone();
            let what = format!("TCP connection {} -> {}", conns[i].0, conns[i].1);
            tokio::spawn(async move {
                match agent.take_expected(id).await {
                    Ok(new) => relay_kept(fd, new, &what).await,
                    Err(e) => tracing::warn!("{what}: kept, never taken: {}", e.msg),
                }
            });
            out[i] = StreamPeer::Kept {
                id,
                node: self.node_id(),
            };
        }
        tracing::debug!("streams of kernel pid {}: {out:?}", mover.pid);
        let held: Vec<(u32, u64)> = out
            .iter()
            .filter_map(|p| match p {
                StreamPeer::Held { id, node } | StreamPeer::Kept { id, node } => Some((*node, *id)),
                _ => None,
            })
            .collect();
        if !held.is_empty() {
            self.moving
                .frozen_for
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(mover.pid)
                .or_default()
                .extend(held);
        }
        Ok(Response::Streams(out))
    }

    /// The capture of a mover failed after its peers were frozen for it
    /// and it did not connect back (it died mid-move, or its reconnection
    /// failed): each of `ids` held here and not handed over ends as if the
    /// mover had died, at once rather than after [`HANDOVER_TIMEOUT`]. A
    /// peer that drained gets a stream with the bytes it had in flight,
    /// then its end (a write there fails with EPIPE, as to a dead reader);
    /// one that had not gets an error and keeps its old end.
    pub(crate) fn call_off(&self, ids: &[u64]) {
        let mut held = self.moving.held();
        for id in ids {
            let Some(h) = held.get_mut(id) else { continue };
            // Taken: the hand-over went on (the mover reconnected).
            let Some(ftx) = h.fd_tx.take() else { continue };
            let drained = h.drained_rx.as_mut().and_then(|r| r.try_recv().ok());
            let ended = match drained {
                Some((pending, _, None)) => {
                    libkrg::streams::unix::pair_holding(false, &pending, &[]).map(|(end, _)| end)
                }
                _ => Err("not drained".into()),
            };
            match ended {
                Ok(end) => {
                    let _ = ftx.send(end);
                    tracing::debug!("stream {id:#x}: called off, its peer sees the end");
                }
                Err(why) => {
                    held.remove(id);
                    tracing::debug!("stream {id:#x}: called off ({why})");
                }
            }
        }
    }

    /// Who holds the end `what` (fd link `link`; `mover` holds the other
    /// end of a pipe) on this node, from `all` (every holder by link).
    fn holder_of(
        &self,
        what: &str,
        link: &str,
        mover: i32,
        all: &HashMap<String, Vec<(i32, i32)>>,
    ) -> Found {
        let every = all.get(link).cloned().unwrap_or_default();
        let hs: Vec<(i32, i32)> = every.iter().filter(|(p, _)| *p != mover).copied().collect();
        // A program being placed whose parent (a shell) still holds the
        // pipe it made for it: the shell is about to fork the stage at the
        // other end and close its copy, or reads it itself (`$(...)`, on
        // this node anyway). Not swapped: relayed, until that stage, placed
        // in turn, takes the relay over.
        if mover != 0 && link.starts_with("pipe:") && self.is_placing(mover) {
            if let Some(ppid) = super::procs::read_stat(mover).map(|s| s.ppid) {
                if hs.iter().any(|(p, fd)| *p == ppid && *fd > 2) {
                    return Err(StreamPeer::Foreign(format!(
                        "{what}: still held by the shell that made it"
                    )));
                }
            }
        }
        if mover != 0 && is_pipe_link(link) && !hs.is_empty() {
            // The other end, and only it: a pipe or FIFO with two writers
            // (or readers, or one both ways) is not a connection between two
            // processes.
            let mine = every
                .iter()
                .find(|(p, _)| *p == mover)
                .and_then(|(p, fd)| reads(*p, *fd));
            let theirs: Vec<Option<bool>> = hs.iter().map(|(p, fd)| reads(*p, *fd)).collect();
            if mine.is_none() || theirs.iter().any(|t| t.is_none() || *t == mine) {
                return Err(StreamPeer::Foreign(format!(
                    "{what}: other processes hold the same end of it, or both (kernel pid, fd: {hs:?}): not movable yet"
                )));
            }
        }
        let (kpid, fds) = match hs.as_slice() {
            // A pipe whose other end is closed.
            [] if mover != 0 => return Err(StreamPeer::Nobody),
            [] => {
                return Err(StreamPeer::Foreign(format!(
                    "{what}: its peer end on node {} is held by no process (closed?)",
                    self.node_id()
                )))
            }
            // Several fds of one process (dup): all handed over together.
            [(k, _), ..] if hs.iter().all(|(p, _)| p == k) => {
                (*k, hs.iter().map(|(_, fd)| *fd).collect::<Vec<i32>>())
            }
            _ => {
                return Err(StreamPeer::Foreign(format!(
                    "{what}: its other end is shared by several processes (kernel pid, fd: {hs:?}): not movable yet"
                )))
            }
        };
        let g = self.procs().translate(kpid).ok_or_else(|| {
            StreamPeer::Foreign(format!(
                "{what}: its other end (kernel pid {kpid} on node {}) is not an SSI process",
                self.node_id()
            ))
        })?;
        // A shadow left here by a program that came back (placed away, then
        // placed here again at an exec: `sh -c 'exec sed'`): the gpid's
        // entry is the program's now, and an order for the gpid would reach
        // the program, never the shadow (the mover waited a minute). The
        // shadow relays the end.
        if self.procs().get(g).is_some_and(|p| p.kpid != kpid) {
            return Err(StreamPeer::Foreign(format!(
                "{what}: its other end is a shadow of pid {g}, whose program came back to node {}: it relays it",
                self.node_id()
            )));
        }
        // Being placed itself: its end is relayed once it runs there, and
        // handed over when it is asked then (not frozen now: it is busy
        // becoming a shadow, with its signals blocked).
        if self.procs().get(g).is_some_and(|p| p.placing) {
            return Err(StreamPeer::Foreign(format!(
                "{what}: its other end's process (pid {g}) is being placed on another node"
            )));
        }
        // A shadow relays the standard fds of a program that runs
        // elsewhere: a pipe it relays is handed over to that program;
        // anything else stays (it leads to what the shadow holds).
        if let Some(node) = self.procs().get(g).and_then(|p| p.running_on) {
            if link.starts_with("pipe:") {
                return Ok((g, kpid, fds, Some(node)));
            }
            return Err(StreamPeer::Foreign(format!(
                "{what}: its other end is the shadow of pid {g}, which relays it"
            )));
        }
        // Signal 62 would kill a process without libkrg's handler (not yet
        // installed, or a program that does not load it).
        if !super::procs::catches(kpid, libkrg::proto::CKPT_SIGNAL) {
            return Err(StreamPeer::Foreign(format!(
                "{what}: its other end's process (pid {g}) does not take part (libkrg's signal handler is not installed)"
            )));
        }
        Ok((g, kpid, fds, None))
    }

    /// Whether local kernel pid `kpid` is being placed on another node.
    fn is_placing(&self, kpid: i32) -> bool {
        let t = self.procs();
        t.translate(kpid)
            .and_then(|g| t.get(g))
            .is_some_and(|p| p.placing)
    }

    /// Before the holders of `links` are judged: wait (a little) for those
    /// not ready to take part yet. A process being placed on another node
    /// is waited for until it runs there (its end is then its shadow's
    /// relay), if it came before the mover (two placed at once must not
    /// wait for each other); a program not started yet (started for a
    /// shadow, restored, or exec'd by a child that has not said Hello),
    /// until it catches signal 62 (it would die of it before) or is being
    /// placed itself.
    async fn settle(
        &self,
        links: &[Result<(String, String, i32), String>],
        all: &HashMap<String, Vec<(i32, i32)>>,
    ) {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        for (_, link, mover) in links.iter().flatten() {
            let mover_g = (*mover != 0)
                .then(|| self.procs().translate(*mover))
                .flatten();
            for (kpid, _) in all.get(link).into_iter().flatten() {
                if *kpid == *mover {
                    continue;
                }
                loop {
                    let ready = {
                        let t = self.procs();
                        match t.translate(*kpid).and_then(|g| t.get(g)) {
                            None => true,
                            Some(p) if p.placing => mover_g.is_none_or(|m| p.gpid >= m),
                            Some(p) if p.running_on.is_some() => true,
                            // Not started yet: a program started for a
                            // shadow, an image being restored, a child that
                            // exec'd and has not said Hello (a forked one
                            // still has its parent's handler).
                            Some(p) => {
                                use libkrg::caps::Caps;
                                let will_catch = p.caps_eff.contains(Caps::MIGRATE)
                                    || p.caps_eff.contains(Caps::CHECKPOINT);
                                !(will_catch && (p.skip_place || p.restoring || !p.greeted))
                                    || super::procs::catches(*kpid, libkrg::proto::CKPT_SIGNAL)
                            }
                        }
                    };
                    if ready || tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
        }
    }

    /// Have shadow `g` (kernel pid `kpid`) hand over its relay of fd `fd`
    /// to its program on `node`: the program's end of the relay is held
    /// there like the peer of a moving connection, and the shadow sends on
    /// what it still has, then closes its end. `Relayed` (the program's
    /// end, held) or why not (the relay goes on).
    async fn release_relay(
        self: &Arc<Self>,
        g: i32,
        kpid: i32,
        fds: &[i32],
        node: u32,
    ) -> StreamPeer {
        let what = format!("fds {fds:?} of pid {g}'s shadow");
        let (relays_tx, relays_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel();
        {
            let mut r = self.moving.releases();
            if r.contains_key(&kpid) {
                return StreamPeer::Foreign(format!("{what}: already being handed over"));
            }
            r.insert(kpid, Release { relays_tx, go_rx });
        }
        // SAFETY: a signal to a process of this node (the shadow reads it
        // from its signalfd).
        if unsafe { libc::kill(kpid, libkrg::proto::CKPT_SIGNAL) } != 0 {
            self.moving.releases().remove(&kpid);
            return StreamPeer::Foreign(format!("{what}: the shadow is gone"));
        }
        let relays = match tokio::time::timeout(SETTLE_TIMEOUT, relays_rx).await {
            Ok(Ok(r)) => r,
            _ => {
                self.moving.releases().remove(&kpid);
                return StreamPeer::Foreign(format!("{what}: the shadow did not answer"));
            }
        };
        let refuse = |go_tx: tokio::sync::oneshot::Sender<Result<i32, String>>, why: String| {
            let _ = go_tx.send(Err(why.clone()));
            StreamPeer::Foreign(why)
        };
        // One relay for all of them (`2>&1` shares stdout's): two streams
        // could not become one connection.
        let mut mine = relays.into_iter().filter(|(f, _, _)| fds.contains(f));
        let (fd, local, peer) = match (mine.next(), mine.next()) {
            (Some(r), None) => r,
            (None, _) => return refuse(go_tx, format!("{what}: not relayed (any more)")),
            (Some(_), Some(_)) => {
                return refuse(
                    go_tx,
                    format!(
                        "{what}: relayed as separate streams (they cannot become one connection)"
                    ),
                )
            }
        };
        // The program's end, as it sees it.
        let end = End::Tcp(peer, local);
        let held = match self.client(node).await {
            Ok(c) => c
                .stream_hold(super::ctx(), vec![end], true)
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.msg)),
            Err(e) => Err(e.msg),
        };
        match held.as_deref() {
            Ok([StreamPeer::Held { id, node }]) => {
                let _ = go_tx.send(Ok(fd));
                StreamPeer::Relayed {
                    id: *id,
                    node: *node,
                }
            }
            Ok([StreamPeer::Foreign(why)]) => refuse(go_tx, format!("{what}: {why}")),
            Ok(other) => refuse(go_tx, format!("{what}: its program's end: {other:?}")),
            Err(e) => refuse(go_tx, format!("{what}: node {node}: {e}")),
        }
    }

    /// `ShadowRelays` from a shadow told to hand a relay over: its relays
    /// go to the waiting [`Agent::release_relay`], and it gets the fd to
    /// let go of once its program's end is held.
    pub(crate) async fn shadow_relays(
        &self,
        who: Caller,
        relays: Relays,
    ) -> Result<Response, ErrorReply> {
        let r = self.moving.releases().remove(&who.pid).ok_or_else(|| {
            err(
                libc::ENOENT,
                "no relay of this process is being handed over",
            )
        })?;
        r.relays_tx
            .send(relays)
            .map_err(|_| err(libc::ECANCELED, "the hand-over was given up"))?;
        match tokio::time::timeout(HANDOVER_TIMEOUT, r.go_rx).await {
            Ok(Ok(Ok(fd))) => Ok(Response::Release(fd)),
            Ok(Ok(Err(why))) => Err(err(libc::EAGAIN, why)),
            _ => Err(err(libc::ECANCELED, "the hand-over was given up")),
        }
    }

    /// At the staying peers' node: freeze the SSI processes holding the
    /// `ends` (one `StreamSwap` order per process); what became of each.
    /// `commit` false: only check that it could (`Held` with id 0).
    pub(crate) async fn stream_hold(
        self: &Arc<Self>,
        ends: Vec<End>,
        commit: bool,
    ) -> Result<Vec<StreamPeer>, ErrorReply> {
        let ends_are_local = !ends.iter().any(|e| matches!(e, End::Tcp(..)));
        let relays = self.moving.relays.inodes();
        // One read of the TCP table and one walk of /proc for every end.
        let find = move || {
            let links = links_of(&ends, &relays);
            let want: Vec<String> = links
                .iter()
                .filter_map(|l| l.as_ref().ok().map(|(_, l, _)| l.clone()))
                .collect();
            let all = holders(&want);
            (links, all)
        };
        let (links, mut all) = if ends_are_local {
            // A walk of this node's few processes (~0.1 ms): cheaper here
            // than a wake-up of the blocking pool (a placed program's
            // stdio pipes are looked up on every remote exec).
            find()
        } else {
            tokio::task::spawn_blocking(find)
                .await
                .map_err(|e| err(libc::EIO, format!("looking for the streams' ends: {e}")))?
        };
        // A shell that has just forked a mover being placed (at its exec)
        // still holds its copy of the mover's pipe end for a moment: wait
        // for it to close it (at most 0.1 s).
        for _ in 0..50 {
            if !links
                .iter()
                .flatten()
                .any(|(_, l, m)| self.is_placing(*m) && parent_shares(l, *m, &all))
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            let want: Vec<String> = links
                .iter()
                .filter_map(|l| l.as_ref().ok().map(|(_, l, _)| l.clone()))
                .collect();
            all = holders(&want);
        }
        // (Instant the second time, after a check.)
        self.settle(&links, &all).await;
        let found: Vec<Found> = links
            .iter()
            .map(|l| match l {
                Ok((what, link, mover)) => self.holder_of(what, link, *mover, &all),
                Err(why) => Err(StreamPeer::Foreign(format!(
                    "{why} (node {})",
                    self.node_id()
                ))),
            })
            .collect();
        let node = self.node_id();
        if !commit {
            return Ok(found
                .into_iter()
                .map(|f| f.map_or_else(|h| h, |_| StreamPeer::Held { id: 0, node }))
                .collect());
        }
        let mut ids = Vec::new();
        // Each id's peer: kernel pid, gpid, and whether its end is a pipe's.
        let mut peers: Vec<(u64, i32, i32, bool)> = Vec::new();
        let mut out = Vec::new();
        let mut orders: HashMap<i32, (i32, Vec<(i32, u64)>)> = HashMap::new();
        for (f, l) in found.iter().zip(&links) {
            let (g, kpid, fds) = match f {
                Ok((g, kpid, fds, Some(node))) => {
                    out.push(self.release_relay(*g, *kpid, fds, *node).await);
                    continue;
                }
                Ok((g, kpid, fds, None)) => (g, kpid, fds),
                Err(h) => {
                    out.push(h.clone());
                    continue;
                }
            };
            let id = self.new_stream_id();
            let mut h = Held::open();
            if let Ok((_, link, mover)) = l {
                h.sole = Some((link.clone(), vec![*kpid, *mover]));
            }
            self.moving.held().insert(id, h);
            let e = orders.entry(*kpid).or_insert((*g, Vec::new()));
            e.1.extend(fds.iter().map(|fd| (*fd, id)));
            ids.push((out.len(), id));
            peers.push((
                id,
                *kpid,
                *g,
                l.as_ref().is_ok_and(|(_, link, _)| is_pipe_link(link)),
            ));
            out.push(StreamPeer::Held { id, node });
            tracing::debug!("stream {id:#x}: holding pid {g} fds {fds:?}");
        }
        for (kpid, (g, order)) in orders {
            let r = self.order_stream_swap(g, kpid, order.clone());
            if r.as_ref().is_err_and(|e| e.msg.contains(PEER_PLACED)) {
                // Placed since it was found (the mover waited for a
                // shadow's relay meanwhile): its ends are relayed by its
                // shadow, handed over when it is asked then.
                let why = format!("pid {g}: {}", PEER_PLACED);
                let mut held = self.moving.held();
                for (_, id) in order {
                    held.remove(&id);
                    if let Some((i, _)) = ids.iter().find(|(_, x)| *x == id) {
                        out[*i] = StreamPeer::Foreign(why.clone());
                    }
                }
                continue;
            }
            if let Err(e) = r {
                // Every swap or none (the mover relays its ends, or tries
                // its move again). Peers ordered already (the orders go
                // out in no set order) find their ids gone at
                // `StreamFrozen` and keep their ends. Before, only the
                // refused order was called off: in `sort | uniq -c | sort
                // -rn | head` with uniq and head placed at once, the last
                // sort was busy with head's swap, uniq's other peer (the
                // first sort) froze and waited a minute for a connection
                // nobody would make.
                let mut held = self.moving.held();
                for (_, id) in &ids {
                    held.remove(id);
                }
                return Err(e);
            }
        }
        // The mover shuts its side down only once every peer thread is
        // parked: a thread still running could read that end of stream.
        let waits: Vec<_> = ids
            .iter()
            .filter_map(|(i, id)| {
                self.moving
                    .held()
                    .get_mut(id)
                    .and_then(|h| h.frozen_rx.take())
                    .map(|w| (*i, *id, w))
            })
            .collect();
        for (i, id, w) in waits {
            let Some(&(_, kpid, g, pipe)) = peers.iter().find(|p| p.0 == id) else {
                continue;
            };
            match self.await_frozen(kpid, w).await {
                Frozen::Yes => {}
                // Shared since it was found (see `stream_frozen`): the peer
                // goes on with its end as it was; the mover relays it.
                Frozen::Refused(why) => {
                    self.moving.held().remove(&id);
                    out[i] = StreamPeer::Foreign(why);
                }
                // Ended since it was found (`awk ... | grep` with grep
                // placed: awk had written all and exited): its end is
                // closed. Before, the mover waited a minute for it.
                Frozen::Ended => {
                    self.moving.held().remove(&id);
                    self.forget_swap(kpid);
                    out[i] = if pipe {
                        StreamPeer::Nobody
                    } else {
                        StreamPeer::Foreign(format!(
                            "its other end's process (pid {g}) ended during the hand-over"
                        ))
                    };
                }
                Frozen::TimedOut => {
                    return Err(err(
                        libc::ETIMEDOUT,
                        "the peer of a moving connection did not stop (is its signal 62 blocked?)",
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Wait for the peer (local kernel pid `kpid`) to say it is parked
    /// (`w`), or to end first.
    async fn await_frozen(
        &self,
        kpid: i32,
        mut w: tokio::sync::oneshot::Receiver<Result<(), String>>,
    ) -> Frozen {
        let until = tokio::time::Instant::now() + HANDOVER_TIMEOUT;
        loop {
            tokio::select! {
                r = &mut w => return match r {
                    Ok(Ok(())) => Frozen::Yes,
                    Ok(Err(why)) => Frozen::Refused(why),
                    Err(_) => Frozen::TimedOut,
                },
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                    if !super::procs::alive(kpid) {
                        // A word sent just before the end wins.
                        return match w.try_recv() {
                            Ok(Ok(())) => Frozen::Yes,
                            Ok(Err(why)) => Frozen::Refused(why),
                            Err(_) => Frozen::Ended,
                        };
                    }
                    if tokio::time::Instant::now() >= until {
                        return Frozen::TimedOut;
                    }
                }
            }
        }
    }

    /// A connection for stream `id` will come from another node for a
    /// process of this node that is not moving and has nothing pending
    /// (the reader of a FIFO, a UNIX listener): hold the place
    /// ([`Agent::take_expected`]). `reads_only`: its end is shut for
    /// writing (a FIFO's reader).
    pub(crate) fn expect_connection(&self, id: u64, reads_only: bool) {
        let mut h = Held::open();
        // Nothing in flight for it; nothing to freeze.
        if let Some(tx) = h.drained_tx.take() {
            let _ = tx.send((Vec::new(), reads_only, None));
        }
        self.moving.held().insert(id, h);
    }

    /// The connection expected for stream `id`, once it came.
    pub(crate) async fn take_expected(&self, id: u64) -> Result<std::os::fd::OwnedFd, ErrorReply> {
        let rx = self
            .moving
            .held()
            .get_mut(&id)
            .and_then(|h| h.fd_rx.take())
            .ok_or_else(|| err(libc::ENOENT, format!("stream {id:#x}: not expected here")))?;
        let r = tokio::time::timeout(HANDOVER_TIMEOUT, rx).await;
        self.moving.held().remove(&id);
        match r {
            Ok(Ok(fd)) => Ok(fd),
            _ => Err(err(
                libc::ECONNRESET,
                format!("stream {id:#x}: the other node never connected"),
            )),
        }
    }

    /// Give up the place held for stream `id` (nobody will take it).
    pub(crate) fn forget_expected(&self, id: u64) {
        self.moving.held().remove(&id);
    }

    /// A new stream id of this node.
    pub(crate) fn new_stream_id(&self) -> u64 {
        (u64::from(self.node_id()) << 40)
            | self
                .moving
                .next
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// `StreamFrozen` from the staying peer: its threads are parked.
    ///
    /// Its ends were found held by it alone, but it ran on until the swap
    /// order reached it: a child it forked meanwhile holds the old end too
    /// (a subshell starting `/bin/echo` just as the next stage of its
    /// pipeline is placed). Swapped, that child would be left with a pipe
    /// whose other end is gone: its output lost, or its input cut short.
    /// Parked, it can fork no more: so the holders are checked again here,
    /// and the swap refused (every end of this order, each relayed) if
    /// anyone else holds one now.
    pub(crate) fn stream_frozen(&self, ids: &[u64]) -> Result<Response, ErrorReply> {
        let sole: Vec<(String, Vec<i32>)> = {
            let h = self.moving.held();
            ids.iter()
                .filter_map(|id| h.get(id).and_then(|x| x.sole.clone()))
                .collect()
        };
        let want: Vec<String> = sole.iter().map(|(l, _)| l.clone()).collect();
        let all = if want.is_empty() {
            HashMap::new()
        } else {
            holders(&want)
        };
        let shared = sole.iter().find_map(|(link, ok)| {
            let others: Vec<(i32, i32)> = all
                .get(link)
                .into_iter()
                .flatten()
                .filter(|(p, _)| !ok.contains(p))
                .copied()
                .collect();
            (!others.is_empty()).then(|| {
                format!(
                    "{link}: held by other processes too since it was found (kernel pid, fd: {others:?}): not movable yet"
                )
            })
        });
        let mut h = self.moving.held();
        // A swap called off after the order went out (another peer of the
        // same mover refused its own): the peer goes on as it was.
        let shared = match ids.iter().find(|id| !h.contains_key(id)) {
            Some(id) => Some(format!("stream {id:#x}: its hand-over was called off")),
            None => shared,
        };
        for id in ids {
            if let Some(tx) = h.get_mut(id).and_then(|x| x.frozen_tx.take()) {
                let _ = tx.send(match &shared {
                    None => Ok(()),
                    Some(why) => Err(why.clone()),
                });
            }
        }
        match shared {
            None => Ok(Response::Ok),
            Some(why) => {
                tracing::debug!("stream swap refused: {why}");
                Err(err(libc::EAGAIN, why))
            }
        }
    }

    /// `StreamDrained` from the staying peer.
    pub(crate) fn stream_drained(
        &self,
        who: Caller,
        id: u64,
        pending: Vec<u8>,
        wr_shut: bool,
        pair: Option<(i32, i32)>,
    ) -> Result<Response, ErrorReply> {
        let pair = pair
            .map(|p| super::seqpacket::take_pair(who.pid, p))
            .transpose()?;
        let tx = self
            .moving
            .held()
            .get_mut(&id)
            .and_then(|h| h.drained_tx.take())
            .ok_or_else(|| err(libc::ENOENT, format!("stream {id:#x}: not held here")))?;
        let _ = tx.send((pending, wr_shut, pair));
        Ok(Response::Ok)
    }

    /// `StreamAwait` from the staying peer: its end of the new connection.
    pub(crate) async fn stream_await(
        &self,
        id: u64,
    ) -> Result<(Response, Vec<std::os::fd::OwnedFd>), ErrorReply> {
        let rx = self
            .moving
            .held()
            .get_mut(&id)
            .and_then(|h| h.fd_rx.take())
            .ok_or_else(|| err(libc::ENOENT, format!("stream {id:#x}: not held here")))?;
        let r = tokio::time::timeout(HANDOVER_TIMEOUT, rx).await;
        self.moving.held().remove(&id);
        match r {
            Ok(Ok(fd)) => Ok((Response::StreamFd, vec![fd])),
            _ => Err(err(
                libc::ECONNRESET,
                format!("stream {id:#x}: the moving peer never reconnected"),
            )),
        }
    }

    /// Take over held stream `id` for its hand-over: where its peer's new
    /// end goes, and (once the peer has drained) the bytes that were in
    /// flight for the peer and whether it had shut down writing.
    async fn handover(&self, id: u64, what: &str) -> Result<(FdSender, Drained), ErrorReply> {
        let (drx, ftx) = {
            let mut h = self.moving.held();
            let h = h
                .get_mut(&id)
                .ok_or_else(|| err(libc::ENOENT, format!("{what}: not held here")))?;
            (h.drained_rx.take(), h.fd_tx.take())
        };
        let (drx, ftx) = drx
            .zip(ftx)
            .ok_or_else(|| err(libc::EBUSY, format!("{what}: already handed over")))?;
        let drained = tokio::time::timeout(HANDOVER_TIMEOUT, drx)
            .await
            .map_err(|_| err(libc::ETIMEDOUT, format!("{what}: the peer never drained")))?
            .map_err(|_| err(libc::ECONNRESET, format!("{what}: the peer went away")))?;
        Ok((ftx, drained))
    }

    /// The agents' port, channel `CHANNEL_STREAM`: the moving side's new
    /// node connects for stream `id`.
    pub(crate) async fn stream_accept(self: Arc<Self>, s: tokio::net::TcpStream, from: u32) {
        if let Err(e) = self.stream_accept_inner(s, from).await {
            tracing::warn!("stream hand-over from node {from}: {}", e.msg);
        }
    }

    async fn stream_accept_inner(
        self: &Arc<Self>,
        mut s: tokio::net::TcpStream,
        from: u32,
    ) -> Result<(), ErrorReply> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The hand-over is a few small messages each way: Nagle's wait for
        // a delayed ACK would add 40 ms to the move (the process's own
        // setting is put back when it takes its end).
        let _ = s.set_nodelay(true);
        let id = s
            .read_u64_le()
            .await
            .map_err(|e| sock_err("stream id", e))?;
        let messages = s.read_u8().await.map_err(|e| sock_err("stream kind", e))? == KIND_MESSAGES;
        let theirs = read_blob(&mut s).await?;
        let what = format!("stream {id:#x}");
        let (ftx, (mine, wr_shut, pair)) = self.handover(id, &what).await?;
        if !messages && pair.is_some() {
            return Err(err(
                libc::EPROTOTYPE,
                format!("{what}: a seqpacket socket at one end only"),
            ));
        }
        // Messages stay on this side: each agent refills its own process.
        let sent: &[u8] = if messages { &[] } else { &mine };
        s.write_u64_le(sent.len() as u64)
            .await
            .map_err(|e| sock_err("stream", e))?;
        s.write_all(sent).await.map_err(|e| sock_err("stream", e))?;
        let fd = match pair {
            Some(p) => self.relay_pair(s, id, from, p, &mine)?,
            // Messages for a connection expected here (a seqpacket
            // listener's stand-in): whoever takes it relays it.
            None if messages => s
                .into_std()
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| sock_err(&what, e))?,
            None => refill(s, &theirs, wr_shut).await?,
        };
        let _ = ftx.send(fd);
        Ok(())
    }

    /// `StreamAttach` from the moved process: connect stream `id` to its
    /// peer's node; this process's end.
    pub(crate) async fn stream_attach(
        self: &Arc<Self>,
        id: u64,
        node: u32,
        pending: Vec<u8>,
        wr_shut: bool,
        pipe: bool,
    ) -> Result<(Response, Vec<std::os::fd::OwnedFd>), ErrorReply> {
        self.stream_attach_with(id, node, pending, wr_shut, pipe, None)
            .await
    }

    /// [`Agent::stream_attach`]; `pair`: a seqpacket socket's new
    /// socketpair, taken from the caller.
    pub(crate) async fn stream_attach_with(
        self: &Arc<Self>,
        id: u64,
        node: u32,
        pending: Vec<u8>,
        wr_shut: bool,
        pipe: bool,
        pair: Option<super::seqpacket::Pair>,
    ) -> Result<(Response, Vec<std::os::fd::OwnedFd>), ErrorReply> {
        use tokio::io::AsyncWriteExt;
        if node == self.node_id() {
            return self
                .stream_attach_here(id, pending, wr_shut, pipe, pair)
                .await;
        }
        let addr = self.members().get(&node).map(|m| m.addr).ok_or_else(|| {
            err(
                libc::EHOSTDOWN,
                format!("stream {id:#x}: node {node} is unknown"),
            )
        })?;
        let what = format!("stream {id:#x} to node {node}");
        let mut s = tokio::time::timeout(HANDOVER_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| err(libc::ETIMEDOUT, format!("{what}: connect timed out")))?
            .map_err(|e| sock_err(&what, e))?;
        // As on the accepting side: no Nagle wait during the hand-over.
        let _ = s.set_nodelay(true);
        super::auth::client(&mut s, &self.cfg.key, self.node_id())
            .await
            .map_err(|e| sock_err(&what, e))?;
        let kind = if pair.is_some() {
            KIND_MESSAGES
        } else {
            KIND_BYTES
        };
        let sent: &[u8] = if pair.is_some() { &[] } else { &pending };
        s.write_all(&[CHANNEL_STREAM])
            .await
            .map_err(|e| sock_err(&what, e))?;
        s.write_u64_le(id).await.map_err(|e| sock_err(&what, e))?;
        s.write_u8(kind).await.map_err(|e| sock_err(&what, e))?;
        s.write_u64_le(sent.len() as u64)
            .await
            .map_err(|e| sock_err(&what, e))?;
        s.write_all(sent).await.map_err(|e| sock_err(&what, e))?;
        let theirs = tokio::time::timeout(HANDOVER_TIMEOUT, read_blob(&mut s))
            .await
            .map_err(|_| err(libc::ETIMEDOUT, format!("{what}: no answer")))??;
        let fd = match pair {
            Some(p) => self.relay_pair(s, id, node, p, &pending)?,
            None => refill(s, &theirs, wr_shut).await?,
        };
        Ok((Response::StreamFd, vec![fd]))
    }

    /// The end of a seqpacket socket's hand-over over `s` (to `node`):
    /// its process's new `pair` refilled with the process's own `pending`
    /// messages, the other end relayed over `s`; the process's end.
    fn relay_pair(
        self: &Arc<Self>,
        s: tokio::net::TcpStream,
        id: u64,
        node: u32,
        (end, relay): super::seqpacket::Pair,
        pending: &[u8],
    ) -> Result<std::os::fd::OwnedFd, ErrorReply> {
        let what = format!("stream {id:#x} to node {node}");
        super::seqpacket::refill(&relay, pending, &what)?;
        let tcp = s.into_std().map_err(|e| sock_err(&what, e))?;
        self.relay(id, node, relay, tcp);
        Ok(end)
    }
}

impl Agent {
    /// Both ends on this node: a loopback TCP connection, each end
    /// refilled with the other process's pending bytes, one end to the
    /// held peer, the other to the caller; a pipe again for a stream that
    /// stands for one.
    async fn stream_attach_here(
        &self,
        id: u64,
        pending: Vec<u8>,
        wr_shut: bool,
        pipe: bool,
        pair: Option<super::seqpacket::Pair>,
    ) -> Result<(Response, Vec<std::os::fd::OwnedFd>), ErrorReply> {
        let what = format!("stream {id:#x} on this node");
        let (ftx, (theirs, their_wr, their_pair)) = self.handover(id, &what).await?;
        match (pair, their_pair) {
            // Seqpacket ends that meet: one socketpair (the caller's), each
            // end refilled with its own process's messages from the other.
            (Some((mine, other)), Some(_)) => {
                super::seqpacket::refill(&other, &pending, &what)?;
                super::seqpacket::refill(&mine, &theirs, &what)?;
                let _ = ftx.send(other);
                return Ok((Response::StreamFd, vec![mine]));
            }
            (None, None) => {}
            _ => {
                return Err(err(
                    libc::EPROTOTYPE,
                    format!("{what}: a seqpacket socket at one end only"),
                ))
            }
        }
        // The reader shut its side for writing (it never writes), and
        // nothing can be in flight for the writer (whose end may have been
        // a shadow's relay, which says nothing of shutting).
        if pipe && !(wr_shut && their_wr) {
            let (reads, writes) = if wr_shut {
                (&pending, &theirs)
            } else {
                (&theirs, &pending)
            };
            if writes.is_empty() {
                match libkrg::streams::moving::pipe_holding(reads, 0) {
                    Ok((r, w)) => {
                        let (mine, peer) = if wr_shut { (r, w) } else { (w, r) };
                        let _ = ftx.send(peer);
                        return Ok((Response::StreamFd, vec![mine]));
                    }
                    Err(e) => {
                        // More in flight than a pipe holds (a relay's
                        // socket buffers): the reader gets its end at
                        // once, the bytes are fed in as it reads, and the
                        // writer gets its end after the last of them.
                        tracing::debug!("{what}: {e}: fed in while read");
                        let (r, w) = libkrg::streams::moving::pipe_holding(&[], 0)
                            .map_err(|e| err(libc::EMFILE, format!("{what}: {e}")))?;
                        let bytes = reads.clone();
                        let feed = move || {
                            let mut f = std::fs::File::from(w);
                            // A reader gone is the writer's EPIPE later,
                            // as on one machine.
                            let _ = std::io::Write::write_all(&mut f, &bytes);
                            std::os::fd::OwnedFd::from(f)
                        };
                        if wr_shut {
                            tokio::task::spawn_blocking(move || {
                                let _ = ftx.send(feed());
                            });
                            return Ok((Response::StreamFd, vec![r]));
                        }
                        let _ = ftx.send(r);
                        let w = tokio::task::spawn_blocking(feed)
                            .await
                            .map_err(|e| err(libc::EIO, format!("{what}: feeding: {e}")))?;
                        return Ok((Response::StreamFd, vec![w]));
                    }
                }
            }
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| sock_err(&what, e))?;
        let at = l.local_addr().map_err(|e| sock_err(&what, e))?;
        let (mine, accepted) = tokio::join!(tokio::net::TcpStream::connect(at), l.accept());
        let mine = mine.map_err(|e| sock_err(&what, e))?;
        let (theirs_end, _) = accepted.map_err(|e| sock_err(&what, e))?;
        // Our process's pending bytes go in from the peer's end, and the
        // other way round.
        let peer_fd = refill(theirs_end, &pending, their_wr).await?;
        let my_fd = refill(mine, &theirs, wr_shut).await?;
        let _ = ftx.send(peer_fd);
        Ok((Response::StreamFd, vec![my_fd]))
    }
}

async fn read_blob(s: &mut tokio::net::TcpStream) -> Result<Vec<u8>, ErrorReply> {
    use tokio::io::AsyncReadExt;
    let n = s.read_u64_le().await.map_err(|e| sock_err("stream", e))?;
    if n > MAX_PENDING {
        return Err(err(
            libc::EMSGSIZE,
            format!("stream: {n} pending bytes announced"),
        ));
    }
    let mut b = vec![0u8; n as usize];
    s.read_exact(&mut b)
        .await
        .map_err(|e| sock_err("stream", e))?;
    Ok(b)
}

/// Write the other side's pending bytes into our end (they arrive first on
/// the other side), shut writing if our process had, and give our end
/// back as a plain blocking socket.
async fn refill(
    mut s: tokio::net::TcpStream,
    theirs: &[u8],
    wr_shut: bool,
) -> Result<std::os::fd::OwnedFd, ErrorReply> {
    use tokio::io::AsyncWriteExt;
    if !theirs.is_empty() {
        // Room for all of it in our send buffer, so that neither side
        // waits for a process that is not reading yet (root may exceed
        // wmem_max).
        let want = theirs
            .len()
            .saturating_add(4 << 20)
            .min(i32::MAX as usize / 2);
        let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::SndBufForce, &want);
        s.write_all(theirs)
            .await
            .map_err(|e| sock_err("stream refill", e))?;
        // Queued: back to what autotuning would reach at most (the
        // process writes on this socket next; see `shrink_sndbuf`).
        libkrg::streams::moving::shrink_sndbuf(s.as_raw_fd(), tcp_wmem_max());
    }
    s.flush().await.map_err(|e| sock_err("stream refill", e))?;
    let std = s.into_std().map_err(|e| sock_err("stream", e))?;
    std.set_nonblocking(false)
        .map_err(|e| sock_err("stream", e))?;
    if wr_shut {
        let _ = std.shutdown(std::net::Shutdown::Write);
    }
    Ok(std::os::fd::OwnedFd::from(std))
}

/// The largest send buffer TCP autotuning gives a socket in this node's
/// network namespace (`tcp_wmem`'s third field; 4 MiB if unreadable).
fn tcp_wmem_max() -> i32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(4 << 20)
}
