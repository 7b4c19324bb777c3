//! The messages between an application process (or the `krg` command) and
//! its node's agent, over the agent's local Unix socket.
//!
//! Frames are a little-endian `u32` length followed by an rkyv archive of a
//! [`Request`] or [`Response`]; every frame is validated (rkyv `bytecheck`)
//! before use, see [`crate::frame`]. The data types used here are also
//! serde-serialisable because the agents exchange them with each other.

#![deny(unsafe_code)]

use rkyv::{Archive, Deserialize, Serialize};

/// Bumped whenever a message changes incompatibly.
pub const PROTO_VERSION: u32 = 8;

/// A request to the local agent. The caller's pid, uid and gid come from
/// `SO_PEERCRED`, never from the message.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub enum Request {
    /// Register the calling process, or refresh its entry after `exec`.
    /// `caps_env` is the value of `KRG_CAPS` it started with.
    Hello {
        version: u32,
        caps_env: Option<String>,
        /// `KRG_NODE`: run this program on that node (consumed by the
        /// program it is given to; its children are placed normally).
        pinned: Option<u32>,
    },
    /// The gpid of a local kernel pid that is the caller itself or one of
    /// its children; registers the process if the agent does not know it yet
    /// (a child just created by fork or posix_spawn).
    Ensure { kpid: i32 },
    /// The gpid of a local kernel pid, if it is a registered SSI process.
    /// Answers `Pid(kpid)` unchanged for a process that is not.
    Translate { kpid: i32 },
    /// The local kernel pid of a gpid that runs on this node.
    Resolve { gpid: i32 },
    /// `kill(2)` semantics on gpids: `pid > 0` one process, `pid < -1` the
    /// process group `-pid`. Delivered wherever the targets run.
    Kill { pid: i32, sig: i32 },
    /// Every SSI process of the cluster.
    Ps,
    /// Every node of the cluster.
    Status,
    /// The capabilities of a process.
    CapGet { gpid: i32 },
    /// Change the capabilities of a process: `spec` in `KRG_CAPS` syntax,
    /// applied to the sets selected by `effective` and `inheritable`.
    CapSet {
        gpid: i32,
        spec: String,
        effective: bool,
        inheritable: bool,
    },
    /// Run the caller's new program on another node; the caller stays as
    /// its shadow (the parent's child: it relays stdio, forwards signals and
    /// exits with the remote program's status). Answered with `Pid(kpid on
    /// the target node)` once the program runs there.
    RemoteExec(RemoteExec),
    /// The scheduling policy in force on this node.
    SchedGet,
    /// Switch the scheduling policy of every up node (root only). `name` is
    /// a built-in policy when `source` is `None`; otherwise `source` is the
    /// text of a user policy (a rhai script) and `name` the file it was
    /// read from.
    SchedSet {
        name: String,
        source: Option<String>,
    },
    /// Debugging aid: ask this node's scheduler where it would place
    /// `count` programs (each decision counts as a real placement for the
    /// policies that remember them). `pinned` as `KRG_NODE` would give.
    SchedPlace {
        count: u32,
        exe: String,
        argv: Vec<String>,
        pinned: Option<u32>,
    },
    /// The gpid of a local kernel process group (or session) id: its
    /// leader's gpid, or for a program started here for a shadow, the group
    /// of its shadow. Answers the kernel id unchanged when no SSI process
    /// leads it.
    TranslateGroup { kpgid: i32 },
    /// The caller's identity, as `Hello` gives it (`place` 0), without
    /// registering: a restored process asks after its memory came back.
    Whoami,
    /// From an SSI process about to `execve` a program (`exe`, `argv`, the
    /// `KRG_CAPS` and `KRG_NODE` of its new environment): where it runs,
    /// decided before the exec (a program placed elsewhere is then never
    /// loaded here). Answered with `Hello`; a program to run here is not
    /// placed again when it says Hello.
    PlaceExec {
        exe: Vec<u8>,
        argv: Vec<Vec<u8>>,
        caps_env: Option<String>,
        pinned: Option<u32>,
    },
    /// From a restored process: the gpids of the children it had where it
    /// was captured (they stayed there). Answered with `Children`.
    MovedChildren,
    /// From a process the restored one started to stand for its child
    /// `gpid` (its *child shadow*): register it as that child here and
    /// answer, once the child has ended where it runs, with `WaitStatus` (its
    /// raw wait status).
    ChildShadow { gpid: i32 },
    /// From a shadow: its kernel child `kpid` (a child of the program
    /// before it moved, or a child shadow) ended with wait status `status`
    /// (not reaped yet). Answered with `Ok`.
    ChildExited { kpid: i32, status: i32 },
    /// Checkpoint a process (the `krg checkpoint` command): its image goes
    /// to `dir` (a path visible on the node where it runs). `kill`: the
    /// process ends once the image is complete.
    Checkpoint { pid: i32, dir: Vec<u8>, kill: bool },
    /// From a process in its checkpoint handler: what is wanted of it.
    CkptOrder,
    /// From a process: the capture it was ordered is over.
    /// `kind` says why a failed one failed.
    CkptDone {
        ok: bool,
        kind: ErrorKind,
        msg: String,
        bytes: u64,
    },
    /// Switch the load balancer of every up node (root only): `off` or
    /// `threshold`. Answered with `Sched`.
    SchedBalance { name: String },
    /// Move a running process to another node (the `krg migrate`
    /// command). Answered with `Ckpt`. `precopy`: copy all the memory
    /// while the process is frozen (no post-copy).
    Migrate { pid: i32, node: u32, precopy: bool },
    /// Restart a checkpointed process (the `krg restart` command); the
    /// caller becomes its shadow as for `RemoteExec`. Answered with
    /// `Restarted`.
    Restart(RestartReq),
    // --- distributed shared memory (System V segments) ---
    /// `shmget(key, size, flags)`: the cluster-wide segment id.
    /// Answered with `Id`.
    ShmGet { key: i32, size: u64, flags: i32 },
    /// Attach the caller to a segment (`shmat`), or register a mapping it
    /// inherited across `fork` (`inherited`: no new memory object is sent).
    /// Answered with `ShmAttached`, followed on the socket by one byte that
    /// carries the file descriptors (SCM_RIGHTS) it announces.
    ShmAttach {
        shmid: i32,
        rdonly: bool,
        inherited: bool,
        /// The caller has no userfaultfd registered with the agent yet: send
        /// `/dev/userfaultfd` so that it can create one.
        need_uffd: bool,
    },
    /// The caller mapped the segment at `addr`; `uffd` is the number of its
    /// new userfaultfd (which the agent takes with `pidfd_getfd`), or -1.
    ShmMapped {
        shmid: i32,
        addr: u64,
        len: u64,
        /// Byte offset in the object of the mapping's start.
        off: u64,
        rdonly: bool,
        uffd: i32,
    },
    /// The caller is about to wait on a synchronisation object (mutex,
    /// condition variable, semaphore, barrier) at `offset` in a segment:
    /// the agent wakes the futexes in it when another node changes its page.
    ShmFutex { shmid: i32, offset: u64, len: u32 },
    /// Open (or create, with `O_CREAT` in `oflag`) a named object: a
    /// POSIX named semaphore (`sem.NAME`) or shared memory object (`shm.NAME`). `init` is the contents of its
    /// first bytes when this call creates it. Answered with `Id`.
    ShmOpen {
        name: String,
        oflag: i32,
        mode: u32,
        size: u64,
        init: Option<Vec<u8>>,
    },
    /// Remove a name (`sem_unlink`, `shm_unlink`); the object lives on
    /// while attached.
    ShmUnlink { name: String },
    /// This node's memory object of an object opened with `shm_open`
    /// (`write`: opened read-write). Answered with `ShmAttached` and one
    /// descriptor.
    ShmFd { shmid: i32, write: bool },
    /// `ftruncate` of a POSIX shared memory object (grow only).
    ShmResize { shmid: i32, size: u64 },
    /// `shmdt`: the caller unmapped the attachment at `addr`.
    ShmDetach { shmid: i32, addr: u64 },
    /// `shmctl(IPC_STAT | IPC_SET | IPC_RMID)`; `set` carries uid, gid and
    /// mode for IPC_SET. Answered with `Shm` (IPC_STAT) or `Ok`.
    ShmCtl {
        shmid: i32,
        cmd: i32,
        set: Option<(u32, u32, u32)>,
    },
    /// Every segment of the cluster (`krg ipcs`). Answered with `Ipcs`.
    Ipcs,
    // --- System V semaphores (cluster-wide, kept by their home node) ---
    /// `semget(key, nsems, flags)`. Answered with `Id`.
    SemGet { key: i32, nsems: i32, flags: i32 },
    /// `semop`/`semtimedop`: `(sem_num, sem_op, sem_flg)` each, all or
    /// nothing. Answered with `Ok`, or `Pending` when the operations could
    /// not be done within the agent's wait round (the caller asks again),
    /// or `EAGAIN` for IPC_NOWAIT or once `timeout_ns` has passed.
    SemOp {
        semid: i32,
        ops: Vec<(u16, i16, i16)>,
        timeout_ns: Option<u64>,
    },
    /// `semctl`: `val` for SETVAL, `array` for SETALL, `set` (uid, gid,
    /// mode) for IPC_SET. Answered with `Sem` (IPC_STAT), `Id` (GETVAL,
    /// GETPID, GETNCNT, GETZCNT), `SemVals` (GETALL) or `Ok`.
    SemCtl {
        semid: i32,
        num: i32,
        cmd: i32,
        val: i32,
        array: Vec<u16>,
        set: Option<(u32, u32, u32)>,
    },
    // --- streams: the cluster-wide loopback (see docs/architecture/streams.md) ---
    /// Reserve TCP port `port` for this node before a bind to a loopback or
    /// wildcard address: `EADDRINUSE` if a process on another node holds it
    /// (`reuse`: the socket has `SO_REUSEADDR`, so only a listener or a
    /// bound socket without it conflicts, as on one machine). Answered with
    /// `Ok`.
    PortBind { port: u16, reuse: bool },
    /// Where a connection to the loopback or wildcard address with TCP port
    /// `port` must go. Answered with `PortOwner`. `from`: the caller's
    /// socket is bound to that local port and connects to `port` at the
    /// loopback (`::1` if `v6`): when the port is held on another node, that
    /// node is told first, so that the server sees the loopback as its peer
    /// (`LoopbackPeer`), as on one machine. 0: nothing to tell.
    PortOwner { port: u16, from: u16, v6: bool },
    /// From a server that accepted a connection on TCP port `port` from
    /// `ip:from` (another node's address): did the client connect to the
    /// loopback (it then sees `127.0.0.1`, or `::1`)? Answered with
    /// `LoopbackPeer`.
    LoopbackPeer { ip: [u8; 4], from: u16, port: u16 },
    /// The IPv4 address of every node up. Answered with `NodeAddrs`.
    NodeAddrs,
    /// From a process being captured for migration: its TCP connections
    /// `(local, peer)` (socket addresses as text), its pipes and FIFOs (on
    /// this node) and UNIX sockets are to move. The agents find the SSI process at
    /// the other end of each and have it drain its side and wait for a new
    /// connection (one order per process, however many streams it has with
    /// the mover). An end that cannot take part fails the whole request,
    /// unless it is `optional` (one flag per stream, connections first:
    /// standard fds, which the shadow can relay instead). Answered with
    /// `Streams`.
    StreamFreeze {
        conns: Vec<(String, String)>,
        /// The fd link of each pipe end (`pipe:[N]`) or FIFO (its path).
        pipes: Vec<String>,
        /// Connected UNIX stream sockets (inode of each, on this node).
        unix: Vec<u64>,
        optional: Vec<bool>,
    },
    /// From a process that has just migrated to `node`, about its listening
    /// TCP socket parked here as `id` during the move: connections that
    /// still come to it here are passed on to `node`, where the process
    /// listens on the same port now, for as long as it does. Answered with
    /// `Ok`.
    ForwardParked { id: i32, node: u32 },
    /// From a process listening again on TCP `port` on this node (restored
    /// here): the listener this agent kept for it when it moved away, with
    /// the connections waiting in its queue, if any (`StreamFd`, then one
    /// descriptor; `Ok` when there is none: it makes a new socket).
    TakeForwarded { port: u16 },
    /// From a process about to be captured (migration or checkpoint): which
    /// of these does another process of this node hold too? `links`: fd
    /// links of pipes and socketpairs both of whose ends are the caller's
    /// (`pipe:[N]`, `socket:[N]`), made again as its own after the move;
    /// `mems`: `(device, inode)` of its shared memory mappings that would
    /// be copied; `files`: `(fd, path)` of its regular files that a
    /// migration reopens on the target (a description other processes
    /// hold too would no longer share its offset with them). Answered with
    /// `Shared` (one description per thing shared, none when it may move).
    SharedWith {
        links: Vec<String>,
        mems: Vec<(u64, u64)>,
        files: Vec<(i32, String)>,
    },
    /// From that peer, in its handler, every thread parked: it no longer
    /// touches those connections (the mover may shut its side down now).
    /// Answered with `Ok`.
    StreamFrozen { ids: Vec<u64> },
    /// From that peer, in its handler: what was pending for it on the old
    /// connection, and whether it had shut down writing. Answered with `Ok`.
    StreamDrained {
        id: u64,
        pending: Vec<u8>,
        wr_shut: bool,
        /// A seqpacket socket: `pending` is framed messages, and these are
        /// the fds `(mine, other)` of a new socketpair of the caller, which
        /// the agent takes (`pidfd_getfd`) to make its new end of.
        pair: Option<(i32, i32)>,
    },
    /// From that peer: wait for the new connection of stream `id`.
    /// Answered with `StreamFd`, then one descriptor.
    StreamAwait { id: u64 },
    /// From the moved process (restored, or resuming after a failed move):
    /// connect stream `id` to its peer on `node`, refilled with `pending`
    /// (what was in flight for this process). Answered with `StreamFd`,
    /// then one descriptor.
    StreamAttach {
        id: u64,
        node: u32,
        pending: Vec<u8>,
        wr_shut: bool,
        /// It stands for a pipe: a pipe again if both ends are on one node.
        pipe: bool,
        /// A seqpacket socket: as for `StreamDrained`.
        pair: Option<(i32, i32)>,
    },
    /// From a shadow told (signal 62) that one of the streams it relays is
    /// to be handed over: every relayed fd with its connection to the
    /// program `(fd, local, peer)`. Answered, once the program's end is
    /// held, with `Release` (the fd whose relay to end) or an error (relay
    /// on).
    ShadowRelays(Vec<(i32, String, String)>),
    /// From a process being checkpointed with `--kill`: keep its fd `fd`
    /// (a connection, a listener, a pipe to another process) open in the
    /// agent until the image is restarted, so that the other end waits
    /// instead of seeing it closed. From a migrating process (`moving`):
    /// its listening TCP socket, kept while it moves (its port is then free
    /// for its new node; see `ForwardParked`). Answered with `Id` (the park).
    Park { fd: i32, moving: bool },
    /// From a restorer: the fd parked as `id` on this node, taken back
    /// (`StreamFd`, then one descriptor; a checkpoint that failed takes
    /// its parks back and closes them). Only its owner (or root) may.
    Unpark { id: i32 },
    /// Open the FIFO `path` (canonical; the file's device and inode as this
    /// node sees them) for reading or `write`ing: wait for a process
    /// opening it the other way anywhere in the cluster. Answered with
    /// `Local` (that process is on this node: open the FIFO itself)
    /// or `StreamFd` and one descriptor (a connection to that process's
    /// node, standing for the FIFO).
    FifoOpen {
        path: Vec<u8>,
        dev: u64,
        ino: u64,
        write: bool,
        /// A non-blocking writer's: answered at once, `ENXIO` when no
        /// reader is waiting or standing (`FifoStand`) anywhere.
        nonblock: bool,
    },
    /// A non-blocking reader opened the FIFO `path` (as for `FifoOpen`) on
    /// this node: writers on other nodes may feed it from now on, through
    /// this node's agent (which writes into the FIFO). Answered with `Ok`.
    FifoStand { path: Vec<u8>, dev: u64, ino: u64 },
    /// A UNIX stream or seqpacket socket named `path` started listening here: make the
    /// name reachable from every node. `path` is the canonical path of
    /// the socket file (with its device and inode as this node sees them),
    /// or an abstract name: a NUL byte and the name, device and inode 0.
    /// Answered with `Ok`.
    UnixListen { path: Vec<u8>, dev: u64, ino: u64 },
    /// Connect to the UNIX socket named as in `UnixListen`.
    /// Answered with `Local` (nobody listens under that name on another
    /// node: connect here) or `StreamFd` and one descriptor (a connection
    /// to the listener's node, already queued there on the listener).
    /// `pair`: a seqpacket socket's (as for `StreamAttach`).
    UnixConnect {
        path: Vec<u8>,
        dev: u64,
        ino: u64,
        pair: Option<(i32, i32)>,
    },
    /// From a listener that accepted the agent's stand-in for connection
    /// `id` (the stand-in's abstract name says which): the connection
    /// itself. Answered with `StreamFd` and one descriptor. `pair`: a
    /// seqpacket socket's (as for `StreamAttach`).
    UnixTake { id: u64, pair: Option<(i32, i32)> },
    /// The local kernel pid of a gpid whose program runs on this node: as
    /// `Resolve`, but `ESRCH` for a shadow standing here for a program that
    /// runs elsewhere (a call on the process's own state, its priority,
    /// limits or memory, must reach the program, never its shadow).
    ResolveRunning { gpid: i32 },
}

