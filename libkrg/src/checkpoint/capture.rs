//! Taking the image, from inside: runs in the capturing thread while every
//! other thread is parked in the checkpoint handler. Allocations come from
//! the capture arena ([`super::alloc`]); nothing here may call malloc,
//! `opendir` or take a lock another thread could hold.

use super::image::{
    self, FdKind, FdState, FileId, Meta, Region, RegionKind, SigAction, ThreadState,
};
use std::os::fd::RawFd;

const PAGE: u64 = 4096;

fn errno() -> i32 {
    crate::rt::errno()
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", crate::rt::Errno(errno()))
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq)]
pub struct MapLine {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    /// The device of the mapped file (`makedev(major, minor)`).
    pub dev: u64,
    pub inode: u64,
    pub path: String,
}

impl MapLine {
    pub fn prot(&self) -> u32 {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ as u32;
        }
        if self.write {
            p |= libc::PROT_WRITE as u32;
        }
        if self.exec {
            p |= libc::PROT_EXEC as u32;
        }
        p
    }

    /// Kernel-provided mappings that are never saved or restored.
    pub fn is_special(&self) -> bool {
        matches!(
            self.path.as_str(),
            "[vsyscall]" | "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[uprobes]"
        )
    }
}

/// Parse `/proc/self/maps` text.
pub fn parse_maps(text: &str) -> Vec<MapLine> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(off), Some(dev), Some(ino)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let dev = dev
            .split_once(':')
            .and_then(|(a, b)| {
                Some(libc::makedev(
                    u32::from_str_radix(a, 16).ok()?,
                    u32::from_str_radix(b, 16).ok()?,
                ))
            })
            .unwrap_or(0);
        let path = it.next().unwrap_or("").trim_start().to_string();
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset), Ok(inode)) = (
            u64::from_str_radix(a, 16),
            u64::from_str_radix(b, 16),
            u64::from_str_radix(off, 16),
            ino.parse::<u64>(),
        ) else {
            continue;
        };
        let p = perms.as_bytes();
        if p.len() < 4 {
            continue;
        }
        out.push(MapLine {
            start,
            end,
            read: p[0] == b'r',
            write: p[1] == b'w',
            exec: p[2] == b'x',
            shared: p[3] == b's',
            offset,
            dev,
            inode,
            path,
        });
    }
    out
}

/// `maps` without the addresses in `[hole.0, hole.1)`. The kernel merges
/// the capture arena with an adjacent anonymous mapping of the same flags
/// (a glibc thread arena is `MAP_NORESERVE` too), so the arena may be part
/// of a longer line: only the arena's own addresses are left out, the
/// program's memory on either side stays.
pub fn without(maps: Vec<MapLine>, hole: (u64, u64)) -> Vec<MapLine> {
    if hole.0 >= hole.1 {
        return maps;
    }
    let mut out = Vec::with_capacity(maps.len() + 1);
    for m in maps {
        if m.end <= hole.0 || hole.1 <= m.start {
            out.push(m);
            continue;
        }
        if m.start < hole.0 {
            out.push(MapLine {
                end: hole.0,
                ..m.clone()
            });
        }
        if hole.1 < m.end {
            let offset = if m.inode == 0 {
                m.offset
            } else {
                m.offset + (hole.1 - m.start)
            };
            out.push(MapLine {
                start: hole.1,
                offset,
                ..m
            });
        }
    }
    out
}

/// Read a whole (proc) file with plain system calls.
pub fn read_file(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{path}: {e}"))
}

fn read_link(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read_link(path)
        .map(|p| p.into_os_string().into_encoded_bytes())
        .map_err(|e| format!("{path}: {e}"))
}

