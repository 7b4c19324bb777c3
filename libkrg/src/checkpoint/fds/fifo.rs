//! A FIFO opened by its path, read-only or write-only, whose other end is
//! on this node (the kernel's FIFO): moved with its process as a
//! connection to the SSI process holding its other end (the migration
//! makes it a `Tcp` entry), like a pipe end. `path` is its fd link.

#![deny(unsafe_code)]

use super::{ConnOpts, FdKind, FdState, Kind, Probe, Purpose, Restoring, Stream};
use crate::error::Error;
use std::os::fd::RawFd;

pub struct Fifo;

impl Kind for Fifo {
    /// One opened both ways (`O_RDWR`: its own reader and writer) moves
    /// only as a standard fd (relayed).
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        let access = p.flags & libc::O_ACCMODE;
        if p.ty() != libc::S_IFIFO || access == libc::O_RDWR {
            return None;
        }
        Some(Ok(FdKind::Fifo {
            path: p.link.clone(),
            read: access == libc::O_RDONLY,
            flags: p.flags,
        }))
    }

    /// A FIFO both of whose ends are among `fds` (opened once each way):
    /// as a standard fd it is relayed; elsewhere the move is refused (made
    /// again as a pipe, its path would no longer reach it).
    fn settle(&self, fds: &mut [FdState], why: Purpose) -> Result<(), Error> {
        if why != Purpose::Migration {
            return Ok(());
        }
        let ends: Vec<(Vec<u8>, bool)> = fds
            .iter()
            .filter_map(|f| match &f.kind {
                FdKind::Fifo { path, read, .. } => Some((path.clone(), *read)),
                _ => None,
            })
            .collect();
        for f in fds.iter_mut() {
            let FdKind::Fifo { path, read, .. } = &f.kind else {
                continue;
            };
            if !ends.iter().any(|(p, r)| p == path && r != read) {
                continue;
            }
            if f.fd > 2 {
                return Err(
                    Error::refused("this process holds both its ends: not movable")
                        .fd(f.fd)
                        .path(format!("FIFO {}", String::from_utf8_lossy(path))),
                );
            }
            f.kind = FdKind::Relay;
        }
        Ok(())
    }

    fn relayed_as_stdio(&self, why: Purpose) -> bool {
        why == Purpose::Checkpoint
    }

    fn leads_out(&self, f: &FdState, _fds: &[FdState]) -> Option<String> {
        let FdKind::Fifo { path, .. } = &f.kind else {
            return None;
        };
        Some(format!("FIFO {} is open", String::from_utf8_lossy(path)))
    }

    fn stream(&self, f: &FdState, _fds: &[FdState]) -> Option<Result<Stream, Error>> {
        let FdKind::Fifo { path, .. } = &f.kind else {
            return None;
        };
        Some(Ok(Stream::Pipe(String::from_utf8_lossy(path).into_owned())))
    }

    fn conn_opts(&self, k: &FdKind) -> Option<ConnOpts> {
        let FdKind::Fifo { flags, .. } = *k else {
            return None;
        };
        Some(ConnOpts::pipe(flags))
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::Fifo { path, .. } = &f.kind else {
            unreachable!("Fifo::restore of {:?}", f.kind)
        };
        Err(Error::other(format!(
            "FIFO {} was not moved (only a migration moves it)",
            String::from_utf8_lossy(path)
        ))
        .fd(f.fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(fd: i32, path: &str, read: bool) -> FdState {
        FdState {
            fd,
            cloexec: false,
            kind: FdKind::Fifo {
                path: path.as_bytes().to_vec(),
                read,
                flags: if read { libc::O_RDONLY } else { libc::O_WRONLY },
            },
        }
    }

    #[test]
    fn a_fifo_whose_both_ends_are_here_is_relayed_as_stdio_and_refused_above() {
        let settle = |fds: &mut [FdState]| Fifo.settle(fds, Purpose::Migration);
        // One end of each of two FIFOs: both move.
        let mut fds = vec![fifo(0, "/a", true), fifo(4, "/b", false)];
        settle(&mut fds).unwrap();
        assert!(fds.iter().all(|f| matches!(f.kind, FdKind::Fifo { .. })));
        // Both ends of one, as stdin and stdout: relayed.
        let mut fds = vec![fifo(0, "/a", true), fifo(1, "/a", false)];
        settle(&mut fds).unwrap();
        assert!(fds.iter().all(|f| f.kind == FdKind::Relay));
        // Both ends of one, one above 2: refused, naming it.
        let mut fds = vec![fifo(0, "/a", true), fifo(5, "/a", false)];
        let e = settle(&mut fds).unwrap_err().to_string();
        assert!(e.contains("fd 5") && e.contains("/a"), "{e}");
    }
}
