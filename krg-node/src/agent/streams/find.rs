//! Who holds the other end of a moving stream on this node: the TCP table,
//! the fd links of every process, and the rules for a holder that may
//! take part (one process, SSI, not being placed, its handler in place).

use super::*;

/// A socket address as /proc/net/tcp{,6} spells it (hex, kernel byte
/// order), both forms of an IPv4 address (plain and IPv4-mapped).
pub(super) fn proc_net_forms(a: &SocketAddr) -> Vec<String> {
    let v4 = |ip: Ipv4Addr| format!("{:08X}:{:04X}", u32::from_ne_bytes(ip.octets()), a.port());
    let v6 = |ip: Ipv6Addr| {
        let o = ip.octets();
        let mut s = String::new();
        for w in o.chunks(4) {
            s.push_str(&format!(
                "{:08X}",
                u32::from_ne_bytes([w[0], w[1], w[2], w[3]])
            ));
        }
        format!("{s}:{:04X}", a.port())
    };
    match a.ip() {
        IpAddr::V4(ip) => vec![v4(ip), v6(ip.to_ipv6_mapped())],
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v) => vec![v4(v), v6(ip)],
            None => vec![v6(ip)],
        },
    }
}

/// The TCP connections of this node: `(local, peer, socket inode)` as
/// /proc/net/tcp{,6} spell them (one read for all the ends asked).
pub(super) fn tcp_table() -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let t = std::fs::read_to_string(f).unwrap_or_default();
        for line in t.lines().skip(1) {
            let w: Vec<&str> = line.split_whitespace().collect();
            if let (true, Some(ino)) = (w.len() > 9, w.get(9).and_then(|v| v.parse().ok())) {
                out.push((w[1].to_string(), w[2].to_string(), ino));
            }
        }
    }
    out
}

/// The socket inode of the TCP connection `local` -> `peer` in `table`.
pub(super) fn tcp_inode(
    table: &[(String, String, u64)],
    local: &SocketAddr,
    peer: &SocketAddr,
) -> Option<u64> {
    let (l, p) = (proc_net_forms(local), proc_net_forms(peer));
    table
        .iter()
        .find(|(a, b, _)| l.contains(a) && p.contains(b))
        .map(|(_, _, ino)| *ino)
}

/// A copy of the socket of kernel pid `mover` that is its TCP connection
/// `local` -> `peer` (addresses as the mover sees them).
pub(super) fn mover_socket(
    mover: i32,
    local: &str,
    peer: &str,
) -> Result<std::os::fd::OwnedFd, String> {
    let (Ok(l), Ok(p)) = (local.parse::<SocketAddr>(), peer.parse::<SocketAddr>()) else {
        return Err("bad socket address".into());
    };
    let ino = tcp_inode(&tcp_table(), &l, &p).ok_or("no such connection on this node")?;
    let link = format!("socket:[{ino}]");
    let fd = std::fs::read_dir(format!("/proc/{mover}/fd"))
        .map_err(|e| format!("its fds: {e}"))?
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == link.as_str()))
        .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .ok_or("the mover does not hold it")?;
    super::super::sys::pidfd_getfd(mover, fd).map_err(|e| e.to_string())
}

/// Every `(kernel pid, fd)` of this node whose fd link is one of `want`
/// (`socket:[N]`, `pipe:[N]`), by link: one walk of /proc for all.
pub(in crate::agent) fn holders(want: &[String]) -> HashMap<String, Vec<(i32, i32)>> {
    let mut out: HashMap<String, Vec<(i32, i32)>> = HashMap::new();
    // Not the agent's own fds (its many sockets are most of the walk; a
    // stream it holds is in a hand-over, never a process's end).
    let me = std::process::id() as i32;
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        for f in std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(l) = std::fs::read_link(f.path()) else {
                continue;
            };
            let Some(l) = l.to_str().filter(|l| want.iter().any(|w| w == l)) else {
                continue;
            };
            if let Some(fd) = f.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.entry(l.to_string()).or_default().push((pid, fd));
            }
        }
    }
    out
}