/// A System V semaphore set as `semctl(IPC_STAT)` shows it.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct SemInfo {
    pub semid: i32,
    pub key: i32,
    pub home: u32,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
    pub mode: u32,
    pub nsems: u32,
    pub otime: i64,
    pub ctime: i64,
}

/// One System V segment as `shmctl(IPC_STAT)` and `krg ipcs` show it.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct ShmInfo {
    pub shmid: i32,
    pub key: i32,
    /// Name of a POSIX object (`sem.NAME`), empty for System V segments.
    pub name: String,
    /// The node that keeps its metadata and page directory.
    pub home: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
    /// Permission bits, plus `SHM_DEST` (0o1000) once removed.
    pub mode: u32,
    pub atime: i64,
    pub dtime: i64,
    pub ctime: i64,
    pub cpid: i32,
    pub lpid: i32,
    /// `(gpid, node)` of every attachment.
    pub attached: Vec<(i32, u32)>,
}

/// Signal the agent sends to ask a process for a capture (SIGRTMAX-2).
pub const CKPT_SIGNAL: i32 = 62;

/// What a process is asked to do in its checkpoint handler.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
)]
pub enum CkptAction {
    /// Nothing (the request was withdrawn).
    None,
    /// Write the image to a directory.
    Checkpoint,
    /// Stream the image to another node, which restores it; stay behind as
    /// the shadow.
    Migrate,
    /// The peer of some of this process's TCP connections is moving: drain
    /// them and take over the new connections (`CkptOrder::streams`).
    StreamSwap,
}

