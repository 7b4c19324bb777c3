//! A pipe end. Moved with its process as a connection to the process at
//! its other end (the migration makes it a `Tcp` entry, see `tcp.rs`); made
//! again as a new pipe when its other end is in the image too (a
//! self-pipe) or held by no process, with the bytes that were in it.

#![deny(unsafe_code)]

use super::{
    high_pair, ConnOpts, FdKind, FdState, Kind, Probe, Purpose, Restoring, Sharing, Stream,
};
use crate::error::Error;
use std::os::fd::{OwnedFd, RawFd};

pub struct Pipe;

/// Whether the other end of pipe end `(ino, read)` is among `fds` too.
fn other_end_here(fds: &[FdState], ino: u64, read: bool) -> bool {
    fds.iter()
        .any(|g| matches!(g.kind, FdKind::Pipe { ino: n, read: r, .. } if n == ino && r != read))
}

impl Kind for Pipe {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        if p.ty() != libc::S_IFIFO || !p.link_s.starts_with("pipe:") {
            return None;
        }
        Some(Ok(FdKind::Pipe {
            ino: p.st.st_ino,
            read: p.flags & libc::O_ACCMODE == libc::O_RDONLY,
            flags: p.flags,
            size: crate::sys::fd::pipe_size(p.fd).unwrap_or(-1),
            pending: Vec::new(),
        }))
    }

    /// Self-pipes (both ends among `fds`) are made again from the image:
    /// the bytes in each go with its first read end (copied: the process
    /// may go on here). A checkpoint relays its standard fds (the
    /// restarting command's), so ends there do not make a self-pipe.
    fn settle(&self, fds: &mut [FdState], why: Purpose) -> Result<(), Error> {
        let counted = |f: &FdState| why == Purpose::Migration || f.fd > 2;
        let ends: Vec<(u64, bool)> = fds
            .iter()
            .filter(|f| counted(f))
            .filter_map(|f| match f.kind {
                FdKind::Pipe { ino, read, .. } => Some((ino, read)),
                _ => None,
            })
            .collect();
        let mut done: Vec<u64> = Vec::new();
        for f in fds.iter_mut().filter(|f| counted(f)) {
            let FdKind::Pipe {
                ino,
                read: true,
                ref mut pending,
                ..
            } = f.kind
            else {
                continue;
            };
            if done.contains(&ino) || !ends.contains(&(ino, false)) {
                continue;
            }
            done.push(ino);
            *pending = crate::streams::moving::peek_pipe(f.fd)?;
        }
        Ok(())
    }

    fn relayed_as_stdio(&self, why: Purpose) -> bool {
        why == Purpose::Checkpoint
    }

    fn sharing(&self, f: &FdState, fds: &[FdState], _moving: bool) -> Option<Sharing> {
        let FdKind::Pipe { ino, read, .. } = f.kind else {
            return None;
        };
        other_end_here(fds, ino, read).then(|| Sharing::Link(format!("pipe:[{ino}]")))
    }

    fn leads_out(&self, f: &FdState, fds: &[FdState]) -> Option<String> {
        let FdKind::Pipe { ino, read, .. } = f.kind else {
            return None;
        };
        (!other_end_here(fds, ino, read)).then(|| format!("pipe:[{ino}] leads to another process"))
    }

    /// One end here: its other end is some other process's, or closed.
    fn stream(&self, f: &FdState, fds: &[FdState]) -> Option<Result<Stream, Error>> {
        let FdKind::Pipe { ino, read, .. } = f.kind else {
            return None;
        };
        (!other_end_here(fds, ino, read)).then(|| Ok(Stream::Pipe(format!("pipe:[{ino}]"))))
    }

    /// A pipe end becomes a connection that sends at once, as pipes do.
    fn conn_opts(&self, k: &FdKind) -> Option<ConnOpts> {
        let FdKind::Pipe { flags, .. } = *k else {
            return None;
        };
        Some(ConnOpts::pipe(flags))
    }

    /// A pipe whose other end is closed: made again as it is, with what a
    /// read end still holds.
    fn no_peer(&self, f: &mut FdState) -> Option<Result<(), Error>> {
        let fd = f.fd;
        if let FdKind::Pipe {
            read: true,
            pending,
            ..
        } = &mut f.kind
        {
            match crate::streams::moving::peek_pipe(fd) {
                Ok(b) => *pending = b,
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }

    fn moved_away(&self) -> bool {
        true
    }

    fn restore(&self, f: &FdState, cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::Pipe {
            ino, read, flags, ..
        } = f.kind
        else {
            unreachable!("Pipe::restore of {:?}", f.kind)
        };
        cx.copy_of_end(f, ("pipe", ino), read, flags, |meta, floor| {
            new_pipe(meta, ino, floor)
        })
        .map(Some)
    }
}

/// Pipe `ino` of the image made again: its capacity, and the bytes that
/// were in it written back. Ends the image does not have are closed once
/// every fd is placed (a reader then sees the end after those bytes, a
/// writer `EPIPE`).
fn new_pipe(meta: &super::Meta, ino: u64, floor: RawFd) -> Result<(OwnedFd, OwnedFd), Error> {
    let (size, pending) = meta
        .fds
        .iter()
        .filter_map(|f| match &f.kind {
            FdKind::Pipe {
                ino: n,
                size,
                pending,
                ..
            } if *n == ino => Some((*size, pending.as_slice())),
            _ => None,
        })
        .fold((0, &[][..]), |(s, b), (s2, b2)| {
            (s.max(s2), if b.is_empty() { b2 } else { b })
        });
    let (r, w) = crate::streams::moving::pipe_holding(pending, size)?;
    high_pair(r, w, floor)
}