/// What each end is: `(description, fd link, mover's kernel pid or 0)`, or
/// why it is not here.
pub(super) fn links_of(
    ends: &[End],
    relays: &HashMap<u64, u64>,
) -> Vec<Result<(String, String, i32), String>> {
    let table = if ends.iter().any(|e| matches!(e, End::Tcp(..))) {
        tcp_table()
    } else {
        Vec::new()
    };
    let peers = if ends
        .iter()
        .any(|e| matches!(e, End::Unix { .. } | End::Relay { .. }))
    {
        libkrg::streams::unix::peers()
    } else {
        Ok(HashMap::new())
    };
    ends.iter()
        .map(|e| match e {
            End::Tcp(local, peer) => {
                let what = format!("TCP connection {peer} -> {local}");
                let (Ok(l), Ok(p)) = (local.parse::<SocketAddr>(), peer.parse::<SocketAddr>())
                else {
                    return Err(format!("{what}: bad socket address"));
                };
                let ino = tcp_inode(&table, &l, &p)
                    .ok_or_else(|| format!("{what}: no such connection on this node"))?;
                Ok((what, format!("socket:[{ino}]"), 0))
            }
            End::Pipe { link, mover } => Ok((
                format!("{link} of kernel pid {mover}"),
                link.clone(),
                *mover,
            )),
            End::Unix { ino, mover } => {
                let what = format!("UNIX socket socket:[{ino}] of kernel pid {mover}");
                let peer = peers
                    .as_ref()
                    .map_err(|e| format!("{what}: its peer: {e}"))?
                    .get(ino)
                    .copied()
                    .ok_or_else(|| format!("{what}: no peer (not connected?)"))?;
                Ok((what, format!("socket:[{peer}]"), *mover))
            }
            End::Relay { id } => {
                let what = format!("seqpacket relay {id:#x}");
                let peer = relays
                    .get(id)
                    .and_then(|ino| peers.as_ref().ok()?.get(ino).copied())
                    .ok_or_else(|| format!("{what}: not relayed here (any more)"))?;
                Ok((what, format!("socket:[{peer}]"), 0))
            }
        })
        .collect()
}

/// Whether `link` is an fd link a pipe end or FIFO has: `pipe:[N]`, or a
/// FIFO's absolute path.
pub(super) fn is_pipe_link(link: &str) -> bool {
    link.strip_prefix("pipe:[")
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        || link.starts_with('/')
}

/// Whether the parent of `mover` holds the same end of pipe `link` as
/// `mover` does, at a number above 2: the pipe a shell made for a pipeline,
/// which it closes once it has forked the stage (a shell that shares its
/// own stdin or stdout with a child keeps it, and is not waited for).
pub(super) fn parent_shares(
    link: &str,
    mover: i32,
    all: &HashMap<String, Vec<(i32, i32)>>,
) -> bool {
    if mover == 0 || !link.starts_with("pipe:") {
        return false;
    }
    let Some(ppid) = super::super::procs::table::read_stat(mover).map(|s| s.ppid) else {
        return false;
    };
    let hs = all.get(link).map(Vec::as_slice).unwrap_or_default();
    let Some(mine) = hs
        .iter()
        .find(|(p, _)| *p == mover)
        .and_then(|(p, fd)| reads(*p, *fd))
    else {
        return false;
    };
    hs.iter()
        .any(|(p, fd)| *p == ppid && *fd > 2 && reads(*p, *fd) == Some(mine))
}

/// Whether fd `fd` of kernel pid `pid` is open read-only (a pipe's read
/// end) or write-only, from its fdinfo; `None` when open both ways (a FIFO
/// opened `O_RDWR` is its own reader and writer).
pub(super) fn reads(pid: i32, fd: i32) -> Option<bool> {
    match accmode(pid, fd)? {
        libc::O_RDONLY => Some(true),
        libc::O_WRONLY => Some(false),
        _ => None,
    }
}

