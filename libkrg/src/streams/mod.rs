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
//!
//! The hooks' entry points that take the application's socket addresses
//! are this module's `abi` fence.

#![deny(unsafe_code)]

pub mod accepted;
pub mod dgram;
pub mod fifo;
pub mod loopback;
pub mod moving;
pub mod placed;
pub mod seqpacket;
pub(crate) mod sock;
pub mod unix;

pub use abi::{accept, bind, connect, getpeername, getsockname};

use crate::caps::Caps;
use crate::sys::user::AddrOut;
use libc::{c_int, socklen_t};

/// The fence of this module: the hooks' entry points that take the
/// application's socket addresses (allowed `unsafe`: their contract is the
/// C call's). Each makes `sys::user` views of them, and closures of the
/// real call with the application's own arguments (`pass`) or with an
/// address of ours (`to`, `into`), and calls the safe code.
///
/// `bind`, `accept`, `getsockname` and `getpeername` are safe functions
/// with raw pointers because krg-preload's hooks call them outside
/// `unsafe` (the hooks' own contract covers the pointers); they should be
/// `unsafe fn`s like `connect`, in the same change as those hooks.
#[allow(unsafe_code)]
mod abi {
    use super::*;
    use crate::sys::user;
    use libc::sockaddr;

    /// The bytes of the address `(addr, len)` given to `bind` or
    /// `connect` (`None` for null); at most a `sockaddr_storage`'s worth,
    /// the most the kernel takes.
    ///
    /// # Safety
    /// `addr` is null or points to `len` readable bytes, during `'a`.
    unsafe fn addr_in<'a>(addr: *const sockaddr, len: socklen_t) -> Option<&'a [u8]> {
        if addr.is_null() {
            return None;
        }
        let n = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: the function's contract (n <= len).
        Some(unsafe { user::slice(addr.cast::<u8>(), n) })
    }

    /// The real call `real` into an address buffer of ours: the result and
    /// the address's length.
    fn into_ours(
        real: &impl Fn(*mut sockaddr, *mut socklen_t) -> c_int,
        b: &mut [u8],
    ) -> (c_int, socklen_t) {
        let mut l = b.len() as socklen_t;
        (real(b.as_mut_ptr().cast(), &mut l), l)
    }

    /// `bind(fd, addr, len)`: a TCP port on the loopback or wildcard
    /// address is reserved in the whole cluster.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn bind(
        fd: c_int,
        addr: *const sockaddr,
        len: socklen_t,
        real: impl Fn(c_int, *const sockaddr, socklen_t) -> c_int,
    ) -> c_int {
        // SAFETY: bind(2)'s contract: `addr` points to `len` bytes.
        let a = unsafe { addr_in(addr, len) };
        let to = |b: &[u8]| real(fd, b.as_ptr().cast(), b.len() as socklen_t);
        loopback::bind(fd, a, || real(fd, addr, len), to)
    }

    /// `connect(fd, addr, len)`: a loopback port held on another node, or
    /// a UNIX stream name listened on there, is reached there.
    ///
    /// # Safety
    /// `addr` is null or points to `len` readable bytes (the connect
    /// contract).
    pub unsafe fn connect(
        fd: c_int,
        addr: *const sockaddr,
        len: socklen_t,
        real: impl Fn(c_int, *const sockaddr, socklen_t) -> c_int,
    ) -> c_int {
        // SAFETY: the function's contract.
        let a = unsafe { addr_in(addr, len) };
        if let Some(r) = a.and_then(|a| unix::connect(fd, a)) {
            return r;
        }
        let to = |b: &[u8]| real(fd, b.as_ptr().cast(), b.len() as socklen_t);
        loopback::connect(fd, a, || real(fd, addr, len), to)
    }

    /// `accept`/`accept4` on `fd` (`real` accepts with an address buffer):
    /// the cluster-wide loopback's filter, then a connection owed since a
    /// migration in place of its stand-in.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn accept(
        fd: c_int,
        addr: *mut sockaddr,
        len: *mut socklen_t,
        real: impl Fn(*mut sockaddr, *mut socklen_t) -> c_int,
    ) -> c_int {
        // SAFETY: accept(2)'s contract: `addr` has room for `*len` bytes.
        let out = unsafe { AddrOut::new(addr, len) };
        let into = |b: &mut [u8]| into_ours(&real, b);
        super::accept_into(fd, out.as_ref(), || real(addr, len), into)
    }

    /// `getsockname(fd, addr, len)`: a listener bound for the program to
    /// the loopback shows the loopback.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn getsockname(
        fd: c_int,
        addr: *mut sockaddr,
        len: *mut socklen_t,
        real: impl Fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int,
    ) -> c_int {
        name(fd, addr, len, real, false)
    }

    /// `getpeername(fd, addr, len)`: a connection made through the
    /// cluster-wide loopback shows the loopback at both ends.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn getpeername(
        fd: c_int,
        addr: *mut sockaddr,
        len: *mut socklen_t,
        real: impl Fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int,
    ) -> c_int {
        name(fd, addr, len, real, true)
    }

    /// `getpeername` (`peer`) or `getsockname`, which have one contract:
    /// `addr` has room for `*len` bytes.
    fn name(
        fd: c_int,
        addr: *mut sockaddr,
        len: *mut socklen_t,
        real: impl Fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int,
        peer: bool,
    ) -> c_int {
        // SAFETY: the calls' contract (see above), which the hooks vouch
        // for.
        let out = unsafe { AddrOut::new(addr, len) };
        let real = |a: *mut sockaddr, l: *mut socklen_t| real(fd, a, l);
        let into = |b: &mut [u8]| into_ours(&real, b);
        let pass = || real(addr, len);
        if peer {
            loopback::getpeername(fd, out.as_ref(), pass, into)
        } else {
            loopback::getsockname(fd, out.as_ref(), pass, into)
        }
    }
}

/// [`accept`] with the caller's address buffer as a view (`out`).
fn accept_into(
    fd: c_int,
    out: Option<&AddrOut<'_>>,
    pass: impl Fn() -> c_int,
    into: impl Fn(&mut [u8]) -> (c_int, socklen_t),
) -> c_int {
    let mut c = loopback::accept(fd, out, pass, into);
    if c >= 0 && active() {
        c = unix::on_accept(c, out);
    }
    if c >= 0 {
        accepted::on_accept(c, out);
    }
    c
}

/// `listen(fd, backlog)`: a TCP socket never bound gets a port free in the
/// cluster; a named UNIX stream socket becomes reachable from every node.
pub fn listen(fd: c_int, backlog: c_int, real: impl Fn(c_int, c_int) -> c_int) -> c_int {
    let r = loopback::listen(fd, backlog, real);
    if r == 0 {
        unix::after_listen(fd);
    }
    r
}

/// Whether this process's streams are krg's (capability `streams`);
/// otherwise the kernel's, node-local.
pub fn active() -> bool {
    Caps::from_bits(crate::processes::hello_caps()).contains(Caps::STREAMS)
}
