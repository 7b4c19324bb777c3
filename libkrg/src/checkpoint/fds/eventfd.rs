//! An eventfd, made again with its count.

#![deny(unsafe_code)]

use super::{FdKind, FdState, Kind, Probe, Restoring};
use crate::error::Error;
use std::os::fd::{IntoRawFd, RawFd};

pub struct EventFd;

impl Kind for EventFd {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        p.anon("eventfd").then(|| {
            Ok(FdKind::EventFd {
                count: p.fdinfo_hex("eventfd-count:").unwrap_or(0),
                flags: p.flags,
            })
        })
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::EventFd { count, flags } = f.kind else {
            unreachable!("EventFd::restore of {:?}", f.kind)
        };
        let fl = flags & (libc::O_NONBLOCK | libc::O_CLOEXEC);
        let fd = crate::sys::events::eventfd(count.min(u32::MAX as u64) as u32, fl)
            .map_err(|e| Error::io("eventfd", &e).fd(f.fd))?;
        Ok(Some(fd.into_raw_fd()))
    }
}
