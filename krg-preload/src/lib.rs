//! libkrg.so: the `LD_PRELOAD` shim of krg.
//!
//! Thin by design: each hook resolves the next definition of its libc
//! function, lets [`libkrg::rt::enter`] decide between the SSI semantics and
//! plain pass-through, and delegates to [`libkrg::processes`] (pids),
//! [`libkrg::pidcalls`] (pids in other calls) or [`libkrg::procfs`]
//! (`/proc/<gpid>` paths). The only code
//! here is argument plumbing (status and siginfo pointers) and the vfork
//! trampoline. See `docs/architecture/preload.md`.

#[cfg(test)]
mod compat;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod execl;
mod hook;
mod vfork;

use hook::{enosys, hooks};
use libc::{
    __priority_which_t, __rlimit_resource_t, c_char, c_int, c_uint, c_ulong, c_void, cpu_set_t,
    id_t, idtype_t, iovec, key_t, mmsghdr, mode_t, msghdr, off_t, pid_t,
    posix_spawn_file_actions_t, posix_spawnattr_t, pthread_barrier_t, pthread_cond_t,
    pthread_mutex_t, rlimit, rlimit64, rusage, sched_param, sem_t, sembuf, shmid_ds, siginfo_t,
    sigval, size_t, sockaddr, socklen_t, ssize_t, termios, timespec, winsize, DIR, FILE,
};
use libkrg::{dsm, pidcalls, processes, procfs, streams, sync};
use std::ffi::CStr;
use std::mem::size_of;

extern "C" {
    /// The process's environment (unistd.h).
    static environ: *mut *const c_char;
}

/// Runs when the dynamic loader initialises libkrg.so: resolve every next
/// symbol, then register with the agent (or go standalone/disabled).
extern "C" fn constructor() {
    resolve_all();
    vfork::resolve();
    libkrg::start::init();
}

#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;

/// malloc, except while a checkpoint is being taken (see
/// `libkrg::checkpoint::alloc`).
#[global_allocator]
static ALLOC: libkrg::checkpoint::alloc::KrgAlloc = libkrg::checkpoint::alloc::KrgAlloc;

/// Where a wait status goes: the caller's pointer, or a local when it passed
/// NULL (the hook needs the status to know whether the child was reaped).
fn status_target(status: *mut c_int, local: &mut c_int) -> *mut c_int {
    if status.is_null() {
        local
    } else {
        status
    }
}

/// Read back the status the real wait stored.
fn read_status(p: *const c_int, r: pid_t) -> c_int {
    if r <= 0 {
        return 0;
    }
    // SAFETY: the real wait returned a child, so it wrote *p, which is either
    // the caller's valid status pointer or our local.
    unsafe { *p }
}

/// The caller's siginfo after a successful real waitid.
///
/// # Safety
/// `p` must be valid for reads and writes, as it is when the kernel just
/// filled it (waitid returned 0).
unsafe fn filled_siginfo<'a>(p: *mut siginfo_t) -> &'a mut siginfo_t {
    // SAFETY: the function's contract.
    unsafe { &mut *p }
}

/// `MAP_FAILED` with errno `ENOSYS` (shmat's error value).
fn enosys_failed() -> *mut c_void {
    libkrg::rt::set_errno(libc::ENOSYS);
    libc::MAP_FAILED
}

/// A null pointer with errno `ENOSYS`: the value of a pointer-returning
/// hook whose real function does not exist in this libc.
fn enosys_null<T>() -> *mut T {
    libkrg::rt::set_errno(libc::ENOSYS);
    std::ptr::null_mut()
}

/// `real(args...)` with its `path` argument translated from
/// `/proc/<gpid>` (see `libkrg::procfs`): the body of every path hook.
macro_rules! via_path {
    ($path:ident => $real:ident($($arg:ident),*)) => {
        // SAFETY: `path` is null or the caller's NUL-terminated string, the
        // hooked function's own contract; with_path reads it only until its
        // NUL and passes either it or a translated copy to `real`.
        unsafe { procfs::with_path($path, |$path| $real($($arg),*)) }
    };
}

/// An open of a FIFO may be a rendezvous across the cluster
/// (`streams::fifo`); anything else is opened as `via_path!` says.
macro_rules! fifo_or_path {
    ($dirfd:expr, $path:ident, $flags:ident => $real:ident($($arg:ident),*)) => {
        // SAFETY: `path` is null or the caller's NUL-terminated string.
        match unsafe { streams::fifo::open($dirfd, $path, $flags) } {
            Some(r) => r,
            None => via_path!($path => $real($($arg),*)),
        }
    };
}

/// `fifo_or_path!` for `fopen`: a FIFO met across the cluster comes back
/// as a stream on the fd the rendezvous gave.
macro_rules! fifo_or_path_stream {
    ($path:ident, $mode:ident => $real:ident($($arg:ident),*)) => {
        // SAFETY: `path` and `mode` are null or the caller's NUL-terminated
        // strings.
        match unsafe { streams::fifo::fopen($path, $mode) } {
            Some(f) => f,
            None => via_path!($path => $real($($arg),*)),
        }
    };
}

// What differs from one machine, for the hooks that share a reason (their
// `status`; see the compatibility table in docs/architecture/preload.md).
const ON_PROCESS: &str = "a process whose program runs on another node is `ESRCH`";
const OWNER: &str = "`F_SETOWN` and `F_SETOWN_EX` to a process or group of another node are `ESRCH`; an owner is not kept across migration or restart";
pub(crate) const EXEC_ELSEWHERE: &str = "a program placed on another node keeps its `ITIMER_VIRTUAL` and `ITIMER_PROF` timers on its shadow, where they never fire";
const PROC_PATH: &str = "`/proc/<gpid>` of a process on another node is `ENOENT`; relative paths into `/proc` are not translated";
const PROC_OR_FIFO: &str = "`/proc/<gpid>` of a process on another node is `ENOENT`; relative paths into `/proc` are not translated; a FIFO opened `O_RDWR` or non-blocking meets only this node's openers";
const READLINK: &str = "`/proc/<gpid>` of a process on another node is `ENOENT`; links that name a process (`/proc/self`) give its kernel pid";
const MAP_OBJECT: &str = "`MAP_PRIVATE` mappings of a cluster-wide object, and mappings through a `dup` of its descriptor, see this node's copy";
const ACCEPT: &str = "past 256 loopback listeners in a process, the oldest accept from anywhere and show the wildcard address";
const MOVED_ADDR: &str =
    "a connection that moved with a migrated process shows the agents' addresses";

