//! Streams, the agent's side: UNIX stream socket names reachable from
//! every node (see docs/architecture/streams.md, "UNIX socket names
//! across nodes").
//!
//! A listening UNIX socket is a kernel object of one node: a client on
//! another node finds at most the socket file (on a shared directory) and
//! gets `ECONNREFUSED`, and an abstract name exists only in its node's
//! network namespace. When an SSI process listens on a named UNIX stream
//! socket, its agent records the name at the key home. A client on another
//! node asks the home who listens; the listener's agent queues a
//! *stand-in* on the listener (a local connection bound to an abstract
//! name that carries the connection's id) and holds a place for a TCP
//! connection, which the client's agent opens and hands to the client in
//! place of its socket. The listener's `accept` recognises the stand-in by
//! its name and swaps it for that connection. So the listener's readiness
//! (poll, epoll, a blocking accept) is the kernel's own, and the data path
//! is one TCP connection between the two nodes: the agents only set it up.

use super::common::{err, Answer, Answered, Caller};
use super::node::Node;
use super::peer::streams::FifoKey;
use super::streams::Streams;
use crate::agent::common::lock;
use libkrg::proto::{ErrorReply, Request, Response, UNIX_STAND_IN};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A stand-in queued on a local listener.
#[derive(Debug)]
struct StandIn {
    /// Kept open until the listener took the connection: the listener's
    /// end of it sits in the accept queue. `None` while it connects (the
    /// listener may accept it before its connect returns here).
    _sock: Option<socket2::Socket>,
    /// Who may take its connection: the uid that listened.
    uid: u32,
    since: Instant,
}

/// Cluster-wide UNIX socket names: where each is listened on, and the
/// stand-ins queued for clients of other nodes.
#[derive(Debug)]
pub struct UnixNames {
    node: Arc<Node>,
    streams: Arc<Streams>,
    /// At the key home: name -> the node where it is listened on.
    home: Mutex<HashMap<FifoKey, u32>>,
    /// Names local SSI processes listen on, with the uid that listened.
    local: Mutex<HashMap<FifoKey, u32>>,
    /// Stand-ins queued on local listeners, by connection id.
    stand_ins: Mutex<HashMap<u64, StandIn>>,
}

/// Longest a stand-in's connect may wait for room in the listener's
/// backlog (a client on the same node would wait as long as it takes; a
/// client elsewhere gets `ETIMEDOUT` rather than an agent call that never
/// ends).
const STAND_IN_CONNECT: Duration = Duration::from_secs(10);
/// A stand-in nobody accepted for this long is dropped with its place.
const STAND_IN_LIFE: Duration = Duration::from_secs(120);

/// A name as `ss -x` shows it: an abstract name after an `@`.
fn show(key: &FifoKey) -> String {
    match key.path.split_first() {
        Some((0, name)) => format!("@{}", String::from_utf8_lossy(name)),
        _ => String::from_utf8_lossy(&key.path).into_owned(),
    }
}

/// Whether a client with `uid` and `gids` may connect to a socket file
/// with metadata `m` (write permission, as `connect` requires).
fn may_connect(m: &std::fs::Metadata, uid: u32, gids: &[u32]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mode = m.mode();
    if uid == 0 {
        true
    } else if m.uid() == uid {
        mode & 0o200 != 0
    } else if gids.contains(&m.gid()) {
        mode & 0o020 != 0
    } else {
        mode & 0o002 != 0
    }
}

/// Connect a stand-in for connection `id` to the listener at `path` (an
/// abstract name if it starts with a NUL byte). Blocking.
fn connect_stand_in(path: &[u8], id: u64, seqpacket: bool) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, SockAddr, Socket, Type};
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let ty = if seqpacket {
        Type::SEQPACKET
    } else {
        Type::STREAM
    };
    let s = Socket::new(Domain::UNIX, ty.cloexec(), None)?;
    let mut me = vec![0u8];
    me.extend_from_slice(UNIX_STAND_IN);
    me.extend_from_slice(format!("{id:x}").as_bytes());
    s.bind(&SockAddr::unix(OsStr::from_bytes(&me))?)?;
    // A UNIX socket's blocking connect waits at most its send timeout.
    s.set_write_timeout(Some(STAND_IN_CONNECT))?;
    s.connect(&SockAddr::unix(OsStr::from_bytes(path))?)?;
    Ok(s)
}

/// A local request about a UNIX socket name (see `Agent::handle_local`);
/// a connection across nodes is a descriptor.
pub(super) async fn handle(unix: &Arc<UnixNames>, req: Request, who: Caller) -> Answered {
    match req {
        Request::UnixListen { path, dev, ino } => Ok((
            unix.unix_listen(who, FifoKey { path, dev, ino }).await?,
            Vec::new(),
        )),
        Request::UnixConnect {
            path,
            dev,
            ino,
            pair,
        } => {
            unix.unix_connect(who, FifoKey { path, dev, ino }, pair)
                .await
        }
        Request::UnixTake { id, pair } => unix.unix_take(who, id, pair).await,
        other => Err(super::common::misrouted(&other)),
    }
}

