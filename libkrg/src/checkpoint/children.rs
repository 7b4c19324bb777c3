//! The children of a migrated process (see docs/architecture/checkpoint.md,
//! "A parent and its children").
//!
//! A child stays where it runs when its parent migrates: it is a kernel
//! child of the process the parent was, which stays behind as the parent's
//! shadow. That shadow reaps it when it ends and reports its wait status
//! ([`crate::distant::reap_and_report`]); the agents carry the report to the node the
//! parent went to. There the restored parent has, for each such child, a
//! *child shadow*: a kernel child of its own, registered under the child's
//! gpid, that ends with the child's status ([`adopt`], [`child_shadow`]).
//! So the parent's `wait`, `waitpid`, `SIGCHLD` and `$?` work as before;
//! `kill` of the child's gpid reaches the child where it runs. When the
//! parent moves again, its child shadows are its children: they are
//! adopted in turn, and each hop reports to the next.

#![deny(unsafe_code)]

use crate::client;
use crate::error::{Error, ResultExt};
use crate::proto::{Request, Response};
use crate::sys::signal::{self, SigSet};
use crate::sys::{process, raw};
use std::ffi::CString;

/// `KRG_CHILD_SHADOW=gpid`: this process stands for child `gpid` of its
/// parent, a restored process.
pub const CHILD_SHADOW_ENV: &str = "KRG_CHILD_SHADOW";

/// Refuse a migration while this process has a kernel child that the
/// program knows by its kernel pid (one libc started itself: `popen`,
/// `system` reach `posix_spawn` and `wait4` inside libc, unhooked): on
/// another node that pid names no child, so `pclose` or `system` would
/// fail with ECHILD (or wait for an unrelated process) although the child
/// ends normally. Movable once the child has been waited for.
pub(super) fn refuse_unnamed_children() -> Result<(), Error> {
    let mut unnamed: Vec<String> = Vec::new();
    for t in crate::dirs::numbers("/proc/self/task")? {
        let Ok(kids) = crate::proc_self::read_file(&format!("/proc/self/task/{t}/children")) else {
            continue;
        };
        for k in String::from_utf8_lossy(&kids)
            .split_whitespace()
            .filter_map(|k| k.parse::<i32>().ok())
        {
            if !crate::processes::knows_child(k) {
                let comm = crate::proc_self::read_file(&format!("/proc/{k}/comm"))
                    .map(|c| String::from_utf8_lossy(&c).trim_end().to_string())
                    .unwrap_or_default();
                unnamed.push(format!("{k} ({comm})"));
            }
        }
    }
    if unnamed.is_empty() {
        return Ok(());
    }
    Err(Error::refused(format!(
        "children with kernel pids {} were started inside libc (popen, system): the program knows them by a kernel pid that names no child on another node, so its wait for them would fail; movable once they have been waited for",
        unnamed.join(", ")
    )))
}

/// In a restored process, before its threads run again: start a child
/// shadow for each child it had where it was captured. Returns how many.
pub fn adopt() -> usize {
    let gpids = match client::call(&Request::MovedChildren) {
        Ok(Response::Children(v)) => v,
        Ok(_) | Err(_) => return 0,
    };
    let mut n = 0;
    for g in gpids {
        match spawn_child_shadow(g) {
            Ok(k) => {
                crate::processes::note_child(k, g);
                n += 1;
            }
            Err(e) => crate::log::emit(format_args!(
                "krg: child {g} stays where it runs, but this process will not see it end ({e})"
            )),
        }
    }
    n
}

/// Start this program's executable again as the child shadow of `gpid`
/// (libkrg's constructor takes over before `main`). A raw `clone`: the
/// process may have other threads (parked), so the new one runs nothing
/// but `execve`.
fn spawn_child_shadow(gpid: i32) -> Result<i32, Error> {
    let mut env: Vec<CString> = Vec::new();
    for key in ["LD_PRELOAD", "KRG_NODE_SOCK", "KRG_LOG", "PATH"] {
        if let Some(v) = std::env::var_os(key) {
            let mut e = key.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_encoded_bytes());
            env.push(CString::new(e).map_err(|e| e.to_string())?);
        }
    }
    env.push(CString::new(format!("{CHILD_SHADOW_ENV}={gpid}")).expect("no NUL"));
    let exe = c"/proc/self/exe";
    let arg0 = CString::new(format!("krg-child-{gpid}")).expect("no NUL");
    // The child lets go of the program's fds (a socket or pipe held there
    // would stay open as long as it runs, and its peer could not tell who
    // holds it), then is replaced.
    raw::spawn(exe, &[arg0], &env).during("clone")
}

/// The child shadow: wait for the child's end and end the same way. Never
/// returns.
pub fn child_shadow(spec: &str) -> ! {
    // Signals aimed at it are not the child's (those reach the child where
    // it runs, by its gpid): nothing but SIGKILL ends it early.
    // A full set, blocked for this (only) thread.
    signal::set_thread_mask(libc::SIG_BLOCK, &SigSet::full());
    let Ok(gpid) = spec.trim().parse::<i32>() else {
        crate::log::emit(format_args!("krg: bad {CHILD_SHADOW_ENV}={spec}"));
        process::exit_now(127)
    };
    match client::call(&Request::ChildShadow { gpid }) {
        Ok(Response::WaitStatus(st)) if libc::WIFEXITED(st) => {
            // The child's exit code.
            process::exit_now(libc::WEXITSTATUS(st))
        }
        Ok(Response::WaitStatus(st)) if libc::WIFSIGNALED(st) => {
            crate::distant::exit_like(libc::WTERMSIG(st))
        }
        other => {
            crate::log::emit(format_args!(
                "krg: pid {gpid}: its end is unknown here ({other:?})"
            ));
            crate::distant::exit_like(libc::SIGKILL)
        }
    }
}
