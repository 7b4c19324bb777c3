//! UNIX stream socket names reachable from every node, the application
//! side (see docs/architecture/streams.md, "UNIX socket names across
//! nodes").
//!
//! - `listen` on a named UNIX stream socket (a path, or an abstract name)
//!   tells the agent, which makes the name known cluster-wide.
//! - `connect` to a UNIX stream name asks the agent where it is listened
//!   on: here or nowhere known, the kernel connects as usual; on another
//!   node, the answer is a TCP connection to that node, already queued on
//!   the listener (as a stand-in), put under the caller's fd.
//! - `accept` that returns the agent's stand-in (its peer is bound to the
//!   abstract name `krg-stand-in:<id>`) swaps it for the connection `id`.
//!
//! Each side's fd is a TCP socket afterwards: the bytes go straight between
//! the two nodes, and the ends move with migrated processes as any
//! connection between SSI processes. What a UNIX socket has and TCP has
//! not (`SCM_RIGHTS`, `SO_PEERCRED`) is lost on such a connection.

#![deny(unsafe_code)]

use super::sock::{int_opt, set_int_opt, shrink_sndbuf, u32_at};
use crate::client;
use crate::error::Error;
use crate::krg_log;
use crate::log::Level;
use crate::proto::{Request, Response, UNIX_STAND_IN};
use crate::sys::user::AddrOut;
use crate::sys::{fd as sysfd, poll, raw, sock};
use libc::{c_int, socklen_t};
use std::os::fd::{AsRawFd, OwnedFd};

/// Bytes before `sun_path` in a `sockaddr_un`.
const PATH_OFFSET: usize = 2;

/// A name as the agents key it: the canonical path of the socket file with
/// its device and inode, or a NUL byte and the abstract name (0, 0).
struct Key {
    path: Vec<u8>,
    dev: u64,
    ino: u64,
}

/// Whether `fd` is a UNIX socket whose names are the cluster's: a stream
/// socket (`Some(false)`) or a seqpacket one (`Some(true)`).
fn named_kind(fd: c_int) -> Option<bool> {
    if int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN) != Some(libc::AF_UNIX) {
        return None;
    }
    match int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE)? {
        libc::SOCK_STREAM => Some(false),
        libc::SOCK_SEQPACKET => Some(true),
        _ => None,
    }
}

/// A seqpacket socket's new end is one end of a socketpair of ours (its
/// agent takes the other; see `streams::seqpacket`).
fn pair_for(seqpacket: bool) -> Result<Option<(OwnedFd, OwnedFd)>, c_int> {
    if !seqpacket {
        return Ok(None);
    }
    super::seqpacket::new_pair().map(Some).map_err(|e| {
        krg_log!(Level::Warn, "{e}");
        libc::EMFILE
    })
}

/// The `sun_path` bytes of the `AF_UNIX` address `addr` (as long as the
/// caller or the kernel said), up to its end: `None` for another family.
fn name_bytes(addr: &[u8]) -> Option<Vec<u8>> {
    if addr.len() < PATH_OFFSET {
        return None;
    }
    let fam = libc::sa_family_t::from_ne_bytes([addr[0], addr[1]]);
    if c_int::from(fam) != libc::AF_UNIX {
        return None;
    }
    let max = std::mem::size_of::<libc::sockaddr_un>();
    let all = &addr[..addr.len().min(max)];
    let path = &all[PATH_OFFSET..];
    Some(match path.first() {
        // Abstract: every byte counts.
        Some(0) => path.to_vec(),
        _ => path.iter().take_while(|b| **b != 0).copied().collect(),
    })
}

/// The first `len` bytes of `sa`, as long as the kernel said the address
/// it wrote there is (at most its size).
fn given(sa: &libc::sockaddr_un, len: socklen_t) -> &[u8] {
    let b = sock::addr_bytes(sa);
    &b[..(len as usize).min(b.len())]
}

/// The agents' key for a name (`None`: unnamed, or no socket file there).
fn key_of(name: &[u8]) -> Option<Key> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match name.first() {
        None => None,
        Some(0) if name.len() > 1 => Some(Key {
            path: name.to_vec(),
            dev: 0,
            ino: 0,
        }),
        Some(0) => None,
        Some(_) => {
            let p = real_path(name)?;
            let m = std::fs::metadata(std::ffi::OsStr::from_bytes(&p)).ok()?;
            m.file_type().is_socket().then(|| Key {
                path: p,
                dev: m.dev(),
                ino: m.ino(),
            })
        }
    }
}

