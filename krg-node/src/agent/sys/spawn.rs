//! Starting a program for a shadow (remote exec, restore) without copying
//! the agent.
//!
//! `std::process::Command` with a `pre_exec` step forks: the kernel copies
//! the page tables of the whole agent (a multi-threaded tokio process) and
//! the exec then tears that copy down again, 0.3-0.4 ms per program on
//! this machine kind, about a tenth of a remote spawn. Here the child is
//! made as glibc's `posix_spawn` makes it: `clone(CLONE_VM | CLONE_VFORK)`
//! on a stack of its own, the agent's thread suspended until the child
//! execs or exits. The child shares the agent's memory, so between the
//! clone and the exec it only makes system calls on data prepared before
//! (no allocation, no lock, no glibc wrapper that acts on the whole
//! process such as `setuid`'s broadcast to every thread).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// What the child is set up with before its exec.
pub(in crate::agent) struct Program {
    pub exe: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: CString,
    /// The program's fds 0, 1, 2 (`None`: closed), 3 (a restore image
    /// stream) and 4 (the userfaultfd device).
    pub fds: [Option<OwnedFd>; 5],
    pub umask: u32,
    pub rlimits: Vec<(u32, u64, u64)>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Signals ignored from the start (`RemoteExec::ignored`).
    pub ignored: u64,
}

/// Everything the child reads, as raw values and pointers into memory that
/// stays put while the agent's thread waits for the child's exec.
struct ChildArgs {
    exe: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    fds: [libc::c_int; 5],
    umask: libc::mode_t,
    rlimits: *const (u32, u64, u64),
    n_rlimits: usize,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: *const libc::gid_t,
    n_groups: usize,
    ignored: u64,
    /// The errno of the step that failed (0: the exec went through).
    error: AtomicI32,
}

const STACK: usize = 64 << 10;

/// Start `p`; answers its kernel pid once the exec went through (the
/// child's error if it did not; the failed child is reaped here).
pub(in crate::agent) fn spawn(p: &Program) -> std::io::Result<i32> {
    let argv: Vec<*const libc::c_char> = p
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = p
        .env
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let args = ChildArgs {
        exe: p.exe.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: p.cwd.as_ptr(),
        fds: std::array::from_fn(|i| p.fds[i].as_ref().map_or(-1, |f| f.as_raw_fd())),
        umask: p.umask as libc::mode_t,
        rlimits: p.rlimits.as_ptr(),
        n_rlimits: p.rlimits.len(),
        uid: p.uid,
        gid: p.gid,
        groups: p.groups.as_ptr(),
        n_groups: p.groups.len(),
        ignored: p.ignored,
        error: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; STACK];
    // The stack grows down: its top, 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + STACK) & !15;
    // No signal handler of the agent may run in the child (it would run
    // on the agent's memory): everything blocked across the clone, the
    // child sets its handlers to the default before unblocking.
    let old = block_all();
    // SAFETY: CLONE_VFORK suspends this thread until the child has exec'd
    // or exited, so `args`, `argv`, `envp`, `p` and `stack` outlive every
    // use the child makes of them; the child runs `child` only (system
    // calls on that data, no allocation, no unwinding).
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const ChildArgs as *mut libc::c_void,
        )
    };
    let clone_err = std::io::Error::last_os_error();
    restore_mask(&old);
    drop(stack);
    if pid < 0 {
        return Err(clone_err);
    }
    let e = args.error.load(Ordering::Acquire);
    if e != 0 {
        // It exited without exec'ing: reap it here.
        let _ = super::wait_status(pid);
        return Err(std::io::Error::from_raw_os_error(e));
    }
    Ok(pid)
}

fn block_all() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation of this thread's mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    }
}

fn restore_mask(old: &libc::sigset_t) {
    // SAFETY: puts this thread's mask back.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
}

/// The child, between the clone and the exec. Never returns: it execs or
/// exits 127 after storing the errno of the step that failed.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` of `spawn`, alive while the parent
    // thread is suspended (CLONE_VFORK).
    let a = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: system calls on the child's own state and on data prepared
    // by `spawn` (see `ChildArgs`).
    let e = unsafe { set_up_and_exec(a) };
    a.error.store(e.max(1), Ordering::Release);
    // SAFETY: ends the child without running anything of the agent's.
    unsafe { libc::syscall(libc::SYS_exit, 127) };
    127
}

