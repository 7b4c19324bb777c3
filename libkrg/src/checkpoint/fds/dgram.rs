//! A datagram socket that only sends (UNIX, connected to a name or not at
//! all; UDP, connected or not bound to a port): made again and connected
//! to its peer (a raw socket address, empty when not connected) on the
//! new node (see `streams::dgram`).

#![deny(unsafe_code)]

use super::{FdKind, FdState, Kind, Probe, Restoring};
use crate::error::Error;
use crate::streams::{dgram, sock};
use std::os::fd::RawFd;

pub struct Dgram;

impl Kind for Dgram {
    /// Above the standard fds only (there any socket is relayed).
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        let dgram = p.ty() == libc::S_IFSOCK
            && sock::int_opt(p.fd, libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_DGRAM);
        if !dgram || p.fd <= 2 {
            return None;
        }
        let domain = sock::int_opt(p.fd, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(-1);
        Some(dgram::sender_peer(p.fd, domain).map(|peer| FdKind::Dgram {
            domain,
            peer,
            flags: p.flags,
        }))
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::Dgram {
            domain,
            peer,
            flags,
        } = &f.kind
        else {
            unreachable!("Dgram::restore of {:?}", f.kind)
        };
        dgram::restore(*domain, peer, *flags)
            .map(Some)
            .map_err(|e| e.fd(f.fd))
    }
}
