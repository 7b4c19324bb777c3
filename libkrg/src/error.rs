//! libkrg's error: what failed, about which process, node, fd or path,
//! the errno the application gets, and the kind of failure its callers
//! decide on (a migration tries again when a peer is busy; everything
//! else is reported), never the text.

use crate::proto::{ErrorKind, ErrorReply};
use std::fmt;

/// A failure, with its context and errno.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{ctx}{msg}")]
pub struct Error {
    /// What the application gets in `errno`.
    pub errno: i32,
    pub kind: ErrorKind,
    /// What it was about, shown before the message.
    pub ctx: Context,
    pub msg: String,
}

/// What a failure was about: shown as `pid P: node N: fd F: PATH: `.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    pub pid: Option<i32>,
    pub node: Option<u32>,
    pub fd: Option<i32>,
    pub path: Option<String>,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.pid {
            write!(f, "pid {p}: ")?;
        }
        if let Some(n) = self.node {
            write!(f, "node {n}: ")?;
        }
        if let Some(fd) = self.fd {
            write!(f, "fd {fd}: ")?;
        }
        if let Some(p) = &self.path {
            write!(f, "{p}: ")?;
        }
        Ok(())
    }
}

impl Error {
    pub fn new(kind: ErrorKind, errno: i32, msg: impl Into<String>) -> Self {
        Error {
            errno,
            kind,
            ctx: Context::default(),
            msg: msg.into(),
        }
    }

    /// A failure of no particular kind (`EIO` for the application).
    pub fn other(msg: impl Into<String>) -> Self {
        Error::new(ErrorKind::Other, libc::EIO, msg)
    }

    /// A failure of no particular kind that the application sees as
    /// `errno`.
    pub fn errno(errno: i32, msg: impl Into<String>) -> Self {
        Error::new(ErrorKind::Other, errno, msg)
    }

    /// The process cannot be captured or moved as it is: `EBUSY`, as the
    /// application sees every refusal of `krg_checkpoint`/`krg_migrate`.
    pub fn refused(msg: impl Into<String>) -> Self {
        Error::errno(libc::EBUSY, msg)
    }

    /// `what` failed with `e`: `what: <e>`, its errno kept (`EIO` when it
    /// has none).
    pub fn io(what: impl fmt::Display, e: &std::io::Error) -> Self {
        Error::errno(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("{what}: {e}"),
        )
    }

    /// The system call `what` just failed: `what: <strerror>`, with the
    /// thread's errno (read before anything else can change it).
    pub fn last_os(what: impl fmt::Display) -> Self {
        // sys, not rt: error sits below the runtime and its agent calls.
        let errno = crate::sys::errno();
        Error::errno(errno, format!("{what}: {}", crate::sys::Errno(errno)))
    }

    /// The same failure, found while doing `what`: `what: ` goes before
    /// the message (after the context).
    pub fn during(mut self, what: impl fmt::Display) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }

    /// About process `pid`.
    pub fn pid(mut self, pid: i32) -> Self {
        self.ctx.pid = Some(pid);
        self
    }

    /// About node `node`.
    pub fn node(mut self, node: u32) -> Self {
        self.ctx.node = Some(node);
        self
    }

    /// About fd `fd`.
    pub fn fd(mut self, fd: i32) -> Self {
        self.ctx.fd = Some(fd);
        self
    }

    /// About `path`.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.ctx.path = Some(path.into());
        self
    }
}

/// Context added to any failure that becomes an [`Error`], on the way up.
pub trait ResultExt<T> {
    /// Found while doing `what` (see [`Error::during`]).
    fn during(self, what: impl fmt::Display) -> Result<T, Error>;
    /// About fd `fd`.
    fn fd(self, fd: i32) -> Result<T, Error>;
    /// About `path`.
    fn path(self, path: impl fmt::Display) -> Result<T, Error>;
}

impl<T, E: Into<Error>> ResultExt<T> for Result<T, E> {
    fn during(self, what: impl fmt::Display) -> Result<T, Error> {
        self.map_err(|e| e.into().during(what))
    }

    fn fd(self, fd: i32) -> Result<T, Error> {
        self.map_err(|e| e.into().fd(fd))
    }

    fn path(self, path: impl fmt::Display) -> Result<T, Error> {
        self.map_err(|e| e.into().path(path.to_string()))
    }
}

/// The messages libkrg's older code builds (context already in the text).
impl From<String> for Error {
    fn from(msg: String) -> Self {
        Error::other(msg)
    }
}

impl From<&str> for Error {
    fn from(msg: &str) -> Self {
        Error::other(msg)
    }
}

/// An I/O failure, its errno kept.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::errno(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
    }
}

/// An agent's answer, kind and errno kept.
impl From<ErrorReply> for Error {
    fn from(e: ErrorReply) -> Self {
        Error::new(e.kind, e.errno, e.msg)
    }
}

/// What goes back over the protocol: the context becomes part of the text.
impl From<Error> for ErrorReply {
    fn from(e: Error) -> Self {
        ErrorReply {
            errno: e.errno,
            kind: e.kind,
            msg: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_comes_first_and_the_kind_survives_the_protocol() {
        let e = Error::new(ErrorKind::PeerBusy, libc::EBUSY, "its peer is moving")
            .pid(7)
            .fd(3);
        assert_eq!(e.to_string(), "pid 7: fd 3: its peer is moving");
        let r: ErrorReply = e.into();
        assert_eq!(r.kind, ErrorKind::PeerBusy);
        assert_eq!(r.errno, libc::EBUSY);
        let back = Error::from(r);
        assert_eq!(back.kind, ErrorKind::PeerBusy);
        assert_eq!(back.to_string(), "pid 7: fd 3: its peer is moving");
        assert_eq!(Error::from("x").kind, ErrorKind::Other);
    }
}
