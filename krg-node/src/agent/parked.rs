//! Connections kept open for a checkpointed process (see
//! docs/architecture/checkpoint.md, "Connections in an image").
//!
//! A process checkpointed with `--kill` whose fds lead to other processes
//! (a TCP or UNIX connection, a listener, a pipe) parks each here before it
//! is killed: the agent holds a copy (`pidfd_getfd`), so the other end sees
//! neither EOF nor a reset and waits, as for a stopped process; what was in
//! flight stays in the socket or pipe itself. The restore of the image on
//! this node takes the very same kernel objects back.

use super::common::{err, Answer, Answered, Caller};
use super::node::Node;
use super::peer::streams::PortOp;
use super::streams::Streams;
use crate::agent::common::lock;
use libkrg::proto::{ErrorReply, Request, Response};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

/// One park: owner uid, the fd, the TCP port of a migrating process's
/// listener.
type Park = (u32, OwnedFd, Option<u16>);

/// Fds kept open for checkpointed processes, and the listeners kept for
/// processes that moved away.
#[derive(Debug)]
pub struct Parked {
    node: Arc<Node>,
    streams: Arc<Streams>,
    /// The parks of this node, by id.
    parks: Mutex<HashMap<i32, Park>>,
    /// Listeners kept for processes that moved away, by port: how to ask
    /// each forwarder for its listener back.
    forwarders: Mutex<HashMap<u16, tokio::sync::oneshot::Sender<Giver>>>,
}

/// The port of listening TCP socket `fd`.
fn listening_port(fd: &OwnedFd) -> Option<u16> {
    let s = socket2::SockRef::from(fd);
    if !s.is_listener().ok()? || s.r#type().ok()? != socket2::Type::STREAM {
        return None;
    }
    s.local_addr().ok()?.as_socket().map(|a| a.port())
}

/// How long a passed-on connection waits for the process to listen on its
/// new node (it restores meanwhile).
const FORWARD_CONNECT: std::time::Duration = std::time::Duration::from_secs(20);

/// Where a forwarder gives its listener back.
pub type Giver = tokio::sync::oneshot::Sender<OwnedFd>;

