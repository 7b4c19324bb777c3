//! A listening UNIX socket (stream or seqpacket), bound again to its name
//! on the new node (see `streams::unix::Listening`).

#![deny(unsafe_code)]

use super::{
    listen_again_here, relistened, vacate_listener, FdKind, FdState, Kind, Probe, Restoring,
};
use crate::error::Error;
use crate::streams::unix::{self, Listening};
use std::os::fd::RawFd;

pub struct UnixListen;

fn listening_of(k: &FdKind) -> Option<Listening> {
    let FdKind::UnixListen {
        name,
        ty,
        flags,
        passcred,
        backlog,
    } = k
    else {
        return None;
    };
    Some(Listening {
        name: name.clone(),
        ty: *ty,
        flags: *flags,
        passcred: *passcred,
        backlog: *backlog,
    })
}

impl Kind for UnixListen {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        if p.ty() != libc::S_IFSOCK || p.fd <= 2 {
            return None;
        }
        let l = unix::listening(p.fd).transpose()?;
        Some(l.map(|l| FdKind::UnixListen {
            name: l.name,
            ty: l.ty,
            flags: l.flags,
            passcred: l.passcred,
            backlog: l.backlog,
        }))
    }

    fn leads_out(&self, _f: &FdState, _fds: &[FdState]) -> Option<String> {
        Some("a listening socket".into())
    }

    /// Its name must be free for the new node's agent to take it over.
    fn vacate(&self, f: &FdState) -> Result<(), Error> {
        vacate_listener(f)
    }

    fn take_back(&self, f: &FdState) {
        listen_again_here(f, || {
            let l = listening_of(&f.kind).ok_or("bad listening socket")?;
            unix::relisten(&l)
        })
    }

    fn moved_away(&self) -> bool {
        true
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        relistened(f, listening_of(&f.kind), unix::relisten)
    }
}
