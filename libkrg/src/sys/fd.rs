//! Descriptors: reading, writing, closing, their flags, what they hold.

use super::check;
use libc::c_int;
use std::ffi::CStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// `read(2)` into `buf`; how much came (0: end of file).
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reads into a live, writable buffer of the given length.
    check(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }).map(|n| n as usize)
}

/// `write(2)` of `buf`; how much went.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: writes initialised bytes of a live buffer of the given length.
    check(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }).map(|n| n as usize)
}

/// `close(2)` of descriptor number `fd`, which the caller owns.
pub fn close(fd: RawFd) -> io::Result<()> {
    // SAFETY: close takes a plain integer; which number to close is the
    // caller's business (see the module rules in `sys`).
    check(unsafe { libc::close(fd) }).map(drop)
}

/// Descriptor number `fd`, which the caller owns (left open for it across
/// an exec, say), as an `OwnedFd`.
pub fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller owns the number (see the module rules in `sys`);
    // an `OwnedFd` only closes it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `fstat(2)`.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; all-zero is valid before fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into our own struct.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// `lseek(2)`; the new offset.
pub fn lseek(fd: RawFd, off: libc::off_t, whence: c_int) -> io::Result<libc::off_t> {
    // SAFETY: lseek takes plain integers.
    check(unsafe { libc::lseek(fd, off, whence) })
}

/// The descriptor flags of `fd` (`F_GETFD`: `FD_CLOEXEC`).
pub fn fd_flags(fd: RawFd) -> io::Result<c_int> {
    // SAFETY: F_GETFD takes no argument.
    check(unsafe { libc::fcntl(fd, libc::F_GETFD) })
}

/// Set the descriptor flags of `fd` (`F_SETFD`).
pub fn set_fd_flags(fd: RawFd, flags: c_int) -> io::Result<()> {
    // SAFETY: F_SETFD takes an int.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, flags) }).map(drop)
}

/// The file status flags of `fd` (`F_GETFL`: access mode, `O_NONBLOCK`...).
pub fn status_flags(fd: RawFd) -> io::Result<c_int> {
    // SAFETY: F_GETFL takes no argument.
    check(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

/// Set the file status flags of `fd` (`F_SETFL`).
pub fn set_status_flags(fd: RawFd, flags: c_int) -> io::Result<()> {
    // SAFETY: F_SETFL takes an int.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(drop)
}

/// `access(2)`: whether `path` allows `mode` (`X_OK`...).
pub fn access(path: &CStr, mode: c_int) -> bool {
    // SAFETY: access reads a NUL-terminated string.
    unsafe { libc::access(path.as_ptr(), mode) == 0 }
}