/// The order a process gets in its checkpoint handler.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct CkptOrder {
    pub action: CkptAction,
    /// Directory of the image.
    pub path: Vec<u8>,
    pub kill: bool,
    /// Target node of a migration.
    pub node: u32,
    /// `StreamSwap`: `(fd, stream id)` of each connection to hand over.
    pub streams: Vec<(i32, u64)>,
    /// A migration that copies all the memory while the process is frozen
    /// (else big anonymous regions follow by post-copy).
    pub precopy: bool,
}

impl CkptOrder {
    /// An order to migrate to `node`.
    pub fn migrate(node: u32, precopy: bool) -> CkptOrder {
        CkptOrder {
            action: CkptAction::Migrate,
            path: Vec::new(),
            kill: false,
            node,
            streams: Vec::new(),
            precopy,
        }
    }
}

/// A restart request: what the command read from the image (the agent
/// takes credentials from the kernel, never from the image, unless the
/// caller is root).
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct RestartReq {
    /// The image file (absolute path, visible on the target node).
    pub image: Vec<u8>,
    /// Target node, 0 to let the scheduler choose.
    pub node: u32,
    pub gpid: i32,
    pub caps: u32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// The node where the image's connections are parked (0: none): the
    /// image is restored there first (it takes back the same sockets),
    /// then migrated to `node` if that is another.
    pub parked_on: u32,
    /// How the restored process is started: executable, argv, environment,
    /// cwd, umask, rlimits, stdio, and the shadow's port and token (the
    /// `node` field is ignored).
    pub exec: RemoteExec,
}

