//! What every subsystem of the agent uses: who calls on the local socket,
//! the shapes of answers and errors, the lock-or-recover of std mutexes,
//! and the deadline of a call to a peer.

use libkrg::proto::{ErrorReply, Request, Response};
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tarpc::context;

/// Deadline of one call to a peer.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Who is calling on the local socket (from SO_PEERCRED).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// Kernel pid in the agent's pid namespace; 0 if not visible from it.
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    /// The caller's kernel pid, if this node's pid namespace shows it.
    pub(crate) fn kpid(&self) -> Result<i32, ErrorReply> {
        if self.pid > 0 {
            Ok(self.pid)
        } else {
            Err(err(
                libc::EPERM,
                "caller is not visible in this node's pid namespace",
            ))
        }
    }
}

/// An answer on the local socket, and the descriptors sent after it
/// (`SCM_RIGHTS`) when it announces some.
pub(crate) type Answer = (Response, Vec<OwnedFd>);

/// What a subsystem's `handle` gives back for a local request.
pub(crate) type Handled = Result<Response, ErrorReply>;

/// The same, for a subsystem whose answers may carry descriptors.
pub(crate) type Answered = Result<Answer, ErrorReply>;

/// An answer without descriptors.
pub(crate) fn bare(r: Response) -> Answer {
    (r, Vec::new())
}

/// A request handed to a subsystem that does not serve it (a mistake in
/// `Agent::handle_local`'s routing).
pub(crate) fn misrouted(req: &Request) -> ErrorReply {
    let name = format!("{req:?}");
    let name = name.split([' ', '(', '{']).next().unwrap_or_default();
    err(
        libc::EINVAL,
        format!("{name}: routed to the wrong subsystem"),
    )
}

/// A std mutex's guard, poisoned or not: a panic while it was held
/// leaves the state as the panicking code left it, which every user here
/// tolerates (the agent must keep serving).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn err(errno: i32, msg: impl Into<String>) -> ErrorReply {
    ErrorReply::other(errno, msg)
}

pub(crate) fn sock_err(what: &str, e: std::io::Error) -> ErrorReply {
    err(libc::EIO, format!("{what}: {e}"))
}

/// A failed system call's error as an answer, with its errno.
pub(crate) fn os_err(e: std::io::Error) -> ErrorReply {
    err(crate::sys::errno(&e).unwrap_or(libc::EIO), e.to_string())
}

pub(crate) fn ctx() -> context::Context {
    let mut c = context::current();
    c.deadline = Instant::now() + CALL_TIMEOUT;
    c
}
