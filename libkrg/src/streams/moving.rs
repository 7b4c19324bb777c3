//! Moving a TCP connection between two SSI processes with one of them
//! (see docs/architecture/streams.md, "Moving TCP connections").
//!
//! Both ends are frozen. Each shuts down writing and reads its socket to
//! EOF: what was in flight for it is then in hand (the mover's goes in its
//! image, the peer's to its agent). The agents make a new connection
//! between the nodes where the two ends now are and write each side's
//! pending bytes into it from the *other* side, so each process reads
//! first what it had not read yet. Each process then puts its end under
//! the old fd number, with the old file flags and options, and re-adds it
//! to the epoll sets that watched the old one. Threads blocked in the old
//! socket were interrupted by the freeze and restart on the new one.
//!
//! A pipe whose other end is held by an SSI process moves the same way:
//! its reader takes what is in the pipe (its pending bytes), its writer has
//! nothing in flight, and both ends become the new connection (a pipe
//! cannot span two nodes; a TCP connection reads and writes as one does).
//!
//! Everything here runs in the leader of a capture (the other threads
//! parked), or in a restorer before the program runs.

#![deny(unsafe_code)]

use super::sock::{accept_queue, int_opt, readable_before, set_int_opt, stat_of, tcp_info, u32_at};
use crate::client;
use crate::error::Error;
use crate::proto::{Request, Response, StreamPeer};
use crate::sys::{events, fd as sysfd, raw, sock};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Longest a drain may wait for the other side's end of stream.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

// The agent uses these by their old path.
pub use super::sock::{ino_of, set_nonblock, shrink_sndbuf};

/// What a connection was, as it is given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opts {
    /// `F_GETFL` flags (`O_NONBLOCK`).
    pub flags: i32,
    pub nodelay: bool,
    pub keepalive: bool,
    /// It stands for a pipe (a pipe whose ends parted, or one about to):
    /// ends that meet on one node again get a pipe again.
    pub pipe: bool,
    /// `SO_PASSCRED` (a seqpacket socket's replacement is one too).
    pub passcred: bool,
}

/// The two ends of `fd` if it is a connected TCP socket (IPv4 or IPv6):
/// `(local, peer)` as text.
pub fn tcp_ends(fd: RawFd) -> Option<(String, String)> {
    let ty = int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE)?;
    let proto = int_opt(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    if ty != libc::SOCK_STREAM || proto != libc::IPPROTO_TCP {
        return None;
    }
    let mut a = sock::zeroed::<libc::sockaddr_storage>();
    let len = sock::getsockname(fd, &mut a).ok()?;
    let l = inet_addr(&a, len)?;
    let len = sock::getpeername(fd, &mut a).ok()?;
    let p = inet_addr(&a, len)?;
    Some((l.to_string(), p.to_string()))
}

/// An IPv4 or IPv6 address as the kernel gave it (`len` bytes of `a`), as
/// std reads one.
fn inet_addr(a: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let b = sock::addr_bytes(a);
    let port = u16::from_be_bytes([b[2], b[3]]);
    let len = len as usize;
    match a.ss_family as i32 {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[8..24]);
            let ip = Ipv6Addr::from(o);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                port,
                u32_at(b, 4),
                u32_at(b, 24),
            )))
        }
        _ => None,
    }
}

/// The options of `fd` that its replacement must keep. A pipe's
/// replacement sends at once, as a pipe does (`TCP_NODELAY`).
pub fn opts(fd: RawFd) -> Opts {
    let pipe = is_pipe(fd) || pipe_born(fd);
    Opts {
        flags: sysfd::status_flags(fd).unwrap_or(0),
        // A pipe or a UNIX socket sends at once: so does its replacement.
        nodelay: pipe
            || unix_stream(fd)
            || int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY).unwrap_or(0) != 0,
        keepalive: int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE).unwrap_or(0) != 0,
        pipe,
        passcred: int_opt(fd, libc::SOL_SOCKET, libc::SO_PASSCRED).unwrap_or(0) != 0,
    }
}

/// This process's sockets that stand for a pipe: `(fd, socket inode)`,
/// fd -1 for a free slot. In the process's memory, so it moves with it; an
/// entry whose fd now holds another file no longer matches its inode. A
/// fixed array: it changes during captures, whose allocations live in an
/// arena that the image leaves out.
static PIPE_BORN: std::sync::Mutex<[(RawFd, u64); 64]> = std::sync::Mutex::new([(-1, 0); 64]);