/// Answer to `Checkpoint` and `Restart`.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct CkptDoneInfo {
    pub pid: i32,
    pub node: u32,
    pub bytes: u64,
    pub ms: u64,
    /// A migration whose big regions followed by post-copy.
    pub postcopy: bool,
}

/// What a process says in `CkptDone` (its `msg`) after a post-copy
/// migration.
pub const POSTCOPY_DONE: &str = "post-copy";

/// The other end of a stream that is moving (answer to `StreamFreeze`).
#[derive(
    Archive,
    Serialize,
    Deserialize,
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    PartialEq,
    Eq,
)]
pub enum StreamPeer {
    /// Held by the agent of `node` as stream `id` until the new
    /// connection comes.
    Held { id: u64, node: u32 },
    /// Held like `Held`, but the other end was a shadow's relay, which
    /// hands over what it still had and closes its end: a pipe read here
    /// is read to its end, not just what is in it now.
    Relayed { id: u64, node: u32 },
    /// A TCP connection whose other end cannot take part (a process
    /// outside krg or the cluster, several processes, or none: a client
    /// that closed): the mover's node's agent keeps the connection itself
    /// and relays it, as stream `id`, to the mover's new end. The mover
    /// takes what is queued for it without shutting anything down (the
    /// connection goes on).
    Kept { id: u64, node: u32 },
    /// No other process holds it (a pipe whose other end is closed).
    Nobody,
    /// It cannot take part (an optional stream only): why.
    Foreign(ErrorReply),
}

