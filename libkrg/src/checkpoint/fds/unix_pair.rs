//! One end of a UNIX socketpair whose two ends are both the process's (a
//! self-pipe made of a socketpair, as asyncio's), made again as a new
//! socketpair with what was queued in each end.

#![deny(unsafe_code)]

use super::{high_pair, FdKind, FdState, Kind, Purpose, Restoring};
use crate::error::Error;
use std::os::fd::{OwnedFd, RawFd};

pub struct UnixPair;

impl Kind for UnixPair {
    /// UNIX stream sockets whose peers are among `fds` become the ends of
    /// a pair, with what is queued in each (left in place: the process may
    /// go on here).
    fn settle(&self, fds: &mut [FdState], _why: Purpose) -> Result<(), Error> {
        // (index, socket inode, fd number)
        let socks: Vec<(usize, u64, i32)> = fds
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match f.kind {
                FdKind::UnixStream { ino, .. } => Some((i, ino, f.fd)),
                _ => None,
            })
            .collect();
        if socks.len() < 2 {
            return Ok(());
        }
        let peers =
            crate::streams::unix::peers().map_err(|e| Error::io("UNIX socket peers", &e))?;
        let fd_of = |ino: u64| socks.iter().find(|s| s.1 == ino).map(|s| s.2);
        let mut done: Vec<u64> = Vec::new();
        for &(i, ino, fd) in &socks {
            let Some(peer) = peers.get(&ino).copied().filter(|p| *p != ino) else {
                continue;
            };
            let Some(peer_fd) = fd_of(peer) else {
                continue;
            };
            let FdKind::UnixStream {
                flags,
                seqpacket,
                passcred,
                ..
            } = fds[i].kind
            else {
                continue;
            };
            let pending = if done.contains(&ino) {
                Vec::new()
            } else {
                done.push(ino);
                crate::streams::unix::queued(fd, peer_fd, seqpacket)?
            };
            fds[i].kind = FdKind::UnixPair {
                pair: ino.min(peer),
                first: ino < peer,
                seqpacket,
                flags,
                passcred,
                pending,
            };
        }
        Ok(())
    }

    /// Made again from the image wherever the process goes.
    fn relayed_as_stdio(&self, _why: Purpose) -> bool {
        false
    }

    fn moved_away(&self) -> bool {
        true
    }

    fn restore(&self, f: &FdState, cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::UnixPair {
            pair,
            first,
            flags,
            passcred,
            ..
        } = f.kind
        else {
            unreachable!("UnixPair::restore of {:?}", f.kind)
        };
        let fd = cx.copy_of_end(f, ("socketpair", pair), first, flags, |meta, floor| {
            new_pair(meta, pair, floor)
        })?;
        if passcred {
            crate::streams::seqpacket::pass_credentials(fd);
        }
        Ok(Some(fd))
    }
}

/// The socketpair `pair` of the image made again (its first end, its
/// second), each end holding what was queued for it, above `floor`.
fn new_pair(meta: &super::Meta, pair: u64, floor: RawFd) -> Result<(OwnedFd, OwnedFd), Error> {
    let queued = |end_first: bool| {
        meta.fds
            .iter()
            .find_map(|f| match &f.kind {
                FdKind::UnixPair {
                    pair: p,
                    first,
                    pending,
                    ..
                } if *p == pair && *first == end_first && !pending.is_empty() => {
                    Some(pending.as_slice())
                }
                _ => None,
            })
            .unwrap_or_default()
    };
    let seqpacket = meta
        .fds
        .iter()
        .any(|f| matches!(f.kind, FdKind::UnixPair { pair: p, seqpacket: true, .. } if p == pair));
    let (a, b) = crate::streams::unix::pair_holding(seqpacket, queued(true), queued(false))?;
    high_pair(a, b, floor)
}
