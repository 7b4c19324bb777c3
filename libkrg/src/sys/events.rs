//! Descriptors that deliver events: epoll instances, eventfds and
//! timerfds (signalfds are in [`super::signal`]).

use super::check;
use std::io;
use std::os::fd::RawFd;

/// `epoll_ctl(EPOLL_CTL_ADD)`: epoll instance `ep` watches `fd` for
/// `events`, reporting `data`.
pub fn epoll_add(ep: RawFd, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: the kernel reads our epoll_event.
    check(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
}
