//! Connections waiting in a listening socket's accept queue when its
//! process migrates (see docs/architecture/streams.md, "Moving listening
//! sockets").
//!
//! A kernel accept queue cannot be carried over, so the capture accepts
//! what is waiting ([`take_queued`]): each such connection becomes an
//! ordinary connected socket of the process, which moves like any other
//! TCP connection, and is remembered as *owed* to its listener. Once the
//! listener listens again (on the new node, or here after a failed move),
//! [`requeue`] puts one connection per owed one into its queue: a socket
//! of the process connects to its own listener, so `poll`, `epoll` and a
//! blocking `accept` see it exactly as they would have seen the original.
//! When the program accepts that stand-in, [`on_accept`] puts the owed
//! connection under the fd `accept` returns.
//!
//! The table is fixed and lives in libkrg's memory: it is filled during a
//! capture (whose allocations are left out of the image) and moves with
//! the process.

#![deny(unsafe_code)]

use crate::sys::user::AddrOut;
use crate::sys::{fd as sysfd, poll, raw, sock};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// `(listener fd, owed connection fd, stand-in client fd or -1)`.
type Owed = (RawFd, RawFd, RawFd);

const SLOTS: usize = 64;

static OWED: std::sync::Mutex<[Owed; SLOTS]> = std::sync::Mutex::new([(-1, -1, -1); SLOTS]);
/// Entries in use (a cheap check for every `accept`).
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// A migration's capture has taken the queues ([`take_queued`]) and not
/// given them back ([`requeue`]): a connection that arrives later, while
/// the listener is captured, is taken too ([`taking`]).
static TAKING: AtomicBool = AtomicBool::new(false);

/// Whether a migration's capture is taking the listeners' queues.
pub fn taking() -> bool {
    TAKING.load(Ordering::Acquire)
}

fn table() -> std::sync::MutexGuard<'static, [Owed; SLOTS]> {
    OWED.lock().unwrap_or_else(|e| e.into_inner())
}

fn recount(t: &[Owed; SLOTS]) {
    COUNT.store(t.iter().filter(|e| e.0 >= 0).count(), Ordering::Release);
}

/// The address of a socket end as bytes, comparable (room for a UNIX
/// socket's name).
fn end(fd: RawFd, peer: bool) -> Option<([u8; 112], libc::socklen_t)> {
    let mut ss = sock::zeroed::<libc::sockaddr_storage>();
    let l = if peer {
        sock::getpeername(fd, &mut ss)
    } else {
        sock::getsockname(fd, &mut ss)
    }
    .ok()?;
    let mut a = [0u8; 112];
    a.copy_from_slice(&sock::addr_bytes(&ss)[..112]);
    Some((a, l))
}

/// Connections waiting in `fd`'s accept queue (a listening TCP socket).
fn queued(fd: RawFd) -> u32 {
    super::sock::accept_queue(fd).map_or(0, |(q, _)| q)
}

/// Whether `fd` is a listening UNIX socket.
fn unix_listener(fd: RawFd) -> bool {
    use super::sock::int_opt;
    int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1)
}

/// Whether a connection waits in listener `fd`'s queue (its readiness: a
/// UNIX socket's queue length cannot be read).
fn waiting(fd: RawFd) -> bool {
    poll::ready(fd, libc::POLLIN, 0)
}

/// In a capture for a migration (the other threads parked): accept what
/// waits in every listening TCP or UNIX socket's queue and owe it to the
/// program. Stand-ins this process queued itself are dropped (they are
/// made again); a UNIX connection from another node is taken from the
/// agent first (see `streams::unix`), so it moves as a connection.
pub fn take_queued() {
    TAKING.store(true, Ordering::Release);
    // getdents, not `read_dir` (libc's `opendir` mallocs; this is the
    // capture handler).
    let Ok(fds) = crate::dirs::numbers("/proc/self/fd") else {
        return;
    };
    let mut t = table();
    for l in fds {
        let unix = unix_listener(l);
        let mut left = if unix { u32::MAX } else { queued(l) };
        while left > 0 && (!unix || waiting(l)) {
            left -= 1;
            // No room left: the rest stays queued (the capture then
            // refuses the move, naming them).
            if !t.iter().any(|e| e.0 < 0) {
                break;
            }
            // Our own listener, which has that many connections waiting
            // (so it does not block).
            let Ok(c) = sock::accept(l, libc::SOCK_CLOEXEC) else {
                break;
            };
            let c = c.into_raw_fd();
            let peer = end(c, true);
            if let Some(e) = t
                .iter_mut()
                .find(|e| e.0 == l && e.2 >= 0 && end(e.2, false) == peer)
            {
                // Our own stand-in: gone, made again after the move.
                let _ = sysfd::close(c);
                let _ = sysfd::close(e.2);
                e.2 = -1;
                continue;
            }
            let c = if unix && super::active() {
                // A connection from another node: its stand-in is swapped
                // for the real connection (or closed if it cannot be had).
                super::unix::on_accept(c, None)
            } else {
                c
            };
            if c < 0 {
                continue;
            }
            if let Some(e) = t.iter_mut().find(|e| e.0 < 0) {
                *e = (l, c, -1);
            }
        }
    }
    recount(&t);
}

