//! A timerfd, re-armed with the time it had left (relative: the nodes'
//! clocks are not the same clock) and its interval; expirations not read
//! yet are given back.

#![deny(unsafe_code)]

use super::{fdinfo, status_field, FdKind, FdState, Kind, Probe, Restoring};
use crate::error::Error;
use crate::sys::events;
use std::os::fd::{IntoRawFd, RawFd};

pub struct TimerFd;

fn describe(fd: i32, flags: i32) -> Result<FdKind, Error> {
    // timerfd_gettime first: for an expired periodic timer it moves the
    // timer forward and counts the expirations, which fdinfo alone would
    // show as disarmed.
    let its = events::timerfd_gettime(fd).map_err(|e| Error::io("timerfd_gettime", &e).fd(fd))?;
    let info = fdinfo(fd);
    let num = |name: &str| status_field(&info, name).and_then(|v| v.parse::<u64>().ok());
    let clockid =
        num("clockid:").ok_or_else(|| Error::other("timerfd without a clock in fdinfo").fd(fd))?;
    Ok(FdKind::TimerFd {
        clockid: clockid as i32,
        flags,
        value: (its.it_value.tv_sec, its.it_value.tv_nsec),
        interval: (its.it_interval.tv_sec, its.it_interval.tv_nsec),
        ticks: num("ticks:").unwrap_or(0),
    })
}

impl Kind for TimerFd {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        p.anon("timerfd").then(|| describe(p.fd, p.flags))
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::TimerFd {
            clockid,
            flags,
            value,
            interval,
            ticks,
        } = f.kind
        else {
            unreachable!("TimerFd::restore of {:?}", f.kind)
        };
        let num = f.fd;
        let fl = flags & (libc::TFD_NONBLOCK | libc::TFD_CLOEXEC);
        let fd = events::timerfd_create(clockid, fl)
            .map_err(|e| Error::io(format!("timerfd_create (clock {clockid})"), &e).fd(num))?
            .into_raw_fd();
        if value != (0, 0) {
            let its = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: interval.0,
                    tv_nsec: interval.1,
                },
                it_value: libc::timespec {
                    tv_sec: value.0,
                    tv_nsec: value.1,
                },
            };
            // Relative.
            events::timerfd_settime(fd, 0, &its)
                .map_err(|e| Error::io("timerfd_settime", &e).fd(num))?;
        }
        if ticks > 0 && events::timerfd_set_ticks(fd, ticks).is_err() {
            return Err(Error::last_os(format!(
                "giving back {ticks} unread expirations (TFD_IOC_SET_TICKS)"
            ))
            .fd(num));
        }
        Ok(Some(fd))
    }
}
