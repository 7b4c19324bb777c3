//! Futex waits and wakes on atomics of libkrg's own (raw system calls:
//! the capture handler and the restorer use them).

use std::sync::atomic::{AtomicI32, AtomicU32};
use std::time::Duration;

mod sealed {
    pub trait Sealed {}
}

/// A 32-bit atomic a futex can be.
pub trait Word: sealed::Sealed {
    #[doc(hidden)]
    fn addr(&self) -> *const u32;
}

impl sealed::Sealed for AtomicU32 {}
impl Word for AtomicU32 {
    fn addr(&self) -> *const u32 {
        self.as_ptr()
    }
}

impl sealed::Sealed for AtomicI32 {}
impl Word for AtomicI32 {
    fn addr(&self) -> *const u32 {
        self.as_ptr().cast()
    }
}

/// `FUTEX_WAIT` on `word` while it holds `val`, for at most `timeout`
/// (woken, timed out or interrupted alike). `private`: only this
/// process's threads wake it (`FUTEX_PRIVATE_FLAG`); a kernel wake (the
/// tid a thread's exit clears) is not private.
pub fn wait(word: &impl Word, val: u32, timeout: Duration, private: bool) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    let op = libc::FUTEX_WAIT | if private { libc::FUTEX_PRIVATE_FLAG } else { 0 };
    // SAFETY: FUTEX_WAIT reads the live atomic `word` and our timespec.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.addr(),
            op,
            val,
            &ts as *const libc::timespec,
        )
    };
}

/// `FUTEX_WAKE` of every waiter on `word` (private: see [`wait`]).
pub fn wake_all(word: &impl Word, private: bool) {
    let op = libc::FUTEX_WAKE | if private { libc::FUTEX_PRIVATE_FLAG } else { 0 };
    // SAFETY: FUTEX_WAKE only uses the address of the live atomic `word`.
    unsafe { libc::syscall(libc::SYS_futex, word.addr(), op, i32::MAX) };
}