/// Once the listeners listen again: queue a stand-in for each owed
/// connection that has none.
pub fn requeue() {
    TAKING.store(false, Ordering::Release);
    if COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut t = table();
    for e in t.iter_mut().filter(|e| e.0 >= 0 && e.2 < 0) {
        let Some((mut a, l)) = end(e.0, false) else {
            continue;
        };
        let fam = u16::from_ne_bytes([a[0], a[1]]) as i32;
        if fam == libc::AF_UNIX {
            match unix_stand_in(e.0, e.1, &a, l) {
                Ok(s) => e.2 = s,
                Err(err) => crate::krg_log!(
                    crate::log::Level::Warn,
                    "fd {}: queueing an owed connection again: {err}",
                    e.0
                ),
            }
            continue;
        }
        // A wildcard listener is reached at the loopback address.
        if fam == libc::AF_INET && a[4..8] == [0; 4] {
            a[4..8].copy_from_slice(&[127, 0, 0, 1]);
        } else if fam == libc::AF_INET6 && a[8..24] == [0; 16] {
            a[23] = 1;
        }
        // A new socket of ours, connected to our own listener (it
        // completes at once: the kernel queues it).
        let Ok(s) = sock::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) else {
            continue;
        };
        let to = sock::addr_from::<libc::sockaddr_storage>(&a);
        if let Err(err) = sock::connect(s.as_raw_fd(), &to, l) {
            crate::krg_log!(
                crate::log::Level::Warn,
                "fd {}: queueing an owed connection again: {err}",
                e.0
            );
            continue;
        }
        e.2 = s.into_raw_fd();
    }
}

/// A stand-in for owed connection `owed` of UNIX listener `l` (named `a`,
/// `len` bytes): a socket bound to an abstract name of its own (so that
/// the accepted end can be told by its peer's name), connected to the
/// listener with the raw system call (the name is this process's).
fn unix_stand_in(
    l: RawFd,
    owed: RawFd,
    a: &[u8; 112],
    len: libc::socklen_t,
) -> Result<RawFd, std::io::Error> {
    let ty = super::sock::int_opt(l, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(libc::SOCK_STREAM);
    let s = sock::socket(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0)?;
    // The raw getpid (not our hook): this node's kernel pid.
    let kpid = raw::getpid();
    let name = format!("krg-owed:{kpid}:{l}:{owed}");
    let mut me = [0u8; 112];
    me[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    me[3..3 + name.len()].copy_from_slice(name.as_bytes());
    // Raw bind and connect (an abstract name: the family, a NUL, the
    // name's bytes); on failure the socket is closed.
    let me = sock::addr_from::<libc::sockaddr_un>(&me);
    let to = sock::addr_from::<libc::sockaddr_un>(a);
    raw::bind(s.as_raw_fd(), &me, (3 + name.len()) as libc::socklen_t)?;
    raw::connect(&s.as_raw_fd(), &to, len)?;
    Ok(s.into_raw_fd())
}

/// After `accept` gave the program `fd`: if it is a stand-in, put the owed
/// connection under that number instead (its flags kept: `accept4`'s
/// `SOCK_NONBLOCK` and `SOCK_CLOEXEC`), and its peer's address in
/// `addr`/`len`.
pub(crate) fn on_accept(fd: RawFd, out: Option<&AddrOut<'_>>) {
    if COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let Some(peer) = end(fd, true) else {
        return;
    };
    let mut t = table();
    let Some(e) = t
        .iter_mut()
        .find(|e| e.0 >= 0 && e.2 >= 0 && end(e.2, false) == Some(peer))
    else {
        return;
    };
    let family = |f: RawFd| super::sock::int_opt(f, libc::SOL_SOCKET, libc::SO_DOMAIN);
    // A UNIX listener's owed connection that became a TCP one (its peer on
    // another node) shows an unnamed UNIX peer, as most UNIX clients are.
    let unnamed = family(fd) == Some(libc::AF_UNIX) && family(e.1) != Some(libc::AF_UNIX);
    // The owed connection takes the stand-in's number and flags (a flag
    // that cannot be read counts as set); the stand-in's client end is
    // ours alone.
    let nonblock = sysfd::status_flags(fd).unwrap_or(-1) & libc::O_NONBLOCK;
    let cloexec = sysfd::fd_flags(fd).unwrap_or(-1) & libc::FD_CLOEXEC != 0;
    let _ = super::sock::set_nonblock(e.1, nonblock != 0);
    if sysfd::dup3(e.1, fd, if cloexec { libc::O_CLOEXEC } else { 0 }).is_err() {
        return;
    }
    let _ = sysfd::close(e.1);
    let _ = sysfd::close(e.2);
    *e = (-1, -1, -1);
    recount(&t);
    drop(t);
    if let Some(out) = out {
        let peer = if unnamed {
            let mut a = [0u8; 112];
            a[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
            Some((a, 2))
        } else {
            end(fd, true)
        };
        if let Some((a, l)) = peer {
            out.give(&a[..(l as usize).min(a.len())]);
        }
    }
}
