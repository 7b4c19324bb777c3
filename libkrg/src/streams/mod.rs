//! Streams, the application side. See docs/architecture/streams.md.
//!
//! So far: the cluster-wide loopback ([`loopback`]): a TCP server that an
//! SSI process binds to `127.0.0.1:P`, `::1` or the wildcard address on one
//! node is reachable at `127.0.0.1:P` from SSI processes on every node, and
//! a port held anywhere in the cluster cannot be bound again elsewhere
//! (`EADDRINUSE`), as on one machine. Stream ends move with a migrated
//! process ([`moving`]), and the pipes of a program placed on another node
//! connect it directly to the process at their other end ([`placed`]).
//! FIFOs ([`fifo`]) and UNIX stream socket names ([`unix`]) opened or
//! connected to from several nodes meet across the cluster. Datagram
//! sockets that only send ([`dgram`]) are connected again on the node a
//! process moves to.

pub mod accepted;
pub mod dgram;
pub mod fifo;
pub mod loopback;
pub mod moving;
pub mod placed;
pub mod seqpacket;
pub mod unix;

pub use loopback::{bind, getpeername, getsockname};

use crate::caps::Caps;

/// `accept`/`accept4` on `fd` (`real` accepts with an address buffer): the
/// cluster-wide loopback's filter, then a connection owed since a
/// migration in place of its stand-in.
pub fn accept(
    fd: libc::c_int,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
    real: impl Fn(*mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int,
) -> libc::c_int {
    let mut c = loopback::accept(fd, addr, len, real);
    if c >= 0 && active() {
        c = unix::on_accept(c, addr, len);
    }
    if c >= 0 {
        accepted::on_accept(c, addr, len);
    }
    c
}

/// `listen(fd, backlog)`: a TCP socket never bound gets a port free in the
/// cluster; a named UNIX stream socket becomes reachable from every node.
pub fn listen(
    fd: libc::c_int,
    backlog: libc::c_int,
    real: impl Fn(libc::c_int, libc::c_int) -> libc::c_int,
) -> libc::c_int {
    let r = loopback::listen(fd, backlog, real);
    if r == 0 {
        unix::after_listen(fd);
    }
    r
}

/// `connect(fd, addr, len)`: a loopback port held on another node, or a
/// UNIX stream name listened on there, is reached there.
///
/// # Safety
/// `addr` is null or points to `len` readable bytes (the connect contract).
pub unsafe fn connect(
    fd: libc::c_int,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
    real: impl Fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int,
) -> libc::c_int {
    // SAFETY: this function's contract.
    if let Some(r) = unsafe { unix::connect(fd, addr, len) } {
        return r;
    }
    loopback::connect(fd, addr, len, real)
}

/// Whether this process's streams are krg's (capability `streams`);
/// otherwise the kernel's, node-local.
pub fn active() -> bool {
    Caps::from_bits(crate::processes::hello_caps()).contains(Caps::STREAMS)
}
