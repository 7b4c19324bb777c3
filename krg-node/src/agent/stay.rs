//! Whether a new program may run on another node at all.
//!
//! A program placed elsewhere gets its standard fds there (relayed by its
//! shadow, or as direct connections for pipes; see
//! docs/architecture/remote-exec.md) and nothing else. Two things would make
//! it behave differently from the same program run here, so the agent keeps
//! it here whatever the scheduler says (a pin included):
//!
//! - **A stdin another process also reads** (the pipe of a `while read`
//!   loop, the shell's terminal, a pipe shared by a group of readers). The
//!   shadow relays stdin as data comes, whether the program reads it or not;
//!   bytes it takes would never come back to the other readers (`seq 1 100
//!   | while read x; do /bin/echo $x; done | wc -l` printed 1 or 2). A pipe
//!   that can only give end of file (no writer, nothing left in it: GNU
//!   make's stdin for parallel jobs) takes nothing from anyone.
//! - **An inherited fd above 2** (`3>file`, a pipe a launcher passes by
//!   number): it would not exist there. Close-on-exec fds do not count (the
//!   exec closes them; the shadow does as well when the program is placed
//!   at its `execve`).
//!
//! A shell that has just forked a pipeline stage holds its copy of the
//! stage's pipe for a moment (at a number above 2) before closing it, and
//! so does each stage it forked, until it has put its own ends in place:
//! those holders are waited for, briefly, instead of counted.

use super::node::Node;
use super::orders::Orders;
use super::streams::{accmode, holders};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// `O_CLOEXEC` as fdinfo's `flags:` shows it.
const FDINFO_CLOEXEC: i32 = 0o2000000;

/// How long a shell's copy of a stage's pipe is waited for.
const PARENT_CLOSE_WAIT: Duration = Duration::from_millis(60);

/// One fd of the process being placed: number, link, fdinfo flags.
struct Fd {
    num: i32,
    link: String,
    flags: i32,
}

/// The fds of kernel pid `kpid` that survive an exec.
fn inherited(kpid: i32) -> Vec<Fd> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{kpid}/fd")) else {
        return v;
    };
    for e in dir.flatten() {
        let Some(num) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let flags = std::fs::read_to_string(format!("/proc/{kpid}/fdinfo/{num}"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
            });
        // Gone meanwhile (or unreadable): nothing to carry.
        let Some(flags) = flags else { continue };
        if flags & FDINFO_CLOEXEC != 0 {
            continue;
        }
        v.push(Fd {
            num,
            link: link.to_string_lossy().into_owned(),
            flags,
        });
    }
    v.sort_by_key(|f| f.num);
    v
}

/// Whether a stdin with fd link `link` can be read by others at all: a
/// pipe, a socket, a FIFO, a terminal. `/dev/null` and regular files opened
/// read-only are not relayed (opened on the target, at the same offset).
fn shareable_stdin(kpid: i32, fd: &Fd) -> bool {
    if fd.flags & libc::O_ACCMODE == libc::O_WRONLY {
        return false;
    }
    if fd.link.starts_with("pipe:") || fd.link.starts_with("socket:") {
        return true;
    }
    let Ok(m) = std::fs::metadata(format!("/proc/{kpid}/fd/{}", fd.num)) else {
        return false;
    };
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_fifo() || t.is_socket() {
        return true;
    }
    if t.is_char_device() {
        use std::os::unix::fs::MetadataExt;
        // /dev/null (1, 3) is made again on the target.
        return m.rdev() != libc::makedev(1, 3);
    }
    // A regular file opened for writing too is relayed (it is not opened
    // on the target), so read ahead.
    t.is_file() && fd.flags & libc::O_ACCMODE == libc::O_RDWR
}

/// Whether the pipe `link` (fd 0 of kernel pid `kpid`) can never give
/// anything but end of file: no process holds its write end and nothing
/// is left in it. GNU make gives its parallel jobs such a stdin (its
/// "bad stdin", whose read end it keeps), so that no job reads the real
/// one; relaying it takes nothing from anyone.
fn dead_pipe(kpid: i32, link: &str, all: &HashMap<String, Vec<(i32, i32)>>) -> bool {
    let writer = all
        .get(link)
        .into_iter()
        .flatten()
        .any(|(p, fd)| accmode(*p, *fd).is_none_or(|m| m != libc::O_RDONLY));
    if writer {
        return false;
    }
    let Ok(end) = super::sys::pidfd_getfd(kpid, 0) else {
        return false;
    };
    super::sys::queued(std::os::fd::AsFd::as_fd(&end)).is_ok_and(|n| n == 0)
}