/// The canonical form of `path`, resolved into a buffer of ours: std's
/// `canonicalize` has libc's `realpath` malloc the result, and this may
/// run in the capture handler (a listener made again after a failed
/// move), which may have interrupted malloc. glibc's `realpath` works on
/// the stack for paths under 1 KiB.
fn real_path(path: &[u8]) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(path).ok()?;
    let mut buf = [0u8; libc::PATH_MAX as usize];
    sysfd::realpath(&c, &mut buf).map(<[u8]>::to_vec)
}

/// Put connection `new` under `fd`, keeping `fd`'s `O_NONBLOCK` and
/// close-on-exec flags (and `SO_PASSCRED`). No Nagle delay: a UNIX socket
/// has none.
fn install(fd: c_int, new: OwnedFd) -> Result<(), i32> {
    let n = new.as_raw_fd();
    if int_opt(fd, libc::SOL_SOCKET, libc::SO_PASSCRED) == Some(1) {
        super::seqpacket::pass_credentials(n);
    }
    // `fd` is the caller's to replace; a flag that cannot be read counts
    // as set.
    let nonblock = sysfd::status_flags(fd).unwrap_or(-1) & libc::O_NONBLOCK;
    let cloexec = sysfd::fd_flags(fd).unwrap_or(-1) & libc::FD_CLOEXEC != 0;
    let _ = super::sock::set_nonblock(n, nonblock != 0);
    let _ = sock::setsockopt(n, libc::IPPROTO_TCP, libc::TCP_NODELAY, &(1 as c_int));
    sysfd::dup3(n, fd, if cloexec { libc::O_CLOEXEC } else { 0 })
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}

// --- listening sockets that move --------------------------------------------

/// A listening UNIX socket (stream or seqpacket), to make it again on
/// another node: its name as `getsockname` gives it (a NUL byte first for
/// an abstract name), type, file flags, `SO_PASSCRED` and backlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    pub name: Vec<u8>,
    pub ty: i32,
    pub flags: i32,
    pub passcred: bool,
    /// The backlog it listened with.
    pub backlog: i32,
}

/// A name for messages: the path, or `@` and the abstract name.
pub fn show(name: &[u8]) -> String {
    match name.split_first() {
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
        _ => String::from_utf8_lossy(name).into_owned(),
    }
}

/// `fd` as a listening UNIX socket, if it is one. Connections still
/// waiting to be accepted (a migration takes them first:
/// `streams::accepted`) refuse, naming them.
pub fn listening(fd: c_int) -> Result<Option<Listening>, Error> {
    if int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) != Some(1)
    {
        return Ok(None);
    }
    let ty = int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(libc::SOCK_STREAM);
    let mut sa = sock::zeroed::<libc::sockaddr_un>();
    // The raw system call (not a hook).
    let name = raw::getsockname(fd, &mut sa)
        .ok()
        .and_then(|l| name_bytes(given(&sa, l)))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::other("listening UNIX socket without a name").fd(fd))?;
    // Readable: a connection waits.
    if poll::ready(fd, libc::POLLIN, 0) {
        return Err(Error::refused(format!(
            "listening UNIX socket {} has connections waiting to be accepted that could not be taken along (try again)",
            show(&name)
        )).fd(fd));
    }
    Ok(Some(Listening {
        name,
        ty,
        flags: sysfd::status_flags(fd).unwrap_or(0),
        passcred: int_opt(fd, libc::SOL_SOCKET, libc::SO_PASSCRED) == Some(1),
        backlog: super::sock::ino_of(fd)
            .and_then(backlog)
            .unwrap_or(libc::SOMAXCONN),
    }))
}

