//! The image of a process: one stream, written front to back by the
//! capture and read front to back by the restore, so that the same format
//! goes to a file (checkpoint) or straight down a socket (migration).
//!
//! ```text
//! "KRGIMG01"  meta_len: u64 LE  meta: rkyv archive of Meta (validated on read)
//! { addr: u64 LE, len: u64 LE, len bytes of memory }*   one record per run of saved pages
//! addr = 0, len = 0                                       end of memory
//! "KRGEND01"
//! ```
//!
//! A post-copy migration (`Meta::lazy` not empty) adds a handshake and a
//! second phase on the same connection (see `postcopy.rs`):
//!
//! ```text
//! source → target: "KRGIMG01" meta
//! target → source: "KRGLAZY1" (post-copy accepted) or "KRGFULL1" (send everything now)
//! source → target: records of the memory outside the lazy regions, end record, "KRGEND01"
//! target → source: "KRGRUN01" (the process resumes), then 8-byte page addresses it faults on
//! source → target: records of the lazy regions ({addr, len | ZERO} = zero-fill),
//!                  end record, "KRGEND01"; the target closes once all is in
//! ```

#![deny(unsafe_code)]

use rkyv::{Archive, Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"KRGIMG01";
pub const END_MAGIC: &[u8; 8] = b"KRGEND01";
/// Post-copy handshake: the target takes the lazy regions on demand.
pub const LAZY_OK: &[u8; 8] = b"KRGLAZY1";
/// Post-copy handshake: the target wants every page before it resumes.
pub const LAZY_NO: &[u8; 8] = b"KRGFULL1";
/// The target resumed the process (post-copy: from here on the process
/// exists only there).
pub const RUNNING: &[u8; 8] = b"KRGRUN01";
/// Largest metadata section accepted on read.
pub const MAX_META: u64 = 64 << 20;
/// Name of the image file in a checkpoint directory.
pub const IMAGE_FILE: &str = "image.krg";

/// Everything about the process except its memory contents.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Meta {
    pub gpid: i32,
    /// Node it was captured on.
    pub node: u32,
    pub caps: u32,
    /// Unix milliseconds at capture.
    pub taken_ms: u64,
    pub exe: Vec<u8>,
    /// The command line and environment the process was started with (its
    /// initial stack), to start the restorer with the same layout.
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
    pub cwd: Vec<u8>,
    pub umask: u32,
    pub rlimits: Vec<(u32, u64, u64)>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub brk: u64,
    pub regions: Vec<Region>,
    pub threads: Vec<ThreadState>,
    pub sigactions: Vec<SigAction>,
    pub fds: Vec<FdState>,
    /// `(which, interval sec, interval usec, value sec, value usec)` for
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
    pub itimers: Vec<(u32, i64, i64, i64, i64)>,
    /// The vDSO the process has been calling into: it must be identical
    /// (same kernel build) where the image is restored.
    pub vdso_start: u64,
    pub vdso: Vec<u8>,
    /// Bytes of memory records that follow.
    pub mem_bytes: u64,
    /// Addresses of libkrg's own statics (the restorer writes them once the
    /// memory is back); they must match the restoring process's.
    pub krg_anchor: u64,
    /// Regions (start, end) whose pages a migration may send after the
    /// process resumed on the target (post-copy); empty for a checkpoint.
    pub lazy: Vec<(u64, u64)>,
    /// The kernel's record of the memory layout (`/proc/self/stat`):
    /// start_code, end_code, start_data, end_data, start_brk, start_stack,
    /// arg_start, arg_end, env_start, env_end; set again on restore so that
    /// `/proc/PID/cmdline` and `environ` read the program's own strings.
    /// Empty when it could not be read.
    pub mm: Vec<u64>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    /// Bytes of this region saved in the image.
    pub saved: u64,
    pub kind: RegionKind,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum RegionKind {
    /// Private anonymous memory (heap, thread stacks, malloc arenas, ...).
    Anon,
    /// The main thread's stack (grows down).
    Stack,
    /// Shared anonymous memory (`MAP_SHARED|MAP_ANONYMOUS`, memfd, a SysV
    /// segment only this process uses): saved whole, restored shared.
    SharedAnon,
    /// A private mapping of a file: mapped from the file again, then the
    /// pages the process modified are overwritten from the image.
    FilePrivate(FileId),
    /// A shared mapping of a file: mapped again, its contents are the file.
    FileShared(FileId),
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FileId {
    pub path: Vec<u8>,
    pub offset: u64,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ThreadState {
    pub tid: i32,
    /// The thread whose tid is the process id (restored as the first
    /// thread of the new process).
    pub main: bool,
    /// [`super::arch::Ctx`] as words: rbx rbp r12 r13 r14 r15 rsp rip,
    /// then mxcsr | fcw << 32.
    pub ctx: Vec<u64>,
    pub fs: u64,
    /// `set_tid_address` pointer (glibc: the thread's `tid` field).
    pub tid_addr: u64,
    pub robust_head: u64,
    pub robust_len: u64,
    /// Its rseq area (0: none registered).
    pub rseq: u64,
    pub rseq_len: u32,
    /// Signal mask inside the checkpoint handler.
    pub sigmask: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SigAction {
    pub sig: u32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FdState {
    pub fd: i32,
    pub cloexec: bool,
    pub kind: FdKind,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum FdKind {
    /// A regular file (or directory), reopened by path at its offset with
    /// its status flags.
    File {
        path: Vec<u8>,
        flags: i32,
        offset: i64,
        dev: u64,
        ino: u64,
    },
    /// A character device that means the same on every node (`/dev/null`,
    /// `/dev/zero`, `/dev/urandom`, ...).
    Device {
        path: Vec<u8>,
        flags: i32,
    },
    /// Standard fd connected to a terminal, pipe or socket: after a
    /// restart it is connected to what the restarting command gives.
    Relay,
    EventFd {
        count: u64,
        flags: i32,
    },
    /// A timerfd, re-armed with the time it had left (relative: the nodes'
    /// clocks are not the same clock) and its interval; expirations not
    /// read yet are given back.
    TimerFd {
        clockid: i32,
        flags: i32,
        /// `(seconds, nanoseconds)` left; zero: disarmed.
        value: (i64, i64),
        interval: (i64, i64),
        ticks: u64,
    },
    /// A signalfd and the signals it takes (bit `n - 1` for signal `n`).
    SignalFd {
        mask: u64,
        flags: i32,
    },
    /// A TCP connection to another SSI process, moved with this one:
    /// stream `id` held by the agent of `node` (the peer's), the bytes that
    /// were in flight for this process, whether it had shut down writing,
    /// and the file flags and options its new connection gets.
    Tcp {
        id: u64,
        node: u32,
        pending: Vec<u8>,
        wr_shut: bool,
        flags: i32,
        nodelay: bool,
        keepalive: bool,
        /// Another fd of the image for the same connection (`dup`): this
        /// one is a copy of it, or -1.
        alias_of: i32,
        /// It stands for a pipe (see `streams::moving`).
        pipe: bool,
        /// A UNIX seqpacket socket: its new end is one too (`pending` holds
        /// framed messages, see `streams::seqpacket`).
        seqpacket: bool,
        /// `SO_PASSCRED` was set on it.
        passcred: bool,
    },
    /// A pipe end made again as a new pipe: its other end is in this
    /// image too (`ino` pairs the ends of one pipe; a self-pipe) or held by
    /// no process. The bytes that were in it (`pending`, on the read end)
    /// are written back; `size` is its capacity.
    Pipe {
        ino: u64,
        read: bool,
        flags: i32,
        size: i32,
        pending: Vec<u8>,
    },
    /// A FIFO opened by its path, read-only or write-only, whose other end
    /// is on this node (the kernel's FIFO): moved with this process as a
    /// connection to the SSI process holding its other end (the migration
    /// makes it a `Tcp`), like a pipe end. `path` is its fd link.
    Fifo {
        path: Vec<u8>,
        read: bool,
        flags: i32,
    },
    /// A datagram socket that only sends (UNIX, connected to a name or
    /// not at all; UDP, connected or not bound to a port): made again
    /// and connected to `peer` (a raw socket address, empty when not
    /// connected) on the new node (see `streams::dgram`).
    Dgram {
        domain: i32,
        peer: Vec<u8>,
        flags: i32,
    },
    /// A connected UNIX stream or seqpacket socket (a socketpair end,
    /// say), moved with this process as a connection to the SSI process at
    /// its other end (filled in by the migration, which makes it a `Tcp`).
    UnixStream {
        ino: u64,
        flags: i32,
        seqpacket: bool,
        passcred: bool,
    },
    /// A listening TCP socket, bound again to the same address and port on
    /// the new node (`addr` as text, the kernel's address).
    TcpListen {
        addr: String,
        v6only: bool,
        reuseaddr: bool,
        reuseport: bool,
        backlog: i32,
        flags: i32,
    },
    /// One end of a UNIX socketpair whose two ends are both this process's
    /// (a self-pipe made of a socketpair, as asyncio's), made again as a new
    /// socketpair: `pair` names it (the lower inode of its two ends),
    /// `first` says whether this is the end with that inode, `pending` is
    /// what was queued for this end (framed messages for seqpacket; on the
    /// first fd of each end only, copies carry none).
    UnixPair {
        pair: u64,
        first: bool,
        seqpacket: bool,
        flags: i32,
        passcred: bool,
        pending: Vec<u8>,
    },
    /// A listening UNIX socket (stream or seqpacket), bound again to its
    /// name on the new node (see `streams::unix::Listening`).
    UnixListen {
        name: Vec<u8>,
        ty: i32,
        flags: i32,
        passcred: bool,
        backlog: i32,
    },
    /// A connection, listener or pipe leading out of the process, kept
    /// open by the agent of `node` as park `id` since a checkpoint with
    /// `--kill` (`Request::Park`): the restore takes the very socket or
    /// pipe back there.
    Parked {
        node: u32,
        id: i32,
    },
    /// An epoll instance with what it watches: `(fd, events, data)`, added
    /// again once every other fd is back under its number.
    Epoll {
        flags: i32,
        watches: Vec<(i32, u32, u64)>,
    },
}

/// Header of one memory record.
pub fn record(addr: u64, len: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&addr.to_le_bytes());
    h[8..].copy_from_slice(&len.to_le_bytes());
    h
}

/// Serialise the metadata section (magic and length included).
pub fn encode_meta(meta: &Meta) -> std::io::Result<Vec<u8>> {
    // An explicit rkyv arena: the default one lives in a thread-local whose
    // first use registers a destructor through libc's calloc, which a
    // capture must not call.
    let mut arena = rkyv::ser::allocator::Arena::new();
    let body =
        rkyv::api::high::to_bytes_with_alloc::<_, rkyv::rancor::Error>(meta, arena.acquire())
            .map_err(|e| std::io::Error::other(format!("image metadata: {e}")))?;
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Read and validate the metadata section from the start of an image.
pub fn read_meta(r: &mut impl std::io::Read) -> std::io::Result<Meta> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut head = [0u8; 16];
    r.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(bad("not a krg process image (bad magic)".into()));
    }
    let len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
    if len == 0 || len > MAX_META {
        return Err(bad(format!(
            "image metadata of {len} bytes is not plausible"
        )));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    crate::frame::decode::<Meta>(&body).map_err(|e| bad(format!("image metadata: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_roundtrip_and_rejects_garbage() {
        let m = Meta {
            gpid: 5,
            node: 1,
            caps: 3,
            taken_ms: 9,
            exe: b"/bin/x".to_vec(),
            argv: vec![b"x".to_vec()],
            env: vec![],
            cwd: b"/".to_vec(),
            umask: 0o22,
            rlimits: vec![(0, 1, 2)],
            uid: 0,
            gid: 0,
            groups: vec![],
            brk: 0x1000,
            regions: vec![Region {
                start: 0x1000,
                end: 0x2000,
                prot: 3,
                saved: 0,
                kind: RegionKind::Anon,
            }],
            threads: vec![],
            sigactions: vec![],
            fds: vec![FdState {
                fd: 1,
                cloexec: false,
                kind: FdKind::Relay,
            }],
            itimers: vec![],
            vdso_start: 0,
            vdso: vec![1, 2],
            mem_bytes: 0,
            krg_anchor: 0,
            lazy: vec![(0x1000, 0x2000)],
            mm: vec![0x1000; 10],
        };
        let bytes = encode_meta(&m).unwrap();
        assert_eq!(read_meta(&mut &bytes[..]).unwrap(), m);
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        bad[20] ^= 0x55;
        assert!(read_meta(&mut &bad[..]).is_err() || read_meta(&mut &bad[..]).unwrap() != m);
        assert!(read_meta(&mut &b"KRGIMG01\xff\xff\xff\xff\xff\xff\xff\xff"[..]).is_err());
        assert!(read_meta(&mut &b"nope"[..]).is_err());
    }
}