/// The other readers of `link` (kernel pid, fd) among `all`.
fn readers(link: &str, me: i32, all: &HashMap<String, Vec<(i32, i32)>>) -> Vec<(i32, i32)> {
    all.get(link)
        .into_iter()
        .flatten()
        .filter(|(p, fd)| *p != me && accmode(*p, *fd).is_some_and(|m| m != libc::O_WRONLY))
        .copied()
        .collect()
}

/// Whether a program the scheduler placed elsewhere goes: it does not
/// while a stream swap waits for it, or while it shares what cannot move.
#[derive(Debug)]
pub struct Stay {
    node: Arc<Node>,
    orders: Arc<Orders>,
}

impl Stay {
    pub fn new(node: Arc<Node>, orders: Arc<Orders>) -> Stay {
        Stay { node, orders }
    }

    /// The scheduler chose `place` for the new program of gpid `gpid`
    /// (local kernel pid `kpid`): the node it goes to, or 0 when it stays
    /// here after all (see [`Stay::must_stay`]). A program that goes is
    /// marked `placing`: until its RemoteExec is through, a process holding
    /// the other end of one of its pipes waits for it (from before the
    /// check, which may wait a little: a hand-over meanwhile must not take
    /// it for a process that stays).
    pub(super) async fn place_or_stay(&self, gpid: i32, kpid: i32, place: u32) -> u32 {
        if place == 0 || place == self.node.node_id() {
            return 0;
        }
        // A stream swap ordered just before (its other end moves) is taken
        // by its handler while it waits for this answer: placed first, it
        // would block its signals and never take it. Waited for a little,
        // else it stays.
        let until = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
        while !self.orders.mark_placing(gpid, kpid) {
            if tokio::time::Instant::now() >= until {
                tracing::debug!("pid {gpid} stays on this node: a stream swap waits for it");
                return 0;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let Some(why) = self.must_stay(kpid).await else {
            return place;
        };
        tracing::debug!("pid {gpid} stays on this node: {why}");
        if let Some(p) = self.node.procs().get_mut(gpid) {
            p.placing = false;
        }
        0
    }

    /// Why the new program of local kernel pid `kpid` must run on this node
    /// (see the module doc), or `None` if it may run elsewhere.
    pub(super) async fn must_stay(&self, kpid: i32) -> Option<String> {
        let fds = inherited(kpid);
        if let Some(f) = fds.iter().find(|f| f.num > 2) {
            return Some(format!(
                "its fd {} ({}) would not reach it on another node",
                f.num, f.link
            ));
        }
        let stdin = fds.iter().find(|f| f.num == 0)?;
        if !shareable_stdin(kpid, stdin) {
            return None;
        }
        let want = vec![stdin.link.clone()];
        let ppid = super::procs::table::read_stat(kpid).map(|s| s.ppid);
        let deadline = tokio::time::Instant::now() + PARENT_CLOSE_WAIT;
        loop {
            let all = holders(&want);
            let others = readers(&stdin.link, kpid, &all);
            if others.is_empty()
                || (stdin.link.starts_with("pipe:") && dead_pipe(kpid, &stdin.link, &all))
            {
                return None;
            }
            // Only the parent or its other children, at numbers above 2: a
            // shell that made the pipe for this stage, and the stages it
            // forked meanwhile, about to close their copies.
            let transient = stdin.link.starts_with("pipe:")
                && others.iter().all(|(p, fd)| {
                    *fd > 2
                        && (Some(*p) == ppid
                            || super::procs::table::read_stat(*p).map(|s| s.ppid) == ppid)
                });
            if !transient || tokio::time::Instant::now() >= deadline {
                let who: Vec<String> = others
                    .iter()
                    .map(|(p, fd)| {
                        let g = self.node.procs().translate(*p).unwrap_or(*p);
                        let comm =
                            std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                        format!("pid {g} ({}, fd {fd})", comm.trim_end())
                    })
                    .collect();
                return Some(format!(
                    "its stdin ({}) is read by {} too: placed elsewhere, it would take input that is theirs",
                    stdin.link,
                    who.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
