//! System calls made directly, not through libc. A call from libkrg.so to a
//! libc function that krg hooks reaches krg's own hook; these do not, and
//! they are not cancellation points (`pthread_cancel` never unwinds
//! through Rust frames here) and are async-signal-safe. For the hooks'
//! agent client and the process's own ids.

use super::sock::SockAddr;
use libc::{c_int, pid_t, socklen_t};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    super::check(r)
}

/// `getpid(2)`.
#[inline]
pub fn getpid() -> pid_t {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::syscall(libc::SYS_getpid) as pid_t }
}

/// `getppid(2)`.
#[inline]
pub fn getppid() -> pid_t {
    // SAFETY: getppid has no preconditions.
    unsafe { libc::syscall(libc::SYS_getppid) as pid_t }
}

/// `getpgid(2)`: the group, or -1 (errno set).
#[inline]
pub fn getpgid(pid: pid_t) -> pid_t {
    // SAFETY: getpgid takes a plain integer.
    unsafe { libc::syscall(libc::SYS_getpgid, pid) as pid_t }
}

/// `gettid(2)`: the calling thread's kernel id.
#[inline]
pub fn gettid() -> pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as pid_t }
}

/// `tgkill(2)`: signal `sig` to thread `tid` of process `pid`.
pub fn tgkill(pid: pid_t, tid: pid_t, sig: c_int) -> io::Result<()> {
    // SAFETY: tgkill takes plain integers.
    check(unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) }).map(drop)
}

/// The calling thread's robust futex list (`get_robust_list(2)`): its
/// head and length.
pub fn robust_list() -> io::Result<(u64, usize)> {
    let (mut head, mut len) = (0u64, 0usize);
    // SAFETY: get_robust_list of the calling thread (0) writes one pointer
    // and one length into ours.
    check(unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            0,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    })?;
    Ok((head, len))
}

/// `getsid(2)`: the session, or -1 (errno set).
#[inline]
pub fn getsid(pid: pid_t) -> pid_t {
    // SAFETY: getsid takes a plain integer.
    unsafe { libc::syscall(libc::SYS_getsid, pid) as pid_t }
}

/// `rt_sigprocmask(how, set, old)` on the kernel's 8-byte signal set
/// (bit `n - 1` for signal `n`). Unlike `pthread_sigmask`, it also blocks
/// glibc's internal signals when asked to.
pub fn sigprocmask(how: c_int, set: Option<&u64>, old: Option<&mut u64>) -> io::Result<()> {
    let set = set.map_or(std::ptr::null(), |s| s as *const u64);
    let old = old.map_or(std::ptr::null_mut(), |o| o as *mut u64);
    // SAFETY: both pointers are null or point to live 8-byte sets, the
    // size passed.
    check(unsafe { libc::syscall(libc::SYS_rt_sigprocmask, how, set, old, 8usize) }).map(drop)
}

/// `getdents64(2)` of directory `fd` into `buf`: how many bytes of
/// `struct linux_dirent64` records came (0: the end). The caller's buffer,
/// no allocation (libc's `opendir` mallocs).
pub fn getdents64(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: getdents64 writes at most buf.len() bytes into buf.
    let n = check(unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) })?;
    Ok(n as usize)
}

/// The disposition of signal `sig` as the kernel keeps it
/// (`rt_sigaction(2)` asking only): handler, flags, restorer, mask.
pub fn sigaction_of(sig: c_int) -> io::Result<[u64; 4]> {
    let mut k = [0u64; 4];
    // SAFETY: a null new action only writes the old one (the kernel's
    // layout, 4 words with an 8-byte mask) into k.
    check(unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            std::ptr::null::<u8>(),
            k.as_mut_ptr(),
            8usize,
        )
    })?;
    Ok(k)
}

/// `getitimer(2)` of timer `which` (`ITIMER_REAL`...).
pub fn getitimer(which: c_int) -> io::Result<libc::itimerval> {
    // SAFETY: itimerval is plain data; all-zero is valid.
    let mut t: libc::itimerval = unsafe { std::mem::zeroed() };
    // SAFETY: getitimer writes into our own itimerval.
    check(unsafe { libc::syscall(libc::SYS_getitimer, which, &mut t) })?;
    Ok(t)
}

/// The program break (`brk(0)`, which only reports it).
pub fn brk_now() -> u64 {
    // SAFETY: brk(0) changes nothing.
    unsafe { libc::syscall(libc::SYS_brk, 0usize) as u64 }
}