/// Why the pipe, FIFO or socket `link`, read by kernel pid `mover`, cannot be
/// relayed for it: other processes read it too (`None` if none does).
pub(super) fn shared_read(
    link: &str,
    mover: i32,
    all: &HashMap<String, Vec<(i32, i32)>>,
) -> Option<String> {
    let hs = all.get(link)?;
    // O_RDWR (a FIFO opened both ways) reads too. A socket is always open
    // both ways: held as stdout or stderr it is taken as written only.
    let socket = link.starts_with("socket:[");
    let reader = |p: i32, fd: i32| {
        if socket {
            fd != 1 && fd != 2
        } else {
            reads(p, fd) != Some(false)
        }
    };
    let mine: Vec<i32> = hs
        .iter()
        .filter(|(p, fd)| *p == mover && reader(*p, *fd))
        .map(|(_, fd)| *fd)
        .collect();
    let theirs: Vec<(i32, i32)> = hs
        .iter()
        .filter(|(p, fd)| *p != mover && reader(*p, *fd))
        .copied()
        .collect();
    (!mine.is_empty() && !theirs.is_empty()).then(|| {
        format!(
            "fds {mine:?} ({link}): other processes read it too (kernel pid, fd: {theirs:?}); \
             a relay would read ahead of this process and take bytes that are theirs: not movable"
        )
    })
}

/// How fd `fd` of kernel pid `pid` is open (`O_RDONLY`, `O_WRONLY`,
/// `O_RDWR`), from its fdinfo.
pub(in crate::agent) fn accmode(pid: i32, fd: i32) -> Option<i32> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let flags = t
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())?;
    Some(flags & libc::O_ACCMODE)
}

impl Streams {
    /// Who holds the end `what` (fd link `link`; `mover` holds the other
    /// end of a pipe) on this node, from `all` (every holder by link).
    pub(super) fn holder_of(
        &self,
        what: &str,
        link: &str,
        mover: i32,
        all: &HashMap<String, Vec<(i32, i32)>>,
    ) -> Found {
        let every = all.get(link).cloned().unwrap_or_default();
        let hs: Vec<(i32, i32)> = every.iter().filter(|(p, _)| *p != mover).copied().collect();
        // A program being placed whose parent (a shell) still holds the
        // pipe it made for it: the shell is about to fork the stage at the
        // other end and close its copy, or reads it itself (`$(...)`, on
        // this node anyway). Not swapped: relayed, until that stage, placed
        // in turn, takes the relay over.
        if mover != 0 && link.starts_with("pipe:") && self.is_placing(mover) {
            if let Some(ppid) = super::super::procs::table::read_stat(mover).map(|s| s.ppid) {
                if hs.iter().any(|(p, fd)| *p == ppid && *fd > 2) {
                    return Err(foreign(format!(
                        "{what}: still held by the shell that made it"
                    )));
                }
            }
        }
        if mover != 0 && is_pipe_link(link) && !hs.is_empty() {
            // The other end, and only it: a pipe or FIFO with two writers
            // (or readers, or one both ways) is not a connection between two
            // processes.
            let mine = every
                .iter()
                .find(|(p, _)| *p == mover)
                .and_then(|(p, fd)| reads(*p, *fd));
            let theirs: Vec<Option<bool>> = hs.iter().map(|(p, fd)| reads(*p, *fd)).collect();
            if mine.is_none() || theirs.iter().any(|t| t.is_none() || *t == mine) {
                return Err(foreign(format!(
                    "{what}: other processes hold the same end of it, or both (kernel pid, fd: {hs:?}): not movable yet"
                )));
            }
        }
        let (kpid, fds) = match hs.as_slice() {
            // A pipe whose other end is closed.
            [] if mover != 0 => return Err(StreamPeer::Nobody),
            [] => {
                return Err(foreign(format!(
                    "{what}: its peer end on node {} is held by no process (closed?)",
                    self.node.node_id()
                )))
            }
            // Several fds of one process (dup): all handed over together.
            [(k, _), ..] if hs.iter().all(|(p, _)| p == k) => {
                (*k, hs.iter().map(|(_, fd)| *fd).collect::<Vec<i32>>())
            }
            _ => {
                return Err(foreign(format!(
                    "{what}: its other end is shared by several processes (kernel pid, fd: {hs:?}): not movable yet"
                )))
            }
        };
        let g = self.node.procs().translate(kpid).ok_or_else(|| {
            foreign(format!(
                "{what}: its other end (kernel pid {kpid} on node {}) is not an SSI process",
                self.node.node_id()
            ))
        })?;
        // A shadow left here by a program that came back (placed away, then
        // placed here again at an exec: `sh -c 'exec sed'`): the gpid's
        // entry is the program's now, and an order for the gpid would reach
        // the program, never the shadow (the mover waited a minute). The
        // shadow relays the end.
        if self.node.procs().get(g).is_some_and(|p| p.kpid != kpid) {
            return Err(foreign(format!(
                "{what}: its other end is a shadow of pid {g}, whose program came back to node {}: it relays it",
                self.node.node_id()
            )));
        }
        // Being placed itself: its end is relayed once it runs there, and
        // handed over when it is asked then (not frozen now: it is busy
        // becoming a shadow, with its signals blocked).
        if self.node.procs().get(g).is_some_and(|p| p.placing) {
            return Err(foreign(format!(
                "{what}: its other end's process (pid {g}) is being placed on another node"
            )));
        }
        // A shadow relays the standard fds of a program that runs
        // elsewhere: a pipe it relays is handed over to that program;
        // anything else stays (it leads to what the shadow holds).
        if let Some(node) = self.node.procs().get(g).and_then(|p| p.running_on) {
            if link.starts_with("pipe:") {
                return Ok((g, kpid, fds, Some(node)));
            }
            return Err(foreign(format!(
                "{what}: its other end is the shadow of pid {g}, which relays it"
            )));
        }
        // Signal 62 would kill a process without libkrg's handler (not yet
        // installed, or a program that does not load it).
        if !super::super::procs::table::catches(kpid, libkrg::proto::CKPT_SIGNAL) {
            return Err(foreign(format!(
                "{what}: its other end's process (pid {g}) does not take part (libkrg's signal handler is not installed)"
            )));
        }
        Ok((g, kpid, fds, None))
    }

