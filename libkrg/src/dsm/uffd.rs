//! userfaultfd: the constants and ioctls krg's shared memory uses, on both
//! sides (the application creates the descriptor, the agent serves it).
//!
//! The kernel ties a userfaultfd to the address space of the process that
//! created it, but its ioctls act on that address space from whichever
//! process holds the descriptor: the agent registers ranges, fills pages and
//! write-protects them from outside the application.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

pub const PAGE: u64 = 4096;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xAA << 8) | nr
}

const UFFDIO_API: u64 = iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, 24);
const UFFDIO_CONTINUE: u64 = iowr(0x07, 32);
/// `_IO(0xAA, 0)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xAA << 8;

const UFFD_API: u64 = 0xAA;
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// What krg needs: missing and minor faults and write protection on
/// shared memory (memfd).
pub const FEATURES: u64 = FEATURE_MISSING_SHMEM | FEATURE_MINOR_SHMEM | FEATURE_WP_HUGETLBFS_SHMEM;

const MODE_MISSING: u64 = 1;
const MODE_WP: u64 = 2;
const MODE_MINOR: u64 = 4;

const WRITEPROTECT_MODE_WP: u64 = 1;
const CONTINUE_MODE_WP: u64 = 1 << 1;

pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const FLAG_WRITE: u64 = 1;
pub const FLAG_WP: u64 = 2;
pub const FLAG_MINOR: u64 = 4;

/// Size of one `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

fn ioctl<T>(fd: BorrowedFd<'_>, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the struct layout the request number
    // encodes (its size is part of the number); the kernel reads and writes
    // only that struct.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Create a userfaultfd for the calling process from an open
/// `/dev/userfaultfd` (which the agent hands over: it is root-only) and
/// negotiate krg's features. Non-blocking, close-on-exec.
pub fn create(dev: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a
    // new descriptor or -1.
    let fd = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW as _,
            libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    let mut api = Api {
        api: UFFD_API,
        features: FEATURES,
        ioctls: 0,
    };
    ioctl(fd.as_fd(), UFFDIO_API, &mut api)?;
    Ok(fd)
}

/// Register `[start, start+len)` for missing, minor and write-protect
/// faults.
pub fn register(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    #[repr(C)]
    struct Register {
        range: Range,
        mode: u64,
        ioctls: u64,
    }
    let mut r = Register {
        range: Range { start, len },
        mode: MODE_MISSING | MODE_MINOR | MODE_WP,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_REGISTER, &mut r)
}

/// Map the page cache page behind `[start, start+len)` (after a minor or
/// missing fault), write-protected if `wp`. `EEXIST` means already mapped.
pub fn cont(fd: BorrowedFd<'_>, start: u64, len: u64, wp: bool) -> io::Result<()> {
    #[repr(C)]
    struct Continue {
        range: Range,
        mode: u64,
        mapped: i64,
    }
    let mut c = Continue {
        range: Range { start, len },
        mode: if wp { CONTINUE_MODE_WP } else { 0 },
        mapped: 0,
    };
    ioctl(fd, UFFDIO_CONTINUE, &mut c)
}

/// Set (`wp`) or clear write protection on `[start, start+len)`; clearing
/// wakes the threads that faulted there.
pub fn write_protect(fd: BorrowedFd<'_>, start: u64, len: u64, wp: bool) -> io::Result<()> {
    #[repr(C)]
    struct Wp {
        range: Range,
        mode: u64,
    }
    let mut w = Wp {
        range: Range { start, len },
        mode: if wp { WRITEPROTECT_MODE_WP } else { 0 },
    };
    ioctl(fd, UFFDIO_WRITEPROTECT, &mut w)
}

/// Wake the threads waiting on faults in `[start, start+len)`.
pub fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = Range { start, len };
    ioctl(fd, UFFDIO_WAKE, &mut r)
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
