//! An epoll instance with what it watches: `(fd, events, data)`, added
//! again once every other fd is back under its number.

#![deny(unsafe_code)]

use super::{fdinfo, FdKind, FdState, Kind, Probe, Restoring};
use crate::error::Error;
use crate::sys::events;
use std::os::fd::{IntoRawFd, RawFd};

pub struct Epoll;

/// What an epoll instance watches, from its fdinfo lines
/// (`tfd: 5 events: 19 data: 5 pos:0 ino:40e sdev:10`; hexadecimal but the
/// fd). Each must still be the file open under that number.
fn watches(fd: i32, info: &str) -> Result<Vec<(i32, u32, u64)>, Error> {
    let mut out = Vec::new();
    for l in info.lines().filter(|l| l.starts_with("tfd:")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        let field = |name: &str| {
            w.iter()
                .position(|x| *x == name)
                .and_then(|i| w.get(i + 1).copied())
        };
        let tagged = |name: &str| w.iter().find_map(|x| x.strip_prefix(name));
        let bad = || Error::other(format!("unreadable epoll entry {l:?}")).fd(fd);
        let tfd: i32 = field("tfd:").and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let events = field("events:")
            .and_then(|v| u32::from_str_radix(v, 16).ok())
            .ok_or_else(bad)?;
        let data = field("data:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(bad)?;
        let ino = tagged("ino:").and_then(|v| u64::from_str_radix(v, 16).ok());
        let st = super::fstat(tfd);
        if st.is_none() || ino.is_some_and(|i| Some(i) != st.map(|s| s.st_ino)) {
            return Err(Error::refused(format!(
                "epoll watches a file that is no longer open as fd {tfd}"
            ))
            .fd(fd));
        }
        out.push((tfd, events, data));
    }
    Ok(out)
}

impl Kind for Epoll {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        p.anon("eventpoll").then(|| {
            Ok(FdKind::Epoll {
                flags: p.flags,
                watches: watches(p.fd, &fdinfo(p.fd))?,
            })
        })
    }

    /// A new instance; what it watches is added by [`Kind::finish`].
    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::Epoll { flags, .. } = f.kind else {
            unreachable!("Epoll::restore of {:?}", f.kind)
        };
        let fd = events::epoll_create(flags & libc::O_CLOEXEC)
            .map_err(|e| Error::io("epoll_create1", &e).fd(f.fd))?;
        Ok(Some(fd.into_raw_fd()))
    }

    fn finish(&self, f: &FdState) -> Result<(), Error> {
        let FdKind::Epoll { watches, .. } = &f.kind else {
            return Ok(());
        };
        for (tfd, ev, data) in watches {
            // An fd now under its image number, added to the epoll instance
            // now under its own, with the saved events and data.
            events::epoll_add(f.fd, *tfd, *ev, *data)
                .map_err(|e| Error::io(format!("epoll watch of fd {tfd}"), &e).fd(f.fd))?;
        }
        Ok(())
    }
}
