//! `krg cluster exec --node K -- CMD...`: run a command on node K.
//!
//! This process enters node K's namespaces (network, IPC, UTS, pid for its
//! children, mount), goes back to its current directory (the repository is
//! at the same path on every node), and forks; the child joins the node's
//! cgroups and execs the command, under libkrg.so or not. The parent
//! forwards termination signals and returns the child's exit code
//! (128 + signal number when a signal killed it, as shells report it).

use super::instance::Instance;
use super::state::{self, NodeState};
use super::sys::{self, CStrVec, SavedAction};
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;

/// The signals passed on to the command.
const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The namespaces joined, in order. Mount comes last: after it the
/// machine's /proc is no longer visible.
const NAMESPACES: [(&str, CloneFlags); 5] = [
    ("net", CloneFlags::CLONE_NEWNET),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// Where libkrg.so is: next to the running `krg`.
pub(super) fn preload_path() -> Result<PathBuf> {
    let dir = super::bin_dir()?;
    let lib = dir.join("libkrg.so");
    if !super::spawn::is_file(&lib) {
        bail!(
            "the preload library {} does not exist (build the workspace: cargo build)",
            lib.display()
        );
    }
    Ok(lib)
}

/// The shell-like message and exit status for a failed execvp.
fn exec_failure(cmd: &str) -> [(i32, Vec<u8>); 3] {
    let not_found = if cmd.contains('/') {
        "No such file or directory"
    } else {
        "command not found"
    };
    [
        (127, format!("krg: {cmd}: {not_found}\n").into_bytes()),
        (126, format!("krg: {cmd}: Permission denied\n").into_bytes()),
        (126, format!("krg: {cmd}: cannot execute\n").into_bytes()),
    ]
}

/// Run `cmd` on node `node` of instance `inst`; with `preload`, under
/// libkrg.so.
pub(super) fn run(inst: &Instance, node: u32, cmd: &[String], preload: bool) -> Result<i32> {
    let Some(prog) = cmd.first() else {
        bail!("krg cluster exec: no command given");
    };
    let st = state::read(inst)?.with_context(|| {
        format!(
            "no {} is up (start one with `{}`)",
            inst.title(),
            inst.command("up --nodes N")
        )
    })?;
    let Some(n) = st.nodes.iter().find(|n| n.id == node) else {
        let ids: Vec<String> = st.nodes.iter().map(|n| n.id.to_string()).collect();
        bail!(
            "node {node} is not in the {} (its nodes: {})",
            inst.title(),
            ids.join(" ")
        );
    };
    check_running(inst, n)?;
    if sys::thread_count().is_some_and(|t| t > 1) {
        bail!("krg cluster exec must run single-threaded: setns into a mount namespace is refused to multithreaded processes");
    }

    // The command's environment, argv and error messages, ready before fork.
    let mut env: Vec<OsString> = std::env::vars_os()
        // KRG_STANDALONE marks a tree that found no agent; this one has one.
        .filter(|(k, _)| {
            k != "LD_PRELOAD" && k != "KRG_NODE_SOCK" && k != "KRG_STANDALONE" && k != "KRG_NODE"
        })
        .map(|(mut k, v)| {
            k.push("=");
            k.push(v);
            k
        })
        .collect();
    if preload {
        let mut v = OsString::from("LD_PRELOAD=");
        v.push(preload_path()?);
        env.push(v);
    }
    env.push(OsString::from(format!(
        "KRG_NODE_SOCK={}",
        n.sock.display()
    )));
    if preload {
        // The program runs on the node asked for; its children are placed
        // by the scheduler (the library consumes KRG_NODE).
        env.push(OsString::from(format!("KRG_NODE={}", n.id)));
    }
    let envp = CStrVec::new(&env)?;
    let argv = CStrVec::new(cmd)?;
    let file = sys::cstring(prog)?;
    let failures = exec_failure(prog);

    // Open everything in the machine's view, before entering the node.
    let ns_files = NAMESPACES
        .iter()
        .map(|(name, flag)| {
            let path = format!("/proc/{}/ns/{name}", n.host_pid);
            File::open(&path)
                .map(|f| (f, *name, *flag))
                .with_context(|| format!("node {node}: opening {path}"))
        })
        .collect::<Result<Vec<_>>>()?;
    // The pid may have been recycled between the check and the opens.
    check_running(inst, n)?;
    let cgroups = n
        .cgroups
        .iter()
        .map(|d| {
            let p = d.join("cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .with_context(|| format!("node {node}: opening {}", p.display()))
        })
        .collect::<Result<Vec<File>>>()?;
    let cwd = std::env::current_dir().context("reading the current directory")?;

    for (f, name, flag) in &ns_files {
        setns(f, *flag).with_context(|| {
            format!(
                "node {node}: entering its {name} namespace (/proc/{}/ns/{name})",
                n.host_pid
            )
        })?;
    }
    drop(ns_files);
    std::env::set_current_dir(&cwd).with_context(|| {
        format!(
            "node {node}: the current directory {} does not exist there (/tmp is private to each node; run from a directory shared by the nodes, such as the repository)",
            cwd.display()
        )
    })?;

    // Block the forwarded signals until the child's pid is known, and note
    // which ones were ignored when we started (those stay ignored: the
    // command inherits the ignored disposition, as with any exec).
    let mut fwd = SigSet::empty();
    for s in FORWARDED {
        fwd.add(s);
    }
    let mut old_mask = SigSet::empty();
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&fwd), Some(&mut old_mask))
        .context("blocking signals")?;
    let mut saved: Vec<SavedAction> = Vec::new();
    for s in FORWARDED {
        match sys::forward_signal(s) {
            Ok(old) => saved.push(old),
            Err(e) => {
                restore(&saved, &old_mask);
                return Err(e).with_context(|| format!("installing a handler for {s}"));
            }
        }
    }

    let child = match sys::fork() {
        Ok(ForkResult::Child) => {
            run_child(&cgroups, &saved, &old_mask, &file, &argv, &envp, &failures)
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            restore(&saved, &old_mask);
            let hint = if crate::sys::errno(&e) == Some(libc::ENOMEM) {
                " (the node's pid namespace is gone: its agent exited)"
            } else {
                ""
            };
            return Err(e).with_context(|| format!("node {node}: fork{hint}"));
        }
    };
    drop(cgroups);
    sys::forward_to(child.as_raw());
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);

    let code = wait_child(child, &fwd);
    restore(&saved, &old_mask);
    code.with_context(|| format!("node {node}: waiting for {prog}"))
}

