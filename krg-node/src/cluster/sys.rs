//! Low-level helpers of the local cluster: processes seen through the host's
//! /proc, argument vectors prepared before `fork`, running `ip`; and, the
//! only code of the local cluster allowed `unsafe`, safe wrappers of fork,
//! exec, `_exit` and signal forwarding (see `crate::sys`).

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{self, kill, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::{ForkResult, Pid};
use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// The state letter and start time (clock ticks since boot) of a process,
/// from `/proc/<pid>/stat`; `None` if there is no such process.
pub(super) fn proc_stat(pid: i32) -> Option<(char, u64)> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself hold spaces or
    // parentheses: the fields that follow start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` is field 3 of proc(5); `starttime` is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Whether `pid` is a live (not zombie) process that started at `start`.
/// Pids are recycled: the start time tells a node's process from a newcomer
/// that got the same number.
pub(super) fn is_running(pid: i32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((s, t)) if t == start && s != 'Z' && s != 'X')
}

/// Whether `pid` is a live (not zombie) process, whoever it is.
pub(super) fn exists(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

/// The inode of a namespace file (`/proc/<pid>/ns/net`, `/run/netns/x`):
/// two files name the same namespace when their inodes are equal.
pub(super) fn ns_inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Every process of the host whose network namespace is one of `inodes`.
pub(super) fn pids_in_netns(inodes: &HashSet<u64>) -> Vec<i32> {
    let mut out = Vec::new();
    if inodes.is_empty() {
        return out;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(ino) = ns_inode(&e.path().join("ns/net")) {
            if inodes.contains(&ino) {
                out.push(pid);
            }
        }
    }
    out
}

/// SIGKILL every live process of `pids` (never this process) and wait up to
/// `timeout` until they are gone. Returns those still alive.
pub(super) fn kill_and_wait(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut left: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&p| p > 1 && p != me)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    left.sort_unstable();
    for &p in &left {
        // ESRCH: already gone, which is what we want.
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let deadline = Instant::now() + timeout;
    loop {
        // A zombie has left its namespaces and cgroups already; whoever
        // adopted it (the host's init) reaps it.
        left.retain(|&p| exists(p));
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The identities (pid, start time) of those of `pids` that exist now.
pub(super) fn identities(pids: &[i32]) -> Vec<(i32, u64)> {
    pids.iter()
        .filter_map(|&p| proc_stat(p).map(|(_, t)| (p, t)))
        .collect()
}

/// Wait up to `timeout` until the processes are not even zombies any more
/// (their parent, usually the host's init, reaped them), so that `ps` and
/// `pgrep` no longer show them. Zombies hold no namespace, cgroup or
/// memory: giving up on them is harmless.
pub(super) fn wait_reaped(procs: &[(i32, u64)], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut left: Vec<(i32, u64)> = procs.to_vec();
    loop {
        left.retain(|&(p, t)| matches!(proc_stat(p), Some((_, now)) if now == t));
        if left.is_empty() || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The number of threads of this process.
pub(super) fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The last `lines` lines of a log file, indented, for error messages.
pub(super) fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) if !bytes.is_empty() => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            let mut s = format!("last lines of {}:", path.display());
            for l in tail {
                s.push_str("\n    ");
                s.push_str(l);
            }
            s
        }
        Ok(_) => format!("{} is empty", path.display()),
        Err(e) => format!("cannot read {}: {e}", path.display()),
    }
}

/// A NULL-terminated array of C strings, built before `fork` so that the
/// child only has to hand a pointer to `execve` (no allocation after fork).
#[derive(Debug)]
pub(super) struct CStrVec {
    _owned: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl CStrVec {
    pub(super) fn new<I, S>(items: I) -> Result<CStrVec>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let owned = items
            .into_iter()
            .map(|s| {
                let s = s.as_ref();
                CString::new(s.as_bytes())
                    .with_context(|| format!("{:?} holds a NUL byte", s.to_string_lossy()))
            })
            .collect::<Result<Vec<CString>>>()?;
        let mut ptrs: Vec<*const libc::c_char> = owned.iter().map(|c| c.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        Ok(CStrVec {
            _owned: owned,
            ptrs,
        })
    }

    /// The `char *const[]` for the exec family; valid while `self` lives.
    pub(super) fn as_ptr(&self) -> *const *const libc::c_char {
        self.ptrs.as_ptr()
    }
}

/// Fork this process. Refused while other threads run: the child would
/// then be allowed only async-signal-safe calls, and the children of the
/// local cluster run ordinary code (nix's mount allocates, for one).
pub(super) fn fork() -> io::Result<ForkResult> {
    if let Some(n) = thread_count().filter(|n| *n > 1) {
        return Err(io::Error::other(format!(
            "fork refused: {n} threads run in this process"
        )));
    }
    // SAFETY: this process is single-threaded (checked above), so the
    // child is a whole copy of it, free to run any code.
    unsafe { nix::unistd::fork() }.map_err(|e| crate::sys::context(e.into(), "fork"))
}

/// End this process at once, without the atexit handlers and stdio
/// flushing that belong to its parent's copy of the state (a child after
/// fork).
pub(super) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes an integer and never returns.
    unsafe { libc::_exit(code) }
}

/// Exec `path` with `argv` and `envp`; returns only on failure, with the
/// error.
pub(super) fn execve(path: &CStr, argv: &CStrVec, envp: &CStrVec) -> io::Error {
    // SAFETY: a NUL-terminated path, and NULL-terminated arrays of
    // NUL-terminated strings (`CStrVec`'s own), all borrowed for the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    crate::sys::last_error(|| format!("execve {}", path.to_string_lossy()))
}

/// As [`execve`], looking `file` up in `PATH` if it has no `/`.
pub(super) fn execvpe(file: &CStr, argv: &CStrVec, envp: &CStrVec) -> io::Error {
    // SAFETY: as for `execve`.
    unsafe { libc::execvpe(file.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    crate::sys::last_error(|| format!("execvpe {}", file.to_string_lossy()))
}

/// Mark every descriptor from `first` on close-on-exec.
pub(super) fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range takes integers; CLOSE_RANGE_CLOEXEC only changes
    // flags, so no descriptor anything owns is closed.
    let r =
        unsafe { libc::close_range(first, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    crate::sys::check(r as libc::c_long, || {
        format!("close_range({first}, CLOEXEC)")
    })
    .map(drop)
}

/// Host pid the forwarded signals go to (0: none).
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let child = FORWARD_TO.load(Ordering::Relaxed);
    if child <= 0 || info.is_null() {
        return;
    }
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t, read
    // here before the handler returns.
    let (code, sender) = unsafe { ((*info).si_code, (*info).si_pid()) };
    // A signal from the terminal (Ctrl-C, Ctrl-\, hangup) is sent by the
    // kernel to the whole foreground process group, which the command is
    // in too: it already has its copy. Neither echo the command's own
    // signals back to it.
    if code == libc::SI_KERNEL || sender == child {
        return;
    }
    // SAFETY: kill is async-signal-safe. `child` is our child and not yet
    // reaped: FORWARD_TO is cleared, with these signals blocked, before
    // the child is reaped (see `forward_to`), so its pid cannot have been
    // recycled.
    unsafe { libc::kill(child, sig) };
}

/// A signal's disposition before [`forward_signal`] changed it.
#[derive(Debug)]
pub(super) struct SavedAction(Signal, SigAction);

/// Pass signal `sig`, whenever it comes, on to the process that
/// [`forward_to`] names; an ignored signal stays ignored. Answers the
/// disposition it had, for [`restore_signal`].
pub(super) fn forward_signal(sig: Signal) -> io::Result<SavedAction> {
    let handler = SigAction::new(
        SigHandler::SigAction(forward),
        SaFlags::SA_SIGINFO | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: `forward` only reads an atomic and the siginfo, and calls
    // kill, all async-signal-safe.
    let old = unsafe { signal::sigaction(sig, &handler) }
        .map_err(|e| crate::sys::context(e.into(), format!("sigaction({sig})")))?;
    let saved = SavedAction(sig, old);
    if old.handler() == SigHandler::SigIgn {
        restore_signal(&saved);
    }
    Ok(saved)
}

/// Put back a disposition that [`forward_signal`] replaced.
pub(super) fn restore_signal(saved: &SavedAction) {
    // SAFETY: the disposition was read from the kernel for this very
    // signal, so it was installed in this process before: a default, an
    // ignore or a handler that was already allowed to run here.
    let _ = unsafe { signal::sigaction(saved.0, &saved.1) };
}

/// From now on, the forwarded signals go to host pid `pid` (0: nowhere).
/// Clear it, with the signals blocked, before `pid` is reaped: the handler
/// must never signal a recycled pid.
pub(super) fn forward_to(pid: i32) {
    FORWARD_TO.store(pid, Ordering::SeqCst);
}

/// A C string from a path or argument, with a useful error.
pub(super) fn cstring(s: impl AsRef<OsStr>) -> Result<CString> {
    let s = s.as_ref();
    CString::new(s.as_bytes())
        .with_context(|| format!("{:?} holds a NUL byte", s.to_string_lossy()))
}

/// Run `ip ARGS...`, feeding `batch` on its stdin if given (for `-b -`).
pub(super) fn ip(args: &[&str], batch: Option<&str>) -> Result<String> {
    let shown = || {
        let mut s = format!("ip {}", args.join(" "));
        if let Some(b) = batch {
            s.push_str(" <<< ");
            s.push_str(&b.trim_end().replace('\n', "; "));
        }
        s
    };
    let mut child = Command::new("ip")
        .args(args)
        .stdin(if batch.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running `{}` (is iproute2 installed?)", shown()))?;
    if let Some(b) = batch {
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(b.as_bytes())
                .with_context(|| format!("feeding `{}`", shown()))?;
        }
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", shown()))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            shown(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An errno as `ENAME (text)`.
pub(super) fn errno_str(errno: i32) -> String {
    let e = Errno::from_raw(errno);
    format!("{e:?} ({})", e.desc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_of_self() {
        let me = std::process::id() as i32;
        let (state, start) = proc_stat(me).expect("own stat");
        assert_ne!(state, 'Z');
        assert!(is_running(me, start));
        assert!(
            !is_running(me, start + 1),
            "another start time is another process"
        );
        assert!(exists(me));
        assert_eq!(proc_stat(0), None);
        assert_eq!(proc_stat(-5), None);
    }

    #[test]
    fn cstrvec_is_null_terminated_and_refuses_nul() {
        let v = CStrVec::new(["a", "bc"]).unwrap();
        // SAFETY: the array holds 2 pointers and a terminating NULL.
        let third = unsafe { *v.as_ptr().add(2) };
        assert!(third.is_null());
        // SAFETY: the second pointer is a valid C string owned by `v`.
        let second = unsafe { std::ffi::CStr::from_ptr(*v.as_ptr().add(1)) };
        assert_eq!(second.to_str().unwrap(), "bc");
        assert!(CStrVec::new(["a\0b"]).is_err());
        assert!(cstring("x\0").is_err());
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("krg-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log");
        std::fs::write(&p, "1\n2\n3\n4\n").unwrap();
        let t = log_tail(&p, 2);
        assert!(t.ends_with("\n    3\n    4"), "{t}");
        std::fs::write(&p, "").unwrap();
        assert!(log_tail(&p, 2).contains("is empty"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(log_tail(&p, 2).contains("cannot read"));
    }
}