/// How the remote program gets one of its standard fds.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    PartialEq,
    Eq,
)]
pub enum StdioKind {
    /// Closed in the caller: closed in the remote program too.
    Closed,
    /// `/dev/null` in the caller: opened on the target node.
    DevNull,
    /// Anything else (terminal, pipe, socket, ...): a TCP stream between
    /// the target node and the shadow, which relays it.
    Relay,
    /// A regular file opened read-only as stdin: the program reads the same
    /// file on the target (same device and inode, or it does not start
    /// there) from the same offset, and the shadow moves its own offset to
    /// where the program stopped, as a shared file description would.
    File(FileRef),
    /// A pipe between the caller and another SSI process, which now holds
    /// its end of a new connection as stream `id` at `node`: the target
    /// attaches to it (no relay), refilled with `pending`, what was in the
    /// pipe for a reader.
    Stream {
        id: u64,
        node: u32,
        pending: Vec<u8>,
        wr_shut: bool,
    },
    /// The same stream as standard fd `0`, `1` or `2` (`2>&1`).
    Alias(u8),
}

/// A regular file the target node must open itself.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    PartialEq,
    Eq,
)]
pub struct FileRef {
    pub path: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
}

/// The program to start elsewhere, as the library sees it at start. The
/// caller's credentials are not in it: the agent takes them from the kernel.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct RemoteExec {
    pub node: u32,
    /// The executable (`/proc/self/exe`).
    pub exe: Vec<u8>,
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
    pub cwd: Vec<u8>,
    pub umask: u32,
    /// `(resource, soft, hard)` for every rlimit.
    pub rlimits: Vec<(u32, u64, u64)>,
    /// fds 0, 1 and 2.
    pub stdio: Vec<StdioKind>,
    /// TCP port the shadow listens on (on its node's address).
    pub port: u16,
    /// What every connection to that port must present first.
    pub token: Vec<u8>,
    /// Migration: the target restores the image the caller streams on
    /// one more connection (channel [`IMAGE_CHANNEL`]) instead of starting
    /// the executable afresh.
    pub restore: bool,
    /// Signals the program starts with ignored, bit `s - 1` for signal
    /// `s`: those the caller ignores (an exec keeps them ignored; `nohup`,
    /// a shell's background job). Every other signal starts at its default.
    pub ignored: u64,
}