/// Returns the errno of the step that failed (the exec returns only then).
///
/// # Safety
/// Only in the child of `spawn`, with `a` its arguments.
unsafe fn set_up_and_exec(a: &ChildArgs) -> i32 {
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: system calls on this child's own process state and on the
    // memory `a` points to (the caller's contract), for the whole block.
    unsafe {
        // The dispositions are the caller's as its exec left them, never
        // the agent's: what it ignored stays ignored, everything else is
        // at the default (a handler the agent installed would run on its
        // memory), all before anything is unblocked.
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            let want = if a.ignored & (1 << (sig - 1)) != 0 {
                libc::SIG_IGN
            } else {
                libc::SIG_DFL
            };
            if old.sa_sigaction != want {
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = want;
                libc::sigaction(sig, &new, std::ptr::null_mut());
            }
        }
        // Out of the agent's session and group: its process group is its
        // shadow's (the agent answers with that gpid), and signals to the
        // agent's group must not reach it.
        libc::setsid();
        // SSI processes run without address randomisation (an image
        // restores at the same addresses on any node).
        libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
        libc::umask(a.umask);
        for i in 0..a.n_rlimits {
            let (r, cur, max) = *a.rlimits.add(i);
            let l = libc::rlimit {
                rlim_cur: cur,
                rlim_max: max,
            };
            libc::setrlimit(r as _, &l);
        }
        // Every source fd first out of the way of the targets 0..=4, then
        // onto its target (dup2 clears close-on-exec there); the copies
        // are close-on-exec.
        let mut tmp = [-1; 5];
        for (i, fd) in a.fds.iter().enumerate() {
            if *fd >= 0 {
                tmp[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 5);
                if tmp[i] < 0 {
                    return errno();
                }
            }
        }
        for (i, fd) in tmp.iter().enumerate() {
            let target = i as libc::c_int;
            if *fd >= 0 {
                if libc::dup2(*fd, target) != target {
                    return errno();
                }
            } else if i < 3 {
                libc::close(target);
            }
        }
        if libc::chdir(a.cwd) != 0 {
            return errno();
        }
        // Raw system calls: glibc's wrappers would change the ids of every
        // thread of the process, which is the agent's here.
        if libc::syscall(libc::SYS_setgroups, a.n_groups, a.groups) != 0
            || libc::syscall(libc::SYS_setgid, a.gid) != 0
            || libc::syscall(libc::SYS_setuid, a.uid) != 0
        {
            return errno();
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(a.exe, a.argv, a.envp);
        errno()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(exe: &str, args: &[&str], out: Option<OwnedFd>) -> Program {
        Program {
            exe: CString::new(exe).unwrap(),
            argv: std::iter::once(exe)
                .chain(args.iter().copied())
                .map(|a| CString::new(a).unwrap())
                .collect(),
            env: vec![CString::new("KRG_SPAWN_TEST=yes").unwrap()],
            cwd: CString::new("/").unwrap(),
            fds: [None, out, None, None, None],
            umask: 0o027,
            rlimits: vec![(libc::RLIMIT_NOFILE, 77, 77)],
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            groups: vec![],
            ignored: 0,
        }
    }

    fn wait(pid: i32) -> i32 {
        super::super::wait_status(pid).unwrap()
    }

    #[test]
    fn runs_with_its_cwd_env_umask_rlimits_and_stdout() {
        let (r, w) = std::io::pipe().unwrap();
        let p = program(
            "/bin/sh",
            &[
                "-c",
                "pwd; echo $KRG_SPAWN_TEST; umask; ulimit -n; cat <&0 || echo closed",
            ],
            Some(w.into()),
        );
        let pid = spawn(&p).unwrap();
        drop(p);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut { r }, &mut out).unwrap();
        let st = wait(pid);
        assert!(libc::WIFEXITED(st), "{st:#x}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[..4], ["/", "yes", "0027", "77"], "{out}");
        // stdin was closed: the shell says so.
        assert!(lines.last().unwrap().ends_with("closed"), "{out}");
    }

    #[test]
    fn starts_with_the_callers_ignored_signals_only() {
        let (r, w) = std::io::pipe().unwrap();
        let mut p = program(
            "/bin/sh",
            &["-c", "grep SigIgn /proc/$$/status"],
            Some(w.into()),
        );
        // SIGINT and SIGQUIT, as a shell's background job has them.
        p.ignored = (1 << (libc::SIGINT - 1)) | (1 << (libc::SIGQUIT - 1));
        let pid = spawn(&p).unwrap();
        drop(p);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut { r }, &mut out).unwrap();
        wait(pid);
        let hex = out.trim().strip_prefix("SigIgn:").unwrap().trim();
        let ign = u64::from_str_radix(hex, 16).unwrap();
        assert_ne!(ign & (1 << (libc::SIGINT - 1)), 0, "{out}");
        assert_ne!(ign & (1 << (libc::SIGQUIT - 1)), 0, "{out}");
        // The test process ignores SIGPIPE (Rust's runtime does): the
        // program does not.
        assert_eq!(ign & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let p = program("/nonexistent/krg-spawn-test", &[], None);
        let e = spawn(&p).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