fn pipe_born_table() -> std::sync::MutexGuard<'static, [(RawFd, u64); 64]> {
    PIPE_BORN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Put `(fd, ino)` in the table (in place of any entry of `fd`).
fn put_pipe_born(t: &mut [(RawFd, u64); 64], fd: RawFd, ino: Option<u64>) {
    for e in t.iter_mut().filter(|e| e.0 == fd) {
        *e = (-1, 0);
    }
    if let Some(ino) = ino {
        if let Some(e) = t.iter_mut().find(|e| e.0 < 0) {
            *e = (fd, ino);
        }
    }
}

/// What `/proc/self/fd/N` says `fd` is (`pipe:[N]`, a FIFO's path).
pub fn fd_link(fd: RawFd) -> Option<String> {
    let l = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    l.into_os_string().into_string().ok()
}

/// Whether socket `fd` stands for a pipe.
pub fn pipe_born(fd: RawFd) -> bool {
    let Some(ino) = ino_of(fd) else {
        return false;
    };
    pipe_born_table().contains(&(fd, ino))
}

/// Before a migration's image is sent: `fds` will stand for a pipe on the
/// target, whatever socket they get there (inode 0 until
/// [`bind_after_restore`]; the restorer's own notes are overwritten by the
/// image's memory).
pub fn mark_for_restore(fds: &[RawFd]) {
    let mut t = pipe_born_table();
    for fd in fds {
        put_pipe_born(&mut t, *fd, Some(0));
    }
}

/// In the restored process: the marked fds' sockets are now known.
pub fn bind_after_restore() {
    let mut t = pipe_born_table();
    for e in t.iter_mut().filter(|e| e.0 >= 0 && e.1 == 0) {
        *e = match ino_of(e.0) {
            Some(i) if !is_pipe(e.0) => (e.0, i),
            _ => (-1, 0),
        };
    }
}

/// Note whether what is under `fd` now stands for a pipe (a real pipe
/// needs no note).
pub fn note_pipe_born(fd: RawFd, pipe: bool) {
    let ino = if pipe && !is_pipe(fd) {
        ino_of(fd)
    } else {
        None
    };
    put_pipe_born(&mut pipe_born_table(), fd, ino);
}

/// Whether `fd` is a connected UNIX stream socket.
pub fn unix_stream(fd: RawFd) -> bool {
    if int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE) != Some(libc::SOCK_STREAM)
    {
        return false;
    }
    sock::getpeername(fd, &mut sock::zeroed::<libc::sockaddr_un>()).is_ok()
}

/// Whether `fd` is a pipe.
pub fn is_pipe(fd: RawFd) -> bool {
    stat_of(fd).is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO)
}

/// Whether pipe end `fd` is a read end.
pub fn pipe_reads(fd: RawFd) -> bool {
    sysfd::status_flags(fd).is_ok_and(|fl| fl & libc::O_ACCMODE == libc::O_RDONLY)
}

/// Bytes in pipe `fd`.
fn pipe_bytes(fd: RawFd) -> Result<usize, Error> {
    let n = sysfd::readable_bytes(fd).map_err(|e| Error::io("FIONREAD", &e).fd(fd))?;
    Ok(n.max(0) as usize)
}

/// Take what is in pipe `fd`, its writers parked. A read end gives its
/// bytes and `true`: it never writes, so its new connection is shut for
/// writing. A write end has nothing in flight for it.
pub fn drain_pipe(fd: RawFd) -> Result<(Vec<u8>, bool), Error> {
    if !pipe_reads(fd) {
        return Ok((Vec::new(), false));
    }
    Ok((read_n(fd, pipe_bytes(fd)?)?, true))
}