/// Entries of a directory, with getdents64 (std's `read_dir` goes through
/// libc's `opendir`, which mallocs).
pub fn list_dir_numbers(path: &str) -> Result<Vec<i32>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let mut buf = vec![0u8; 32 * 1024];
    let mut out = Vec::new();
    loop {
        // SAFETY: getdents64 writes at most buf.len() bytes into buf.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(os_err(path));
        }
        if n == 0 {
            break;
        }
        let mut off = 0usize;
        while off + 19 <= n as usize {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            if reclen == 0 || off + reclen > n as usize {
                break;
            }
            let name = &buf[off + 19..off + reclen];
            let end = name.iter().position(|c| *c == 0).unwrap_or(name.len());
            if let Ok(v) = std::str::from_utf8(&name[..end])
                .unwrap_or("")
                .parse::<i32>()
            {
                out.push(v);
            }
            off += reclen;
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn split_nul(b: &[u8]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = b.split(|c| *c == 0).map(<[u8]>::to_vec).collect();
    if v.last().is_some_and(Vec::is_empty) {
        v.pop();
    }
    v
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .map(|l| l[name.len()..].trim())
}

/// Why an fd can never be captured, from its `/proc/<pid>/fd` link and
/// number: `None` if it may be (the agent asks this before it disturbs the
/// process; the capture asks again from inside).
pub fn refusal(fd: i32, link: &str) -> Option<String> {
    if let Some(kind) = link.strip_prefix("anon_inode:") {
        let kind = kind.trim_matches(|c| c == '[' || c == ']');
        return match kind {
            "eventfd" | "timerfd" | "signalfd" | "eventpoll" => None,
            "io_uring" => Some(format!("fd {fd}: io_uring is not migratable")),
            other => Some(format!("fd {fd}: {other} is not migratable")),
        };
    }
    if link.ends_with(" (deleted)") {
        return Some(format!("fd {fd}: {link} is not migratable (deleted file)"));
    }
    if link.starts_with("/dev/pts/") || link.starts_with("/dev/tty") || link == "/dev/console" {
        return (fd > 2).then(|| format!("fd {fd}: terminal {link} is not migratable"));
    }
    None
}

const PORTABLE_DEVICES: &[(u32, u32, &str)] = &[
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 7, "/dev/full"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

fn capture_fd(fd: i32) -> Result<Option<FdState>, String> {
    // The fd that listed the directory is gone already: skip what vanished.
    let Ok(link) = read_link(&format!("/proc/self/fd/{fd}")) else {
        return Ok(None);
    };
    let link_s = String::from_utf8_lossy(&link).into_owned();
    if let Some(why) = refusal(fd, &link_s) {
        return Err(why);
    }
    // SAFETY: fcntl/fstat/lseek on an fd number only read its state.
    let (fdflags, flags) = unsafe {
        (
            libc::fcntl(fd, libc::F_GETFD),
            libc::fcntl(fd, libc::F_GETFL),
        )
    };
    if fdflags < 0 || flags < 0 {
        return Ok(None);
    }
    let cloexec = fdflags & libc::FD_CLOEXEC != 0;
    // SAFETY: as above; st is ours.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(os_err(&format!("fd {fd}: fstat")));
    }
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFDIR => {
            // SAFETY: lseek with SEEK_CUR only reads the offset.
            let offset = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
            if !link.starts_with(b"/") {
                return Err(format!("fd {fd}: {link_s} has no path to reopen it by"));
            }
            FdKind::File {
                path: link,
                flags,
                offset: offset.max(0),
                dev: st.st_dev,
                ino: st.st_ino,
            }
        }
        libc::S_IFCHR => {
            let (ma, mi) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
            if let Some((_, _, p)) = PORTABLE_DEVICES
                .iter()
                .find(|(a, b, _)| *a == ma && *b == mi)
            {
                FdKind::Device {
                    path: p.as_bytes().to_vec(),
                    flags,
                }
            } else if fd <= 2 {
                FdKind::Relay
            } else {
                return Err(format!("fd {fd}: device {link_s} is not migratable"));
            }
        }
        // A pipe moves with its process (`checkpoint::migrate`), and so
        // does a FIFO end opened by path one way; one opened both ways
        // (`O_RDWR`: its own reader and writer) only as a standard fd
        // (relayed).
        libc::S_IFIFO if link_s.starts_with("pipe:") => FdKind::Pipe {
            ino: st.st_ino,
            read: flags & libc::O_ACCMODE == libc::O_RDONLY,
            flags,
            // SAFETY: F_GETPIPE_SZ only reads.
            size: unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) },
            pending: Vec::new(),
        },
        libc::S_IFIFO if flags & libc::O_ACCMODE != libc::O_RDWR => FdKind::Fifo {
            path: link,
            read: flags & libc::O_ACCMODE == libc::O_RDONLY,
            flags,
        },
        libc::S_IFIFO if fd <= 2 => FdKind::Relay,
        libc::S_IFIFO => return Err(format!("fd {fd}: FIFO {link_s} opened for reading and writing is not migratable (pipes are, and FIFOs opened one way; both ways only as stdin, stdout or stderr)")),
        libc::S_IFSOCK => {
            use crate::streams::moving;
            if fd > 2 {
                if let Some(l) = crate::streams::unix::listening(fd)? {
                    return Ok(Some(FdState {
                        fd,
                        cloexec,
                        kind: FdKind::UnixListen {
                            name: l.name,
                            ty: l.ty,
                            flags: l.flags,
                            passcred: l.passcred,
                            backlog: l.backlog,
                        },
                    }));
                }
                if let Some(l) = moving::listening(fd)? {
                    return Ok(Some(FdState {
                        fd,
                        cloexec,
                        kind: FdKind::TcpListen {
                            addr: l.addr.to_string(),
                            v6only: l.v6only,
                            reuseaddr: l.reuseaddr,
                            reuseport: l.reuseport,
                            backlog: l.backlog,
                            flags: l.flags,
                        },
                    }));
                }
            }
            // Connections move with the migration (`streams::moving`) when
            // their peer is an SSI process (a checkpoint with --kill parks
            // them), datagram senders are connected again where they land
            // (`streams::dgram`); at fds 0-2 anything else is relayed.
            let seqpacket = crate::streams::seqpacket::is_seqpacket(fd);
            let dgram = moving::int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE)
                == Some(libc::SOCK_DGRAM);
            if dgram && fd > 2 {
                let domain =
                    moving::int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(-1);
                crate::streams::dgram::capture(fd, domain, flags)?
            } else if seqpacket || moving::unix_stream(fd) {
                FdKind::UnixStream {
                    ino: st.st_ino,
                    flags,
                    seqpacket,
                    passcred: moving::opts(fd).passcred,
                }
            } else if moving::tcp_ends(fd).is_some() {
                let o = moving::opts(fd);
                FdKind::Tcp {
                    id: 0,
                    node: 0,
                    pending: Vec::new(),
                    wr_shut: false,
                    flags: o.flags,
                    nodelay: o.nodelay,
                    keepalive: o.keepalive,
                    alias_of: -1,
                    pipe: o.pipe,
                    seqpacket: false,
                    passcred: false,
                }
            } else if fd <= 2 {
                FdKind::Relay
            } else {
                return Err(format!("fd {fd}: {link_s} is not migratable (TCP connections, connected UNIX stream and seqpacket sockets and datagram senders move, and stdin, stdout and stderr)"));
            }
        }
        _ if link_s == "anon_inode:[eventfd]" => {
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
            let count = status_field(&info, "eventfd-count:")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0);
            FdKind::EventFd { count, flags }
        }
        _ if link_s == "anon_inode:[timerfd]" => timerfd(fd, flags)?,
        _ if link_s == "anon_inode:[signalfd]" => {
            let info = fdinfo(fd);
            let mask = status_field(&info, "sigmask:")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .ok_or_else(|| format!("fd {fd}: signalfd without a mask in fdinfo"))?;
            FdKind::SignalFd { mask, flags }
        }
        _ if link_s == "anon_inode:[eventpoll]" => FdKind::Epoll {
            flags,
            watches: epoll_watches(fd, &fdinfo(fd))?,
        },
        _ => return Err(format!("fd {fd}: {link_s} is not migratable")),
    };
    Ok(Some(FdState { fd, cloexec, kind }))
}

