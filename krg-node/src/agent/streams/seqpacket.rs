//! UNIX seqpacket sockets whose ends are on two nodes: the agent's relay.
//!
//! A seqpacket socket's messages keep their boundaries; a TCP connection
//! would not. So each process holds a real seqpacket socket (one end of a
//! socketpair it made itself), whose other end its agent holds and relays,
//! message by message, over one TCP connection to the agent of the other
//! end's node (made by a stream hand-over, `streams.rs`). Ends on one node
//! are one socketpair, with no agent in between. See
//! docs/architecture/streams.md, "Moving UNIX seqpacket sockets".
//!
//! On the TCP connection each direction is a series of frames: a tag byte,
//! a little-endian `u32` length, the message. `SHUT`: the process shut
//! down writing (the other side shuts its relay end for writing, so its
//! process reads the end of stream after the last message); `CLOSE`: the
//! process is gone or its end can no longer be written (the other side
//! shuts its relay end both ways, so its process's next write fails with
//! `EPIPE`, as with a peer that closed).

use super::super::common::sock_err;
use super::super::sys;
use super::Streams;
use crate::agent::common::lock;
use libkrg::proto::ErrorReply;
use libkrg::streams::seqpacket::{self, Got, MAX_MESSAGE};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{MsgFlags, Shutdown};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MSG: u8 = 0;
const SHUT: u8 = 1;
const CLOSE: u8 = 2;

/// A new socketpair of a process: `(its end, the end the agent takes)`.
pub type Pair = (OwnedFd, OwnedFd);

/// The relays of this node, by stream id: the inode of the relay end (the
/// agent's socket) and the node at the other end.
#[derive(Debug, Default)]
pub struct Relays(std::sync::Mutex<HashMap<u64, (u64, u32)>>);

impl Relays {
    pub(crate) fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u64, u32)>> {
        lock(&self.0)
    }

    /// The relay whose end is socket `ino`: `(id, node at the other end)`.
    pub fn by_inode(&self, ino: u64) -> Option<(u64, u32)> {
        self.map()
            .iter()
            .find(|(_, (i, _))| *i == ino)
            .map(|(id, (_, n))| (*id, *n))
    }

    /// Relay end inodes by stream id (a copy, for the blocking walks).
    pub fn inodes(&self) -> HashMap<u64, u64> {
        self.map().iter().map(|(id, (i, _))| (*id, *i)).collect()
    }

    /// How many relays run here.
    pub fn count(&self) -> usize {
        self.map().len()
    }
}

/// Take fds `(mine, other)` of kernel pid `pid` (a socketpair it just
/// made) into the agent.
pub fn take_pair(pid: i32, fds: (i32, i32)) -> Result<Pair, ErrorReply> {
    let what = format!("the socketpair of kernel pid {pid}");
    let pidfd = sys::pidfd_open(pid).map_err(|e| sock_err(&what, e))?;
    let take = |fd: i32| {
        let o = sys::getfd(pidfd.as_fd(), fd, || format!("pidfd_getfd(fd {fd})"))
            .map_err(|e| sock_err(&what, e))?;
        if !seqpacket::is_seqpacket(o.as_raw_fd()) {
            return Err(sock_err(
                &format!("{what}: fd {fd}"),
                std::io::Error::from_raw_os_error(libc::ENOTSOCK),
            ));
        }
        Ok(o)
    };
    Ok((take(fds.0)?, take(fds.1)?))
}

/// Put `framed` pending messages into the queue of `end`'s peer.
pub fn refill(end: &OwnedFd, framed: &[u8], what: &str) -> Result<(), ErrorReply> {
    seqpacket::refill(end.as_raw_fd(), framed)
        .map_err(|e| super::err(libc::EIO, format!("{what}: {e}")))
}

impl Streams {
    /// Relay stream `id` between `end` (the agent's end of a process's
    /// socketpair) and `tcp` (to the agent of `node`), until both
    /// directions have ended.
    pub(crate) fn relay(
        self: &Arc<Self>,
        id: u64,
        node: u32,
        end: OwnedFd,
        tcp: std::net::TcpStream,
    ) {
        let me = self.clone();
        // Known before the relay runs: a move may look for it at once.
        let ino = libkrg::streams::moving::ino_of(end.as_raw_fd()).unwrap_or(0);
        self.moving.relays.map().insert(id, (ino, node));
        tokio::spawn(async move {
            tracing::debug!("seqpacket relay {id:#x} to node {node}: started");
            match run(end, tcp).await {
                Ok(()) => tracing::debug!("seqpacket relay {id:#x} to node {node}: ended"),
                Err(e) => tracing::debug!("seqpacket relay {id:#x} to node {node}: {e}"),
            }
            me.moving.relays.map().remove(&id);
        });
    }
}

