//! The one place of krg-node's library, with `agent::sys` and
//! `cluster::sys`, where `unsafe` is allowed: the process-wide calls that
//! std and nix do not wrap safely, shared by the agent, the `krg` command
//! and the local cluster, and the error type of every such wrapper.
//!
//! Each wrapper is safe to call with any argument; its `SAFETY` comment
//! says why.

use nix::sys::signal::{self, SigHandler, Signal};
use std::fmt;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// A failed system call: what was called, and the OS error it gave.
#[derive(Debug)]
struct Failed {
    call: String,
    source: io::Error,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.call, self.source)
    }
}

impl std::error::Error for Failed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// `e`, from system call `call` (with its arguments, as the message
/// should show them): its message names the call, its kind and errno
/// ([`errno`]) stay the OS error's.
pub fn context(e: io::Error, call: impl Into<String>) -> io::Error {
    io::Error::new(
        e.kind(),
        Failed {
            call: call.into(),
            source: e,
        },
    )
}

/// The error of the system call that just failed (see [`context`]);
/// `call` names it, built once errno is read.
pub fn last_error(call: impl FnOnce() -> String) -> io::Error {
    let e = io::Error::last_os_error();
    context(e, call())
}

/// The errno of `e`, through the context of [`context`] too.
pub fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()?
            .downcast_ref::<Failed>()
            .and_then(|f| f.source.raw_os_error())
    })
}

/// A system call's `-1` as [`last_error`], else its value.
pub(crate) fn check(r: libc::c_long, call: impl FnOnce() -> String) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(last_error(call))
    } else {
        Ok(r)
    }
}

/// Put signal `sig` back to its default disposition (what an exec'd
/// program starts with, unless it was ignored).
pub fn default_signal(sig: Signal) -> io::Result<()> {
    // SAFETY: SIG_DFL installs no handler code, so no code of ours can run
    // in a signal context; signal(2) itself may be called at any time,
    // async-signal-safe in a child after fork too.
    unsafe { signal::signal(sig, SigHandler::SigDfl) }
        .map(drop)
        .map_err(|e| context(e.into(), format!("signal({sig}, SIG_DFL)")))
}

/// Ignore signal `sig` (an ignored signal stays ignored across exec).
pub fn ignore_signal(sig: Signal) -> io::Result<()> {
    // SAFETY: as for `default_signal`: SIG_IGN installs no handler code.
    unsafe { signal::signal(sig, SigHandler::SigIgn) }
        .map(drop)
        .map_err(|e| context(e.into(), format!("signal({sig}, SIG_IGN)")))
}

/// Turn address randomisation off for the programs this process execs
/// from now on: SSI processes run without it, so that a checkpoint image
/// restores at the same addresses on any node.
pub fn no_aslr() -> io::Result<()> {
    // SAFETY: personality(2) takes a plain integer and changes only this
    // process's execution domain; it is async-signal-safe.
    let r = unsafe { libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong) };
    check(r as libc::c_long, || {
        "personality(ADDR_NO_RANDOMIZE)".into()
    })
    .map(drop)
}

/// Have the program `cmd` starts run without address randomisation (see
/// [`no_aslr`]), by a step between its fork and its exec.
pub fn exec_without_aslr(cmd: &mut Command) {
    // SAFETY: the step runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed: it makes one system call
    // (personality) and allocates nothing (its failure, harmless, is not
    // even looked at).
    unsafe {
        cmd.pre_exec(|| {
            libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
            Ok(())
        });
    }
}

/// Wait until a child of this process (of any of its threads) has ended,
/// and answer its pid without reaping it: its waiter, if any, still gets
/// its status.
pub(crate) fn ended_child() -> io::Result<i32> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C
    // struct, which waitid fills.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into our siginfo_t.
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::__WALL,
        )
    };
    check(r as libc::c_long, || "waitid(P_ALL, WNOWAIT)".into())?;
    // SAFETY: waitid succeeded without WNOHANG, so it filled si_pid.
    Ok(unsafe { info.si_pid() })
}

/// Reap child `pid` if it has ended (its status is dropped).
pub(crate) fn reap(pid: i32) {
    // SAFETY: waitpid accepts a null status pointer (no status wanted).
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_in_context_keeps_its_errno_and_kind() {
        let e = context(io::Error::from_raw_os_error(libc::ENOENT), "open(x)");
        assert_eq!(errno(&e), Some(libc::ENOENT));
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().starts_with("open(x): "), "{e}");
        assert_eq!(errno(&io::Error::other("x")), None);
    }
}
