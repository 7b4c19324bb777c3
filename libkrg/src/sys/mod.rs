//! Where libkrg's `unsafe` lives: small safe wrappers of the system calls
//! and libc functions the library makes, grouped by topic, each unsafe
//! block with the reason it is sound. The rest of libkrg is
//! `#![deny(unsafe_code)]` and calls these; the only other places allowed
//! `unsafe` are the `abi` fences of the modules whose entry points take
//! the application's raw pointers, and the parts of `checkpoint` that run
//! without libc or below Rust's rules (named in `checkpoint/mod.rs`).
//!
//! Rules of the wrappers, because hooks call them:
//! - no allocation unless the doc says so (errors are `io::Error`s made
//!   from the raw errno, which do not allocate), no lock;
//! - the route matters: a libc function may reach one of krg's own hooks,
//!   a raw system call never does ([`raw`] is that family), so each
//!   wrapper names which it is;
//! - descriptors are taken by number (`RawFd`): libkrg acts on the
//!   application's descriptors, which no Rust owner holds, and a wrong
//!   number is the kernel's `EBADF`, not memory unsafety. Descriptors the
//!   kernel creates come back as `OwnedFd`.

pub mod events;
pub mod fd;
pub mod futex;
pub mod mem;
pub mod poll;
pub mod process;
pub mod raw;
pub mod signal;
pub mod sock;
pub mod uffd;
pub mod user;

use std::io;

/// The calling thread's errno.
#[inline]
pub fn errno() -> i32 {
    // SAFETY: __errno_location always returns the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Set the calling thread's errno.
#[inline]
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location always returns the calling thread's errno.
    unsafe { *libc::__errno_location() = e }
}

/// The null-terminated array of pointers to `v`'s strings that `execve`
/// takes (alive as long as `v`).
fn c_ptrs(v: &[std::ffi::CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// `Err` with errno when a call returned a negative value, else the value.
#[inline]
fn check<T: Copy + Default + PartialOrd>(r: T) -> io::Result<T> {
    if r < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Fill `buf` with random bytes (`getrandom(2)`, no flags); how many.
pub fn getrandom(buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    check(n).map(|n| n as usize)
}

/// The text of `errno` (`strerror_r`, XSI) in `buf`; `None` if there is
/// none. Allocates nothing.
pub fn strerror(errno: i32, buf: &mut [u8; 128]) -> Option<&str> {
    // SAFETY: strerror_r (XSI variant in the libc crate's binding) writes
    // a NUL-terminated string of at most buf.len() bytes into buf.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
    match std::str::from_utf8(&buf[..end]) {
        Ok(s) if rc == 0 && !s.is_empty() => Some(s),
        _ => None,
    }
}

/// Formats an errno value as `strerror` would, without allocating in the
/// "C" locale (under another, glibc's gettext mallocs: the capture handler
/// switches its thread to "C").
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; 128];
        match strerror(self.0, &mut buf) {
            Some(s) => f.write_str(s),
            None => write!(f, "errno {}", self.0),
        }
    }
}
