//! A signalfd and the signals it takes (bit `n - 1` for signal `n`).

#![deny(unsafe_code)]

use super::{FdKind, FdState, Kind, Probe, Restoring};
use crate::error::Error;
use crate::sys::signal::SigSet;
use std::os::fd::{IntoRawFd, RawFd};

pub struct SignalFd;

impl Kind for SignalFd {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        p.anon("signalfd").then(|| {
            let mask = p
                .fdinfo_hex("sigmask:")
                .ok_or_else(|| Error::other("signalfd without a mask in fdinfo").fd(p.fd))?;
            Ok(FdKind::SignalFd {
                mask,
                flags: p.flags,
            })
        })
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::SignalFd { mask, flags } = f.kind else {
            unreachable!("SignalFd::restore of {:?}", f.kind)
        };
        // Signals libc keeps for itself are left out, as sigaddset does.
        let set = (1..=64)
            .filter(|sig| mask & (1u64 << (sig - 1)) != 0)
            .fold(SigSet::empty(), SigSet::with);
        let fl = flags & (libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        let fd = crate::sys::signal::signalfd(&set, fl)
            .map_err(|e| Error::io("signalfd", &e).fd(f.fd))?;
        Ok(Some(fd.into_raw_fd()))
    }
}