/// A new pipe (read end, write end) with `bytes` in it already, of at
/// least `size` bytes: room for them all at once, so that nobody waits for
/// a reader that is not reading yet (the restorer of a pipe that was full,
/// an agent refilling a pipe whose ends met again).
pub fn pipe_holding(bytes: &[u8], size: i32) -> Result<(OwnedFd, OwnedFd), Error> {
    let (r, w) = sysfd::pipe2(libc::O_CLOEXEC).map_err(|e| Error::io("pipe2", &e))?;
    if bytes.is_empty() && size <= 0 {
        return Ok((r, w));
    }
    // Never below the default capacity (64 KiB).
    let want = size.max(bytes.len().next_power_of_two() as i32).max(65536);
    // Sized (best effort: the bytes must fit below), written without
    // blocking, then back to blocking (the process sets its own flags).
    let wfd = w.as_raw_fd();
    let _ = sysfd::set_pipe_size(wfd, want);
    let _ = sysfd::set_status_flags(wfd, libc::O_NONBLOCK);
    let n = sysfd::write(wfd, bytes).map_or(-1, |n| n as isize);
    let _ = sysfd::set_status_flags(wfd, 0);
    if n != bytes.len() as isize {
        return Err(Error::errno(
            libc::ENOSPC,
            format!("pipe: {} bytes to put in it, {n} fit", bytes.len()),
        ));
    }
    Ok((r, w))
}

/// The `n` bytes waiting in pipe `fd` (there, so reading does not block).
fn read_n(fd: RawFd, n: usize) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match sysfd::read(fd, &mut out[got..]) {
            Ok(0) => {
                let e = std::io::Error::last_os_error();
                return Err(Error::io("reading the pipe", &e).fd(fd));
            }
            Ok(r) => got += r,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(Error::io("reading the pipe", &e).fd(fd)),
        }
    }
    Ok(out)
}

/// A copy of what is in pipe read end `fd`, left where it is (`tee` into a
/// pipe of the same capacity): the process may go on here with it.
pub fn peek_pipe(fd: RawFd) -> Result<Vec<u8>, Error> {
    let n = pipe_bytes(fd)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let (r, w) =
        sysfd::pipe2(libc::O_CLOEXEC | libc::O_NONBLOCK).map_err(|e| Error::io("pipe2", &e))?;
    let size = sysfd::pipe_size(fd).unwrap_or(-1);
    let _ = sysfd::set_pipe_size(w.as_raw_fd(), size.max(n as i32));
    // The pipe's bytes duplicated into ours without taking them.
    match sysfd::tee(fd, w.as_raw_fd(), n, libc::SPLICE_F_NONBLOCK) {
        Ok(t) if t == n => {}
        t => {
            let what = format!("copying the {n} bytes in the pipe");
            return Err(match t {
                Ok(t) => Error::other(format!("{what}: only {t}")),
                Err(e) => Error::io(what, &e),
            }
            .fd(fd));
        }
    }
    drop(w);
    read_n(r.as_raw_fd(), n).map_err(|e| e.during("the copy of the pipe").fd(fd))
}

/// Whether this side had shut down writing (its FIN sent), from the TCP
/// state.
fn wr_shut(fd: RawFd) -> bool {
    // FIN_WAIT1 4, FIN_WAIT2 5, TIME_WAIT 6, CLOSE 7, LAST_ACK 9, CLOSING 11.
    tcp_info(fd).is_some_and(|info| matches!(info[0], 4 | 5 | 6 | 7 | 9 | 11))
}

/// Shut down writing and read `fd` to EOF: what was in flight for this
/// side, and whether it had shut down writing itself before. A pipe:
/// [`drain_pipe`].
pub fn drain(fd: RawFd) -> Result<(Vec<u8>, bool), Error> {
    if is_pipe(fd) {
        return drain_pipe(fd);
    }
    if super::seqpacket::is_seqpacket(fd) {
        return super::seqpacket::drain(fd);
    }
    let was_shut = wr_shut(fd);
    // The other threads are parked.
    let _ = sock::shutdown(fd, libc::SHUT_WR);
    match read_to_end(
        fd,
        DRAIN_TIMEOUT,
        "the other end did not finish its side of the connection",
    ) {
        (out, None) => Ok((out, was_shut)),
        // Reset by the peer: nothing more will come.
        (_, Some(e)) => Err(e),
    }
}

