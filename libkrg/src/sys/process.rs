//! The process: ending it, signalling, limits, name, personality, fork
//! handlers, timers, exec and its environment array.

use super::check;
use libc::{c_int, pid_t};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;

/// `_exit(2)`: end the process now (no atexit handlers, no flush).
pub fn exit_now(code: c_int) -> ! {
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(code) }
}

/// `getpid(2)` through libc: krg's own hook answers it (the gpid of an
/// SSI process, outside the hooks' guard).
pub fn getpid() -> pid_t {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// `kill(2)` (through libc: a hook of krg's own sees it).
pub fn kill(pid: pid_t, sig: c_int) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// A child's state as `waitid` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildState {
    /// 0 when no child was in a state asked for (`WNOHANG`).
    pub pid: pid_t,
    /// `CLD_EXITED`, `CLD_KILLED`, `CLD_DUMPED`...
    pub code: c_int,
    /// The exit code, or the signal.
    pub status: c_int,
}

/// `waitid(2)` (through libc: krg's own hook sees it).
pub fn waitid(idtype: libc::idtype_t, id: libc::id_t, options: c_int) -> io::Result<ChildState> {
    // SAFETY: siginfo_t is plain data; all-zero is valid (and is what
    // WNOHANG leaves when no child is ready).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into our own siginfo.
    check(unsafe { libc::waitid(idtype, id, &mut info, options) })?;
    // SAFETY: the SIGCHLD fields of a siginfo waitid filled or left zeroed.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    Ok(ChildState {
        pid,
        code: info.si_code,
        status,
    })
}

/// `waitpid(2)` (through libc: krg's own hook sees it): the child and its
/// wait status.
pub fn waitpid(pid: pid_t, options: c_int) -> io::Result<(pid_t, c_int)> {
    let mut st = 0;
    // SAFETY: waitpid writes one int into ours.
    let r = check(unsafe { libc::waitpid(pid, &mut st, options) })?;
    Ok((r, st))
}

/// `getrlimit(2)` of `resource`: (soft, hard).
pub fn getrlimit(resource: u32) -> io::Result<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the rlimit struct we own.
    check(unsafe { libc::getrlimit(resource as _, &mut l) })?;
    Ok((l.rlim_cur, l.rlim_max))
}

/// The calling thread's `set_tid_address` pointer (`PR_GET_TID_ADDRESS`):
/// where the kernel clears its tid when it exits.
pub fn tid_address() -> io::Result<u64> {
    let mut addr: u64 = 0;
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer into ours.
    check(unsafe { libc::prctl(libc::PR_GET_TID_ADDRESS, &mut addr as *mut u64) })?;
    Ok(addr)
}

/// The calling thread in the "C" locale while this lives (`uselocale`,
/// which is per thread), its own locale back after. glibc's "C" locale
/// object is static: `newlocale` of it allocates nothing.
pub struct CLocale(libc::locale_t);

impl CLocale {
    pub fn enter() -> CLocale {
        // SAFETY: newlocale of "C" with no base returns glibc's static C
        // locale object; uselocale only changes this thread's locale.
        unsafe {
            let c = libc::newlocale(libc::LC_ALL_MASK, c"C".as_ptr(), std::ptr::null_mut());
            CLocale(if c.is_null() {
                std::ptr::null_mut()
            } else {
                libc::uselocale(c)
            })
        }
    }
}

impl Drop for CLocale {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: puts back the locale this thread had (a valid
            // locale_t, or LC_GLOBAL_LOCALE).
            unsafe { libc::uselocale(self.0) };
        }
    }
}

/// Name the calling thread (`PR_SET_NAME`; the kernel keeps 15 bytes):
/// what `ps` shows for a single-threaded process.
pub fn set_name(name: &CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// `personality(2)`: set `persona` (0xffffffff only asks); the previous
/// one.
pub fn personality(persona: libc::c_ulong) -> io::Result<c_int> {
    // SAFETY: personality takes a plain integer.
    check(unsafe { libc::personality(persona) })
}

/// `pthread_atfork(3)`: handlers run around every `fork` of the process.
pub fn atfork(
    prepare: Option<extern "C" fn()>,
    parent: Option<extern "C" fn()>,
    child: Option<extern "C" fn()>,
) {
    let f = |h: Option<extern "C" fn()>| h.map(|h| h as unsafe extern "C" fn());
    // SAFETY: registering handlers has no preconditions; they are safe
    // functions, valid for the life of the process.
    unsafe { libc::pthread_atfork(f(prepare), f(parent), f(child)) };
}

/// `timer_delete(2)` of POSIX timer `id` of this process.
pub fn timer_delete(id: i64) -> io::Result<()> {
    // SAFETY: timer_delete takes a plain integer.
    check(unsafe { libc::syscall(libc::SYS_timer_delete, id) }).map(drop)
}

/// Whether this process's descriptors `a` and `b` are one open file
/// description (`kcmp(KCMP_FILE)`; `Err` where there is no kcmp).
pub fn same_file(a: RawFd, b: RawFd) -> io::Result<bool> {
    const KCMP_FILE: c_int = 0;
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // SAFETY: kcmp takes plain integers (two of our own descriptors).
    let r = check(unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) })?;
    Ok(r == 0)
}

/// `execve(2)`: returns only on failure, with its error. Allocates the
/// pointer arrays.
pub fn execve(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Error {
    let (av, ev) = (super::c_ptrs(argv), super::c_ptrs(envp));
    // SAFETY: a NUL-terminated path and null-terminated arrays of valid C
    // strings, all alive across the call.
    unsafe { libc::execve(path.as_ptr(), av.as_ptr(), ev.as_ptr()) };
    io::Error::last_os_error()
}

extern "C" {
    /// The process's environment (unistd.h).
    static mut environ: *mut *mut libc::c_char;
}

/// Remove every `name=...` from the environment array itself and return
/// the first value. Not `unsetenv`: a program may define its own (bash
/// does, and its version does nothing before the shell has started), and
/// bash builds its variables from the very array its `main` gets, so only
/// an edit of that array keeps a consumed variable from its children.
/// Only while no other thread runs (a library constructor).
pub fn take_env(name: &str) -> Option<Vec<u8>> {
    let name = name.as_bytes();
    let mut found = None;
    // SAFETY: `environ` is null or a null-terminated array of pointers to
    // NUL-terminated strings (the C runtime's contract); entries are only
    // moved down within the same array, and nothing else runs meanwhile.
    unsafe {
        let mut read = environ;
        if read.is_null() {
            return None;
        }
        let mut write = read;
        while !(*read).is_null() {
            let s = CStr::from_ptr(*read).to_bytes();
            let ours = s.len() > name.len() && s.starts_with(name) && s[name.len()] == b'=';
            if ours {
                if found.is_none() {
                    found = Some(s[name.len() + 1..].to_vec());
                }
            } else {
                *write = *read;
                write = write.add(1);
            }
            read = read.add(1);
        }
        *write = std::ptr::null_mut();
    }
    found
}
