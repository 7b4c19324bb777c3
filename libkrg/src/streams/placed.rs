//! The pipes of a program placed on another node (see
//! docs/architecture/remote-exec.md, "Pipes between nodes").
//!
//! A program created by a local shell and placed elsewhere would otherwise
//! have its stdio relayed by its shadow, so `a | b` with `a` on node 2 and
//! `b` on node 3 would pass through the shell's node. Before the program
//! is started there, each of its standard fds that is a pipe to another SSI
//! process is handed over like a migrating process's pipe: the process at
//! the other end (or, when that end is itself a shadow's, the program the
//! shadow relays for) is frozen and swaps its end for a connection that
//! the target node attaches to. What was in the pipe for this program goes
//! with it. A pipe whose other end cannot take part stays relayed.

#![deny(unsafe_code)]

use super::moving;
use crate::proto::{StdioKind, StreamPeer};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

/// Set by the target agent on a program whose fds 0-2 (listed, comma
/// separated) stand for pipes: ends that meet on one node again get a pipe.
pub const PIPE_FDS_ENV: &str = "KRG_PIPE_FDS";

/// Longest wait for a shadow that hands over its relay to close its end.
const EOF_TIMEOUT: Duration = Duration::from_secs(30);

/// Read pipe `fd` to its end (its last writer, a shadow handing over its
/// relay, closes it once it has written what it had). What was read, and
/// why it stopped early if it did (what was read still counts).
pub fn drain_pipe_to_eof(fd: RawFd) -> (Vec<u8>, Option<crate::error::Error>) {
    moving::read_to_end(fd, EOF_TIMEOUT, "the pipe's writer did not close it")
}

/// Turn the relayed standard fds that are pipes to other SSI processes
/// into streams the target attaches to (`StdioKind::Stream`, copies of one
/// pipe `Alias`). Nothing is changed for a pipe whose other end cannot take
/// part. Each stream held must then be attached, on the target or here
/// ([`reattach`]).
pub fn hand_over(stdio: &mut [StdioKind]) {
    // One group per pipe or FIFO: (fd link, fds).
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (fd, k) in stdio.iter().enumerate().take(3) {
        if *k != StdioKind::Relay || !moving::is_pipe(fd as RawFd) {
            continue;
        }
        let Some(link) = moving::fd_link(fd as RawFd) else {
            continue;
        };
        match groups.iter_mut().find(|(l, _)| *l == link) {
            Some((_, v)) => v.push(fd),
            None => groups.push((link, vec![fd])),
        }
    }
    // Both ends here (`prog <p >p`, say): not a stream between two
    // processes; it stays relayed.
    groups.retain(|(_, fds)| {
        let r = moving::pipe_reads(fds[0] as RawFd);
        fds.iter().all(|f| moving::pipe_reads(*f as RawFd) == r)
    });
    if groups.is_empty() {
        return;
    }
    let n = groups.len();
    let peers = match moving::freeze(
        Vec::new(),
        groups.iter().map(|(l, _)| l.clone()).collect(),
        Vec::new(),
        vec![true; n],
    ) {
        Ok(p) => p,
        Err(e) => {
            crate::krg_log!(crate::log::Level::Debug, "stdio pipes stay relayed: {e}");
            return;
        }
    };
    for ((_, fds), peer) in groups.iter().zip(peers) {
        let (id, node, relayed) = match peer {
            StreamPeer::Held { id, node } => (id, node, false),
            StreamPeer::Relayed { id, node } => (id, node, true),
            _ => continue,
        };
        let first = fds[0] as RawFd;
        let (pending, wr_shut) = if !moving::pipe_reads(first) {
            (Vec::new(), false)
        } else if relayed {
            let (b, e) = drain_pipe_to_eof(first);
            if let Some(e) = e {
                crate::krg_log!(crate::log::Level::Warn, "{e}");
            }
            (b, true)
        } else {
            match moving::drain_pipe(first) {
                Ok(x) => x,
                Err(e) => {
                    // The peer is held: it still gets its connection, with
                    // nothing in flight for this side.
                    crate::krg_log!(crate::log::Level::Warn, "{e}");
                    (Vec::new(), true)
                }
            }
        };
        stdio[fds[0]] = StdioKind::Stream {
            id,
            node,
            pending,
            wr_shut,
        };
        for f in &fds[1..] {
            stdio[*f] = StdioKind::Alias(fds[0] as u8);
        }
    }
}

/// The program was not started elsewhere after all: attach its streams
/// here, under their fd numbers, as pipes' stand-ins.
pub fn reattach(stdio: &[StdioKind]) {
    for (fd, k) in stdio.iter().enumerate() {
        let StdioKind::Stream {
            id,
            node,
            pending,
            wr_shut,
        } = k
        else {
            continue;
        };
        let new = match moving::attach(*id, *node, pending.clone(), *wr_shut, true, false) {
            Ok(s) => s,
            Err(e) => {
                crate::log::emit(format_args!(
                    "krg: fd {fd}: reconnecting the pipe here failed ({e}): it is lost"
                ));
                continue;
            }
        };
        let copies: Vec<(RawFd, std::os::fd::OwnedFd)> = stdio
            .iter()
            .enumerate()
            .filter(|(_, a)| **a == StdioKind::Alias(fd as u8))
            .filter_map(|(f, _)| new.try_clone().ok().map(|c| (f as RawFd, c)))
            .collect();
        for (f, s) in std::iter::once((fd as RawFd, new)).chain(copies) {
            if let Err(e) = moving::install(f, s, true) {
                crate::log::emit(format_args!("krg: {e}"));
            }
        }
    }
}

/// The program runs elsewhere with these streams: the shadow lets go of
/// its ends (fd numbers kept, on `/dev/null`, so that nothing the shadow
/// opens lands on a standard fd).
pub fn let_go(stdio: &[StdioKind]) {
    for (fd, k) in stdio.iter().enumerate() {
        let stream = match k {
            StdioKind::Stream { .. } => true,
            StdioKind::Alias(j) => matches!(stdio.get(*j as usize), Some(StdioKind::Stream { .. })),
            _ => false,
        };
        if stream {
            park(fd as RawFd);
        }
    }
}

/// `/dev/null` under `fd` in place of what it held.
pub(crate) fn park(fd: RawFd) {
    if let Ok(n) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = crate::sys::fd::dup2(n.as_raw_fd(), fd);
    }
}

/// In a program started for a shadow: note the standard fds that stand for
/// pipes (`KRG_PIPE_FDS`), and drop the variable (its children's fds are
/// their own business).
pub fn note_from_env() {
    let Some(v) = crate::rt::take_env(PIPE_FDS_ENV) else {
        return;
    };
    for fd in String::from_utf8_lossy(&v)
        .split(',')
        .filter_map(|f| f.trim().parse::<RawFd>().ok())
        .filter(|f| (0..3).contains(f))
    {
        moving::note_pipe_born(fd, true);
    }
}