/// What is queued for this side of connection `fd` now, without shutting
/// anything down or waiting (the connection goes on, kept by the agent),
/// and whether this side had shut down writing.
pub fn take_queued(fd: RawFd) -> Result<(Vec<u8>, bool), Error> {
    let was_shut = wr_shut(fd);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let e = match sock::recv(fd, &mut buf, libc::MSG_DONTWAIT) {
            Ok(0) => {
                // The peer's end of stream stays for the relay to see.
                return Ok((out, was_shut));
            }
            Ok(r) => {
                out.extend_from_slice(&buf[..r]);
                continue;
            }
            Err(e) => e,
        };
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok((out, was_shut)),
            Some(libc::EINTR) => continue,
            // Reset: the relay sees it too; what was read still counts.
            Some(libc::ECONNRESET) => return Ok((out, was_shut)),
            _ => return Err(Error::io("taking what is queued", &e).fd(fd)),
        }
    }
}

/// Read `fd` (a socket or a pipe) until its end of stream, for at most
/// `timeout` (`late` says what did not happen then). What was read, and
/// why it stopped early if it did.
pub(crate) fn read_to_end(fd: RawFd, timeout: Duration, late: &str) -> (Vec<u8>, Option<Error>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + timeout;
    loop {
        match readable_before(fd, deadline) {
            None => {
                let why = format!("{late} within {}s", timeout.as_secs());
                return (out, Some(Error::errno(libc::ETIMEDOUT, why).fd(fd)));
            }
            Some(false) => continue,
            Some(true) => {}
        }
        // poll said it would not block.
        match sysfd::read(fd, &mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => {
                if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    return (out, Some(Error::io("reading to its end", &e).fd(fd)));
                }
            }
        }
    }
}

/// `StreamFreeze`: the agents find the peer of each connection `(local,
/// peer)` and pipe (inode) and have it drain and wait; `optional`: one flag
/// per stream, connections first (see the request). What became of each.
pub fn freeze(
    conns: Vec<(String, String)>,
    pipes: Vec<String>,
    unix: Vec<u64>,
    optional: Vec<bool>,
) -> Result<Vec<StreamPeer>, crate::error::Error> {
    let n = conns.len() + pipes.len() + unix.len();
    match client::call(&Request::StreamFreeze {
        conns,
        pipes,
        unix,
        optional,
    }) {
        Ok(Response::Streams(v)) if v.len() == n => Ok(v),
        Ok(other) => Err(format!("unexpected answer {other:?}").into()),
        // The agent's kind is kept: a busy peer is tried again.
        Err(e) => Err(e.into()),
    }
}

/// This side's end of the new connection for stream `id`, refilled with
/// `pending`. A seqpacket socket's is one end of a socketpair made here
/// (its agent takes the other, see `streams::seqpacket`).
pub fn attach(
    id: u64,
    node: u32,
    pending: Vec<u8>,
    wr_shut: bool,
    pipe: bool,
    seqpacket: bool,
) -> Result<OwnedFd, Error> {
    let pair = seqpacket
        .then(super::seqpacket::new_pair)
        .transpose()
        .map_err(|e| e.during(format_args!("stream {id:#x}")))?;
    let req = Request::StreamAttach {
        id,
        node,
        pending,
        wr_shut,
        pipe,
        pair: pair.as_ref().map(super::seqpacket::numbers),
    };
    // The pair is closed here once the agent has its copies.
    one_fd(&req, id)
}

fn one_fd(req: &Request, id: u64) -> Result<OwnedFd, Error> {
    match client::call_fds(req) {
        Ok((Response::StreamFd, mut fds)) if fds.len() == 1 => Ok(fds.remove(0)),
        Ok((other, _)) => Err(Error::other(format!(
            "stream {id:#x}: unexpected answer {other:?}"
        ))),
        Err(e) => Err(Error::from(e).during(format_args!("stream {id:#x}"))),
    }
}

/// Give `new` the options of what it replaces.
pub fn apply(new: &OwnedFd, o: &Opts) {
    let fd = new.as_raw_fd();
    let _ = sysfd::set_status_flags(fd, o.flags & libc::O_NONBLOCK);
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, o.nodelay as i32);
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, o.keepalive as i32);
    if o.passcred {
        super::seqpacket::pass_credentials(fd);
    }
}

