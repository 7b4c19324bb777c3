//! userfaultfd's ioctls (linux/userfaultfd.h): each takes the structure
//! its request number encodes, built here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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

/// `UFFD_API`.
pub const API: u64 = 0xAA;

/// `UFFDIO_REGISTER_MODE_*`.
pub const MODE_MISSING: u64 = 1;
pub const MODE_WP: u64 = 2;
pub const MODE_MINOR: u64 = 4;

/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub const WRITEPROTECT_MODE_WP: u64 = 1;
/// `UFFDIO_CONTINUE_MODE_WP`.
pub const CONTINUE_MODE_WP: u64 = 1 << 1;

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

/// The ioctl `req` on `fd` with `arg`.
///
/// # Safety
/// `T` is the structure `req` takes.
unsafe fn ioctl<T>(fd: BorrowedFd<'_>, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: the function's contract: the kernel reads and writes only
    // that structure, which is live.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    super::check(r).map(drop)
}

/// A new userfaultfd for the calling process from an open
/// `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`), with `flags` (`O_CLOEXEC`,
/// `O_NONBLOCK`).
pub fn new(dev: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a
    // new descriptor or -1.
    let fd =
        super::check(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) })?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API`: ask for `features`; those the kernel grants.
pub fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    #[repr(C)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    let mut a = Api {
        api: API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a struct uffdio_api.
    unsafe { ioctl(fd, UFFDIO_API, &mut a) }?;
    Ok(a.features)
}

/// `struct uffdio_register` and `struct uffdio_continue`: a range, a
/// mode, and a word the kernel writes back (the ioctls available, the
/// bytes mapped).
#[repr(C)]
struct RangeMode {
    range: Range,
    mode: u64,
    out: u64,
}

/// `UFFDIO_REGISTER` or `UFFDIO_CONTINUE` (`req`), which take a
/// [`RangeMode`].
fn range_mode(fd: BorrowedFd<'_>, req: u64, start: u64, len: u64, mode: u64) -> io::Result<()> {
    if req != UFFDIO_REGISTER && req != UFFDIO_CONTINUE {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut r = RangeMode {
        range: Range { start, len },
        mode,
        out: 0,
    };
    // SAFETY: both requests take a struct laid out as RangeMode (checked
    // above).
    unsafe { ioctl(fd, req, &mut r) }
}

/// `UFFDIO_REGISTER` of `[start, start+len)` for the faults of `mode`.
pub fn register(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<()> {
    range_mode(fd, UFFDIO_REGISTER, start, len, mode)
}

/// `UFFDIO_CONTINUE`: map the page cache pages behind
/// `[start, start+len)`.
pub fn cont(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<()> {
    range_mode(fd, UFFDIO_CONTINUE, start, len, mode)
}

/// `UFFDIO_WRITEPROTECT` of `[start, start+len)`.
pub fn write_protect(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<()> {
    #[repr(C)]
    struct Wp {
        range: Range,
        mode: u64,
    }
    let mut w = Wp {
        range: Range { start, len },
        mode,
    };
    // SAFETY: UFFDIO_WRITEPROTECT takes a struct uffdio_writeprotect.
    unsafe { ioctl(fd, UFFDIO_WRITEPROTECT, &mut w) }
}

/// `UFFDIO_WAKE`: wake the threads waiting on faults in
/// `[start, start+len)`.
pub fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = Range { start, len };
    // SAFETY: UFFDIO_WAKE takes a struct uffdio_range.
    unsafe { ioctl(fd, UFFDIO_WAKE, &mut r) }
}