/// A new process running `path` with `argv` and `envp`: a fork-like raw
/// `clone` (`SIGCHLD` to the parent, no shared memory) whose child closes
/// every descriptor above 2 (`close_range`) and execs, or ends with 127.
/// The child runs nothing else (raw system calls on arrays made before
/// the clone), so the caller may have other threads, even parked in a
/// signal handler with locks held. Allocates the pointer arrays. The
/// child's kernel pid.
pub fn spawn(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Result<pid_t> {
    let (av, ev) = (super::c_ptrs(argv), super::c_ptrs(envp));
    // SAFETY: a fork-like clone: the child has a copy of the memory and
    // runs only the three raw system calls below.
    let pid = check(unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    })?;
    if pid == 0 {
        // SAFETY: in the new child: a NUL-terminated path and
        // null-terminated arrays of C strings, alive in its copy of the
        // memory; exit_group does not return.
        unsafe {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            libc::syscall(libc::SYS_execve, path.as_ptr(), av.as_ptr(), ev.as_ptr());
            libc::syscall(libc::SYS_exit_group, 127);
        }
    }
    Ok(pid as pid_t)
}

/// An owned descriptor closed with a raw `close` (an `OwnedFd` closes it
/// through libc, which a hook may see).
#[derive(Debug)]
pub struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: self.0 is a descriptor this value owns.
        unsafe { libc::syscall(libc::SYS_close, self.0) };
    }
}

/// `socket(2)`.
pub fn socket(domain: c_int, ty: c_int, protocol: c_int) -> io::Result<Fd> {
    // SAFETY: socket takes plain integers.
    let fd = check(unsafe { libc::syscall(libc::SYS_socket, domain, ty, protocol) })?;
    Ok(Fd(fd as RawFd))
}

/// `setsockopt(2)` with a value of type `T` (its size is passed).
pub fn setsockopt<T: Copy>(fd: &Fd, level: c_int, opt: c_int, v: &T) -> io::Result<()> {
    // SAFETY: v is live and its exact size is passed; the kernel only
    // reads it.
    check(unsafe {
        libc::syscall(
            libc::SYS_setsockopt,
            fd.0,
            level,
            opt,
            v as *const T,
            std::mem::size_of::<T>() as socklen_t,
        )
    })
    .map(drop)
}

/// `connect(2)` to the first `len` bytes of `addr` (at most its size).
pub fn connect<A: SockAddr>(fd: &impl AsRawFd, addr: &A, len: socklen_t) -> io::Result<()> {
    let len = super::sock::addr_len(addr, len)?;
    let fd = fd.as_raw_fd();
    // SAFETY: addr is live for len bytes (checked above).
    check(unsafe { libc::syscall(libc::SYS_connect, fd, addr as *const A, len) }).map(drop)
}

/// `bind(2)` to the first `len` bytes of `addr` (at most its size).
pub fn bind<A: SockAddr>(fd: RawFd, addr: &A, len: socklen_t) -> io::Result<()> {
    let len = super::sock::addr_len(addr, len)?;
    // SAFETY: addr is live for len bytes (checked above).
    check(unsafe { libc::syscall(libc::SYS_bind, fd, addr as *const A, len) }).map(drop)
}

/// `listen(2)`.
pub fn listen(fd: RawFd, backlog: c_int) -> io::Result<()> {
    // SAFETY: listen takes plain integers.
    check(unsafe { libc::syscall(libc::SYS_listen, fd, backlog) }).map(drop)
}

/// `getsockname(2)` into `addr`: the kernel's own address of the socket
/// (libc's is krg's hook, which may show another); the address's length.
pub fn getsockname<A: SockAddr>(fd: RawFd, addr: &mut A) -> io::Result<socklen_t> {
    let mut len = std::mem::size_of::<A>() as socklen_t;
    // SAFETY: the kernel writes at most len bytes into addr, which any
    // bytes leave valid (SockAddr).
    check(unsafe { libc::syscall(libc::SYS_getsockname, fd, addr as *mut A, &mut len) })?;
    Ok(len)
}

/// `openat(2)` of `path` relative to `dirfd`, past krg's own `open`
/// hooks.
pub fn openat(dirfd: RawFd, path: &CStr, flags: c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path; the rest are plain integers.
    let fd = check(unsafe { libc::syscall(libc::SYS_openat, dirfd, path.as_ptr(), flags, mode) })?;
    Ok(super::fd::adopt(fd as RawFd))
}

/// `send(2)` (a `sendto` without address) of `buf`; how much went.
pub fn send(fd: &Fd, buf: &[u8], flags: c_int) -> io::Result<usize> {
    // SAFETY: buf is a live byte slice of the given length.
    let n = check(unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd.0,
            buf.as_ptr(),
            buf.len(),
            flags,
            std::ptr::null::<libc::sockaddr>(),
            0,
        )
    })?;
    Ok(n as usize)
}

/// `recv(2)` (a `recvfrom` without address) into `buf`; how much came.
pub fn recv(fd: &Fd, buf: &mut [u8], flags: c_int) -> io::Result<usize> {
    // SAFETY: buf is a live, writable byte slice of the given length.
    let n = check(unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd.0,
            buf.as_mut_ptr(),
            buf.len(),
            flags,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<socklen_t>(),
        )
    })?;
    Ok(n as usize)
}