/// Every `(epoll fd, events, data)` of this process that watches `fd`.
/// The fds are listed with getdents (`read_dir` is libc's `opendir`,
/// which mallocs: this runs in the capture handler, which may have
/// interrupted malloc).
fn epoll_watches_of(fd: RawFd) -> Vec<(RawFd, u32, u64)> {
    let mut out = Vec::new();
    let Ok(fds) = crate::dirs::numbers("/proc/self/fd") else {
        return out;
    };
    for ep in fds {
        if !std::fs::read_link(format!("/proc/self/fd/{ep}"))
            .is_ok_and(|l| l.as_os_str() == "anon_inode:[eventpoll]")
        {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{ep}")).unwrap_or_default();
        for l in info.lines().filter(|l| l.starts_with("tfd:")) {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = |k: &str| w.iter().position(|x| *x == k).and_then(|i| w.get(i + 1));
            let tfd = at("tfd:").and_then(|v| v.parse::<RawFd>().ok());
            let ev = at("events:").and_then(|v| u32::from_str_radix(v, 16).ok());
            let data = at("data:").and_then(|v| u64::from_str_radix(v, 16).ok());
            if let (Some(t), Some(ev), Some(data)) = (tfd, ev, data) {
                if t == fd {
                    out.push((ep, ev, data));
                }
            }
        }
    }
    out
}

/// Put `new` under number `fd` (its close-on-exec flag kept) in place of
/// the old connection, and in the epoll sets that watched the old one.
pub fn install(fd: RawFd, new: OwnedFd, pipe: bool) -> Result<(), Error> {
    let watches = epoll_watches_of(fd);
    let cloexec = sysfd::fd_flags(fd).is_ok_and(|f| f > 0);
    let fl = if cloexec { libc::O_CLOEXEC } else { 0 };
    // The old connection closed, which also drops it from every epoll set.
    sysfd::dup3(new.as_raw_fd(), fd, fl).map_err(|e| Error::io("dup3", &e).fd(fd))?;
    drop(new);
    note_pipe_born(fd, pipe);
    for (ep, ev, data) in watches {
        let _ = events::epoll_add(ep, fd, ev, data);
    }
    Ok(())
}

/// The staying peer's side (`StreamSwap` order), threads parked: drain
/// each connection, tell the agent, take the new connection in its place.
/// Fds listed with the same id are copies of one connection: drained once,
/// and each gets the new connection.
pub fn swap(streams: &[(RawFd, u64)]) -> Result<(), Error> {
    // The mover waits for this before it shuts its side down: no thread of
    // ours may see that end of stream.
    let ids: Vec<u64> = streams.iter().map(|s| s.1).collect();
    client::call(&Request::StreamFrozen { ids }).map_err(|e| Error::from(e).during("streams"))?;
    let mut drained: Vec<(RawFd, u64, Opts)> = Vec::new();
    for &(fd, id) in streams {
        if drained.iter().any(|d| d.1 == id) {
            continue;
        }
        let o = opts(fd);
        let (pending, wr) = drain(fd)?;
        // A seqpacket socket's new end is a socketpair of ours (the agent
        // takes its copies while it answers).
        let pair = super::seqpacket::is_seqpacket(fd)
            .then(super::seqpacket::new_pair)
            .transpose()?;
        client::call(&Request::StreamDrained {
            id,
            pending,
            wr_shut: wr,
            pair: pair.as_ref().map(super::seqpacket::numbers),
        })
        .map_err(|e| Error::from(e).during(format_args!("stream {id:#x}")))?;
        drop(pair);
        drained.push((fd, id, o));
    }
    for (fd, id, o) in drained {
        let new = one_fd(&Request::StreamAwait { id }, id)?;
        apply(&new, &o);
        let copies: Vec<(RawFd, OwnedFd)> = streams
            .iter()
            .filter(|(f, i)| *i == id && *f != fd)
            .filter_map(|(f, _)| new.try_clone().ok().map(|c| (*f, c)))
            .collect();
        install(fd, new, o.pipe)?;
        for (f, c) in copies {
            install(f, c, o.pipe)?;
        }
    }
    Ok(())
}

// --- listening sockets -------------------------------------------------------

/// What a listening TCP socket is, to make it again on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    /// The address it is bound to (`0.0.0.0:P`, `[::]:P`; the kernel's,
    /// not what `getsockname` shows the program).
    pub addr: std::net::SocketAddr,
    pub v6only: bool,
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub backlog: i32,
    pub flags: i32,
}

