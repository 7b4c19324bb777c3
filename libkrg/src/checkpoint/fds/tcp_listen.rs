//! A listening TCP socket, bound again to the same address and port on the
//! new node (`addr` as text, the kernel's address). During a migration
//! this node's agent keeps the socket open (a connection that comes
//! meanwhile waits in its queue instead of being refused) and passes on
//! what still reaches it once the process listens on the new node.

#![deny(unsafe_code)]

use super::{
    listen_again_here, relistened, vacate_listener, FdKind, FdState, Kind, Probe, Restoring,
};
use crate::error::Error;
use crate::proto::{Request, Response};
use crate::streams::moving::{self, Listening};
use std::os::fd::RawFd;

pub struct TcpListen;

fn listening_of(k: &FdKind) -> Option<Listening> {
    let FdKind::TcpListen {
        addr,
        v6only,
        reuseaddr,
        reuseport,
        backlog,
        flags,
    } = k
    else {
        return None;
    };
    Some(Listening {
        addr: addr.parse().ok()?,
        v6only: *v6only,
        reuseaddr: *reuseaddr,
        reuseport: *reuseport,
        backlog: *backlog,
        flags: *flags,
    })
}

/// Listening sockets of this migration kept open by this node's agent
/// (`Park`): `(fd, park id)`. A fixed table: filled in the capture, used
/// right after it (handed on, or taken back).
static PARKED: std::sync::Mutex<[(i32, i32); 64]> = std::sync::Mutex::new([(-1, 0); 64]);

fn parked() -> std::sync::MutexGuard<'static, [(i32, i32); 64]> {
    PARKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Have this node's agent keep listening socket `fd` open while the move
/// goes on. Without the agent the socket is only closed.
fn park(fd: i32) {
    match crate::client::call(&Request::Park { fd, moving: true }) {
        Ok(Response::Id(id)) => {
            let mut t = parked();
            if let Some(e) = t.iter_mut().find(|e| e.0 < 0) {
                *e = (fd, id);
            }
        }
        other => crate::krg_log!(
            crate::log::Level::Warn,
            "fd {fd}: listening socket not kept during the move: {other:?}"
        ),
    }
}

/// The move failed: listening socket `fd`, if parked, comes back as it was
/// (with what queued meanwhile). Whether it did.
fn unpark(fd: i32, cloexec: bool) -> bool {
    let id = {
        let mut t = parked();
        let Some(e) = t.iter_mut().find(|e| e.0 == fd) else {
            return false;
        };
        let id = e.1;
        *e = (-1, 0);
        id
    };
    match crate::client::call_fds(&Request::Unpark { id }) {
        Ok((Response::StreamFd, mut got)) if !got.is_empty() => {
            let s = got.remove(0);
            let fl = if cloexec { libc::O_CLOEXEC } else { 0 };
            // The listener back under its own number.
            crate::sys::fd::dup3(std::os::fd::AsRawFd::as_raw_fd(&s), fd, fl).is_ok()
        }
        other => {
            crate::krg_log!(
                crate::log::Level::Warn,
                "fd {fd}: taking the listening socket back: {other:?}"
            );
            false
        }
    }
}

impl Kind for TcpListen {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        if p.ty() != libc::S_IFSOCK || p.fd <= 2 {
            return None;
        }
        let l = moving::listening(p.fd).transpose()?;
        Some(l.map(|l| FdKind::TcpListen {
            addr: l.addr.to_string(),
            v6only: l.v6only,
            reuseaddr: l.reuseaddr,
            reuseport: l.reuseport,
            backlog: l.backlog,
            flags: l.flags,
        }))
    }

    fn leads_out(&self, _f: &FdState, _fds: &[FdState]) -> Option<String> {
        Some("a listening socket".into())
    }

    /// The port must be free for the new node to bind it.
    fn vacate(&self, f: &FdState) -> Result<(), Error> {
        park(f.fd);
        vacate_listener(f)
    }

    fn take_back(&self, f: &FdState) {
        if unpark(f.fd, f.cloexec) {
            return;
        }
        listen_again_here(f, || {
            let l = listening_of(&f.kind).ok_or("bad listening address")?;
            moving::relisten(&l)
        })
    }

    fn moved_away(&self) -> bool {
        true
    }

    /// The agent passes on what still reaches the parked listeners to
    /// `node`, where the process listens now.
    fn moved_to(&self, node: u32) {
        let mut t = parked();
        for e in t.iter_mut().filter(|e| e.0 >= 0) {
            if let Err(e2) = crate::client::call(&Request::ForwardParked { id: e.1, node }) {
                crate::krg_log!(
                    crate::log::Level::Warn,
                    "fd {}: connections to the old node will not be passed on: {e2}",
                    e.0
                );
            }
            *e = (-1, 0);
        }
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        relistened(f, listening_of(&f.kind), moving::relisten)
    }
}