/// The abstract name (after its NUL byte) an agent's stand-in for a
/// connection from another node is bound to, followed by the connection's
/// id in hex: what the listener's `accept` recognises it by.
pub const UNIX_STAND_IN: &[u8] = b"krg-stand-in:";

/// Channel of the connection that carries a migrating process's image.
pub const IMAGE_CHANNEL: u8 = 4;

/// The agent's answer to a [`Request`].
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub enum Response {
    /// `place`: 0 to run here, else the node the scheduler chose for this
    /// new program (the library then runs it there, see `RemoteExec`).
    /// `spread`: the policy in force may place programs on other nodes (an
    /// `execve` then asks first, `PlaceExec`).
    Hello {
        gpid: i32,
        node: u32,
        caps: u32,
        place: u32,
        spread: bool,
    },
    Pid(i32),
    /// Answer to `MovedChildren`.
    Children(Vec<i32>),
    /// Answer to `ChildShadow`: a raw wait status.
    WaitStatus(i32),
    Ok,
    Err(ErrorReply),
    Ps(Vec<ProcInfo>),
    Status(Vec<NodeStatus>),
    Caps(CapsInfo),
    /// Answer to `SchedGet` and `SchedSet`.
    Sched(SchedInfo),
    /// Answer to `SchedPlace`: the chosen node of each placement, in order.
    Placed(Vec<u32>),
    CkptOrder(CkptOrder),
    /// A checkpoint was written, or a process restarted.
    Ckpt(CkptDoneInfo),
    /// An identifier (a segment id for `ShmGet`).
    Id(i32),
    /// Answer to `ShmAttach`: `fds` descriptors follow (the memory object,
    /// then `/dev/userfaultfd` if asked for).
    ShmAttached {
        size: u64,
        fds: u8,
    },
    Shm(ShmInfo),
    Ipcs(Vec<ShmInfo>),
    Sem(SemInfo),
    SemVals(Vec<u16>),
    /// A blocking operation is still waiting: ask again.
    Pending,
    /// Answer to `PortOwner`: the node whose SSI process holds the port and
    /// that node's address, or `None` when it is this node or nobody (the
    /// connection stays on this node).
    PortOwner(Option<(u32, [u8; 4])>),
    /// Answer to `LoopbackPeer`: `None` (not a loopback connection), or
    /// whether the client asked for `::1` (else `127.0.0.1`).
    LoopbackPeer(Option<bool>),
    /// Answer to `NodeAddrs`: `(node, IPv4 address)` of every node up.
    NodeAddrs(Vec<(u32, [u8; 4])>),
    /// Answer to `StreamFreeze`: what became of each stream, in the order
    /// asked (connections, pipes, UNIX sockets).
    Streams(Vec<StreamPeer>),
    /// Answer to `SharedWith`: what other processes share, described.
    Shared(Vec<String>),
    /// A stream's new connection: one descriptor follows.
    StreamFd,
    /// Answer to `ShadowRelays`: hand over the relay of this fd.
    Release(i32),
    /// Answer to `FifoOpen` and `UnixConnect`: the other end is on this
    /// node, the kernel pairs the two.
    Local,
}