impl UnixNames {
    pub fn new(node: Arc<Node>, streams: Arc<Streams>) -> UnixNames {
        UnixNames {
            node,
            streams,
            home: Mutex::default(),
            local: Mutex::default(),
            stand_ins: Mutex::default(),
        }
    }

    /// `UnixListen` from a local process.
    async fn unix_listen(
        self: &Arc<Self>,
        who: Caller,
        key: FifoKey,
    ) -> Result<Response, ErrorReply> {
        lock(&self.local).insert(key.clone(), who.uid);
        let home = self.node.key_home();
        let me = self.node.node_id();
        tracing::debug!("UNIX socket {} listened on here", show(&key));
        if home == me {
            self.unix_name_set(key, me);
        } else {
            let c = self.node.client(home).await?;
            c.unix_name_set(super::common::ctx(), key, me)
                .await
                .map_err(|e| self.node.peer_lost(home, "key home", e))?;
        }
        Ok(Response::Ok)
    }

    /// At the key home.
    pub(crate) fn unix_name_set(&self, key: FifoKey, node: u32) {
        lock(&self.home).insert(key, node);
    }

    /// At the key home.
    pub(crate) fn unix_name_owner(&self, key: &FifoKey) -> Option<u32> {
        lock(&self.home).get(key).copied()
    }

