//! An eventfd, made again with its count.

#![deny(unsafe_code)]

use super::{fdinfo, status_field, FdKind, FdState, Kind, Probe, Restoring};
use crate::error::Error;
use std::os::fd::{IntoRawFd, RawFd};

pub struct EventFd;

impl Kind for EventFd {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        if p.link_s != "anon_inode:[eventfd]" {
            return None;
        }
        let count = status_field(&fdinfo(p.fd), "eventfd-count:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0);
        Some(Ok(FdKind::EventFd {
            count,
            flags: p.flags,
        }))
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
