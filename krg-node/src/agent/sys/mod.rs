//! The agent's system calls that std and nix do not wrap safely: pidfds,
//! signals by number, the memory of shared segments, splice, and starting
//! a program for a shadow (`spawn`). With `crate::sys` and
//! `cluster::sys`, the only code of the library allowed `unsafe`: every
//! function here is safe to call with any argument, and its `SAFETY`
//! comment says why. Errors name the call (`crate::sys::context`).

pub(super) mod spawn;

use crate::sys::{check, last_error};
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// The descriptor a system call just returned (`-1`: its error).
fn new_fd(r: libc::c_long, call: impl FnOnce() -> String) -> io::Result<OwnedFd> {
    let fd = check(r, call)?;
    // SAFETY: the system call returned this new descriptor, which nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Watch a descriptor we own with the runtime.
pub(super) fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is moved into the AsyncFd, so the descriptor stays
    // open and the same for the AsyncFd's whole life.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// A pidfd of local process `kpid`.
pub(super) fn pidfd_open(kpid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no memory.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, kpid, 0) };
    new_fd(r, || format!("pidfd_open({kpid})"))
}

/// A copy (close-on-exec) of descriptor `fd` of the process of `pidfd`;
/// `what` names it in the error.
pub(super) fn getfd(
    pidfd: BorrowedFd<'_>,
    fd: i32,
    what: impl FnOnce() -> String,
) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags, no
    // memory; the pidfd is borrowed, so open for the call.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    new_fd(r, what)
}

/// A copy of descriptor `fd` of process `kpid` (also the parks'; see
/// `parked`).
pub(super) fn pidfd_getfd(kpid: i32, fd: i32) -> io::Result<OwnedFd> {
    let p = pidfd_open(kpid)?;
    getfd(p.as_fd(), fd, || format!("pid {kpid}: fd {fd}"))
}

/// Send signal `sig` (any number, real-time ones included) to the process
/// of `pidfd`: never to a process that reused its pid.
pub(super) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a borrowed (open) pidfd, a null
    // siginfo (the kernel fills in the sender) and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    check(r, || format!("pidfd_send_signal({sig})")).map(drop)
}

/// kill(2) with any signal number (nix's `Signal` has no real-time ones).
pub(super) fn kill(kpid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes two integers, no memory.
    let r = unsafe { libc::kill(kpid, sig) };
    check(r as libc::c_long, || format!("kill({kpid}, {sig})")).map(drop)
}

/// Wait for child `kpid` to end and reap it (blocking; a signal does not
/// end the wait): its raw wait status, as a shadow passes it on.
pub(super) fn wait_status(kpid: i32) -> io::Result<i32> {
    loop {
        let mut st = 0;
        // SAFETY: waitpid writes the status into our int.
        let r = unsafe { libc::waitpid(kpid, &mut st, 0) };
        match check(r as libc::c_long, || format!("waitpid({kpid})")) {
            Ok(_) => return Ok(st),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A system limit or option (`libc::_SC_...`); `None` if not known.
pub(super) fn sysconf(name: libc::c_int) -> Option<i64> {
    // SAFETY: sysconf takes an integer; an unknown one is an error.
    let v = unsafe { libc::sysconf(name) };
    (v > 0).then_some(v as i64)
}

/// A new memfd named `name` (close-on-exec).
pub(super) fn memfd(name: &std::ffi::CStr) -> io::Result<File> {
    // SAFETY: memfd_create reads the NUL-terminated name, borrowed for the
    // call.
    let r = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    new_fd(r as libc::c_long, || "memfd_create".into()).map(File::from)
}

/// Write `bufs` one after the other at byte `off` of `file`, in one call
/// (`pwritev`); the bytes written.
pub(super) fn pwritev(file: &File, bufs: &[IoSlice<'_>], off: u64) -> io::Result<usize> {
    // SAFETY: an IoSlice has the layout of an iovec (std guarantees it on
    // Unix); the slices are borrowed for the call, which only reads them.
    let r = unsafe {
        libc::pwritev(
            file.as_raw_fd(),
            bufs.as_ptr().cast::<libc::iovec>(),
            bufs.len().min(libc::c_int::MAX as usize) as libc::c_int,
            off as libc::off_t,
        )
    };
    Ok(check(r as libc::c_long, || format!("pwritev at {off}"))? as usize)
}

/// Free bytes `off..off + len` of `file`, which then read as zeros (its
/// size stays).
pub(super) fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes a descriptor (borrowed) and integers.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    check(r as libc::c_long, || format!("punch {len} bytes at {off}")).map(drop)
}

/// A read-only shared mapping of a file, unmapped when dropped: its
/// futex words can be woken (FUTEX_WAKE needs an address).
#[derive(Debug)]
pub(super) struct SharedView {
    addr: usize,
    len: usize,
}

impl SharedView {
    /// Map the first `len` bytes of `file`.
    pub(super) fn new(file: &File, len: usize) -> io::Result<SharedView> {
        // SAFETY: a new shared mapping at an address the kernel picks, so
        // no existing memory is touched; nothing reads through it (futex
        // wakes only pass addresses in it to the kernel).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_error(|| format!("mmap of {len} bytes")));
        }
        Ok(SharedView {
            addr: p as usize,
            len,
        })
    }

    /// Wake every waiter on the futex word at byte `off` (inside the
    /// mapping, 4-byte aligned).
    pub(super) fn futex_wake(&self, off: usize) -> io::Result<()> {
        if off & 3 != 0 || off.checked_add(4).is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("futex word at {off} of a {}-byte mapping", self.len),
            ));
        }
        // SAFETY: FUTEX_WAKE with an aligned address inside our mapping
        // (checked above); the kernel reads nothing there, it only hashes
        // the address, and the other arguments are unused.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.addr + off,
                libc::FUTEX_WAKE,
                i32::MAX,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                0,
            )
        };
        check(r, || format!("futex wake at {off}")).map(drop)
    }
}

impl Drop for SharedView {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns; no reference into
        // it was ever handed out (only addresses passed to the kernel).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Move up to `len` bytes from `from` to `to` in the kernel (one of them
/// a pipe or FIFO); the bytes moved, 0 at the end of `from`.
pub(super) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two borrowed (open) descriptors, with null
    // offsets (both ends' own positions): no memory is passed.
    let r = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE,
        )
    };
    Ok(check(r as libc::c_long, || "splice".into())? as usize)
}

/// How many bytes wait to be read on `fd` (a pipe or socket: FIONREAD).
pub(super) fn queued(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes the count of queued bytes into our int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    check(r as libc::c_long, || "ioctl(FIONREAD)".into())?;
    Ok(n.max(0) as usize)
}

/// Whether fd `a` of process `pa` and fd `b` of process `pb` are the same
/// open file description (kcmp).
pub(super) fn same_file(pa: i32, a: i32, pb: i32, b: i32) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes pids, a type and descriptor numbers, no memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pa as libc::c_long,
            pb as libc::c_long,
            KCMP_FILE,
            a as libc::c_long,
            b as libc::c_long,
        )
    };
    Ok(check(r, || format!("kcmp({pa}, {pb}, KCMP_FILE, {a}, {b})"))? == 0)
}