/// A failed request: the errno the application should see, what kind of
/// failure it is (callers decide on the kind, never on the text), and what
/// failed.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    PartialEq,
    Eq,
)]
pub struct ErrorReply {
    pub errno: i32,
    pub kind: ErrorKind,
    pub msg: String,
}

impl ErrorReply {
    /// A failure of kind `kind`.
    pub fn new(errno: i32, kind: ErrorKind, msg: impl Into<String>) -> Self {
        ErrorReply {
            errno,
            kind,
            msg: msg.into(),
        }
    }

    /// A failure no caller acts on but to report it.
    pub fn other(errno: i32, msg: impl Into<String>) -> Self {
        ErrorReply::new(errno, ErrorKind::Other, msg)
    }
}

/// What kind of failure an [`ErrorReply`] or a libkrg `Error` is, where a
/// caller acts on it.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
)]
pub enum ErrorKind {
    /// Any other failure: reported as it is.
    #[default]
    Other,
    /// Another capture of the same process is under way (a migration
    /// tries again once it is over).
    CaptureBusy,
    /// The other end of one of the process's streams is being captured
    /// itself (a migration tries again once it is over).
    PeerBusy,
    /// The other end of a stream is being placed on another node at its
    /// exec: its shadow relays it until it is handed over.
    PeerPlaced,
}

