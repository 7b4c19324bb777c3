//! A connected UNIX stream or seqpacket socket (a socketpair end, say),
//! moved with its process as a connection to the SSI process at its other
//! end (the migration makes it a `Tcp` entry); a socketpair both of whose
//! ends are the process's becomes a `UnixPair` (see `unix_pair.rs`).

#![deny(unsafe_code)]

use super::{ConnOpts, FdKind, FdState, Kind, Probe, Purpose, Restoring, Sharing, Stream};
use crate::error::Error;
use crate::streams::moving;
use std::os::fd::RawFd;

pub struct UnixStream;

impl Kind for UnixStream {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        if p.ty() != libc::S_IFSOCK {
            return None;
        }
        let seqpacket = crate::streams::seqpacket::is_seqpacket(p.fd);
        (seqpacket || moving::unix_stream(p.fd)).then(|| {
            Ok(FdKind::UnixStream {
                ino: p.st.st_ino,
                flags: p.flags,
                seqpacket,
                passcred: moving::opts(p.fd).passcred,
            })
        })
    }

    fn relayed_as_stdio(&self, why: Purpose) -> bool {
        why == Purpose::Checkpoint
    }

    fn sharing(&self, f: &FdState, _fds: &[FdState], _moving: bool) -> Option<Sharing> {
        let FdKind::UnixStream { ino, .. } = f.kind else {
            return None;
        };
        Some(Sharing::Socket(ino))
    }

    fn leads_out(&self, _f: &FdState, _fds: &[FdState]) -> Option<String> {
        Some("a connection to another process".into())
    }

    fn stream(&self, f: &FdState, _fds: &[FdState]) -> Option<Result<Stream, Error>> {
        let FdKind::UnixStream { ino, .. } = f.kind else {
            return None;
        };
        Some(Ok(Stream::Unix(ino)))
    }

    /// It sends at once, as UNIX sockets do.
    fn conn_opts(&self, k: &FdKind) -> Option<ConnOpts> {
        let FdKind::UnixStream {
            flags,
            seqpacket,
            passcred,
            ..
        } = *k
        else {
            return None;
        };
        Some(ConnOpts::at_once(flags, false, passcred, seqpacket))
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        Err(Error::other("a UNIX socket that was not moved (only a migration moves it)").fd(f.fd))
    }
}
