//! A signalfd and the signals it takes (bit `n - 1` for signal `n`).

use super::{fdinfo, os_err, status_field, FdKind, FdState, Kind, Probe, Restoring};
use std::os::fd::RawFd;

pub struct SignalFd;

impl Kind for SignalFd {
    fn owns(&self, k: &FdKind) -> bool {
        matches!(k, FdKind::SignalFd { .. })
    }

    fn describe(&self, p: &Probe) -> Option<Result<FdKind, String>> {
        if p.link_s != "anon_inode:[signalfd]" {
            return None;
        }
        let mask = status_field(&fdinfo(p.fd), "sigmask:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(|| format!("fd {}: signalfd without a mask in fdinfo", p.fd));
        Some(mask.map(|mask| FdKind::SignalFd {
            mask,
            flags: p.flags,
        }))
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, String> {
        let FdKind::SignalFd { mask, flags } = f.kind else {
            unreachable!("SignalFd::restore of {:?}", f.kind)
        };
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: our set.
        unsafe { libc::sigemptyset(&mut set) };
        for sig in 1..=64 {
            if mask & (1u64 << (sig - 1)) != 0 {
                // SAFETY: our set; out-of-range signals are refused, not UB.
                unsafe { libc::sigaddset(&mut set, sig) };
            }
        }
        let fl = flags & (libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        // SAFETY: a new signalfd for our set.
        let fd = unsafe { libc::signalfd(-1, &set, fl) };
        if fd < 0 {
            return Err(os_err(&format!("fd {}: signalfd", f.fd)));
        }
        Ok(Some(fd))
    }
}