/// Make the listening socket again here (the old one was closed first): a
/// socket file left at its path is removed, the name bound and listened
/// on with its backlog, and a stream socket's name made reachable from
/// every node again.
pub fn relisten(l: &Listening) -> Result<OwnedFd, Error> {
    let what = format!("listening UNIX socket {}", show(&l.name));
    let owned = sock::socket(libc::AF_UNIX, l.ty | libc::SOCK_CLOEXEC, 0)
        .map_err(|e| Error::io("socket", &e).during(&what))?;
    let fd = owned.as_raw_fd();
    let mut sa = sock::zeroed::<libc::sockaddr_un>();
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if l.name.len() >= sa.sun_path.len() {
        return Err(Error::errno(
            libc::ENAMETOOLONG,
            format!("{what}: name too long"),
        ));
    }
    for (d, s) in sa.sun_path.iter_mut().zip(&l.name) {
        *d = *s as libc::c_char;
    }
    if l.name[0] != 0 {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::FileTypeExt;
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(&l.name));
        // The old listener's file (a directory every node sees): its
        // socket is closed; a listener binds a fresh one in its place.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(path);
        }
    }
    let len = if l.name[0] == 0 {
        PATH_OFFSET + l.name.len()
    } else {
        std::mem::size_of::<libc::sockaddr_un>()
    };
    // Raw bind and listen (not our hooks).
    raw::bind(fd, &sa, len as socklen_t)
        .and_then(|()| raw::listen(fd, l.backlog))
        .map_err(|e| Error::io(&what, &e))?;
    if l.passcred {
        super::seqpacket::pass_credentials(fd);
    }
    let _ = sysfd::set_status_flags(fd, l.flags & libc::O_NONBLOCK);
    // (In a restorer or a capture: no hook runs here, no guard needed.)
    register(fd);
    Ok(owned)
}

/// After a successful `listen(fd)`: a named UNIX stream socket's name
/// becomes reachable from every node.
pub fn after_listen(fd: c_int) {
    if !super::active() {
        return;
    }
    crate::rt::guarded(|| register(fd))
}

/// Make the name of listening UNIX stream socket `fd` known cluster-wide.
fn register(fd: c_int) {
    if named_kind(fd).is_none() {
        return;
    }
    let mut sa = sock::zeroed::<libc::sockaddr_un>();
    let Ok(l) = sock::getsockname(fd, &mut sa) else {
        return;
    };
    let Some(key) = name_bytes(given(&sa, l)).and_then(|n| key_of(&n)) else {
        return;
    };
    let req = Request::UnixListen {
        path: key.path,
        dev: key.dev,
        ino: key.ino,
    };
    if let Err(e) = client::call_fds(&req) {
        krg_log!(
            Level::Warn,
            "listen on a UNIX socket: not reachable from other nodes: {e}"
        );
    }
}

/// `connect(fd, addr)` to a UNIX stream name: `None` when the kernel
/// connects as usual (another family, not a stream socket, the name is
/// listened on here or not by an SSI process), else the result.
pub(super) fn connect(fd: c_int, addr: &[u8]) -> Option<c_int> {
    if !super::active() {
        return None;
    }
    let name = name_bytes(addr)?;
    // Guarded: the agent call and the file lookups use hooked calls (the
    // connection to the agent is itself a UNIX socket's connect).
    let r = crate::rt::guarded(|| {
        // The agent's own socket (a call made outside the guard comes here
        // too): never a cluster name.
        let seqpacket = named_kind(fd)?;
        if name == client::sock_path().as_os_str().as_encoded_bytes() {
            return None;
        }
        let key = key_of(&name)?;
        let shown = String::from_utf8_lossy(&key.path).into_owned();
        let pair = match pair_for(seqpacket) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let req = Request::UnixConnect {
            path: key.path,
            dev: key.dev,
            ino: key.ino,
            pair: pair.as_ref().map(super::seqpacket::numbers),
        };
        Some(match client::call_fds(&req) {
            Ok((Response::Local, _)) => return None,
            Ok((Response::StreamFd, mut fds)) if fds.len() == 1 => {
                install(fd, fds.remove(0)).map(|()| {
                    krg_log!(Level::Debug, "UNIX socket {shown}: connected across nodes");
                })
            }
            Ok((other, _)) => {
                krg_log!(
                    Level::Warn,
                    "UNIX socket {shown}: unexpected answer {other:?}"
                );
                Err(libc::EIO)
            }
            Err(e) => {
                krg_log!(Level::Debug, "UNIX socket {shown}: {e}");
                Err(e.errno())
            }
        })
    })?;
    Some(match r {
        Ok(()) => 0,
        Err(e) => {
            crate::rt::set_errno(e);
            -1
        }
    })
}

