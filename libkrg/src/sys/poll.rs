//! Waiting for descriptors.

use std::io;
use std::os::fd::RawFd;

/// `poll(2)` of `fds` for up to `ms` milliseconds (-1: no limit); how many
/// have events.
pub fn poll(fds: &mut [libc::pollfd], ms: i32) -> io::Result<usize> {
    // SAFETY: fds is a live, writable array of pollfd of the given length.
    super::check(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) })
        .map(|n| n as usize)
}

/// Whether `fd` has one of `events` within `ms` milliseconds (an error
/// counts as no).
pub fn ready(fd: RawFd, events: i16, ms: i32) -> bool {
    let mut p = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    poll(&mut p, ms).is_ok_and(|n| n > 0)
}
