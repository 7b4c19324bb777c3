//! Descriptors that deliver events: epoll instances, eventfds and
//! timerfds (signalfds are in [`super::signal`]).

use super::check;
use super::fd::adopt;
use libc::c_int;
use std::io;
use std::os::fd::{OwnedFd, RawFd};

/// `epoll_create1(2)`.
pub fn epoll_create(flags: c_int) -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes a plain integer.
    check(unsafe { libc::epoll_create1(flags) }).map(adopt)
}

/// `epoll_ctl(EPOLL_CTL_ADD)`: epoll instance `ep` watches `fd` for
/// `events`, reporting `data`.
pub fn epoll_add(ep: RawFd, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: the kernel reads our epoll_event.
    check(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
}

/// `eventfd(2)` with its count at `count`.
pub fn eventfd(count: u32, flags: c_int) -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes plain integers.
    check(unsafe { libc::eventfd(count, flags) }).map(adopt)
}

/// `timerfd_create(2)`.
pub fn timerfd_create(clock: c_int, flags: c_int) -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes plain integers.
    check(unsafe { libc::timerfd_create(clock, flags) }).map(adopt)
}

/// `timerfd_gettime(2)`: the time left and the interval (an expired
/// periodic timer is moved forward, its expirations counted).
pub fn timerfd_gettime(fd: RawFd) -> io::Result<libc::itimerspec> {
    // SAFETY: itimerspec is plain data; all-zero is valid.
    let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: timerfd_gettime writes into our own itimerspec.
    check(unsafe { libc::timerfd_gettime(fd, &mut its) })?;
    Ok(its)
}

/// `timerfd_settime(2)` to `its` (`flags`: `TFD_TIMER_ABSTIME`...), the
/// old setting not wanted.
pub fn timerfd_settime(fd: RawFd, flags: c_int, its: &libc::itimerspec) -> io::Result<()> {
    // SAFETY: the kernel reads our itimerspec; a null old value.
    check(unsafe { libc::timerfd_settime(fd, flags, its, std::ptr::null_mut()) }).map(drop)
}

/// `_IOW('T', 0, u64)`: set a timerfd's expiration count (the kernel's
/// checkpoint/restore ioctl).
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

/// Give timerfd `fd` `ticks` unread expirations (`TFD_IOC_SET_TICKS`).
pub fn timerfd_set_ticks(fd: RawFd, ticks: u64) -> io::Result<()> {
    // SAFETY: the ioctl reads one u64 from the pointer we give.
    check(unsafe { libc::ioctl(fd, TFD_IOC_SET_TICKS, &ticks as *const u64) }).map(drop)
}