/// `UnixTake` for stand-in `id`, accepted as `c`: the connection put under `c`.
fn take(c: c_int, id: u64, req: &Request) -> Result<(), c_int> {
    match client::call_fds(req) {
        Ok((Response::StreamFd, mut fds)) if fds.len() == 1 => install(c, fds.remove(0)),
        Ok((other, _)) => {
            krg_log!(
                Level::Warn,
                "connection {id:#x}: unexpected answer {other:?}"
            );
            Err(libc::ECONNABORTED)
        }
        Err(e) => {
            krg_log!(Level::Warn, "connection {id:#x} from another node: {e}");
            Err(libc::ECONNABORTED)
        }
    }
}

/// After `accept` gave the program `c`: if it is an agent's stand-in, the
/// connection it stands for, under the same number (`out` then shows an
/// unnamed peer, as for any client). Returns what `accept` returns.
pub(crate) fn on_accept(c: c_int, out: Option<&AddrOut<'_>>) -> c_int {
    let mut sa = sock::zeroed::<libc::sockaddr_un>();
    let Ok(l) = sock::getpeername(c, &mut sa) else {
        return c;
    };
    let Some(peer) = name_bytes(given(&sa, l)) else {
        return c;
    };
    let Some(id) = peer
        .strip_prefix(&[0u8][..])
        .and_then(|n| n.strip_prefix(UNIX_STAND_IN))
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| u64::from_str_radix(h, 16).ok())
    else {
        return c;
    };
    let r = crate::rt::guarded(|| {
        let pair = pair_for(named_kind(c) == Some(true))?;
        let req = Request::UnixTake {
            id,
            pair: pair.as_ref().map(super::seqpacket::numbers),
        };
        take(c, id, &req)
    });
    match r {
        Ok(()) => {
            if let Some(out) = out {
                // An unnamed peer is its family alone.
                if out.room() >= PATH_OFFSET {
                    out.give(&(libc::AF_UNIX as libc::sa_family_t).to_ne_bytes());
                } else {
                    out.set_len(PATH_OFFSET as socklen_t);
                }
            }
            c
        }
        Err(e) => {
            // The stand-in accept just gave us; the program has not seen it.
            crate::rt::guarded(|| sysfd::close(c).ok());
            crate::rt::set_errno(e);
            -1
        }
    }
}

/// The peer of every connected UNIX socket of this node's network
/// namespace, by inode (a `sock_diag` dump: what `ss -x` shows).
pub fn peers() -> std::io::Result<std::collections::HashMap<u64, u64>> {
    const UDIAG_SHOW_PEER: u32 = 4;
    const UNIX_DIAG_PEER: u16 = 2;
    let mut out = std::collections::HashMap::new();
    diag(UDIAG_SHOW_PEER, |ino, aty, v| {
        if aty == UNIX_DIAG_PEER && v.len() >= 4 {
            out.insert(ino, u64::from(u32::from_ne_bytes([v[0], v[1], v[2], v[3]])));
        }
    })?;
    Ok(out)
}

/// The backlog a listening UNIX socket (inode `ino`) was given (`listen`'s
/// second argument, as the kernel capped it), from a `sock_diag` dump.
pub fn backlog(ino: u64) -> Option<i32> {
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
    const UNIX_DIAG_RQLEN: u16 = 4;
    let mut found = None;
    // For a listener, unix_diag_rqlen is (connections waiting, backlog).
    diag(UDIAG_SHOW_RQLEN, |i, aty, v| {
        if i == ino && aty == UNIX_DIAG_RQLEN && v.len() >= 8 {
            found = Some(u32::from_ne_bytes([v[4], v[5], v[6], v[7]]) as i32);
        }
    })
    .ok()?;
    found
}

/// One `sock_diag` dump of this network namespace's UNIX sockets asking
/// for the attributes `show` (`UDIAG_SHOW_*`): `each(inode, attribute
/// type, attribute payload)` for every attribute of every socket.
fn diag(show: u32, mut each: impl FnMut(u64, u16, &[u8])) -> std::io::Result<()> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    let nl = sock::socket(
        libc::AF_NETLINK,
        libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
        libc::NETLINK_SOCK_DIAG,
    )?;
    // nlmsghdr (16 bytes), then unix_diag_req: family, protocol, pad (2),
    // states, ino, show, cookie (2 x u32).
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&show.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]);
    // To the kernel.
    sock::send(nl.as_raw_fd(), &req, 0)?;
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = sock::recv(nl.as_raw_fd(), &mut buf, 0)?;
        let b = &buf[..n];
        let mut at = 0;
        while at + 16 <= b.len() {
            let len = u32_at(b, at) as usize;
            let ty = u16_at(b, at + 4);
            if len < 16 || at + len > b.len() {
                return Ok(());
            }
            if ty == libc::NLMSG_DONE as u16 || ty == libc::NLMSG_ERROR as u16 {
                return Ok(());
            }
            // unix_diag_msg: family, type, state, pad, ino, cookie (2 x u32).
            let m = &b[at + 16..at + len];
            if m.len() >= 16 {
                let ino = u64::from(u32_at(m, 4));
                let mut a = 16;
                while a + 4 <= m.len() {
                    let alen = u16_at(m, a) as usize;
                    let aty = u16_at(m, a + 2);
                    if alen < 4 || a + alen > m.len() {
                        break;
                    }
                    each(ino, aty, &m[a + 4..a + alen]);
                    a += (alen + 3) & !3;
                }
            }
            at += (len + 3) & !3;
        }
    }
}