    /// `UnixConnect` from a local process.
    async fn unix_connect(
        self: &Arc<Self>,
        who: Caller,
        key: FifoKey,
        pair: Option<(i32, i32)>,
    ) -> Result<Answer, ErrorReply> {
        let home = self.node.key_home();
        let me = self.node.node_id();
        let owner = if home == me {
            self.unix_name_owner(&key)
        } else {
            // A home that cannot answer leaves the connect to the kernel
            // here, as before krg (never a failure of its own making).
            let asked = match self.node.client(home).await {
                Ok(c) => c
                    .unix_name_owner(super::common::ctx(), key.clone())
                    .await
                    .map_err(|e| self.node.peer_lost(home, "key home", e).msg),
                Err(e) => Err(e.msg),
            };
            match asked {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!("UNIX socket {}: key home node {home}: {e}", show(&key));
                    None
                }
            }
        };
        let name = show(&key);
        let node = match owner {
            Some(n) if n != me => n,
            // Listened on here, or nowhere krg knows of: the kernel's.
            _ => return Ok((Response::Local, Vec::new())),
        };
        if !self.node.is_up(node) {
            return Err(err(
                libc::ECONNREFUSED,
                format!("UNIX socket {name}: node {node}, where it was listened on, is down"),
            ));
        }
        let (uid, gid, groups) = super::remote::creds(who.pid).ok_or_else(|| {
            err(
                libc::ESRCH,
                format!("kernel pid {}: cannot read its credentials", who.pid),
            )
        })?;
        let gids = std::iter::once(gid).chain(groups).collect();
        let pair = pair
            .map(|p| super::streams::seqpacket::take_pair(who.pid, p))
            .transpose()?;
        let c = self.node.client(node).await?;
        let id = c
            .unix_stand_in(super::common::ctx(), key, uid, gids, pair.is_some())
            .await
            .map_err(|e| {
                self.node.drop_client(node);
                err(
                    libc::EHOSTUNREACH,
                    format!("UNIX socket {name}: node {node}: {e}"),
                )
            })??;
        tracing::debug!("UNIX socket {name}: connection {id:#x} to node {node}");
        self.streams
            .stream_attach_with(id, node, Vec::new(), false, false, pair)
            .await
    }

    /// At the listener's node: queue a stand-in for a client of another
    /// node and hold the place of its connection.
    pub(crate) async fn unix_stand_in(
        self: &Arc<Self>,
        key: FifoKey,
        uid: u32,
        gids: Vec<u32>,
        seqpacket: bool,
    ) -> Result<u64, ErrorReply> {
        let name = show(&key);
        let me = self.node.node_id();
        // Only names an SSI process listened on: never any socket of this
        // node under the agent's own rights.
        let Some(owner_uid) = lock(&self.local).get(&key).copied() else {
            return Err(err(
                libc::ECONNREFUSED,
                format!("UNIX socket {name}: no SSI process listens on it on node {me}"),
            ));
        };
        if key.path.first() != Some(&0) {
            use std::os::unix::ffi::OsStrExt;
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let p = std::path::Path::new(std::ffi::OsStr::from_bytes(&key.path));
            let m = std::fs::metadata(p).map_err(|e| {
                err(
                    e.raw_os_error().unwrap_or(libc::ECONNREFUSED),
                    format!("UNIX socket {name} on node {me}: {e}"),
                )
            })?;
            if !m.file_type().is_socket() || m.dev() != key.dev || m.ino() != key.ino {
                lock(&self.local).remove(&key);
                return Err(err(
                    libc::ECONNREFUSED,
                    format!("UNIX socket {name}: no longer the socket listened on on node {me}"),
                ));
            }
            if !may_connect(&m, uid, &gids) {
                return Err(err(
                    libc::EACCES,
                    format!("UNIX socket {name}: uid {uid} may not write to it"),
                ));
            }
        }
        let id = self.streams.new_stream_id();
        self.streams.expect_connection(id, false);
        lock(&self.stand_ins).insert(
            id,
            StandIn {
                _sock: None,
                uid: owner_uid,
                since: Instant::now(),
            },
        );
        let path = key.path.clone();
        let sock = tokio::task::spawn_blocking(move || connect_stand_in(&path, id, seqpacket))
            .await
            .map_err(|e| err(libc::EIO, format!("UNIX socket {name}: {e}")))
            .and_then(|r| {
                r.map_err(|e| {
                    let errno = match e.raw_os_error() {
                        Some(libc::EAGAIN) => libc::ETIMEDOUT,
                        Some(n) => n,
                        None => libc::EIO,
                    };
                    err(errno, format!("UNIX socket {name} on node {me}: {e}"))
                })
            });
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                lock(&self.stand_ins).remove(&id);
                self.streams.forget_expected(id);
                return Err(e);
            }
        };
        let stale: Vec<u64> = {
            let mut t = lock(&self.stand_ins);
            match t.get_mut(&id) {
                Some(s) => s._sock = Some(sock),
                // Taken already: the listener's copy is replaced.
                None => drop(sock),
            }
            let old: Vec<u64> = t
                .iter()
                .filter(|(_, s)| s.since.elapsed() > STAND_IN_LIFE)
                .map(|(i, _)| *i)
                .collect();
            for i in &old {
                t.remove(i);
            }
            old
        };
        for i in stale {
            self.streams.forget_expected(i);
        }
        Ok(id)
    }

    /// `UnixTake` from the listener that accepted stand-in `id`.
    async fn unix_take(
        self: &Arc<Self>,
        who: Caller,
        id: u64,
        pair: Option<(i32, i32)>,
    ) -> Result<Answer, ErrorReply> {
        let owner = lock(&self.stand_ins).get(&id).map(|s| s.uid);
        match owner {
            None => {
                return Err(err(
                    libc::ENOENT,
                    format!("connection {id:#x}: no stand-in for it here"),
                ))
            }
            Some(u) if u != who.uid && who.uid != 0 => {
                return Err(err(
                    libc::EPERM,
                    format!("connection {id:#x}: uid {} did not listen for it", who.uid),
                ))
            }
            Some(_) => {}
        }
        let pair = pair
            .map(|p| super::streams::seqpacket::take_pair(who.pid, p))
            .transpose()?;
        let fd = self.streams.take_expected(id).await;
        // The listener's copy of the stand-in is replaced by now.
        drop(lock(&self.stand_ins).remove(&id));
        let fd = fd?;
        let Some((end, relay)) = pair else {
            return Ok((Response::StreamFd, vec![fd]));
        };
        // A seqpacket connection: `fd` is the connection to the client's
        // node, relayed from the end of the listener's new socketpair.
        let tcp = std::net::TcpStream::from(fd);
        let node = tcp
            .peer_addr()
            .ok()
            .and_then(|a| self.streams.node_at(a.ip()))
            .unwrap_or(0);
        self.streams.relay(id, node, relay, tcp);
        Ok((Response::StreamFd, vec![end]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stand_in_is_bound_to_its_abstract_name_and_reaches_the_listener() {
        let name = format!("krg-unix-test-{}", std::process::id());
        let mut path = vec![0u8];
        path.extend_from_slice(name.as_bytes());
        let l = std::os::unix::net::UnixListener::bind_addr(
            &<std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
                name.as_bytes(),
            )
            .unwrap(),
        )
        .unwrap();
        let _s = connect_stand_in(&path, 0x2a, false).unwrap();
        let (_c, peer) = l.accept().unwrap();
        let got = std::os::linux::net::SocketAddrExt::as_abstract_name(&peer).unwrap();
        let mut want = UNIX_STAND_IN.to_vec();
        want.extend_from_slice(b"2a");
        assert_eq!(got, &want[..]);
    }

    #[test]
    fn nobody_listening_is_refused() {
        let e = connect_stand_in(b"\0krg-unix-test-nobody-listens", 7, false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED));
    }
}