hooks! {
    /// `getpid()`: the gpid (a cached atomic load).
    fn getpid() -> pid_t {
        status => full,
        // SAFETY: getpid has no preconditions.
        missing => unsafe { libc::syscall(libc::SYS_getpid) as pid_t },
        krg(real) => processes::getpid(),
    }

    /// `getppid()`: the parent's gpid.
    fn getppid() -> pid_t {
        status => partial("a parent that is not an SSI process (the shell that started the tree, this node's init after reparenting) is its kernel pid"),
        // SAFETY: getppid has no preconditions.
        missing => unsafe { libc::syscall(libc::SYS_getppid) as pid_t },
        krg(real) => processes::getppid(),
    }

    /// `kill(pid, sig)` on gpids and group gpids.
    fn kill(pid: pid_t, sig: c_int) -> c_int {
        status => partial("`kill(-1)` signals this node's processes only; a signal sent through the agent shows the agent's kernel pid in `si_pid`"),
        missing => enosys(),
        krg(real) => processes::kill(pid, sig, real),
    }

    /// `killpg(pgrp, sig)` on group gpids.
    fn killpg(pgrp: pid_t, sig: c_int) -> c_int {
        status => partial("a signal sent through the agent shows the agent's kernel pid in `si_pid`"),
        missing => enosys(),
        krg(real) => processes::killpg(pgrp, sig, real),
    }

    /// `sigqueue(pid, sig, value)` on gpids of this node.
    fn sigqueue(pid: pid_t, sig: c_int, value: sigval) -> c_int {
        status => partial("a process whose program runs on another node is `ESRCH` (the protocol has no queued signal); the receiver's `si_pid` is the sender's kernel pid"),
        missing => enosys(),
        krg(real) => processes::sigqueue(pid, |k| real(k, sig, value)),
    }

    /// `execve`: a program the scheduler places on another node goes there
    /// from here, this process becoming its shadow, instead of being loaded
    /// here first.
    fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
        status => partial(EXEC_ELSEWHERE),
        missing => enosys(),
        krg(real) => {
            // SAFETY: the execve contract (NUL-terminated path, null or
            // null-terminated arrays).
            unsafe { libkrg::distant::exec_elsewhere(path, argv, envp) };
            libkrg::checkpoint::around_exec(|| real(path, argv, envp))
        },
    }

    /// `execv`: as `execve`, with this process's environment.
    fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
        status => partial(EXEC_ELSEWHERE),
        missing => enosys(),
        krg(real) => {
            // SAFETY: as execve; `environ` is this process's environment.
            unsafe { libkrg::distant::exec_elsewhere(path, argv, environ.cast_const()) };
            libkrg::checkpoint::around_exec(|| real(path, argv))
        },
    }

    /// `execvp`: the capture signal held across the exec (placement, which
    /// needs the path searched, happens at the program's Hello).
    fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
        status => partial(EXEC_ELSEWHERE),
        missing => enosys(),
        krg(real) => libkrg::checkpoint::around_exec(|| real(file, argv)),
    }

    /// `fexecve(fd, argv, envp)`: as `execvp` (glibc's runs `execveat`,
    /// where no hook would see it).
    fn fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
        status => partial(EXEC_ELSEWHERE),
        missing => enosys(),
        krg(real) => libkrg::checkpoint::around_exec(|| real(fd, argv, envp)),
    }

    /// `execvpe`: as `execvp`.
    fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
        status => partial(EXEC_ELSEWHERE),
        missing => enosys(),
        krg(real) => libkrg::checkpoint::around_exec(|| real(file, argv, envp)),
    }

    /// `pidfd_open(pid, flags)` on gpids of this node.
    fn pidfd_open(pid: pid_t, flags: c_uint) -> c_int {
        status => partial("a process whose program runs on another node: the pidfd of its shadow if this node has it (it ends with the program; `pidfd_getfd` reaches the shadow), else `ESRCH`"),
        missing => enosys(),
        krg(real) => processes::pidfd_open(pid, |k| real(k, flags)),
    }

    /// `wait(status)`: returns the child's gpid.
    fn wait(status: *mut c_int) -> pid_t {
        status => full,
        missing => enosys(),
        krg(real) => processes::wait(None, |_| {
            let mut local = 0;
            let p = status_target(status, &mut local);
            let r = real(p);
            (r, read_status(p, r))
        }),
    }

    /// `waitpid(pid, status, options)` with gpids.
    fn waitpid(pid: pid_t, status: *mut c_int, options: c_int) -> pid_t {
        status => full,
        missing => enosys(),
        krg(real) => processes::wait(Some(pid), |k| {
            let mut local = 0;
            let p = status_target(status, &mut local);
            let r = real(k, p, options);
            (r, read_status(p, r))
        }),
    }

    /// `wait3(status, options, rusage)`: returns the child's gpid.
    fn wait3(status: *mut c_int, options: c_int, usage: *mut rusage) -> pid_t {
        status => partial("the `rusage` of a child placed on another node is its shadow's, not its program's"),
        missing => enosys(),
        krg(real) => processes::wait(None, |_| {
            let mut local = 0;
            let p = status_target(status, &mut local);
            let r = real(p, options, usage);
            (r, read_status(p, r))
        }),
    }

    /// `wait4(pid, status, options, rusage)` with gpids.
    fn wait4(pid: pid_t, status: *mut c_int, options: c_int, usage: *mut rusage) -> pid_t {
        status => partial("the `rusage` of a child placed on another node is its shadow's, not its program's"),
        missing => enosys(),
        krg(real) => processes::wait(Some(pid), |k| {
            let mut local = 0;
            let p = status_target(status, &mut local);
            let r = real(k, p, options, usage);
            (r, read_status(p, r))
        }),
    }

    /// `waitid(idtype, id, info, options)` with gpids, `si_pid` included.
    fn waitid(idtype: idtype_t, id: id_t, infop: *mut siginfo_t, options: c_int) -> c_int {
        status => partial("`si_utime` and `si_stime` of a child placed on another node are its shadow's"),
        missing => enosys(),
        krg(real) => {
            // SAFETY: all-zero is a valid siginfo_t.
            let mut local: siginfo_t = unsafe { std::mem::zeroed() };
            let p = if infop.is_null() { &mut local as *mut siginfo_t } else { infop };
            processes::waitid(idtype, id, options, |t, i| {
                let r = real(t, i, p, options);
                // SAFETY: waitid returned 0, so the kernel filled *p.
                (r, (r == 0).then(|| unsafe { filled_siginfo(p) }))
            })
        },
    }

    /// `fork()`: returns the child's gpid to the parent.
    fn fork() -> pid_t {
        status => full,
        missing => enosys(),
        krg(real) => processes::fork(real),
    }

    /// `_Fork()` (glibc 2.34: fork without atfork handlers).
    fn _Fork() -> pid_t {
        status => full,
        missing => enosys(),
        krg(real) => processes::fork(real),
    }

    /// `forkpty(...)`: returns the child's gpid to the parent (glibc's
    /// forkpty forks internally, without the PLT).
    fn forkpty(
        amaster: *mut c_int,
        name: *mut c_char,
        termp: *const termios,
        winp: *const winsize,
    ) -> pid_t {
        status => full,
        missing => enosys(),
        krg(real) => processes::fork(|| real(amaster, name, termp, winp)),
    }

    /// `posix_spawn(...)`: stores the child's gpid.
    fn posix_spawn(
        pid: *mut pid_t,
        path: *const c_char,
        actions: *const posix_spawn_file_actions_t,
        attr: *const posix_spawnattr_t,
        argv: *const *mut c_char,
        envp: *const *mut c_char,
    ) -> c_int {
        status => full,
        missing => libc::ENOSYS,
        // SAFETY: pid is null or writable (posix_spawn's contract).
        krg(real) => unsafe { processes::spawn(pid, |k| real(k, path, actions, attr, argv, envp)) },
    }

    /// `posix_spawnp(...)`: stores the child's gpid.
    fn posix_spawnp(
        pid: *mut pid_t,
        file: *const c_char,
        actions: *const posix_spawn_file_actions_t,
        attr: *const posix_spawnattr_t,
        argv: *const *mut c_char,
        envp: *const *mut c_char,
    ) -> c_int {
        status => full,
        missing => libc::ENOSYS,
        // SAFETY: pid is null or writable (posix_spawnp's contract).
        krg(real) => unsafe { processes::spawn(pid, |k| real(k, file, actions, attr, argv, envp)) },
    }

    /// `getpgrp()`: the group's gpid when its leader is an SSI process.
    fn getpgrp() -> pid_t {
        status => full,
        missing => enosys(),
        krg(real) => processes::getpgrp(real),
    }

    /// `getpgid(pid)` with gpids.
    fn getpgid(pid: pid_t) -> pid_t {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => processes::getpgid(pid, real),
    }

    /// `__getpgid(pid)`, glibc's exported alias of getpgid.
    fn __getpgid(pid: pid_t) -> pid_t {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => processes::getpgid(pid, real),
    }

    /// `getsid(pid)` with gpids.
    fn getsid(pid: pid_t) -> pid_t {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => processes::getsid(pid, real),
    }

    /// `setpgid(pid, pgid)` with gpids.
    fn setpgid(pid: pid_t, pgid: pid_t) -> c_int {
        status => partial("a process whose program runs on another node is `ESRCH`, a group with no member here `EPERM`"),
        missing => enosys(),
        krg(real) => processes::setpgid(pid, pgid, real),
    }

    /// `setsid()`: returns the new session's gpid.
    fn setsid() -> pid_t {
        status => full,
        missing => enosys(),
        krg(real) => processes::setsid(real),
    }

    /// `tcgetpgrp(fd)`: the foreground group's gpid.
    fn tcgetpgrp(fd: c_int) -> pid_t {
        status => full,
        missing => enosys(),
        krg(real) => processes::tcgetpgrp(|| real(fd)),
    }

    /// `tcsetpgrp(fd, pgrp)` with a group gpid.
    fn tcsetpgrp(fd: c_int, pgrp: pid_t) -> c_int {
        status => partial("a group with no member on this node is `EPERM`"),
        missing => enosys(),
        krg(real) => processes::tcsetpgrp(pgrp, |k| real(fd, k)),
    }

    /// `tcgetsid(fd)`: the session's gpid.
    fn tcgetsid(fd: c_int) -> pid_t {
        status => full,
        missing => enosys(),
        krg(real) => processes::tcgetsid(|| real(fd)),
    }

    /// `fcntl(fd, cmd, ...)`: the pid of `F_SETOWN`, `F_GETOWN`,
    /// `F_SETOWN_EX`, `F_GETOWN_EX` and `F_GETLK` (see
    /// `libkrg::pidcalls`); any other command costs one bit test and goes
    /// to libc without entering krg.
    fn fcntl(fd: c_int, cmd: c_int; ...arg: usize) -> c_int {
        status => partial(OWNER),
        missing => enosys(),
        only_if => pidcalls::fcntl_may_carry_pid(cmd),
        // SAFETY: arg is what the caller passed for cmd, per fcntl(2).
        krg(real) => unsafe { pidcalls::fcntl(cmd, arg, |c, a| real(fd, c, a)) },
    }

    /// `fcntl64` (glibc 2.28; what `fcntl` is with `_FILE_OFFSET_BITS=64`,
    /// e.g. nginx): as `fcntl`.
    fn fcntl64(fd: c_int, cmd: c_int; ...arg: usize) -> c_int {
        status => partial(OWNER),
        missing => enosys(),
        only_if => pidcalls::fcntl_may_carry_pid(cmd),
        // SAFETY: as fcntl.
        krg(real) => unsafe { pidcalls::fcntl(cmd, arg, |c, a| real(fd, c, a)) },
    }

    /// `__fcntl`, glibc's exported alias of fcntl.
    fn __fcntl(fd: c_int, cmd: c_int; ...arg: usize) -> c_int {
        status => partial(OWNER),
        missing => enosys(),
        only_if => pidcalls::fcntl_may_carry_pid(cmd),
        // SAFETY: as fcntl.
        krg(real) => unsafe { pidcalls::fcntl(cmd, arg, |c, a| real(fd, c, a)) },
    }

    /// `ioctl(fd, req, ...)`: the pid of `FIOSETOWN`, `SIOCSPGRP`,
    /// `FIOGETOWN`, `SIOCGPGRP`, `TIOCSPGRP`, `TIOCGPGRP`, `TIOCGSID`; any
    /// other request costs one bit test.
    fn ioctl(fd: c_int, req: c_ulong; ...arg: usize) -> c_int {
        status => partial("`FIOSETOWN` and `SIOCSPGRP` to a process or group of another node are `ESRCH`, `TIOCSPGRP` to a group with no member here `EPERM`"),
        missing => enosys(),
        only_if => pidcalls::ioctl_may_carry_pid(req),
        // SAFETY: arg is what the caller passed for req, per ioctl(2).
        krg(real) => unsafe { pidcalls::ioctl(req, arg, |a| real(fd, req, a)) },
    }

    /// `getpriority(which, who)` with gpids (`PRIO_PROCESS`, `PRIO_PGRP`).
    fn getpriority(which: __priority_which_t, who: id_t) -> c_int {
        status => partial("`PRIO_PROCESS` and `PRIO_PGRP` of another node are `ESRCH`"),
        missing => enosys(),
        krg(real) => pidcalls::priority(which, who, |w| real(which, w)),
    }

    /// `setpriority(which, who, prio)` with gpids.
    fn setpriority(which: __priority_which_t, who: id_t, prio: c_int) -> c_int {
        status => partial("`PRIO_PROCESS` and `PRIO_PGRP` of another node are `ESRCH`"),
        missing => enosys(),
        krg(real) => pidcalls::priority(which, who, |w| real(which, w, prio)),
    }

    /// `sched_setaffinity(pid, size, mask)` with a gpid of this node.
    fn sched_setaffinity(pid: pid_t, size: size_t, mask: *const cpu_set_t) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, size, mask)),
    }

    /// `sched_getaffinity(pid, size, mask)` with a gpid of this node.
    fn sched_getaffinity(pid: pid_t, size: size_t, mask: *mut cpu_set_t) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, size, mask)),
    }

    /// `sched_setscheduler(pid, policy, param)` with a gpid of this node.
    fn sched_setscheduler(pid: pid_t, policy: c_int, param: *const sched_param) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, policy, param)),
    }

    /// `__sched_setscheduler`, glibc's exported alias.
    fn __sched_setscheduler(pid: pid_t, policy: c_int, param: *const sched_param) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, policy, param)),
    }

    /// `sched_getscheduler(pid)` with a gpid of this node.
    fn sched_getscheduler(pid: pid_t) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, real),
    }

    /// `__sched_getscheduler`, glibc's exported alias.
    fn __sched_getscheduler(pid: pid_t) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, real),
    }

    /// `sched_setparam(pid, param)` with a gpid of this node.
    fn sched_setparam(pid: pid_t, param: *const sched_param) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, param)),
    }

    /// `sched_getparam(pid, param)` with a gpid of this node.
    fn sched_getparam(pid: pid_t, param: *mut sched_param) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, param)),
    }

    /// `__sched_getparam`, glibc's exported alias.
    fn __sched_getparam(pid: pid_t, param: *mut sched_param) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, param)),
    }

    /// `sched_rr_get_interval(pid, tp)` with a gpid of this node.
    fn sched_rr_get_interval(pid: pid_t, tp: *mut timespec) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, tp)),
    }

    /// `prlimit(pid, resource, new, old)` with a gpid of this node.
    fn prlimit(pid: pid_t, resource: __rlimit_resource_t, new: *const rlimit, old: *mut rlimit) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, resource, new, old)),
    }

    /// `prlimit64`: as prlimit.
    fn prlimit64(pid: pid_t, resource: __rlimit_resource_t, new: *const rlimit64, old: *mut rlimit64) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, resource, new, old)),
    }

    /// `process_vm_readv(pid, ...)` with a gpid of this node.
    fn process_vm_readv(
        pid: pid_t,
        local: *const iovec,
        nlocal: c_ulong,
        remote: *const iovec,
        nremote: c_ulong,
        flags: c_ulong,
    ) -> ssize_t {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, local, nlocal, remote, nremote, flags)),
    }

    /// `process_vm_writev(pid, ...)` with a gpid of this node.
    fn process_vm_writev(
        pid: pid_t,
        local: *const iovec,
        nlocal: c_ulong,
        remote: *const iovec,
        nremote: c_ulong,
        flags: c_ulong,
    ) -> ssize_t {
        status => partial(ON_PROCESS),
        missing => enosys(),
        krg(real) => pidcalls::on_process(pid, |k| real(k, local, nlocal, remote, nremote, flags)),
    }

    /// `tgkill(tgid, tid, sig)`: the thread group may be named by its gpid
    /// (`tid` is a kernel thread id, as `gettid` gives).
    fn tgkill(tgid: pid_t, tid: pid_t, sig: c_int) -> c_int {
        status => partial("a thread group whose program runs on another node is `ESRCH`; thread ids are kernel ids"),
        missing => enosys(),
        krg(real) => pidcalls::on_process(tgid, |k| real(k, tid, sig)),
    }

    /// `capget(hdr, data)`: the header's pid may be a gpid of this node.
    fn capget(hdr: *mut c_void, data: *mut c_void) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        // SAFETY: hdr is the caller's header, per capget(2).
        krg(real) => unsafe { pidcalls::capabilities(hdr, |h| real(h, data)) },
    }

    /// `capset(hdr, data)`: as capget.
    fn capset(hdr: *mut c_void, data: *const c_void) -> c_int {
        status => partial(ON_PROCESS),
        missing => enosys(),
        // SAFETY: as capget.
        krg(real) => unsafe { pidcalls::capabilities(hdr, |h| real(h, data)) },
    }

    /// `getsockopt`: `SO_PEERCRED`'s pid is a gpid; any other option costs
    /// two comparisons.
    fn getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int {
        status => partial("a `SO_PEERCRED` peer that is not an SSI process (an agent relaying a connection among them) shows its kernel pid"),
        missing => enosys(),
        only_if => pidcalls::is_peercred(level, name),
        // SAFETY: val and len are the caller's, per getsockopt(2).
        krg(real) => unsafe { pidcalls::getsockopt(level, name, val, len, || real(fd, level, name, val, len)) },
    }

    /// `sendmsg`: `SCM_CREDENTIALS` may carry the sender's gpid (a message
    /// without control data costs one comparison).
    fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
        status => partial("`SCM_CREDENTIALS` naming another process (root only) must name one of this node, else `ESRCH`"),
        missing => enosys(),
        // Read only once the library is active (with KRG_DISABLE=1 a bad
        // pointer must get libc's EFAULT, not a crash here).
        // SAFETY: msg is null or the caller's valid message, per sendmsg(2).
        only_if => libkrg::rt::active() && unsafe { pidcalls::sends_gpid_creds(msg) },
        // SAFETY: msg is the caller's, per sendmsg(2).
        krg(real) => unsafe { pidcalls::sendmsg(msg, |m| real(fd, m, flags)) },
    }

    /// `sendmmsg`: as sendmsg, for each message.
    fn sendmmsg(fd: c_int, msgs: *mut mmsghdr, n: c_uint, flags: c_int) -> c_int {
        status => partial("`SCM_CREDENTIALS` naming another process (root only) must name one of this node, else `ESRCH`; a batch with credentials is sent one message at a time"),
        missing => enosys(),
        // SAFETY: msgs is the caller's array of n entries, per sendmmsg(2).
        krg(real) => unsafe { pidcalls::sendmmsg(msgs, n, |m, c| real(fd, m, c, flags)) },
    }

    /// `recvmsg`: received `SCM_CREDENTIALS` show gpids (a message without
    /// a control buffer costs one comparison).
    fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
        status => full,
        missing => enosys(),
        // Read only once the library is active (as sendmsg).
        // SAFETY: msg is null or the caller's valid message, per recvmsg(2).
        only_if => libkrg::rt::active() && unsafe { pidcalls::has_control(msg) },
        // SAFETY: msg is the caller's, per recvmsg(2).
        krg(real) => unsafe { pidcalls::recvmsg(msg, || real(fd, msg, flags)) },
    }

    /// `recvmmsg`: as recvmsg, for each message.
    fn recvmmsg(fd: c_int, msgs: *mut mmsghdr, n: c_uint, flags: c_int, timeout: *mut timespec) -> c_int {
        status => full,
        missing => enosys(),
        // SAFETY: msgs is the caller's array of n entries, per recvmmsg(2).
        krg(real) => unsafe { pidcalls::recvmmsg(msgs, || real(fd, msgs, n, flags, timeout)) },
    }

    /// `open(path, flags, ...)`: `/proc/<gpid>` paths translated; a FIFO may
    /// meet its other end on another node.
    fn open(path: *const c_char, flags: c_int; ...mode: mode_t) -> c_int {
        status => partial(PROC_OR_FIFO),
        missing => enosys(),
        krg(real) => fifo_or_path!(libc::AT_FDCWD, path, flags => real(path, flags, mode)),
    }

    /// `open64`: as `open`.
    fn open64(path: *const c_char, flags: c_int; ...mode: mode_t) -> c_int {
        status => partial(PROC_OR_FIFO),
        missing => enosys(),
        krg(real) => fifo_or_path!(libc::AT_FDCWD, path, flags => real(path, flags, mode)),
    }

    /// `openat`: absolute `/proc/<gpid>` paths translated (relative ones are
    /// not); FIFOs as with `open`.
    fn openat(dirfd: c_int, path: *const c_char, flags: c_int; ...mode: mode_t) -> c_int {
        status => partial(PROC_OR_FIFO),
        missing => enosys(),
        krg(real) => fifo_or_path!(dirfd, path, flags => real(dirfd, path, flags, mode)),
    }

    /// `openat64`: as `openat`.
    fn openat64(dirfd: c_int, path: *const c_char, flags: c_int; ...mode: mode_t) -> c_int {
        status => partial(PROC_OR_FIFO),
        missing => enosys(),
        krg(real) => fifo_or_path!(dirfd, path, flags => real(dirfd, path, flags, mode)),
    }

    /// `__open_2` (fortified open): as `open`.
    fn __open_2(path: *const c_char, flags: c_int) -> c_int {
        status => partial(PROC_OR_FIFO),
        missing => enosys(),
        krg(real) => fifo_or_path!(libc::AT_FDCWD, path, flags => real(path, flags)),
    }

    /// `__open64_2`: as `open`.
    fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
        status => partial(PROC_OR_FIFO),
        missing => enosys(),
        krg(real) => fifo_or_path!(libc::AT_FDCWD, path, flags => real(path, flags)),
    }

    /// `__openat_2` (fortified openat): as `openat`.
    fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
        status => partial(PROC_OR_FIFO),
        missing => enosys(),
        krg(real) => fifo_or_path!(dirfd, path, flags => real(dirfd, path, flags)),
    }

    /// `__openat64_2`: as `openat`.
    fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
        status => partial(PROC_OR_FIFO),
        missing => enosys(),
        krg(real) => fifo_or_path!(dirfd, path, flags => real(dirfd, path, flags)),
    }

    /// `fopen` (glibc opens without the PLT): `/proc/<gpid>` paths
    /// translated; FIFOs as with `open`.
    fn fopen(path: *const c_char, mode: *const c_char) -> *mut FILE {
        status => partial(PROC_OR_FIFO),
        missing => enosys_null(),
        krg(real) => fifo_or_path_stream!(path, mode => real(path, mode)),
    }

    /// `fopen64`: as `fopen`.
    fn fopen64(path: *const c_char, mode: *const c_char) -> *mut FILE {
        status => partial(PROC_OR_FIFO),
        missing => enosys_null(),
        krg(real) => fifo_or_path_stream!(path, mode => real(path, mode)),
    }

    /// `opendir`: `/proc/<gpid>` paths translated.
    fn opendir(path: *const c_char) -> *mut DIR {
        status => partial("`/proc/<gpid>` of a process on another node is `ENOENT`; listing `/proc` shows kernel pids"),
        missing => enosys_null(),
        krg(real) => via_path!(path => real(path)),
    }

    /// `stat`: `/proc/<gpid>` paths translated.
    fn stat(path: *const c_char, buf: *mut libc::stat) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(path, buf)),
    }

    /// `stat64`: `/proc/<gpid>` paths translated.
    fn stat64(path: *const c_char, buf: *mut libc::stat64) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(path, buf)),
    }

    /// `lstat`: `/proc/<gpid>` paths translated.
    fn lstat(path: *const c_char, buf: *mut libc::stat) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(path, buf)),
    }

    /// `lstat64`: `/proc/<gpid>` paths translated.
    fn lstat64(path: *const c_char, buf: *mut libc::stat64) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(path, buf)),
    }

    /// `fstatat`: `/proc/<gpid>` paths translated.
    fn fstatat(dirfd: c_int, path: *const c_char, buf: *mut libc::stat, flags: c_int) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(dirfd, path, buf, flags)),
    }

    /// `fstatat64`: `/proc/<gpid>` paths translated.
    fn fstatat64(dirfd: c_int, path: *const c_char, buf: *mut libc::stat64, flags: c_int) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(dirfd, path, buf, flags)),
    }

    /// `statx`: `/proc/<gpid>` paths translated.
    fn statx(dirfd: c_int, path: *const c_char, flags: c_int, mask: c_uint, buf: *mut libc::statx) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(dirfd, path, flags, mask, buf)),
    }

    /// `access`: `/proc/<gpid>` paths translated.
    fn access(path: *const c_char, mode: c_int) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(path, mode)),
    }

    /// `eaccess`: `/proc/<gpid>` paths translated.
    fn eaccess(path: *const c_char, mode: c_int) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(path, mode)),
    }

    /// `euidaccess`: `/proc/<gpid>` paths translated.
    fn euidaccess(path: *const c_char, mode: c_int) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(path, mode)),
    }

    /// `faccessat`: `/proc/<gpid>` paths translated.
    fn faccessat(dirfd: c_int, path: *const c_char, mode: c_int, flags: c_int) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(dirfd, path, mode, flags)),
    }

    /// `readlink`: `/proc/<gpid>` paths translated.
    fn readlink(path: *const c_char, buf: *mut c_char, size: size_t) -> ssize_t {
        status => partial(READLINK),
        missing => enosys(),
        krg(real) => via_path!(path => real(path, buf, size)),
    }

    /// `__readlink_chk` (fortified readlink): as `readlink`.
    fn __readlink_chk(path: *const c_char, buf: *mut c_char, size: size_t, buflen: size_t) -> ssize_t {
        status => partial(READLINK),
        missing => enosys(),
        krg(real) => via_path!(path => real(path, buf, size, buflen)),
    }

    /// `readlinkat`: `/proc/<gpid>` paths translated.
    fn readlinkat(dirfd: c_int, path: *const c_char, buf: *mut c_char, size: size_t) -> ssize_t {
        status => partial(READLINK),
        missing => enosys(),
        krg(real) => via_path!(path => real(dirfd, path, buf, size)),
    }

    /// `__readlinkat_chk`: `/proc/<gpid>` paths translated.
    fn __readlinkat_chk(dirfd: c_int, path: *const c_char, buf: *mut c_char, size: size_t, buflen: size_t) -> ssize_t {
        status => partial(READLINK),
        missing => enosys(),
        krg(real) => via_path!(path => real(dirfd, path, buf, size, buflen)),
    }

    /// `chdir`: `/proc/<gpid>` paths translated.
    fn chdir(path: *const c_char) -> c_int {
        status => partial(PROC_PATH),
        missing => enosys(),
        krg(real) => via_path!(path => real(path)),
    }

    /// `realpath`: a `/proc/<gpid>` path resolves to `/proc/<kernel pid>`.
    fn realpath(path: *const c_char, resolved: *mut c_char) -> *mut c_char {
        status => partial("`/proc/<gpid>` of a process on another node is `ENOENT`; the answer names the kernel pid (`/proc/<kernel pid>`)"),
        missing => enosys_null(),
        krg(real) => via_path!(path => real(path, resolved)),
    }

    /// `__realpath_chk`: `/proc/<gpid>` paths translated.
    fn __realpath_chk(path: *const c_char, resolved: *mut c_char, resolvedlen: size_t) -> *mut c_char {
        status => partial("`/proc/<gpid>` of a process on another node is `ENOENT`; the answer names the kernel pid (`/proc/<kernel pid>`)"),
        missing => enosys_null(),
        krg(real) => via_path!(path => real(path, resolved, resolvedlen)),
    }

    /// `pthread_mutex_lock`: a process-shared mutex in a cluster-wide
    /// segment is woken across nodes (see `dsm::sync_object`).
    fn pthread_mutex_lock(m: *mut pthread_mutex_t) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => { dsm::sync_object(m as usize, size_of::<pthread_mutex_t>()); real(m) },
    }

    /// `pthread_mutex_timedlock`: as pthread_mutex_lock.
    fn pthread_mutex_timedlock(m: *mut pthread_mutex_t, t: *const timespec) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => { dsm::sync_object(m as usize, size_of::<pthread_mutex_t>()); real(m, t) },
    }

    /// `pthread_cond_wait`: a process-shared condition variable in a
    /// cluster-wide segment is signalled across nodes.
    fn pthread_cond_wait(c: *mut pthread_cond_t, m: *mut pthread_mutex_t) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => {
            dsm::sync_object(c as usize, size_of::<pthread_cond_t>());
            dsm::sync_object(m as usize, size_of::<pthread_mutex_t>());
            real(c, m)
        },
    }

    /// `pthread_cond_timedwait`: as pthread_cond_wait.
    fn pthread_cond_timedwait(c: *mut pthread_cond_t, m: *mut pthread_mutex_t, t: *const timespec) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => {
            dsm::sync_object(c as usize, size_of::<pthread_cond_t>());
            dsm::sync_object(m as usize, size_of::<pthread_mutex_t>());
            real(c, m, t)
        },
    }

    /// `sem_wait`: a semaphore in a cluster-wide segment is posted across
    /// nodes.
    fn sem_wait(sem: *mut sem_t) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => { dsm::sync_object(sem as usize, size_of::<sem_t>()); real(sem) },
    }

    /// `sem_timedwait`: as sem_wait.
    fn sem_timedwait(sem: *mut sem_t, t: *const timespec) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => { dsm::sync_object(sem as usize, size_of::<sem_t>()); real(sem, t) },
    }

    /// `sem_open(name, oflag, mode, value)`: a named semaphore of the whole
    /// cluster (capability `dsm`).
    fn sem_open(name: *const c_char, oflag: c_int; ...mode: mode_t, value: c_uint) -> *mut sem_t {
        status => full,
        missing => enosys_null(),
        krg(real) => if dsm::active() && !name.is_null() {
            // SAFETY: a non-null name is the caller's C string, per sem_open(3).
            dsm::sem_open(unsafe { CStr::from_ptr(name) }, oflag, mode, value)
        } else {
            real(name, oflag, mode, value)
        },
    }

    /// `sem_close`: detach a cluster-wide named semaphore.
    fn sem_close(sem: *mut sem_t) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => if dsm::is_attachment(sem.cast()) { dsm::shmdt(sem.cast()) } else { real(sem) },
    }

    /// `sem_unlink`: remove a cluster-wide named semaphore's name.
    fn sem_unlink(name: *const c_char) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => if dsm::active() && !name.is_null() {
            // SAFETY: a non-null name is the caller's C string.
            dsm::sem_unlink(unsafe { CStr::from_ptr(name) })
        } else {
            real(name)
        },
    }

    /// `pthread_barrier_wait`: a process-shared barrier in a cluster-wide
    /// segment.
    fn pthread_barrier_wait(b: *mut pthread_barrier_t) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => { dsm::sync_object(b as usize, size_of::<pthread_barrier_t>()); real(b) },
    }

    /// `shm_open`: a POSIX shared memory object of the whole cluster
    /// (capability `dsm`).
    fn shm_open(name: *const c_char, oflag: c_int, mode: mode_t) -> c_int {
        status => partial("`O_TRUNC` is ignored (an object never shrinks); `read` and `write` on the descriptor bypass the coherence (use the mapping)"),
        missing => enosys(),
        krg(real) => if dsm::active() && !name.is_null() {
            // SAFETY: a non-null name is the caller's C string.
            dsm::shm_open(unsafe { CStr::from_ptr(name) }, oflag, mode)
        } else {
            real(name, oflag, mode)
        },
    }

    /// `shm_unlink`: remove a cluster-wide object's name.
    fn shm_unlink(name: *const c_char) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => if dsm::active() && !name.is_null() {
            // SAFETY: a non-null name is the caller's C string.
            dsm::shm_unlink(unsafe { CStr::from_ptr(name) })
        } else {
            real(name)
        },
    }

    /// `ftruncate`: sizes a cluster-wide object (other descriptors: libc).
    fn ftruncate(fd: c_int, len: off_t) -> c_int {
        status => partial("shrinking a cluster-wide object is `EINVAL`"),
        missing => enosys(),
        krg(real) => dsm::ftruncate(fd, len).unwrap_or_else(|| real(fd, len)),
    }

    /// `ftruncate64`: as ftruncate.
    fn ftruncate64(fd: c_int, len: off_t) -> c_int {
        status => partial("shrinking a cluster-wide object is `EINVAL`"),
        missing => enosys(),
        krg(real) => dsm::ftruncate(fd, len).unwrap_or_else(|| real(fd, len)),
    }

    /// `mmap`: a shared mapping of a cluster-wide object is kept coherent
    /// (other mappings: libc).
    fn mmap(addr: *mut c_void, len: size_t, prot: c_int, flags: c_int, fd: c_int, off: off_t) -> *mut c_void {
        status => partial(MAP_OBJECT),
        missing => enosys_failed(),
        krg(real) => dsm::mmap(addr, len, prot, flags, fd, off).unwrap_or_else(|| real(addr, len, prot, flags, fd, off)),
    }

    /// `mmap64`: as mmap.
    fn mmap64(addr: *mut c_void, len: size_t, prot: c_int, flags: c_int, fd: c_int, off: off_t) -> *mut c_void {
        status => partial(MAP_OBJECT),
        missing => enosys_failed(),
        krg(real) => dsm::mmap(addr, len, prot, flags, fd, off).unwrap_or_else(|| real(addr, len, prot, flags, fd, off)),
    }

    /// `munmap`: unmapping a cluster-wide object's mapping detaches it.
    fn munmap(addr: *mut c_void, len: size_t) -> c_int {
        status => full,
        missing => enosys(),
        // SAFETY: the caller's munmap of its own range.
        krg(real) => unsafe { dsm::munmap(addr, len) }.unwrap_or_else(|| real(addr, len)),
    }

    /// `close`: forgets a cluster-wide object's descriptor.
    fn close(fd: c_int) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => { dsm::closed(fd); real(fd) },
    }

    /// `bind`: a TCP port on the loopback or wildcard address is reserved
    /// in the whole cluster (capability `streams`).
    fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
        status => partial("UDP and other non-TCP sockets are node-local (a UDP port can be bound once on each node); while the port home is down, binds to the loopback fail naming it"),
        missing => enosys(),
        krg(real) => streams::bind(fd, addr, len, real),
    }

    /// `listen`: an unbound TCP socket gets a port free in the cluster.
    fn listen(fd: c_int, backlog: c_int) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => streams::listen(fd, backlog, real),
    }

    /// `connect`: the loopback reaches the node that holds the port.
    fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
        status => partial("UDP to the loopback reaches this node only"),
        missing => enosys(),
        // SAFETY: the C caller's connect contract: `addr` points to `len`
        // bytes.
        krg(real) => unsafe { streams::connect(fd, addr, len, real) },
    }

    /// `accept`: a loopback server accepts only cluster nodes.
    fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
        status => partial(ACCEPT),
        missing => enosys(),
        krg(real) => streams::accept(fd, addr, len, |a, l| real(fd, a, l)),
    }

    /// `accept4`: as accept.
    fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
        status => partial(ACCEPT),
        missing => enosys(),
        krg(real) => streams::accept(fd, addr, len, |a, l| real(fd, a, l, flags)),
    }

    /// `getsockname`: a loopback server, and either end of a connection
    /// made through the cluster-wide loopback, show the loopback address.
    fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
        status => partial(MOVED_ADDR),
        missing => enosys(),
        krg(real) => streams::getsockname(fd, addr, len, real),
    }

    /// `getpeername`: either end of a connection made through the
    /// cluster-wide loopback shows the loopback address.
    fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
        status => partial(MOVED_ADDR),
        missing => enosys(),
        krg(real) => streams::getpeername(fd, addr, len, real),
    }

    /// `semget`: a cluster-wide System V semaphore set (capability `dsm`).
    fn semget(key: key_t, nsems: c_int, flags: c_int) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => if sync::active() { sync::semget(key, nsems, flags) } else { real(key, nsems, flags) },
    }

    /// `semop`: done atomically at the set's home node.
    fn semop(semid: c_int, sops: *mut sembuf, nsops: size_t) -> c_int {
        status => full,
        missing => enosys(),
        // SAFETY: sops is the caller's array of nsops entries, per semop(2).
        krg(real) => if sync::active() { unsafe { sync::semtimedop(semid, sops, nsops, std::ptr::null()) } } else { real(semid, sops, nsops) },
    }

    /// `semtimedop`: as semop, with a timeout.
    fn semtimedop(semid: c_int, sops: *mut sembuf, nsops: size_t, timeout: *const timespec) -> c_int {
        status => full,
        missing => enosys(),
        // SAFETY: the caller's arguments, per semop(2).
        krg(real) => if sync::active() { unsafe { sync::semtimedop(semid, sops, nsops, timeout) } } else { real(semid, sops, nsops, timeout) },
    }

    /// `semctl(semid, num, cmd, ...)`: the optional `union semun` is one
    /// integer-class argument (an int or a pointer).
    fn semctl(semid: c_int, num: c_int, cmd: c_int; ...arg: usize) -> c_int {
        status => partial("`IPC_INFO`, `SEM_INFO` and `SEM_STAT` show this node's kernel"),
        missing => enosys(),
        krg(real) => if sync::active() {
            // SAFETY: arg is what the caller passed for cmd, per semctl(2).
            unsafe { sync::semctl(semid, num, cmd, arg, real) }
        } else {
            real(semid, num, cmd, arg)
        },
    }

    /// `shmget`: a cluster-wide System V segment (capability `dsm`).
    fn shmget(key: key_t, size: size_t, flags: c_int) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => if dsm::active() { dsm::shmget(key, size, flags) } else { real(key, size, flags) },
    }

    /// `shmat`: map a cluster-wide segment, kept coherent by the agent.
    fn shmat(shmid: c_int, addr: *const c_void, flags: c_int) -> *mut c_void {
        status => full,
        missing => enosys_failed(),
        krg(real) => if dsm::active() { dsm::shmat(shmid, addr, flags) } else { real(shmid, addr, flags) },
    }

    /// `shmdt`: detach a cluster-wide segment.
    fn shmdt(addr: *const c_void) -> c_int {
        status => full,
        missing => enosys(),
        krg(real) => if dsm::active() { dsm::shmdt(addr) } else { real(addr) },
    }

    /// `shmctl`: IPC_STAT, IPC_SET and IPC_RMID act cluster-wide.
    fn shmctl(shmid: c_int, cmd: c_int, buf: *mut shmid_ds) -> c_int {
        status => partial("`IPC_INFO` and `SHM_INFO` show this node's kernel, `SHM_STAT` is `EINVAL`, `SHM_LOCK` and `SHM_UNLOCK` do nothing"),
        missing => enosys(),
        krg(real) => if dsm::active() {
            // SAFETY: buf is the caller's, valid for cmd per shmctl(2).
            unsafe { dsm::shmctl(shmid, cmd, buf, real) }
        } else {
            real(shmid, cmd, buf)
        },
    }
}