// --- socketpairs whose two ends are one process's --------------------------

/// What is queued for `fd`, one end of a socketpair whose other end `peer`
/// is this process's too (its threads parked), left where it is: a stream
/// socket's bytes are peeked; a seqpacket socket's messages (which cannot
/// be peeked past the first) are taken and sent again from `peer`, in
/// order, and come back framed.
pub fn queued(fd: c_int, peer: c_int, seqpacket: bool) -> Result<Vec<u8>, Error> {
    if !seqpacket {
        let n = match sysfd::readable_bytes(fd) {
            Ok(n) if n > 0 => n,
            _ => return Ok(Vec::new()),
        };
        let mut b = vec![0u8; n as usize];
        // Peeked, without waiting.
        match sock::recv(fd, &mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
            Ok(r) if r == n as usize => {}
            r => {
                let e = r.err().unwrap_or_else(std::io::Error::last_os_error);
                return Err(Error::io(format!("peeking at {n} queued bytes"), &e).fd(fd));
            }
        }
        return Ok(b);
    }
    use super::seqpacket::{frame, recv, Got};
    let had = int_opt(fd, libc::SOL_SOCKET, libc::SO_PASSCRED) == Some(1);
    super::seqpacket::pass_credentials(fd);
    let mut msgs = Vec::new();
    let r = loop {
        match recv(fd, true) {
            Ok(Got::Message(m)) => msgs.push(m),
            Ok(Got::Nothing | Got::End) => break Ok(()),
            Err(e) => break Err(Error::io("taking its queued messages", &e).fd(fd)),
        }
    };
    if !had {
        set_int_opt(fd, libc::SOL_SOCKET, libc::SO_PASSCRED, 0);
    }
    // Put back from the other end (it held these messages a moment ago:
    // there is room).
    super::seqpacket::resend(peer, &msgs).map_err(|e| e.fd(fd))?;
    let mut out = Vec::new();
    for m in &msgs {
        frame(&mut out, m);
    }
    r.map(|()| out)
}

