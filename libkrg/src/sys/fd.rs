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

/// `fstatat(2)` of `path` relative to `dirfd` (through libc: krg's own
/// hook sees it).
pub fn fstatat(dirfd: RawFd, path: &CStr, flags: c_int) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; all-zero is valid before fstatat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path; fstatat writes into our own struct.
    check(unsafe { libc::fstatat(dirfd, path.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// `dup2(2)`: `fd` also under number `target` (what `target` held is
/// closed), which the caller owns.
pub fn dup2(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 takes plain integers; which number to replace is the
    // caller's business (see the module rules in `sys`).
    check(unsafe { libc::dup2(fd, target) }).map(drop)
}

/// `dup3(2)`: `fd` also under number `target` with `flags`
/// (`O_CLOEXEC`); what `target` held is closed. The caller owns `target`.
pub fn dup3(fd: RawFd, target: RawFd, flags: c_int) -> io::Result<()> {
    // SAFETY: as dup2.
    check(unsafe { libc::dup3(fd, target, flags) }).map(drop)
}

/// `pipe2(2)`: (read end, write end).
pub fn pipe2(flags: c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two descriptors into our array.
    check(unsafe { libc::pipe2(p.as_mut_ptr(), flags) })?;
    Ok((adopt(p[0]), adopt(p[1])))
}

/// The capacity of pipe `fd` (`F_GETPIPE_SZ`).
pub fn pipe_size(fd: RawFd) -> io::Result<c_int> {
    // SAFETY: F_GETPIPE_SZ takes no argument.
    check(unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) })
}

/// Set the capacity of pipe `fd` (`F_SETPIPE_SZ`); the capacity it got.
pub fn set_pipe_size(fd: RawFd, size: c_int) -> io::Result<c_int> {
    // SAFETY: F_SETPIPE_SZ takes an int.
    check(unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size) })
}

/// Bytes waiting to be read in `fd` (`FIONREAD`, `SIOCINQ` for a socket).
pub fn readable_bytes(fd: RawFd) -> io::Result<c_int> {
    let mut n: c_int = 0;
    // SAFETY: FIONREAD writes one int into ours.
    check(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) })?;
    Ok(n)
}

/// `tee(2)`: copy up to `len` bytes from pipe `from` into pipe `to`
/// without taking them; how many.
pub fn tee(from: RawFd, to: RawFd, len: usize, flags: libc::c_uint) -> io::Result<usize> {
    // SAFETY: tee takes plain integers.
    check(unsafe { libc::tee(from, to, len, flags) }).map(|n| n as usize)
}

/// `realpath(3)` of `path` into `buf` (through libc: krg's own hook sees
/// it; glibc works on the stack for paths under 1 KiB, so nothing is
/// allocated): the canonical path's bytes.
pub fn realpath<'a>(path: &CStr, buf: &'a mut [u8; libc::PATH_MAX as usize]) -> Option<&'a [u8]> {
    // SAFETY: a NUL-terminated path and a PATH_MAX buffer, as realpath
    // requires.
    let r = unsafe { libc::realpath(path.as_ptr(), buf.as_mut_ptr().cast()) };
    if r.is_null() {
        return None;
    }
    let n = buf.iter().position(|b| *b == 0)?;
    Some(&buf[..n])
}

/// `fdopen(3)`: a stdio stream on `fd` with `mode`; null (errno set) on
/// failure.
pub fn fdopen(fd: RawFd, mode: &CStr) -> *mut libc::FILE {
    // SAFETY: a NUL-terminated mode string; fdopen takes the descriptor
    // by number.
    unsafe { libc::fdopen(fd, mode.as_ptr()) }
}

/// `open(2)` of `path` (through libc: krg's own `open` hooks see it).
pub fn open(path: &CStr, flags: c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: open reads a NUL-terminated string.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags, mode) })?;
    Ok(adopt(fd))
}

/// `dup(2)`: a new descriptor for what `fd` holds.
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: dup takes a plain integer.
    check(unsafe { libc::dup(fd) }).map(adopt)
}

/// `fcntl(F_DUPFD_CLOEXEC)`: a close-on-exec copy of `fd` at the lowest
/// free number from `floor` up.
pub fn dup_above(fd: RawFd, floor: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an int.
    check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) }).map(adopt)
}
