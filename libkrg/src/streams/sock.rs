//! The streams code's low-level socket and fd questions, shared by every
//! streams file. It imports no other streams file, so that the calls
//! between them run one way (the moving code calls the kinds of sockets,
//! which call this, never back).

#![deny(unsafe_code)]

use crate::sys::{fd as sysfd, poll, sock};
use std::os::fd::RawFd;
use std::time::Instant;

/// An int socket option of `fd` (shared by the streams code).
pub fn int_opt(fd: RawFd, level: i32, opt: i32) -> Option<i32> {
    sock::getsockopt_int(fd, level, opt).ok()
}

/// `fd`'s send buffer back to `doubled` (what `SO_SNDBUF` read before it
/// was enlarged to queue a refill: the kernel doubles what is set), once
/// the refill is queued. Left enlarged, the writer could run that much
/// further ahead of its reader, and at the next hand-over the bytes in
/// flight would be that much more: a pipe moved back and forth between
/// `yes` and `gzip` held 100 MB after eight moves, more than one frame or
/// one image may carry.
pub fn shrink_sndbuf(fd: RawFd, doubled: i32) {
    if doubled > 0 {
        set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, doubled / 2);
    }
}

/// Set an int socket option of `fd` (best effort).
pub fn set_int_opt(fd: RawFd, level: i32, opt: i32, v: i32) {
    let _ = sock::setsockopt(fd, level, opt, &v);
}

pub fn stat_of(fd: RawFd) -> Option<libc::stat> {
    sysfd::fstat(fd).ok()
}

/// The inode of what `fd` holds (a socket's, a pipe's).
pub fn ino_of(fd: RawFd) -> Option<u64> {
    stat_of(fd).map(|st| st.st_ino)
}

/// Set or clear `O_NONBLOCK` on `fd`, its other status flags kept.
pub fn set_nonblock(fd: RawFd, on: bool) -> std::io::Result<()> {
    let fl = sysfd::status_flags(fd)?;
    if on {
        sysfd::set_status_flags(fd, fl | libc::O_NONBLOCK)
    } else {
        sysfd::set_status_flags(fd, fl & !libc::O_NONBLOCK)
    }
}

/// Wait (a second at most, and not past `deadline`) for `fd` to be
/// readable: `None` once the deadline has passed.
pub fn readable_before(fd: RawFd, deadline: Instant) -> Option<bool> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    Some(poll::ready(
        fd,
        libc::POLLIN,
        left.as_millis().min(1000) as i32,
    ))
}

/// `struct tcp_info`: state (byte 0), then `tcpi_unacked` at 24 and
/// `tcpi_sacked` at 28 (for a listener: its accept queue and backlog).
pub fn tcp_info(fd: RawFd) -> Option<[u8; 104]> {
    let mut info = [0u8; 104];
    sock::getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info).ok()?;
    Some(info)
}

/// The native-endian `u32` at byte `i` of `b`.
pub fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// `(connections waiting, backlog)` of `fd` if it is a listening TCP
/// socket.
pub fn accept_queue(fd: RawFd) -> Option<(u32, u32)> {
    if int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) != Some(1)
        || int_opt(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL) != Some(libc::IPPROTO_TCP)
    {
        return None;
    }
    let info = tcp_info(fd)?;
    Some((u32_at(&info, 24), u32_at(&info, 28)))
}