/// A new socketpair whose ends hold what was queued for them: `for_a`
/// queued for the first end, `for_b` for the second (framed messages for
/// seqpacket).
pub fn pair_holding(
    seqpacket: bool,
    for_a: &[u8],
    for_b: &[u8],
) -> Result<(OwnedFd, OwnedFd), Error> {
    let ty = if seqpacket {
        libc::SOCK_SEQPACKET
    } else {
        libc::SOCK_STREAM
    };
    let (a, b) = sock::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0)
        .map_err(|e| Error::io("socketpair", &e))?;
    for (from, bytes) in [(&b, for_a), (&a, for_b)] {
        if seqpacket {
            super::seqpacket::refill(from.as_raw_fd(), bytes)?;
            continue;
        }
        if bytes.is_empty() {
            continue;
        }
        let want = (bytes.len() + (64 << 10)).min(i32::MAX as usize / 2) as i32;
        let fd = from.as_raw_fd();
        let before = int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0);
        set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, want);
        let r = super::seqpacket::resend(fd, &[bytes]);
        shrink_sndbuf(fd, before);
        r.map_err(|e| e.during(format!("socketpair: {} queued bytes", bytes.len())))?;
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(path: &[u8]) -> (libc::sockaddr_un, socklen_t) {
        let mut sa = sock::zeroed::<libc::sockaddr_un>();
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (i, b) in path.iter().enumerate() {
            sa.sun_path[i] = *b as libc::c_char;
        }
        (sa, (PATH_OFFSET + path.len()) as socklen_t)
    }

    #[test]
    fn names_are_read_as_the_kernel_reads_them() {
        let (sa, l) = addr(b"/tmp/x.sock");
        let n = name_bytes(given(&sa, l + 1));
        assert_eq!(n.as_deref(), Some(&b"/tmp/x.sock"[..]));
        let (sa, l) = addr(b"\0abs\0x");
        let n = name_bytes(given(&sa, l));
        assert_eq!(n.as_deref(), Some(&b"\0abs\0x"[..]));
        let k = key_of(&n.unwrap()).unwrap();
        assert_eq!((k.dev, k.ino), (0, 0));
        // Unnamed, and a path with no socket file: no key.
        assert!(key_of(b"").is_none());
        assert!(key_of(b"\0").is_none());
        assert!(key_of(b"/nonexistent/krg.sock").is_none());
    }

    #[test]
    fn a_listeners_backlog_is_read_back() {
        let name = format!("\0krg-backlog-{}", std::process::id());
        let (sa, l) = addr(name.as_bytes());
        let s = sock::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0).unwrap();
        let fd = s.as_raw_fd();
        sock::bind(fd, &sa, l).unwrap();
        sock::listen(fd, 7).unwrap();
        let got = listening(fd).unwrap().unwrap();
        assert_eq!(got.backlog, 7);
        assert_eq!(got.name, name.as_bytes());
    }

    #[test]
    fn a_socket_file_is_keyed_by_its_canonical_path() {
        let dir = std::env::temp_dir().join(format!("krg-unix-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.sock");
        let _ = std::fs::remove_file(&p);
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let odd = format!(
            "{}/../{}/s.sock",
            dir.display(),
            dir.file_name().unwrap().to_str().unwrap()
        );
        let k = key_of(odd.as_bytes()).unwrap();
        assert_eq!(
            k.path,
            std::fs::canonicalize(&p)
                .unwrap()
                .as_os_str()
                .as_encoded_bytes()
        );
        assert_ne!(k.ino, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn what_is_queued_in_a_socketpair_is_read_in_place_and_put_in_a_new_one() {
        use crate::streams::seqpacket::{frame, messages, new_pair, pass_credentials, recv, Got};
        let send = |fd: &OwnedFd, m: &[u8]| {
            sock::send(fd.as_raw_fd(), m, 0).unwrap();
        };
        // Seqpacket: taken and sent again, still there afterwards.
        let (a, b) = new_pair().unwrap();
        for m in [&b"one"[..], b"", b"three"] {
            send(&b, m);
        }
        let q = queued(a.as_raw_fd(), b.as_raw_fd(), true).unwrap();
        assert_eq!(messages(&q).unwrap(), vec![&b"one"[..], b"", b"three"]);
        assert_eq!(queued(a.as_raw_fd(), b.as_raw_fd(), true).unwrap(), q);
        // A new pair holding them (and bytes the other way).
        let mut back = Vec::new();
        frame(&mut back, b"back");
        let (x, y) = pair_holding(true, &q, &back).unwrap();
        pass_credentials(x.as_raw_fd());
        pass_credentials(y.as_raw_fd());
        for want in [&b"one"[..], b"", b"three"] {
            assert_eq!(
                recv(x.as_raw_fd(), true).unwrap(),
                Got::Message(want.to_vec())
            );
        }
        assert_eq!(recv(x.as_raw_fd(), true).unwrap(), Got::Nothing);
        assert_eq!(
            recv(y.as_raw_fd(), true).unwrap(),
            Got::Message(b"back".to_vec())
        );
        // Stream: peeked.
        let (a, b) = new_stream_pair();
        send(&b, b"abc");
        send(&b, b"def");
        assert_eq!(
            queued(a.as_raw_fd(), b.as_raw_fd(), false).unwrap(),
            b"abcdef"
        );
        assert_eq!(
            queued(a.as_raw_fd(), b.as_raw_fd(), false).unwrap(),
            b"abcdef"
        );
        let (x, _y) = pair_holding(false, b"abcdef", b"").unwrap();
        let mut buf = [0u8; 16];
        let n = sock::recv(x.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT).unwrap();
        assert_eq!(&buf[..n], b"abcdef");
    }

    fn new_stream_pair() -> (OwnedFd, OwnedFd) {
        sock::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0).unwrap()
    }
}
