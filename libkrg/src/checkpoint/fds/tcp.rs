//! A TCP connection to another SSI process, and what every moved stream
//! becomes: stream `id` held by the agent of `node` (the peer's), the bytes
//! that were in flight for this process, whether it had shut down writing,
//! and the file flags and options its new connection gets (see
//! `streams::moving`). Pipe ends, FIFO ends and UNIX sockets moved by a
//! migration are such connections too (`pipe`, `seqpacket`).

#![deny(unsafe_code)]

use super::{ConnOpts, FdKind, FdState, HandOver, Kind, Probe, Purpose, Restoring, Stream};
use crate::error::Error;
use crate::streams::moving;
use std::os::fd::{IntoRawFd, RawFd};

pub struct Tcp;

/// Whether `k` is a moved connection that stands for a pipe.
pub fn is_pipe(k: &FdKind) -> bool {
    matches!(k, FdKind::Tcp { pipe: true, .. })
}

/// The image entry of a moved stream: connection `id` held at `node`,
/// `alias_of` the fd it is a copy of (or -1).
pub fn connection(id: u64, node: u32, alias_of: i32, c: ConnOpts) -> FdKind {
    let o = c.opts;
    FdKind::Tcp {
        id,
        node,
        pending: Vec::new(),
        wr_shut: false,
        flags: o.flags,
        nodelay: o.nodelay,
        keepalive: o.keepalive,
        alias_of,
        pipe: o.pipe,
        seqpacket: c.seqpacket,
        passcred: o.passcred,
    }
}

/// The new end of the connection `f` describes.
fn attach(f: &FdState) -> Result<std::os::fd::OwnedFd, Error> {
    let FdKind::Tcp {
        id,
        node,
        pending,
        wr_shut,
        pipe,
        seqpacket,
        ..
    } = &f.kind
    else {
        unreachable!("Tcp::attach of {:?}", f.kind)
    };
    let new = moving::attach(*id, *node, pending.clone(), *wr_shut, *pipe, *seqpacket)?;
    if let Some(c) = Tcp.conn_opts(&f.kind) {
        moving::apply(&new, &c.opts);
    }
    Ok(new)
}

impl Kind for Tcp {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        if p.ty() != libc::S_IFSOCK || moving::tcp_ends(p.fd).is_none() {
            return None;
        }
        let opts = moving::Opts {
            passcred: false,
            ..moving::opts(p.fd)
        };
        Some(Ok(connection(
            0,
            0,
            -1,
            ConnOpts {
                opts,
                seqpacket: false,
            },
        )))
    }

    fn relayed_as_stdio(&self, why: Purpose) -> bool {
        why == Purpose::Checkpoint
    }

    fn leads_out(&self, _f: &FdState, _fds: &[FdState]) -> Option<String> {
        Some("a connection to another process".into())
    }

    fn stream(&self, f: &FdState, _fds: &[FdState]) -> Option<Result<Stream, Error>> {
        let fd = f.fd;
        Some(
            moving::tcp_ends(fd)
                .map(|ends| Stream::Tcp(ends, crate::streams::sock::ino_of(fd)))
                .ok_or_else(|| Error::other("the TCP connection is not connected").fd(fd)),
        )
    }

    fn conn_opts(&self, k: &FdKind) -> Option<ConnOpts> {
        let FdKind::Tcp {
            flags,
            nodelay,
            keepalive,
            pipe,
            seqpacket,
            passcred,
            ..
        } = *k
        else {
            return None;
        };
        Some(ConnOpts {
            opts: moving::Opts {
                flags,
                nodelay,
                keepalive,
                pipe,
                passcred,
            },
            seqpacket,
        })
    }

    /// The bytes in flight for this process go in the image (drained first,
    /// even if the move fails: a reconnection here is refilled with them).
    fn hand_over(&self, f: &mut FdState, h: &HandOver) -> Result<(), Error> {
        let fd = f.fd;
        let FdKind::Tcp {
            id,
            alias_of,
            pending,
            wr_shut,
            ..
        } = &mut f.kind
        else {
            return Ok(());
        };
        if *id == 0 || *alias_of >= 0 {
            return Ok(());
        }
        if h.kept.contains(id) {
            // Nobody at the other end drains or shuts anything: what is
            // queued now is taken, what comes later the agent relays.
            (*pending, *wr_shut) = moving::take_queued(fd)?;
            return Ok(());
        }
        // The other end was a shadow's relay: a pipe read here is read to
        // its end (the shadow writes what it still had, then closes it).
        if h.relayed.contains(id) && moving::is_pipe(fd) && moving::pipe_reads(fd) {
            let (p, e) = crate::streams::placed::drain_pipe_to_eof(fd);
            *pending = p;
            *wr_shut = true;
            return e.map_or(Ok(()), Err);
        }
        (*pending, *wr_shut) = moving::drain(fd)?;
        Ok(())
    }

    /// Connected again from here, refilled, under its number.
    fn take_back(&self, f: &FdState) {
        let FdKind::Tcp {
            id, alias_of, pipe, ..
        } = f.kind
        else {
            return;
        };
        let r = if alias_of >= 0 {
            // Our fd a copy of another of ours.
            crate::sys::fd::dup3(alias_of, f.fd, 0)
                .map(|()| moving::note_pipe_born(f.fd, pipe))
                .map_err(|e| Error::io("dup3", &e))
        } else if id == 0 {
            return;
        } else {
            attach(f).and_then(|new| moving::install(f.fd, new, pipe))
        };
        if let Err(e) = r {
            crate::krg_log!(
                crate::log::Level::Warn,
                "fd {}: reconnecting after a failed migration: {e}",
                f.fd
            );
        }
    }

    fn moved_away(&self) -> bool {
        true
    }

    fn restore(&self, f: &FdState, cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::Tcp { alias_of, .. } = f.kind else {
            unreachable!("Tcp::restore of {:?}", f.kind)
        };
        if alias_of < 0 {
            let new = attach(f).map_err(|e| e.fd(f.fd))?;
            return Ok(Some(new.into_raw_fd()));
        }
        // A copy of a connection placed before it (its fd is lower).
        let (tmp, _, _) = cx
            .placed
            .iter()
            .find(|(_, target, _)| *target == alias_of)
            .ok_or_else(|| {
                Error::other(format!("copy of fd {alias_of}, which is not in the image")).fd(f.fd)
            })?;
        // A copy of our own temporary fd.
        let fd = crate::sys::fd::dup(*tmp).map_err(|e| Error::io("dup", &e).fd(f.fd))?;
        Ok(Some(std::os::fd::IntoRawFd::into_raw_fd(fd)))
    }
}
