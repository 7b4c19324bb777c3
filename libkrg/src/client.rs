//! Blocking client of the local agent (used inside application processes and
//! by the `krg` command). One request per connection keeps it trivially
//! thread- and fork-safe: no shared socket, no lock to inherit mid-call.

#![deny(unsafe_code)]

use crate::frame::{self, MAX_RESPONSE};
use crate::proto::{ErrorKind, ErrorReply, Request, Response};
use crate::sys::sock;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Where the agent listens when `KRG_NODE_SOCK` does not say otherwise.
pub const DEFAULT_SOCK: &str = "/run/krg/krg-node.sock";

/// The agent socket path: `KRG_NODE_SOCK` or [`DEFAULT_SOCK`].
pub fn sock_path() -> PathBuf {
    std::env::var_os("KRG_NODE_SOCK")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCK))
}

/// Why a call to the agent failed: one enum for ordinary code and hooks,
/// which differ only in how they hold the agent's message (`M`): a
/// `String` here, a fixed buffer in hooks, which must not allocate
/// ([`crate::hookclient::HookCallError`]).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum CallError<M = String> {
    /// The agent could not be reached or the exchange broke: `op` failed
    /// with `errno`.
    #[error("cannot talk to the krg agent ({op}: {})", crate::sys::Errno(*errno))]
    Io { op: &'static str, errno: i32 },
    /// The agent answered with an error, of kind `kind`.
    #[error("{msg}")]
    Agent { errno: i32, kind: ErrorKind, msg: M },
    /// The request could not be sent as it is, or the answer does not fit
    /// it.
    #[error("unexpected answer from the agent: {0}")]
    Protocol(M),
}

impl<M> CallError<M> {
    /// The errno an application should see for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            CallError::Io { .. } => libc::EAGAIN,
            CallError::Agent { errno, .. } => *errno,
            CallError::Protocol(_) => libc::EIO,
        }
    }
}

impl From<ErrorReply> for CallError {
    fn from(e: ErrorReply) -> Self {
        CallError::Agent {
            errno: e.errno,
            kind: e.kind,
            msg: e.msg,
        }
    }
}

/// libkrg's error, the agent's kind kept.
impl From<CallError> for crate::error::Error {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Agent { errno, kind, msg } => crate::error::Error::new(kind, errno, msg),
            other => crate::error::Error::new(ErrorKind::Other, other.errno(), other.to_string()),
        }
    }
}

/// `Io` for `op` with the errno of `e`; an exchange that broke without
/// one (a malformed frame) is `Protocol`.
fn io_err(op: &'static str) -> impl Fn(io::Error) -> CallError {
    move |e| match e.raw_os_error() {
        Some(errno) => CallError::Io { op, errno },
        None => CallError::Protocol(format!("{op}: {e}")),
    }
}

/// Send one request to the agent at `KRG_NODE_SOCK` and wait for its answer.
pub fn call(req: &Request) -> Result<Response, CallError> {
    call_at(&sock_path(), req, None)
}

/// Send one request to the agent at `path`, with an optional timeout.
pub fn call_at(
    path: &std::path::Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Response, CallError> {
    // std opens Unix sockets with SOCK_CLOEXEC, so exec never leaks them.
    let mut s = UnixStream::connect(path).map_err(io_err("connect"))?;
    s.set_read_timeout(timeout).map_err(io_err("timeout"))?;
    s.set_write_timeout(timeout).map_err(io_err("timeout"))?;
    frame::write_frame(&mut s, req).map_err(io_err("send"))?;
    let resp: Response = frame::read_frame(&mut s, MAX_RESPONSE).map_err(io_err("receive"))?;
    match resp {
        Response::Err(e) => Err(e.into()),
        r => Ok(r),
    }
}

/// Like [`call`], for requests whose answer announces file descriptors
/// (`ShmAttached`): they follow the answer as SCM_RIGHTS on one byte.
pub fn call_fds(req: &Request) -> Result<(Response, Vec<OwnedFd>), CallError> {
    let mut s = UnixStream::connect(sock_path()).map_err(io_err("connect"))?;
    frame::write_frame(&mut s, req).map_err(io_err("send"))?;
    let resp: Response = frame::read_frame(&mut s, MAX_RESPONSE).map_err(io_err("receive"))?;
    let n = match &resp {
        Response::Err(e) => return Err(e.clone().into()),
        Response::ShmAttached { fds, .. } => *fds as usize,
        Response::StreamFd => 1,
        _ => 0,
    };
    let fds = if n > 0 {
        recv_fds(&s, n).map_err(io_err("receive descriptors"))?
    } else {
        Vec::new()
    };
    Ok((resp, fds))
}

/// Receive up to `max` (at most 4) descriptors sent with one byte.
fn recv_fds(s: &UnixStream, max: usize) -> io::Result<Vec<OwnedFd>> {
    const MAX: usize = 4;
    let max = max.min(MAX);
    let mut byte = [0u8; 1];
    let mut control = sock::Control::<8>::default();
    // MSG_CMSG_CLOEXEC keeps the fds from exec.
    let r = sock::recvmsg(
        s.as_raw_fd(),
        &mut byte,
        &mut control,
        libc::MSG_CMSG_CLOEXEC,
    )?;
    if r == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "agent closed before sending descriptors",
        ));
    }
    let out: Vec<OwnedFd> = control.take_fds().collect();
    if out.len() > max {
        return Err(io::Error::other(format!(
            "agent sent {} descriptors, {max} announced",
            out.len()
        )));
    }
    Ok(out)
}

/// A request that must be answered with a pid.
pub fn call_pid(req: &Request) -> Result<i32, CallError> {
    match call(req)? {
        Response::Pid(p) => Ok(p),
        other => Err(CallError::Protocol(format!("{other:?}"))),
    }
}
