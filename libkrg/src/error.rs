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
