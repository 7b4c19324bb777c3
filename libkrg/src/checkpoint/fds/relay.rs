//! A standard fd connected to a terminal, pipe or socket that cannot move:
//! after a migration the shadow relays it; after a restart it is what the
//! restarting command gives.

#![deny(unsafe_code)]

use super::{FdKind, FdState, Kind, Probe, Restoring};
use crate::error::Error;
use std::os::fd::RawFd;

pub struct Relay;

impl Kind for Relay {
    /// The devices, FIFOs and sockets no other kind took, as fds 0-2.
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        let relayable = matches!(p.ty(), libc::S_IFCHR | libc::S_IFIFO | libc::S_IFSOCK);
        (relayable && p.fd <= 2).then_some(Ok(FdKind::Relay))
    }

    fn restore(&self, _f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        Ok(None)
    }
}
