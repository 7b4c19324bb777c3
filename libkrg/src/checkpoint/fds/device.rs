//! A character device that means the same on every node (`/dev/null`,
//! `/dev/zero`, `/dev/urandom`, ...): opened again by its path.

#![deny(unsafe_code)]

use super::{open_path, FdKind, FdState, Kind, Probe, Purpose, Restoring};
use crate::error::Error;
use std::os::fd::RawFd;

const PORTABLE_DEVICES: &[(u32, u32, &str)] = &[
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 7, "/dev/full"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

pub struct Device;

impl Kind for Device {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        if p.ty() != libc::S_IFCHR {
            return None;
        }
        let (ma, mi) = (libc::major(p.st.st_rdev), libc::minor(p.st.st_rdev));
        let (_, _, path) = PORTABLE_DEVICES
            .iter()
            .find(|(a, b, _)| *a == ma && *b == mi)?;
        Some(Ok(FdKind::Device {
            path: path.as_bytes().to_vec(),
            flags: p.flags,
        }))
    }

    /// Opened again wherever the process goes, even as a standard fd.
    fn relayed_as_stdio(&self, _why: Purpose) -> bool {
        false
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::Device { path, flags } = &f.kind else {
            unreachable!("Device::restore of {:?}", f.kind)
        };
        open_path(path, *flags).map(Some).map_err(|e| e.fd(f.fd))
    }
}
