//! Blocking client of the local agent (used inside application processes and
//! by the `krg` command). One request per connection keeps it trivially
//! thread- and fork-safe: no shared socket, no lock to inherit mid-call.

#![deny(unsafe_code)]

use crate::frame::{self, MAX_RESPONSE};
use crate::proto::{ErrorReply, Request, Response};
use crate::sys::sock;
use std::fmt;
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

/// Why a call to the agent failed.
#[derive(Debug)]
pub enum CallError {
    /// The agent could not be reached or the exchange broke.
    Io { path: PathBuf, err: io::Error },
    /// The agent answered with an error.
    Agent(ErrorReply),
    /// The agent answered something that does not fit the request.
    Unexpected(String),
}

impl CallError {
    /// The errno an application should see for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            CallError::Io { .. } => libc::EAGAIN,
            CallError::Agent(e) => e.errno,
            CallError::Unexpected(_) => libc::EIO,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Io { path, err } => {
                write!(
                    f,
                    "cannot talk to the krg agent at {}: {err}",
                    path.display()
                )
            }
            CallError::Agent(e) => f.write_str(&e.msg),
            CallError::Unexpected(s) => write!(f, "unexpected answer from the agent: {s}"),
        }
    }
}

impl std::error::Error for CallError {}

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
    let io_err = |err| CallError::Io {
        path: path.to_path_buf(),
        err,
    };
    // std opens Unix sockets with SOCK_CLOEXEC, so exec never leaks them.
    let mut s = UnixStream::connect(path).map_err(io_err)?;
    s.set_read_timeout(timeout).map_err(io_err)?;
    s.set_write_timeout(timeout).map_err(io_err)?;
    frame::write_frame(&mut s, req).map_err(io_err)?;
    let resp: Response = frame::read_frame(&mut s, MAX_RESPONSE).map_err(io_err)?;
    match resp {
        Response::Err(e) => Err(CallError::Agent(e)),
        r => Ok(r),
    }
}

/// Like [`call`], for requests whose answer announces file descriptors
/// (`ShmAttached`): they follow the answer as SCM_RIGHTS on one byte.
pub fn call_fds(req: &Request) -> Result<(Response, Vec<OwnedFd>), CallError> {
    let path = sock_path();
    let io_err = |err| CallError::Io {
        path: path.clone(),
        err,
    };
    let mut s = UnixStream::connect(&path).map_err(io_err)?;
    frame::write_frame(&mut s, req).map_err(io_err)?;
    let resp: Response = frame::read_frame(&mut s, MAX_RESPONSE).map_err(io_err)?;
    let n = match &resp {
        Response::Err(e) => return Err(CallError::Agent(e.clone())),
        Response::ShmAttached { fds, .. } => *fds as usize,
        Response::StreamFd => 1,
        _ => 0,
    };
    let fds = if n > 0 {
        recv_fds(&s, n).map_err(io_err)?
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
        other => Err(CallError::Unexpected(format!("{other:?}"))),
    }
}