async fn run(end: OwnedFd, tcp: std::net::TcpStream) -> std::io::Result<()> {
    seqpacket::pass_credentials(end.as_raw_fd());
    libkrg::streams::moving::set_nonblock(end.as_raw_fd(), true)?;
    tcp.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(tcp)?;
    let _ = tcp.set_nodelay(true);
    let (mut rd, wr) = tcp.into_split();
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let end = Arc::new(sys::async_fd(end)?);
    let up = {
        let (end, wr) = (end.clone(), wr.clone());
        async move {
            let r = up(&end, &wr).await;
            if r.is_err() {
                // The other side must not wait for this direction.
                let _ = send(&wr, CLOSE, &[]).await;
            }
            r
        }
    };
    let down = async {
        let r = down(&end, &mut rd, &wr).await;
        if r.is_err() {
            // The other node is gone: the process's reads end, its writes
            // fail, as with a peer that reset the connection.
            shut(&end, Shutdown::Both);
        }
        r
    };
    let (a, b) = tokio::join!(up, down);
    tracing::debug!("seqpacket relay: up {a:?}, down {b:?}");
    a.and(b)
}

fn shut(end: &AsyncFd<OwnedFd>, how: Shutdown) {
    let _ = nix::sys::socket::shutdown(end.get_ref().as_raw_fd(), how);
}

async fn send(
    wr: &tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
    tag: u8,
    msg: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&(msg.len() as u32).to_le_bytes());
    let mut w = wr.lock().await;
    w.write_all(&head).await?;
    w.write_all(msg).await
}

/// The process's messages to the other node, then how its end ended.
async fn up(
    end: &AsyncFd<OwnedFd>,
    wr: &tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
) -> std::io::Result<()> {
    loop {
        let mut guard = end.readable().await?;
        loop {
            match seqpacket::recv(end.get_ref().as_raw_fd(), true) {
                Ok(Got::Message(m)) => send(wr, MSG, &m).await?,
                Ok(Got::End) => {
                    // Shut both ways (`POLLHUP`): the process closed its
                    // end (or shut it both ways): its peer's writes fail.
                    let mut p = [PollFd::new(end.get_ref().as_fd(), PollFlags::empty())];
                    let _ = poll(&mut p, PollTimeout::ZERO);
                    let hup = p[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLHUP));
                    let tag = if hup { CLOSE } else { SHUT };
                    send(wr, tag, &[]).await?;
                    return wr.lock().await.flush().await;
                }
                Ok(Got::Nothing) => {
                    guard.clear_ready();
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The other node's messages into the process's queue.
async fn down(
    end: &AsyncFd<OwnedFd>,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    wr: &tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
) -> std::io::Result<()> {
    let mut closed = false;
    loop {
        let tag = rd.read_u8().await?;
        let n = rd.read_u32_le().await? as usize;
        if n > MAX_MESSAGE {
            return Err(std::io::Error::other(format!("a {n}-byte frame")));
        }
        let mut m = vec![0u8; n];
        rd.read_exact(&mut m).await?;
        match tag {
            MSG if closed => {}
            MSG => {
                if let Err(e) = write_msg(end, &m).await {
                    // The process's end is gone: the other side's writes
                    // must fail from now on.
                    tracing::debug!("seqpacket relay: writing to the process: {e}");
                    closed = true;
                    send(wr, CLOSE, &[]).await?;
                }
            }
            SHUT => {
                shut(end, Shutdown::Write);
                return Ok(());
            }
            CLOSE => {
                shut(end, Shutdown::Both);
                return Ok(());
            }
            t => return Err(std::io::Error::other(format!("frame tag {t}"))),
        }
    }
}

async fn write_msg(end: &AsyncFd<OwnedFd>, m: &[u8]) -> std::io::Result<()> {
    loop {
        let mut guard = end.writable().await?;
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        let e = match nix::sys::socket::send(end.get_ref().as_raw_fd(), m, flags) {
            Ok(_) => return Ok(()),
            Err(e) => std::io::Error::from(e),
        };
        match e.raw_os_error() {
            Some(libc::EAGAIN) => guard.clear_ready(),
            Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
}
