//! Signals: sets, the thread's mask, dispositions, signalfd, siginfo.

use libc::{c_int, pid_t, siginfo_t};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A `sigset_t`.
#[derive(Clone, Copy)]
pub struct SigSet(libc::sigset_t);

impl SigSet {
    /// A set for the kernel to fill.
    #[inline]
    fn blank() -> SigSet {
        // SAFETY: sigset_t is plain data; all-zero is valid.
        SigSet(unsafe { std::mem::zeroed() })
    }

    /// No signal.
    #[inline]
    pub fn empty() -> SigSet {
        let mut s = SigSet::blank();
        // SAFETY: sigemptyset only writes the set it is given.
        unsafe { libc::sigemptyset(&mut s.0) };
        s
    }

    /// Every signal.
    #[inline]
    pub fn full() -> SigSet {
        let mut s = SigSet::blank();
        // SAFETY: sigfillset only writes the set it is given.
        unsafe { libc::sigfillset(&mut s.0) };
        s
    }

    /// This set with `sig` (an invalid number is left out).
    pub fn with(mut self, sig: c_int) -> SigSet {
        // SAFETY: sigaddset writes our own set (EINVAL for a bad number).
        unsafe { libc::sigaddset(&mut self.0, sig) };
        self
    }

    /// Whether `sig` is in the set.
    pub fn contains(&self, sig: c_int) -> bool {
        // SAFETY: sigismember reads our own set.
        unsafe { libc::sigismember(&self.0, sig) == 1 }
    }
}

/// `pthread_sigmask(how, set)` on the calling thread; the mask it had.
/// Unlike the raw `rt_sigprocmask`, it leaves glibc's internal
/// cancellation and setxid signals unblocked.
#[inline]
pub fn set_thread_mask(how: c_int, set: &SigSet) -> SigSet {
    let mut old = SigSet::blank();
    // SAFETY: both pointers are to live sigset_t values.
    unsafe { libc::pthread_sigmask(how, &set.0, &mut old.0) };
    old
}

/// The calling thread's signal mask.
#[cfg(test)]
pub fn thread_mask() -> SigSet {
    let mut cur = SigSet::blank();
    // SAFETY: a null new set only reads the mask into `cur`.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur.0) };
    cur
}

/// The handler of `sig` (`SIG_DFL`, `SIG_IGN` or a function's address).
pub fn handler(sig: c_int) -> io::Result<libc::sighandler_t> {
    // SAFETY: sigaction is plain data; all-zero is valid.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries; `old` is a valid out
    // pointer.
    super::check(unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) })?;
    Ok(old.sa_sigaction)
}

/// Give `sig` the disposition `handler`, `SIG_DFL` or `SIG_IGN` only
/// (`EINVAL` otherwise), with `sigaction` (no flags, an empty mask).
pub fn set_plain(sig: c_int, handler: libc::sighandler_t) -> io::Result<()> {
    if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: sigaction is plain data; all-zero is SIG_DFL with an empty
    // mask.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler;
    // SAFETY: SIG_DFL and SIG_IGN install no code of ours.
    super::check(unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) }).map(drop)
}

/// Give `sig` its default disposition (`signal(sig, SIG_DFL)`).
pub fn set_default(sig: c_int) {
    // SAFETY: SIG_DFL installs no code of ours.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

/// `raise(3)`.
pub fn raise(sig: c_int) {
    // SAFETY: raise takes a plain integer.
    unsafe { libc::raise(sig) };
}

/// A new signalfd for `set` (`signalfd(2)`).
pub fn signalfd(set: &SigSet, flags: c_int) -> io::Result<OwnedFd> {
    // SAFETY: set is a live sigset_t.
    let fd = super::check(unsafe { libc::signalfd(-1, &set.0, flags) })?;
    // SAFETY: the kernel just returned this new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The next signal read from signalfd `fd`, if a whole record came.
pub fn read_signalfd(fd: RawFd) -> Option<libc::signalfd_siginfo> {
    // SAFETY: signalfd_siginfo is plain data; all-zero is valid.
    let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let sz = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most one record into si, which is that size.
    let n = unsafe { libc::read(fd, (&mut si as *mut libc::signalfd_siginfo).cast(), sz) };
    (n == sz as isize).then_some(si)
}

/// Offset of `si_pid` in a SIGCHLD siginfo: three ints, then the union,
/// which is pointer-aligned (16 on 64-bit targets, 12 on 32-bit ones).
const SI_PID_OFFSET: usize = {
    let head = 3 * std::mem::size_of::<c_int>();
    let align = std::mem::align_of::<*const u8>();
    head.div_ceil(align) * align
};

/// The `si_pid` field of a SIGCHLD siginfo.
pub fn child_pid(info: &mut siginfo_t) -> &mut pid_t {
    // SAFETY: siginfo_t is at least 128 bytes and pointer-aligned; si_pid is
    // the first field of the union that starts at SI_PID_OFFSET, which is
    // aligned for pid_t. The reference borrows `info` mutably.
    unsafe {
        &mut *(info as *mut siginfo_t)
            .cast::<u8>()
            .add(SI_PID_OFFSET)
            .cast::<pid_t>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_pid_offset_matches_libc() {
        // SAFETY: zeroed siginfo_t is valid plain data.
        let mut info: siginfo_t = unsafe { std::mem::zeroed() };
        *child_pid(&mut info) = 4242;
        // SAFETY: reading the union field of a zero-initialised siginfo.
        assert_eq!(unsafe { info.si_pid() }, 4242);
    }

    #[test]
    fn sets() {
        let s = SigSet::empty().with(libc::SIGINT);
        assert!(s.contains(libc::SIGINT) && !s.contains(libc::SIGTERM));
        assert!(SigSet::full().contains(libc::SIGTERM));
    }
}