/// Wait for the command and return its exit code (128 + signal if a
/// signal killed it). The child is only reaped once the forwarding is
/// cleared with the forwarded signals blocked, so the handler never
/// signals a pid that was recycled.
fn wait_child(child: Pid, fwd: &SigSet) -> nix::Result<i32> {
    loop {
        match waitid(Id::Pid(child), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                sys::forward_to(0);
                return Err(e);
            }
        }
    }
    let _ = signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(fwd), None);
    sys::forward_to(0);
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn check_running(inst: &Instance, n: &NodeState) -> Result<()> {
    if !n.is_running() {
        bail!(
            "node {} is not running (its pid-1 process, host pid {}, is gone); `{}` then `{}` to start afresh\n{}",
            n.id,
            n.host_pid,
            inst.command("down"),
            inst.command("up"),
            sys::log_tail(&n.log, 10)
        );
    }
    Ok(())
}

/// Put the dispositions and the mask back as they were.
fn restore(saved: &[SavedAction], mask: &SigSet) {
    for old in saved {
        sys::restore_signal(old);
    }
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None);
}

/// The command's side of the fork: cgroups, signal state, exec.
fn run_child(
    cgroups: &[File],
    saved: &[SavedAction],
    old_mask: &SigSet,
    file: &std::ffi::CStr,
    argv: &CStrVec,
    envp: &CStrVec,
    failures: &[(i32, Vec<u8>); 3],
) -> ! {
    let fail = |msg: &[u8], code: i32| -> ! {
        let _ = nix::unistd::write(std::io::stderr(), msg);
        sys::exit_now(code)
    };
    for f in cgroups {
        // "0": the writing process itself, whatever pid it has in the node.
        if nix::unistd::write(f, b"0").is_err() {
            fail(b"krg: cannot join the node's cgroups\n", 126);
        }
    }
    // The command starts with the dispositions krg started with, SIGPIPE at
    // its default (Rust ignores it; an ignored signal stays ignored across
    // exec), and krg's original signal mask.
    restore(saved, old_mask);
    let _ = crate::sys::default_signal(Signal::SIGPIPE);
    // SSI processes run without address randomisation (checkpoint images
    // restore at the same addresses); a plain process keeps it off too,
    // harmlessly, as setarch -R would.
    let _ = crate::sys::no_aslr();
    // Only stdio enters the node, as with a remote login: an fd above 2
    // would be a machine's file shared by two nodes, which no real cluster
    // has (launchers and CI runners leave some open in every child). The
    // failure message below still has stderr.
    let _ = sys::cloexec_from(3);
    let e = sys::execvpe(file, argv, envp);
    let (code, msg) = match crate::sys::errno(&e) {
        Some(libc::ENOENT | libc::ENOTDIR) => (failures[0].0, &failures[0].1),
        Some(libc::EACCES | libc::EPERM) => (failures[1].0, &failures[1].1),
        _ => (failures[2].0, &failures[2].1),
    };
    fail(msg, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_like_exec_failures() {
        let f = exec_failure("nosuch");
        assert_eq!(f[0].0, 127);
        assert_eq!(f[0].1, b"krg: nosuch: command not found\n");
        let f = exec_failure("./nosuch");
        assert_eq!(f[0].1, b"krg: ./nosuch: No such file or directory\n");
        assert_eq!(f[1].0, 126);
    }
}