    /// Whether local kernel pid `kpid` is being placed on another node.
    pub(super) fn is_placing(&self, kpid: i32) -> bool {
        let t = self.node.procs();
        t.translate(kpid)
            .and_then(|g| t.get(g))
            .is_some_and(|p| p.placing)
    }

    /// Before the holders of `links` are judged: wait (a little) for those
    /// not ready to take part yet. A process being placed on another node
    /// is waited for until it runs there (its end is then its shadow's
    /// relay), if it came before the mover (two placed at once must not
    /// wait for each other); a program not started yet (started for a
    /// shadow, restored, or exec'd by a child that has not said Hello),
    /// until it catches signal 62 (it would die of it before) or is being
    /// placed itself.
    pub(super) async fn settle(
        &self,
        links: &[Result<(String, String, i32), String>],
        all: &HashMap<String, Vec<(i32, i32)>>,
    ) {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        for (_, link, mover) in links.iter().flatten() {
            let mover_g = (*mover != 0)
                .then(|| self.node.procs().translate(*mover))
                .flatten();
            for (kpid, _) in all.get(link).into_iter().flatten() {
                if *kpid == *mover {
                    continue;
                }
                loop {
                    let ready = {
                        let t = self.node.procs();
                        match t.translate(*kpid).and_then(|g| t.get(g)) {
                            None => true,
                            Some(p) if p.placing => mover_g.is_none_or(|m| p.gpid >= m),
                            Some(p) if p.running_on.is_some() => true,
                            // Not started yet: a program started for a
                            // shadow, an image being restored, a child that
                            // exec'd and has not said Hello (a forked one
                            // still has its parent's handler).
                            Some(p) => {
                                use libkrg::caps::Caps;
                                let will_catch = p.caps_eff.contains(Caps::MIGRATE)
                                    || p.caps_eff.contains(Caps::CHECKPOINT);
                                !(will_catch && (p.skip_place || p.restoring || !p.greeted))
                                    || super::super::procs::table::catches(
                                        *kpid,
                                        libkrg::proto::CKPT_SIGNAL,
                                    )
                            }
                        }
                    };
                    if ready || tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
        }
    }
}