/// The kernel's address of `fd` (the raw system call: libc's getsockname
/// is our hook, which shows a loopback server its loopback).
fn bound_addr(fd: RawFd) -> Option<SocketAddr> {
    let mut a = sock::zeroed::<libc::sockaddr_in6>();
    raw::getsockname(fd, &mut a).ok()?;
    let b = sock::addr_bytes(&a);
    let port = u16::from_be_bytes([b[2], b[3]]);
    match u16::from_ne_bytes([b[0], b[1]]) as i32 {
        libc::AF_INET => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(b[4], b[5], b[6], b[7])),
            port,
        )),
        libc::AF_INET6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[8..24]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => None,
    }
}

/// `fd` as a listening TCP socket, if it is one. Connections still waiting
/// to be accepted (a migration takes them first: `streams::accepted`)
/// refuse, naming them.
pub fn listening(fd: RawFd) -> Result<Option<Listening>, Error> {
    let Some((mut queued, backlog)) = accept_queue(fd) else {
        return Ok(None);
    };
    if queued > 0 && super::accepted::taking() {
        // The process is frozen but the kernel still queues: a client
        // that connected since the migration took the queues is taken
        // now, as they were.
        super::accepted::take_queued();
        queued = accept_queue(fd).map_or(0, |q| q.0);
    }
    let addr =
        bound_addr(fd).ok_or_else(|| Error::other("listening socket without an address").fd(fd))?;
    if queued > 0 {
        return Err(Error::refused(format!(
            "listening socket {addr} has {queued} connection(s) waiting to be accepted that could not be taken along (try again)"
        ))
        .fd(fd));
    }
    Ok(Some(Listening {
        addr,
        v6only: addr.is_ipv6() && int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) == Some(1),
        reuseaddr: int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR) == Some(1),
        reuseport: int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT) == Some(1),
        backlog: backlog.min(i32::MAX as u32) as i32,
        flags: sysfd::status_flags(fd).unwrap_or(0),
    }))
}

/// The listener this node's agent kept on `port` for this process when it
/// moved away, if any.
fn kept_listener(port: u16) -> Option<OwnedFd> {
    match client::call_fds(&Request::TakeForwarded { port }) {
        Ok((Response::StreamFd, mut got)) if !got.is_empty() => Some(got.remove(0)),
        _ => None,
    }
}

/// Make the listening socket again here: its port reserved in the cluster
/// (the old one was closed first), bound and listening, with its options.
pub fn relisten(l: &Listening) -> Result<OwnedFd, Error> {
    use super::loopback::{reserve, Reserved};
    let what = format!("listening socket {}", l.addr);
    let fam = if l.addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    let owned = sock::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        .map_err(|e| Error::io("socket", &e).during(&what))?;
    let fd = owned.as_raw_fd();
    if l.addr.is_ipv6() {
        set_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, l.v6only as i32);
    }
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, l.reuseaddr as i32);
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, l.reuseport as i32);
    match reserve(l.addr.port(), l.reuseaddr) {
        Reserved::Yes | Reserved::Unknown => {}
        Reserved::No(e) => {
            return Err(Error::errno(
                e,
                format!(
                    "{what}: port {} is taken in the cluster ({})",
                    l.addr.port(),
                    std::io::Error::from_raw_os_error(e)
                ),
            ))
        }
    }
    // Back on a node it left: the agent kept its listener (and passed on
    // what came to it); it is the process's own again, with its queue.
    if let Some(kept) = kept_listener(l.addr.port()) {
        let _ = sysfd::set_status_flags(kept.as_raw_fd(), l.flags & libc::O_NONBLOCK);
        return Ok(kept);
    }
    let mut b = [0u8; 28];
    b[..2].copy_from_slice(&(fam as u16).to_ne_bytes());
    b[2..4].copy_from_slice(&l.addr.port().to_be_bytes());
    let len = match l.addr.ip() {
        std::net::IpAddr::V4(a) => {
            b[4..8].copy_from_slice(&a.octets());
            16
        }
        std::net::IpAddr::V6(a) => {
            b[8..24].copy_from_slice(&a.octets());
            28
        }
    };
    // Raw bind and listen (not our hooks: the port is reserved above).
    let addr = sock::addr_from::<libc::sockaddr_in6>(&b);
    raw::bind(fd, &addr, len)
        .and_then(|()| raw::listen(fd, l.backlog.max(1)))
        .map_err(|e| Error::io(&what, &e))?;
    let _ = sysfd::set_status_flags(fd, l.flags & libc::O_NONBLOCK);
    Ok(owned)
}