/// Connection `c` (from `from`) that came to a kept listener, passed on to
/// `to` (retried while the process is still being restored there).
async fn pass_on(
    mut c: tokio::net::TcpStream,
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    port: u16,
) {
    let deadline = tokio::time::Instant::now() + FORWARD_CONNECT;
    let mut s = loop {
        match tokio::net::TcpStream::connect(to).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                tracing::warn!("port {port}: passing on {from}: {e}");
                return;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
}

/// A local request about parked descriptors (see `Agent::handle_local`);
/// taking one back answers with it.
pub(super) async fn handle(parked: &Arc<Parked>, req: Request, who: Caller) -> Answered {
    match req {
        Request::Park { fd, moving } => Ok((parked.park(who, fd, moving)?, Vec::new())),
        Request::ForwardParked { id, node } => {
            Ok((parked.forward_parked(who, id, node)?, Vec::new()))
        }
        Request::Unpark { id } => parked.unpark(who, id),
        Request::TakeForwarded { port } => parked.take_forwarded(port).await,
        other => Err(super::common::misrouted(&other)),
    }
}

impl Parked {
    pub fn new(node: Arc<Node>, streams: Arc<Streams>) -> Parked {
        Parked {
            node,
            streams,
            parks: Mutex::default(),
            forwarders: Mutex::default(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Park>> {
        lock(&self.parks)
    }

    /// `Park`: keep a copy of the caller's fd `fd` until `Unpark` (or, for
    /// a migrating process's listener, `ForwardParked`).
    fn park(&self, who: Caller, fd: i32, moving: bool) -> Result<Response, ErrorReply> {
        who.kpid()?;
        let f = super::sys::pidfd_getfd(who.pid, fd).map_err(|e| {
            err(
                libc::EBADF,
                format!("parking fd {fd} of kernel pid {}: {e}", who.pid),
            )
        })?;
        let port = if moving {
            let p = listening_port(&f).ok_or_else(|| {
                err(
                    libc::EINVAL,
                    format!(
                        "parking fd {fd} of kernel pid {}: not a listening TCP socket",
                        who.pid
                    ),
                )
            })?;
            // Its process takes the port on its new node.
            self.streams.forwarding().insert(p);
            Some(p)
        } else {
            None
        };
        let mut m = self.map();
        let id = loop {
            let id = (rand::random::<u32>() >> 1) as i32;
            if id != 0 && !m.contains_key(&id) {
                break id;
            }
        };
        m.insert(id, (who.uid, f, port));
        tracing::info!(
            "kernel pid {}: fd {fd} parked here as {id} ({})",
            who.pid,
            if moving {
                "while it moves"
            } else {
                "for its restart"
            }
        );
        Ok(Response::Id(id))
    }

    /// Take park `id` for `who` (its owner, or root).
    fn take_park(&self, who: Caller, id: i32) -> Result<(OwnedFd, Option<u16>), ErrorReply> {
        let mut m = self.map();
        match m.get(&id) {
            None => Err(err(
                libc::ENOENT,
                format!(
                    "node {}: nothing is parked as {id} (restarted already, or the agent restarted)",
                    self.node.node_id()
                ),
            )),
            Some((uid, ..)) if who.uid != 0 && who.uid != *uid => Err(err(
                libc::EPERM,
                format!("node {}: park {id} is another user's", self.node.node_id()),
            )),
            Some(_) => {
                let (_, f, port) = m.remove(&id).expect("checked above");
                Ok((f, port))
            }
        }
    }

    fn stop_forwarding(&self, port: u16) {
        self.streams.forwarding().remove(&port);
    }

    /// `ForwardParked`: the process that parked listener `id` here listens
    /// on `node` now. Connections that still come here (to this node's
    /// address, or to the loopback from a client that asked before the
    /// port moved) are accepted and passed on to wherever the port is held
    /// now, each over a new connection, until nobody holds it any more, or
    /// the process comes back and takes its listener here again
    /// (`TakeForwarded`).
    fn forward_parked(
        self: &Arc<Self>,
        who: Caller,
        id: i32,
        node: u32,
    ) -> Result<Response, ErrorReply> {
        let (f, port) = self.take_park(who, id)?;
        let Some(port) = port else {
            return Err(err(
                libc::EINVAL,
                format!("park {id} is not a moving process's listener"),
            ));
        };
        let l = std::net::TcpListener::from(f);
        let l = l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
            .map_err(|e| {
                self.stop_forwarding(port);
                err(libc::EIO, format!("port {port}: {e}"))
            })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.forwarders().insert(port, tx);
        tracing::info!("port {port}: what still comes here goes on to node {node}");
        let me = self.clone();
        tokio::spawn(async move {
            me.forward(l, port, node, rx).await;
            tracing::info!("port {port}: no longer passed on from here");
        });
        Ok(Response::Ok)
    }

    fn forwarders(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u16, tokio::sync::oneshot::Sender<Giver>>> {
        lock(&self.forwarders)
    }

    /// `TakeForwarded` from a process listening again on `port` here (it
    /// moved back): the listener this agent kept for it, with what waits
    /// in its queue, instead of a new socket. `Ok` when there is none.
    async fn take_forwarded(&self, port: u16) -> Result<Answer, ErrorReply> {
        let Some(tx) = self.forwarders().remove(&port) else {
            return Ok((Response::Ok, Vec::new()));
        };
        let (give, got) = tokio::sync::oneshot::channel();
        if tx.send(give).is_err() {
            return Ok((Response::Ok, Vec::new()));
        }
        match tokio::time::timeout(std::time::Duration::from_secs(5), got).await {
            Ok(Ok(fd)) => Ok((Response::StreamFd, vec![fd])),
            _ => Ok((Response::Ok, Vec::new())),
        }
    }

    /// Accept on `l` and pass each connection on to the node that holds
    /// `port` (`node` at first; the port home is asked every 2 s), until
    /// nobody holds it (once it was seen held, or after a grace period for
    /// the restore), or `back` asks for the listener.
    async fn forward(
        self: &Arc<Self>,
        l: tokio::net::TcpListener,
        port: u16,
        node: u32,
        mut back: tokio::sync::oneshot::Receiver<Giver>,
    ) {
        let start = tokio::time::Instant::now();
        let mut to = self
            .streams
            .node_ipv4(node)
            .map(|ip| std::net::SocketAddr::from((ip, port)));
        let mut seen = false;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                give = &mut back => {
                    // The process is back on this node: its listener, with
                    // its queue, is its own again.
                    self.stop_forwarding(port);
                    if let (Ok(give), Ok(std)) = (give, l.into_std()) {
                        let _ = std.set_nonblocking(false);
                        let _ = give.send(OwnedFd::from(std));
                    }
                    return;
                }
                a = l.accept() => {
                    let (Ok((c, from)), Some(to)) = (a, to) else { continue };
                    tokio::spawn(pass_on(c, from, to, port));
                }
                _ = tick.tick() => {
                    let holder = match self.streams.port_call(PortOp::Owner { port }).await {
                        Ok(Some(n)) if n != self.node.node_id() => Some(n),
                        _ => None,
                    };
                    let taken = match holder {
                        Some(n) => self.streams.probe_on(n, port, true).await,
                        None => false,
                    };
                    if taken {
                        seen = true;
                        to = holder
                            .and_then(|n| self.streams.node_ipv4(n))
                            .map(|ip| std::net::SocketAddr::from((ip, port)));
                    } else if seen || start.elapsed() > FORWARD_CONNECT {
                        self.forwarders().remove(&port);
                        self.stop_forwarding(port);
                        return;
                    }
                }
            }
        }
    }

    /// `Unpark`: the fd parked as `id`, to its owner (or root).
    fn unpark(&self, who: Caller, id: i32) -> Result<Answer, ErrorReply> {
        let (f, port) = self.take_park(who, id)?;
        if let Some(p) = port {
            // A failed move: the process listens here again.
            self.stop_forwarding(p);
        }
        Ok((Response::StreamFd, vec![f]))
    }
}