/// One SSI process, as `krg ps` shows it.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct ProcInfo {
    pub pid: i32,
    pub node: u32,
    pub ppid: i32,
    pub pgid: i32,
    pub uid: u32,
    pub user: String,
    /// One-letter kernel state (R, S, D, T, Z, ...).
    pub state: String,
    /// CPU use since start, in percent of one CPU (as ps computes it).
    pub cpu: f32,
    pub rss_kb: u64,
    /// User plus system CPU time, in milliseconds.
    pub cpu_time_ms: u64,
    /// Seconds since the process started.
    pub elapsed_s: f64,
    pub command: String,
    pub caps: u32,
}

/// One node, as `krg status` shows it.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct NodeStatus {
    pub id: u32,
    pub address: String,
    /// `true` while the node answers heartbeats.
    pub up: bool,
    /// CPU capacity (the cgroup quota in the local cluster; fractions allowed).
    pub cpus: f64,
    /// Runnable tasks divided by `cpus`, averaged over about a second.
    pub load: f64,
    pub mem_total_kb: u64,
    pub mem_free_kb: u64,
    /// SSI processes running on the node.
    pub processes: u32,
}

/// The capabilities of one process.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct CapsInfo {
    pub gpid: i32,
    pub effective: u32,
    pub inheritable: u32,
}

/// Environment variable that pins a program to a node: `KRG_NODE=N`.
pub const NODE_PIN_ENV: &str = "KRG_NODE";

/// Parse a `KRG_NODE` value: a node id in `1..=511`. `None` for anything
/// else (the variable is then ignored).
pub fn parse_node_pin(value: &str) -> Option<u32> {
    let n: u32 = value.trim().parse().ok()?;
    (1..=crate::gpid::MAX_NODE).contains(&n).then_some(n)
}

/// The scheduling policy in force on a node, as `krg sched` shows it.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct SchedInfo {
    /// A built-in policy name, or the file name of a user policy.
    pub name: String,
    /// `built-in` or `script`.
    pub kind: String,
    /// Where a user policy was read from (its path on the node that set
    /// it); empty for a built-in one.
    pub origin: String,
    /// Version: unix milliseconds when it was set, then the node that set
    /// it (0 for the default in force at start). The highest wins.
    pub version_ms: u64,
    pub version_node: u32,
    /// First 16 hex digits of the SHA-256 of a user policy's text; empty
    /// for a built-in one.
    pub digest: String,
    /// For `SchedSet`: the outcome on each other node that was up.
    pub pushed: Vec<SchedPush>,
    /// The load-balancing policy (`off`, `threshold`).
    pub balance: String,
}

/// The outcome of pushing a new policy to one node.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct SchedPush {
    pub node: u32,
    pub ok: bool,
    /// Why it failed, when it did.
    pub error: String,
}