/// Whether the other end of pipe end `(ino, read)` is among `fds` too.
pub(super) fn other_end_here(fds: &[FdState], ino: u64, read: bool) -> bool {
    fds.iter()
        .any(|g| matches!(g.kind, FdKind::Pipe { ino: n, read: r, .. } if n == ino && r != read))
}

/// A FIFO both of whose ends are among `fds` (opened once each way): as a
/// standard fd it is relayed; elsewhere the move is refused (made again as
/// a pipe, its path would no longer reach it).
pub(super) fn refuse_self_fifos(fds: &mut [FdState]) -> Result<(), String> {
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
            return Err(format!(
                "fd {}: FIFO {}: this process holds both its ends: not movable",
                f.fd,
                String::from_utf8_lossy(path)
            ));
        }
        f.kind = FdKind::Relay;
    }
    Ok(())
}

/// Memory and streams the image would turn into the process's own: shared
/// memory mappings that are copied (anonymous `MAP_SHARED` memory without
/// the `dsm-anon` capability, System V segments and memfds that are not
/// cluster segments), pipes and socketpairs both of whose ends are its
/// fds. That is exact only if no other process shares them: a server
/// whose children watch a pipe it holds both ends of (PostgreSQL's
/// postmaster death watch) and share its anonymous memory would be cut
/// off from them. Refused, naming what is shared and with whom.
///
/// When `moving` (a migration), also the regular files above the standard
/// fds, which the target opens again: one open file description held by
/// another process too (`exec 3>f; cmd >&3`: a shell and its children)
/// shares its offset with it, which a file opened again on another node
/// cannot do (their writes would overwrite each other). Refused until the
/// sharer is gone. (Fds 0-2 stay with the shadow, which keeps sharing.)
pub(super) fn refuse_shared(maps: &[MapLine], fds: &[FdState], moving: bool) -> Result<(), String> {
    let mut mems: Vec<(u64, u64)> = Vec::new();
    for m in maps.iter().filter(|m| copied_shared(m)) {
        if !mems.contains(&(m.dev, m.inode)) {
            mems.push((m.dev, m.inode));
        }
    }
    let mut links: Vec<String> = Vec::new();
    for f in fds {
        if let FdKind::Pipe { ino, read, .. } = f.kind {
            let l = format!("pipe:[{ino}]");
            if other_end_here(fds, ino, read) && !links.contains(&l) {
                links.push(l);
            }
        }
    }
    let socks: Vec<u64> = fds
        .iter()
        .filter_map(|f| match f.kind {
            FdKind::UnixStream { ino, .. } => Some(ino),
            _ => None,
        })
        .collect();
    if socks.len() >= 2 {
        let peers = crate::streams::unix::peers().map_err(|e| format!("UNIX socket peers: {e}"))?;
        for ino in &socks {
            if peers.get(ino).is_some_and(|p| socks.contains(p)) {
                links.push(format!("socket:[{ino}]"));
            }
        }
    }
    let files: Vec<(i32, String)> = if moving {
        fds.iter()
            .filter(|f| f.fd > 2)
            .filter_map(|f| match &f.kind {
                FdKind::File { path, .. } => {
                    Some((f.fd, String::from_utf8_lossy(path).into_owned()))
                }
                _ => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    if mems.is_empty() && links.is_empty() && files.is_empty() {
        return Ok(());
    }
    match crate::client::call(&crate::proto::Request::SharedWith { links, mems, files }) {
        Ok(crate::proto::Response::Shared(v)) if v.is_empty() => Ok(()),
        Ok(crate::proto::Response::Shared(v)) => Err(v.join("; ")),
        Ok(other) => Err(format!(
            "asking what is shared: unexpected answer {other:?}"
        )),
        Err(e) => Err(format!("asking what is shared: {e}")),
    }
}

/// The offsets of the regular files among `fds`, read again. After
/// [`refuse_shared`] has found no other holder of their descriptions
/// (`moving`), nothing but this frozen process can move them any more; but
/// before, a holder may have written (and ended) after [`capture_fds`]
/// read the offset, and the file opened again there would overwrite that
/// write.
pub(super) fn reread_offsets(fds: &mut [FdState]) {
    for f in fds.iter_mut() {
        if let FdKind::File { offset, .. } = &mut f.kind {
            // SAFETY: lseek with SEEK_CUR only reads the offset.
            let now = unsafe { libc::lseek(f.fd, 0, libc::SEEK_CUR) };
            if now >= 0 {
                *offset = now;
            }
        }
    }
}

/// Whether `m` is shared memory that an image holds a copy of (made again
/// as the process's own on restore), not a cluster segment.
fn copied_shared(m: &MapLine) -> bool {
    m.shared
        && !crate::dsm::is_segment_path(&m.path)
        && (m.inode == 0
            || m.path.ends_with(" (deleted)")
            || m.path.starts_with("/SYSV")
            || m.path.starts_with("/memfd:"))
}

/// Self-pipes (both ends among `fds`) are made again from the image: the
/// bytes in each go with its first read end (copied: the process may go
/// on here).
pub(super) fn keep_self_pipes(fds: &mut [FdState]) -> Result<(), String> {
    let mut done: Vec<u64> = Vec::new();
    for i in 0..fds.len() {
        let FdKind::Pipe {
            ino, read: true, ..
        } = fds[i].kind
        else {
            continue;
        };
        if done.contains(&ino) || !other_end_here(fds, ino, true) {
            continue;
        }
        done.push(ino);
        let bytes = crate::streams::moving::peek_pipe(fds[i].fd)?;
        if let FdKind::Pipe { pending, .. } = &mut fds[i].kind {
            *pending = bytes;
        }
    }
    Ok(())
}

/// UNIX socketpairs whose two ends are both among `fds` are made again
/// from the image with what is queued in each (left in place: the process
/// may go on here).
pub(super) fn keep_self_pairs(fds: &mut [FdState]) -> Result<(), String> {
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
    let peers = crate::streams::unix::peers().map_err(|e| format!("UNIX socket peers: {e}"))?;
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

fn fdinfo(fd: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default()
}

fn timerfd(fd: i32, flags: i32) -> Result<FdKind, String> {
    // SAFETY: itimerspec is plain data; timerfd_gettime fills it.
    let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
    // timerfd_gettime first: for an expired periodic timer it moves the
    // timer forward and counts the expirations, which fdinfo alone would
    // show as disarmed.
    // SAFETY: our itimerspec.
    if unsafe { libc::timerfd_gettime(fd, &mut its) } != 0 {
        return Err(os_err(&format!("fd {fd}: timerfd_gettime")));
    }
    let info = fdinfo(fd);
    let num = |name: &str| status_field(&info, name).and_then(|v| v.parse::<u64>().ok());
    let clockid =
        num("clockid:").ok_or_else(|| format!("fd {fd}: timerfd without a clock in fdinfo"))?;
    Ok(FdKind::TimerFd {
        clockid: clockid as i32,
        flags,
        value: (its.it_value.tv_sec, its.it_value.tv_nsec),
        interval: (its.it_interval.tv_sec, its.it_interval.tv_nsec),
        ticks: num("ticks:").unwrap_or(0),
    })
}

/// What an epoll instance watches, from its fdinfo lines
/// (`tfd: 5 events: 19 data: 5 pos:0 ino:40e sdev:10`; hexadecimal but the
/// fd). Each must still be the file open under that number.
fn epoll_watches(fd: i32, info: &str) -> Result<Vec<(i32, u32, u64)>, String> {
    let mut out = Vec::new();
    for l in info.lines().filter(|l| l.starts_with("tfd:")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        let field = |name: &str| {
            w.iter()
                .position(|x| *x == name)
                .and_then(|i| w.get(i + 1).copied())
        };
        let tagged = |name: &str| w.iter().find_map(|x| x.strip_prefix(name));
        let bad = || format!("fd {fd}: unreadable epoll entry {l:?}");
        let tfd: i32 = field("tfd:").and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let events = field("events:")
            .and_then(|v| u32::from_str_radix(v, 16).ok())
            .ok_or_else(bad)?;
        let data = field("data:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(bad)?;
        let ino = tagged("ino:").and_then(|v| u64::from_str_radix(v, 16).ok());
        // SAFETY: st is ours; fstat only reads the fd's state.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let open = unsafe { libc::fstat(tfd, &mut st) } == 0;
        if !open || ino.is_some_and(|i| i != st.st_ino) {
            return Err(format!(
                "fd {fd}: epoll watches a file that is no longer open as fd {tfd}"
            ));
        }
        out.push((tfd, events, data));
    }
    Ok(out)
}

/// Capture the fds of the process, except `skip`.
pub fn capture_fds(skip: &[RawFd]) -> Result<Vec<FdState>, String> {
    let mut out = Vec::new();
    for fd in list_dir_numbers("/proc/self/fd")? {
        if skip.contains(&fd) {
            continue;
        }
        if let Some(s) = capture_fd(fd)? {
            out.push(s);
        }
    }
    Ok(out)
}

fn sigactions() -> Vec<SigAction> {
    let mut v = Vec::new();
    for sig in 1..=64u32 {
        if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 {
            continue;
        }
        let mut k = [0u64; 4];
        // SAFETY: rt_sigaction with a null new action only writes the old
        // one (kernel layout: handler, flags, restorer, mask) into k.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<u8>(),
                k.as_mut_ptr(),
                8usize,
            )
        };
        if r == 0 && k[0] != 0 {
            v.push(SigAction {
                sig,
                handler: k[0],
                flags: k[1],
                restorer: k[2],
                mask: k[3],
            });
        }
    }
    v
}

fn itimers() -> Vec<(u32, i64, i64, i64, i64)> {
    let mut v = Vec::new();
    for which in 0..3u32 {
        // SAFETY: getitimer fills the struct we own.
        let mut t: libc::itimerval = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::syscall(libc::SYS_getitimer, which, &mut t) } == 0
            && (t.it_value.tv_sec != 0 || t.it_value.tv_usec != 0)
        {
            v.push((
                which,
                t.it_interval.tv_sec,
                t.it_interval.tv_usec,
                t.it_value.tv_sec,
                t.it_value.tv_usec,
            ));
        }
    }
    v
}

fn rlimits() -> Vec<(u32, u64, u64)> {
    let mut v = Vec::new();
    for r in 0..16u32 {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct we own.
        if unsafe { libc::getrlimit(r, &mut l) } == 0 {
            v.push((r, l.rlim_cur, l.rlim_max));
        }
    }
    v
}

fn file_id(m: &MapLine) -> Result<FileId, String> {
    let md = std::fs::metadata(&m.path).map_err(|e| format!("mapping of {}: {e}", m.path))?;
    use std::os::unix::fs::MetadataExt;
    if md.ino() != m.inode {
        return Err(format!(
            "mapping of {}: the file at that path was replaced",
            m.path
        ));
    }
    Ok(FileId {
        path: m.path.clone().into_bytes(),
        offset: m.offset,
        dev: md.dev(),
        ino: md.ino(),
        size: md.size(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
    })
}

/// Which pages of a region to save.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Save {
    /// Pages that exist (present or swapped).
    Present,
    /// Pages a private file mapping has copied (present and not file
    /// pages, or swapped).
    Modified,
    /// Every page.
    All,
    Nothing,
}

/// Runs of memory to save: (address, length).
pub type Runs = Vec<(u64, u64)>;

/// The regions of the image and the runs of memory to save.
pub fn regions(maps: &[MapLine]) -> Result<(Vec<Region>, Runs), String> {
    regions_deferring(maps, &[])
}

/// [`regions`], except that the pages of the regions `(start, end)` in
/// `defer` are not looked up (a post-copy migration scans them once the
/// process runs on the target: [`present_runs`]).
pub fn regions_deferring(
    maps: &[MapLine],
    defer: &[(u64, u64)],
) -> Result<(Vec<Region>, Runs), String> {
    let pagemap = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let mut regions = Vec::new();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for m in maps {
        if m.is_special() {
            continue;
        }
        let deleted = m.path.ends_with(" (deleted)");
        let anon_name = m.inode == 0;
        let (kind, save) = if m.shared && crate::dsm::is_segment_path(&m.path) {
            // Cluster shared memory: a placeholder; the restored process
            // attaches the segment again (`dsm::after_restore`).
            (RegionKind::SharedAnon, Save::Nothing)
        } else if m.path == "[stack]" {
            (RegionKind::Stack, Save::Present)
        } else if anon_name {
            if m.shared {
                (RegionKind::SharedAnon, Save::All)
            } else {
                (RegionKind::Anon, Save::Present)
            }
        } else if deleted || m.path.starts_with("/SYSV") || m.path.starts_with("/memfd:") {
            if m.shared {
                (RegionKind::SharedAnon, Save::All)
            } else {
                (RegionKind::Anon, Save::All)
            }
        } else if m.shared {
            (RegionKind::FileShared(file_id(m)?), Save::Nothing)
        } else {
            (RegionKind::FilePrivate(file_id(m)?), Save::Modified)
        };
        // Runs never span two regions: the restore checks each against one.
        let floor = runs.len();
        match save {
            _ if defer.contains(&(m.start, m.end)) => {}
            Save::Nothing => {}
            Save::All => push_run(&mut runs, floor, m.start, m.end - m.start),
            Save::Present | Save::Modified => scan_pagemap(
                &pagemap,
                m.start,
                m.end,
                save == Save::Modified,
                &mut runs,
                floor,
            )?,
        }
        regions.push(Region {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            saved: runs[floor..].iter().map(|r| r.1).sum(),
            kind,
        });
    }
    Ok((regions, runs))
}

/// The runs of present or swapped pages of `[start, end)`.
pub fn present_runs(start: u64, end: u64) -> Result<Runs, String> {
    let pagemap = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let mut runs = Vec::new();
    scan_pagemap(&pagemap, start, end, false, &mut runs, 0)?;
    Ok(runs)
}

fn push_run(runs: &mut Vec<(u64, u64)>, floor: usize, addr: u64, len: u64) {
    if runs.len() > floor {
        let last = runs.last_mut().expect("non-empty");
        if last.0 + last.1 == addr {
            last.1 += len;
            return;
        }
    }
    runs.push((addr, len));
}

fn scan_pagemap(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    modified_only: bool,
    runs: &mut Vec<(u64, u64)>,
    floor: usize,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = start / PAGE;
    let last = end / PAGE;
    while page < last {
        let n = ((last - page) as usize).min(buf.len() / 8);
        let got = pagemap
            .read_at(&mut buf[..n * 8], page * 8)
            .map_err(|e| format!("/proc/self/pagemap: {e}"))?;
        if got < 8 {
            return Err("/proc/self/pagemap: short read".into());
        }
        for i in 0..got / 8 {
            let e = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            let keep = if modified_only {
                e & SWAPPED != 0 || (e & PRESENT != 0 && e & FILE == 0)
            } else {
                e & (PRESENT | SWAPPED) != 0
            };
            if keep {
                push_run(runs, floor, (page + i as u64) * PAGE, PAGE);
            }
        }
        page += (got / 8) as u64;
    }
    Ok(())
}

/// Everything but memory contents and threads.
pub fn meta(
    maps: &[MapLine],
    regions: Vec<Region>,
    threads: Vec<ThreadState>,
    fds: Vec<FdState>,
    mem_bytes: u64,
    anchor: u64,
) -> Result<Meta, String> {
    let status = String::from_utf8_lossy(&read_file("/proc/self/status")?).into_owned();
    let ids = |name: &str| -> Vec<u32> {
        status_field(&status, name)
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let umask = status_field(&status, "Umask:")
        .and_then(|v| u32::from_str_radix(v, 8).ok())
        .unwrap_or(0o022);
    let vdso = maps.iter().find(|m| m.path == "[vdso]");
    let (vdso_start, vdso_bytes) = match vdso {
        Some(v) => {
            // SAFETY: the vDSO is mapped readable for its whole range.
            let s = unsafe {
                std::slice::from_raw_parts(v.start as *const u8, (v.end - v.start) as usize)
            };
            (v.start, s.to_vec())
        }
        None => (0, Vec::new()),
    };
    let ident = super::exec_ident()?;
    // SAFETY: brk(0) only reports the current break.
    let brk = unsafe { libc::syscall(libc::SYS_brk, 0usize) } as u64;
    Ok(Meta {
        gpid: crate::processes::my_gpid(),
        node: crate::processes::node_id(),
        caps: crate::processes::hello_caps(),
        taken_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        exe: read_link("/proc/self/exe")?,
        argv: split_nul(&ident.0),
        env: split_nul(&ident.1),
        cwd: read_link("/proc/self/cwd")?,
        umask,
        rlimits: rlimits(),
        uid: ids("Uid:").get(1).copied().unwrap_or(0),
        gid: ids("Gid:").get(1).copied().unwrap_or(0),
        groups: ids("Groups:"),
        brk,
        regions,
        threads,
        sigactions: sigactions(),
        fds,
        itimers: itimers(),
        vdso_start,
        vdso: vdso_bytes,
        mem_bytes,
        krg_anchor: anchor,
        lazy: Vec::new(),
        mm: read_file("/proc/self/stat")
            .map(|t| mm_layout(&String::from_utf8_lossy(&t)))
            .unwrap_or_default(),
    })
}

/// The memory layout fields of a `/proc/PID/stat` line (see
/// [`Meta::mm`]), or nothing if the line is not as expected.
pub fn mm_layout(stat: &str) -> Vec<u64> {
    // Fields after the command (which may hold spaces and parentheses):
    // the first is field 3 (state); field N is at N - 3.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Vec::new();
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let out: Vec<u64> = [26, 27, 45, 46, 47, 28, 48, 49, 50, 51]
        .iter()
        .filter_map(|n| f.get(n - 3).and_then(|v| v.parse().ok()))
        .collect();
    if out.len() == 10 && out.iter().all(|v| *v != 0) {
        out
    } else {
        Vec::new()
    }
}

/// Write `len` bytes at `p` to `fd`.
///
/// # Safety
/// `[p, p + len)` must be readable memory of this process.
pub unsafe fn write_all(fd: RawFd, mut p: *const u8, mut len: usize) -> Result<(), String> {
    while len > 0 {
        // SAFETY: [p, p+len) is readable memory of this process.
        let n = unsafe { libc::write(fd, p.cast(), len) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(os_err("writing the image"));
        }
        if n == 0 {
            return Err("writing the image: no progress".into());
        }
        // SAFETY: stays within the original range.
        p = unsafe { p.add(n as usize) };
        len -= n as usize;
    }
    Ok(())
}

/// Write the image: metadata, memory runs, end marker. Returns its size.
pub fn write_image(
    fd: RawFd,
    meta: &Meta,
    regions: &[Region],
    runs: &[(u64, u64)],
) -> Result<u64, String> {
    let head = image::encode_meta(meta).map_err(|e| e.to_string())?;
    // SAFETY: a live buffer.
    unsafe { write_all(fd, head.as_ptr(), head.len())? };
    let total = head.len() as u64 + write_runs(fd, regions, runs)?;
    write_end(fd)?;
    Ok(total + 24)
}

/// Write the memory records of `runs`; returns the bytes written.
pub fn write_runs(fd: RawFd, regions: &[Region], runs: &[(u64, u64)]) -> Result<u64, String> {
    let mut total = 0u64;
    for (addr, len) in runs {
        // A run in a region the process cannot read (PROT_NONE after use)
        // is made readable for the copy, then put back.
        let unreadable = regions
            .iter()
            .find(|r| r.start <= *addr && *addr < r.end)
            .filter(|r| r.prot & libc::PROT_READ as u32 == 0);
        if let Some(r) = unreadable {
            // SAFETY: changes protection of a mapping of this process that
            // no running thread uses (all are parked).
            unsafe {
                libc::mprotect(
                    r.start as *mut _,
                    (r.end - r.start) as usize,
                    libc::PROT_READ,
                )
            };
        }
        let h = image::record(*addr, *len);
        // SAFETY: a live buffer, then a run of the process's own mapped
        // memory (made readable above if it was not).
        unsafe {
            write_all(fd, h.as_ptr(), h.len())?;
            write_all(fd, *addr as *const u8, *len as usize)?;
        }
        if let Some(r) = unreadable {
            // SAFETY: as above, back to the original protection.
            unsafe { libc::mprotect(r.start as *mut _, (r.end - r.start) as usize, r.prot as i32) };
        }
        total += 16 + len;
    }
    Ok(total)
}

/// Write the end record and the end marker (24 bytes).
pub fn write_end(fd: RawFd) -> Result<(), String> {
    let end = image::record(0, 0);
    // SAFETY: live buffers.
    unsafe {
        write_all(fd, end.as_ptr(), end.len())?;
        write_all(fd, image::END_MAGIC.as_ptr(), 8)
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
        // One end of each of two FIFOs: both move.
        let mut fds = vec![fifo(0, "/a", true), fifo(4, "/b", false)];
        refuse_self_fifos(&mut fds).unwrap();
        assert!(fds.iter().all(|f| matches!(f.kind, FdKind::Fifo { .. })));
        // Both ends of one, as stdin and stdout: relayed.
        let mut fds = vec![fifo(0, "/a", true), fifo(1, "/a", false)];
        refuse_self_fifos(&mut fds).unwrap();
        assert!(fds.iter().all(|f| f.kind == FdKind::Relay));
        // Both ends of one, one above 2: refused, naming it.
        let mut fds = vec![fifo(0, "/a", true), fifo(5, "/a", false)];
        let e = refuse_self_fifos(&mut fds).unwrap_err();
        assert!(e.contains("fd 5") && e.contains("/a"), "{e}");
    }

    #[test]
    fn maps_parse() {
        let t = "55555555-55556000 r-xp 00001000 fe:00 123    /usr/bin/with space\n\
                 7ffff000-7ffff100 rw-s 00000000 00:00 0 \n\
                 ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n";
        let m = parse_maps(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].path, "/usr/bin/with space");
        assert!(m[0].exec && !m[0].write && !m[0].shared);
        assert_eq!(m[0].offset, 0x1000);
        assert!(m[1].shared && m[1].path.is_empty());
        assert!(m[2].is_special());
    }

    #[test]
    fn the_arena_is_cut_out_of_a_line_it_was_merged_into() {
        let t = "7fffb0000000-7ffff0021000 rw-p 00000000 00:00 0 \n\
                 7ffff0021000-7ffff4000000 ---p 00000000 00:00 0 \n\
                 7ffff5000000-7ffff5004000 rw-p 00010000 fe:00 9    /lib/x\n";
        let arena = (0x7fffb0000000, 0x7ffff0000000);
        let m = without(parse_maps(t), arena);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].start, m[0].end), (0x7ffff0000000, 0x7ffff0021000));
        assert!(m[0].write && m[0].inode == 0);
        assert_eq!(m[1].start, 0x7ffff0021000);
        // A hole in the middle of a file mapping keeps both sides' offsets.
        let m = without(parse_maps(t), (0x7ffff5001000, 0x7ffff5002000));
        assert_eq!(m.len(), 4);
        assert_eq!(
            (m[2].start, m[2].end, m[2].offset),
            (0x7ffff5000000, 0x7ffff5001000, 0x10000)
        );
        assert_eq!(
            (m[3].start, m[3].end, m[3].offset),
            (0x7ffff5002000, 0x7ffff5004000, 0x12000)
        );
        // No arena: nothing changes.
        assert_eq!(without(parse_maps(t), (0, 0)), parse_maps(t));
    }

    #[test]
    fn the_memory_layout_is_read_off_our_own_stat() {
        let t = String::from_utf8(read_file("/proc/self/stat").unwrap()).unwrap();
        let mm = mm_layout(&t);
        assert_eq!(mm.len(), 10, "{t}");
        // start_code < end_code, start_data < end_data, arg and env areas
        // ordered and on the stack side of the data.
        assert!(mm[0] < mm[1] && mm[2] < mm[3] && mm[6] < mm[7] && mm[8] < mm[9]);
        assert!(mm[7] <= mm[8] && mm[6] > mm[3]);
        assert!(mm_layout("12 (a) b) S 1").is_empty());
    }

    #[test]
    fn refusals_name_the_resource() {
        assert_eq!(
            refusal(7, "anon_inode:[io_uring]").unwrap(),
            "fd 7: io_uring is not migratable"
        );
        assert!(refusal(3, "anon_inode:[eventfd]").is_none());
        assert!(refusal(1, "pipe:[123]").is_none());
        assert!(refusal(5, "pipe:[9]").is_none());
        // Sockets: the capture decides (a TCP connection or listener moves).
        assert!(refusal(5, "socket:[9]").is_none());
        assert!(refusal(3, "anon_inode:[timerfd]").is_none());
        assert!(refusal(3, "anon_inode:[eventpoll]").is_none());
        assert!(refusal(3, "anon_inode:inotify")
            .unwrap()
            .contains("not migratable"));
        assert!(refusal(4, "/tmp/x (deleted)").is_some());
        assert!(refusal(4, "/tmp/x").is_none());
    }

    #[test]
    fn own_fds_and_regions() {
        let fds = list_dir_numbers("/proc/self/fd").unwrap();
        assert!(fds.contains(&0) || fds.contains(&1) || fds.contains(&2));
        let maps = parse_maps(&String::from_utf8(read_file("/proc/self/maps").unwrap()).unwrap());
        let (regions, runs) = regions(&maps).unwrap();
        assert!(regions.iter().any(|r| r.kind == RegionKind::Stack));
        assert!(!runs.is_empty());
        assert!(runs.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    }
}
