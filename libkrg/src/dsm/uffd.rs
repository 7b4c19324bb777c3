//! userfaultfd: the constants and ioctls krg's shared memory uses, on both
//! sides (the application creates the descriptor, the agent serves it).
//!
//! The kernel ties a userfaultfd to the address space of the process that
//! created it, but its ioctls act on that address space from whichever
//! process holds the descriptor: the agent registers ranges, fills pages and
//! write-protects them from outside the application.

#![deny(unsafe_code)]

use crate::sys::uffd as sys;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub const PAGE: u64 = 4096;

const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// What krg needs: missing and minor faults and write protection on
/// shared memory (memfd).
pub const FEATURES: u64 = FEATURE_MISSING_SHMEM | FEATURE_MINOR_SHMEM | FEATURE_WP_HUGETLBFS_SHMEM;

pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const FLAG_WRITE: u64 = 1;
pub const FLAG_WP: u64 = 2;
pub const FLAG_MINOR: u64 = 4;

/// Size of one `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

/// Create a userfaultfd for the calling process from an open
/// `/dev/userfaultfd` (which the agent hands over: it is root-only) and
/// negotiate krg's features. Non-blocking, close-on-exec.
pub fn create(dev: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let fd = sys::new(dev, libc::O_CLOEXEC | libc::O_NONBLOCK)?;
    sys::api(fd.as_fd(), FEATURES)?;
    Ok(fd)
}

/// Register `[start, start+len)` for missing, minor and write-protect
/// faults.
pub fn register(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    sys::register(
        fd,
        start,
        len,
        sys::MODE_MISSING | sys::MODE_MINOR | sys::MODE_WP,
    )
}

/// Map the page cache page behind `[start, start+len)` (after a minor or
/// missing fault), write-protected if `wp`. `EEXIST` means already mapped.
pub fn cont(fd: BorrowedFd<'_>, start: u64, len: u64, wp: bool) -> io::Result<()> {
    sys::cont(fd, start, len, if wp { sys::CONTINUE_MODE_WP } else { 0 })
}

/// Set (`wp`) or clear write protection on `[start, start+len)`; clearing
/// wakes the threads that faulted there.
pub fn write_protect(fd: BorrowedFd<'_>, start: u64, len: u64, wp: bool) -> io::Result<()> {
    let mode = if wp { sys::WRITEPROTECT_MODE_WP } else { 0 };
    sys::write_protect(fd, start, len, mode)
}

/// Wake the threads waiting on faults in `[start, start+len)`.
pub fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    sys::wake(fd, start, len)
}

/// One page fault read from a userfaultfd.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub addr: u64,
    pub flags: u64,
}

/// Decode the page faults in `buf` (whole `uffd_msg`s); other events are
/// skipped (krg does not ask for any).
pub fn faults(buf: &[u8]) -> impl Iterator<Item = Fault> + '_ {
    buf.chunks_exact(MSG_SIZE).filter_map(|m| {
        if m[0] != EVENT_PAGEFAULT {
            return None;
        }
        let u = |o: usize| u64::from_ne_bytes(m[o..o + 8].try_into().expect("8 bytes"));
        Some(Fault {
            flags: u(8),
            addr: u(16),
        })
    })
}
