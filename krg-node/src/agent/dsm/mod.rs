//! Distributed shared memory, the agent side: cluster-wide System V
//! segments and the coherence of their pages. See docs/architecture/dsm.md.
//!
//! Every segment has a *home* node, named by its id (`home << 20 | seq`),
//! which keeps its metadata (what IPC_STAT shows) and one directory entry
//! per page: the node that holds it writable, if any, and the nodes that
//! hold a valid copy. The home serialises the requests for a page, so the
//! protocol is single-writer / many-readers with invalidation: sequentially
//! consistent at page granularity.
//!
//! Every node with attachments keeps one memfd per segment, mapped by all
//! its local processes (so they share pages natively), and one state per
//! page: *invalid* (absent from the memfd: any access faults), *read*
//! (present, every local mapping of it write-protected) or *write*
//! (present, mappings may be writable). The processes' mappings are
//! registered with their userfaultfds, which the agent holds: missing and
//! minor faults map a page in (after fetching it if invalid), write-protect
//! faults take ownership. Invalidation punches the page out of the memfd,
//! which unmaps it from every local process at once.

mod fault;
mod home;
pub mod link;
mod local;

use super::common::{err, Answer, Answered, Caller};
use super::node::Node;
use super::peer::dsm::{Cred, Grant, HomeOp, HomeReply, NodeOp, Req, Resp};
use super::sys::{self, async_fd, pidfd_getfd, pidfd_open, SharedView};
use crate::agent::common::lock;
use libkrg::dsm::uffd;
use libkrg::proto::{ErrorReply, Request, Response, ShmInfo};
use link::{FaultLink, Pace};
use local::resolve;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde_bytes::ByteBuf;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Mutex as AsyncMutex, Notify};
use tracing::{debug, warn};

const PAGE: u64 = uffd::PAGE;
/// How long a fault waits for a grant in flight (a read-ahead window)
/// before it asks its home again.
const WAIT_IN_FLIGHT: std::time::Duration = std::time::Duration::from_millis(20);
/// Segment ids: the home node above these bits, a sequence number below.
const SEQ_BITS: u32 = 20;
/// Largest segment: bounds the page directory a request can make a home
/// allocate.
const SHM_MAX: u64 = 1 << 36;
/// `mode` bit of a removed segment (Linux's SHM_DEST).
const SHM_DEST: u32 = 0o1000;
/// Node ids up to this (page directories' limit).
const MAX_NODE: u32 = 63;
/// Pages read ahead after a read fault that follows the previous one.
const READ_AHEAD: u32 = 512;
/// Pages a first write at the home may take at once (see `acquire_fresh`).
const FRESH_RUN: u32 = 128;

/// The home node of a segment id.
pub fn home_of(shmid: i32) -> u32 {
    (shmid as u32) >> SEQ_BITS
}

impl Cred {
    fn in_group(&self, g: u32) -> bool {
        self.gid == g || self.groups.contains(&g)
    }

    /// Linux's ipcperms: `want` is rwx in the low three bits.
    pub(crate) fn allowed(&self, i: &impl IpcPerm, want: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let p = i.perm();
        let mut granted = p.mode;
        if self.uid == p.cuid || self.uid == p.uid {
            granted >>= 6;
        } else if self.in_group(p.cgid) || self.in_group(p.gid) {
            granted >>= 3;
        }
        want & !granted & 0o7 == 0
    }

    /// Owner, creator or root: may IPC_SET and IPC_RMID.
    pub(crate) fn owns(&self, i: &impl IpcPerm) -> bool {
        let p = i.perm();
        self.uid == 0 || self.uid == p.uid || self.uid == p.cuid
    }
}

/// Credentials of the caller, as the home checks them.
/// The permission fields of a System V object (`struct ipc_perm`).
pub(crate) struct Perm {
    uid: u32,
    gid: u32,
    cuid: u32,
    cgid: u32,
    mode: u32,
}

pub(crate) trait IpcPerm {
    fn perm(&self) -> Perm;
}

impl IpcPerm for ShmInfo {
    fn perm(&self) -> Perm {
        Perm {
            uid: self.uid,
            gid: self.gid,
            cuid: self.cuid,
            cgid: self.cgid,
            mode: self.mode,
        }
    }
}

impl IpcPerm for libkrg::proto::SemInfo {
    fn perm(&self) -> Perm {
        Perm {
            uid: self.uid,
            gid: self.gid,
            cuid: self.cuid,
            cgid: self.cgid,
            mode: self.mode,
        }
    }
}

// ---------------------------------------------------------------------------
// State

/// A segment at its home.
#[derive(Debug)]
struct Home {
    meta: Mutex<Meta>,
    /// Directory entries, made at a page's first request (a segment may be
    /// large and sparse, and POSIX objects grow).
    pages: Mutex<HashMap<u32, Arc<AsyncMutex<Dir>>>>,
}

impl Home {
    /// The directory entry of a page inside the segment.
    fn dir(&self, shmid: i32, page: u32) -> Result<Arc<AsyncMutex<Dir>>, ErrorReply> {
        if page as usize >= pages_of(lock(&self.meta).info.size) {
            return Err(err(
                libc::EINVAL,
                format!("segment {shmid}: no page {page}"),
            ));
        }
        Ok(lock(&self.pages).entry(page).or_default().clone())
    }
}

#[derive(Debug)]
struct Meta {
    info: ShmInfo,
    removed: bool,
    /// Nodes that made a memfd for it (told when it is destroyed).
    nodes: BTreeSet<u32>,
}

/// Directory entry of a page at its home.
#[derive(Debug, Default)]
struct Dir {
    writer: Option<u32>,
    /// The nodes holding a valid copy (the writer included), with the
    /// version of the grant that gave it.
    holders: Vec<(u32, u64)>,
    /// Version of the last grant.
    ver: u64,
    /// The only up-to-date copy was on a node that is gone: every access
    /// fails (SIGBUS) rather than see old contents.
    lost: bool,
}

impl Dir {
    fn holds(&self, n: u32) -> Option<u64> {
        self.holders.iter().find(|h| h.0 == n).map(|h| h.1)
    }
}

/// A page on a node: its state and the version of the last grant applied.
#[derive(Debug, Clone, Copy)]
struct LPage {
    st: PState,
    ver: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PState {
    Invalid,
    Read,
    Write,
}

/// A segment on a node that has (or had) attachments.
#[derive(Debug)]
struct LocalSeg {
    /// Size in bytes (POSIX objects grow).
    size: AtomicU64,
    mem: File,
    /// Page states, made at a page's first use.
    pages: Mutex<HashMap<u32, Arc<AsyncMutex<LPage>>>>,
    /// Signalled whenever a grant is applied (see [`NodeOp`]).
    applied: Notify,
    /// The last page this node read-faulted (sequential read detection).
    last_read: AtomicU32,
    /// End of the last window read ahead.
    ahead_until: AtomicU32,
    atts: Mutex<Vec<LAtt>>,
    /// Offsets of the futex words local processes wait on (4-byte words of
    /// their mutexes, condition variables, semaphores, barriers).
    futex: Mutex<BTreeSet<u64>>,
    /// The agent's own mapping of the memfd, made for the first futex word:
    /// a shared futex is named by file and offset, so a wake through this
    /// mapping reaches the waiters of every local process.
    map: Mutex<Option<SharedView>>,
}

/// A local process's mapping of a segment (of `len` bytes from byte `off`
/// of the segment).
#[derive(Debug, Clone)]
struct LAtt {
    kpid: i32,
    addr: u64,
    len: u64,
    off: u64,
    mem: Arc<ProcMem>,
}

/// A local process's userfaultfd.
#[derive(Debug)]
struct ProcMem {
    kpid: i32,
    uffd: OwnedFd,
}

/// The shared-memory subsystem: segments homed here, local copies, the
/// processes' mappings, and the links to other agents.
#[derive(Debug)]
pub struct Dsm {
    node: Arc<Node>,
    /// Shared-memory links to other agents (see `link`).
    links: Mutex<HashMap<u32, Arc<link::Link>>>,
    keys: Mutex<HashMap<i32, i32>>,
    /// Names of POSIX objects homed here.
    names: Mutex<HashMap<String, i32>>,
    homes: Mutex<HashMap<i32, Arc<Home>>>,
    seq: AtomicU32,
    locals: Mutex<HashMap<i32, Arc<LocalSeg>>>,
    mems: Mutex<HashMap<i32, Arc<ProcMem>>>,
    /// Home attachments per local kernel pid (segment id, the gpid the
    /// home recorded), mapped or not: what to detach when the process exits
    /// or execs (when its gpid may no longer be known).
    owed: Mutex<HashMap<i32, Vec<(i32, i32)>>>,
    /// Local processes whose exit is watched.
    watched: Mutex<HashSet<i32>>,
    /// The userfaultfds the fault thread serves (started at the first).
    faults: Mutex<Option<Arc<Epoll>>>,
}

/// An async lock taken without a trip through the scheduler when it is
/// free: a read-ahead window locks 512 pages, and each awaited lock spends
/// tokio's cooperative budget (the task yielded every 128 and was seen
/// taking 2.5 ms to lock a window on a busy node).
async fn lock_now<T>(m: Arc<AsyncMutex<T>>) -> tokio::sync::OwnedMutexGuard<T> {
    match m.clone().try_lock_owned() {
        Ok(g) => g,
        Err(_) => m.lock_owned().await,
    }
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn pages_of(size: u64) -> usize {
    size.div_ceil(PAGE) as usize
}

fn io_err(what: String, e: std::io::Error) -> ErrorReply {
    err(
        crate::sys::errno(&e).unwrap_or(libc::EIO),
        format!("{what}: {e}"),
    )
}

/// The supplementary groups of a local process.
/// System V `*get` of `key` among the objects homed here (`keys`, key ->
/// id; `what`: "segment", say): `Some` existing object's id (refused
/// under `IPC_CREAT | IPC_EXCL`), `None` when one is to be made
/// (`IPC_PRIVATE`, or none and `IPC_CREAT`), else `ENOENT`.
pub(crate) fn keyed(
    keys: &HashMap<i32, i32>,
    key: i32,
    flags: i32,
    what: &str,
) -> Result<Option<i32>, ErrorReply> {
    if key == libc::IPC_PRIVATE {
        return Ok(None);
    }
    match keys.get(&key) {
        Some(&id) if flags & libc::IPC_CREAT != 0 && flags & libc::IPC_EXCL != 0 => Err(err(
            libc::EEXIST,
            format!("key {key:#x}: {what} {id} exists"),
        )),
        Some(&id) => Ok(Some(id)),
        None if flags & libc::IPC_CREAT == 0 => {
            Err(err(libc::ENOENT, format!("no {what} with key {key:#x}")))
        }
        None => Ok(None),
    }
}

/// The access a `*get`'s mode bits ask for (rwx, the same for owner,
/// group and others), as `Cred::allowed` checks it.
pub(crate) fn access_of(flags: i32) -> u32 {
    let f = flags as u32;
    ((f >> 6) | (f >> 3) | f) & 0o7
}

/// A link answer of the wrong kind from node `node`.
fn unexpected(node: u32, r: &Resp) -> ErrorReply {
    err(libc::EIO, format!("node {node}: unexpected {r:?}"))
}

/// The caller's credentials, as a home checks them.
pub(crate) fn cred(who: Caller) -> Cred {
    Cred {
        uid: who.uid,
        gid: who.gid,
        groups: if who.pid > 0 {
            groups_of(who.pid)
        } else {
            Vec::new()
        },
    }
}

/// Run `f` when local process `kpid` exits (at once if it is gone).
pub(crate) fn on_exit(kpid: i32, f: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        if let Ok(fd) = pidfd_open(kpid) {
            if let Ok(afd) = async_fd(fd) {
                let _ = afd.readable().await;
            }
        }
        f();
    });
}

fn groups_of(kpid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{kpid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

impl Dsm {
    fn local(&self, shmid: i32) -> Result<Arc<LocalSeg>, ErrorReply> {
        lock(&self.locals)
            .get(&shmid)
            .cloned()
            .ok_or_else(|| err(libc::EINVAL, format!("segment {shmid}: not present here")))
    }

    fn local_or_new(&self, shmid: i32, size: u64) -> Result<Arc<LocalSeg>, ErrorReply> {
        let mut l = lock(&self.locals);
        if let Some(s) = l.get(&shmid) {
            return Ok(s.clone());
        }
        let s = Arc::new(LocalSeg::new(shmid, size)?);
        l.insert(shmid, s.clone());
        Ok(s)
    }

    fn home(&self, shmid: i32) -> Result<Arc<Home>, ErrorReply> {
        lock(&self.homes)
            .get(&shmid)
            .cloned()
            .ok_or_else(|| err(libc::EINVAL, format!("no shared memory segment {shmid}")))
    }

    /// The segment and attachment base of a faulting address.
    fn find(&self, kpid: i32, addr: u64) -> Option<(i32, Arc<LocalSeg>, u64)> {
        let l = lock(&self.locals);
        l.iter().find_map(|(id, s)| {
            lock(&s.atts)
                .iter()
                .find(|a| a.kpid == kpid && addr >= a.addr && addr < a.addr + a.len)
                .map(|a| (*id, s.clone(), a.addr.wrapping_sub(a.off)))
        })
    }

    /// Every segment homed here.
    fn list(&self) -> Vec<ShmInfo> {
        let h = lock(&self.homes);
        let mut v: Vec<ShmInfo> = h.values().map(|s| lock(&s.meta).info.clone()).collect();
        v.sort_by_key(|i| i.shmid);
        v
    }
}

/// A local request about shared memory (see `Agent::handle_local`);
/// attaching answers with descriptors.
pub(super) async fn handle(dsm: &Arc<Dsm>, req: Request, who: Caller) -> Answered {
    let r = match req {
        Request::ShmAttach {
            shmid,
            rdonly,
            inherited,
            need_uffd,
        } => {
            return dsm
                .shm_attach(who, shmid, rdonly, inherited, need_uffd)
                .await
        }
        Request::ShmFd { shmid, write } => return dsm.shm_fd(who, shmid, write).await,
        Request::ShmGet { key, size, flags } => dsm.shm_get(who, key, size, flags).await?,
        Request::ShmMapped {
            shmid,
            addr,
            len,
            off,
            uffd,
            ..
        } => dsm.shm_mapped(who, shmid, addr, len, off, uffd)?,
        Request::ShmFutex { shmid, offset, len } => dsm.shm_futex(who, shmid, offset, len)?,
        Request::ShmOpen {
            name,
            oflag,
            mode,
            size,
            init,
        } => dsm.shm_open(who, name, oflag, mode, size, init).await?,
        Request::ShmUnlink { name } => dsm.shm_unlink(who, name).await?,
        Request::ShmResize { shmid, size } => dsm.shm_resize(who, shmid, size).await?,
        Request::ShmDetach { shmid, addr } => dsm.shm_detach(who, shmid, addr).await,
        Request::ShmCtl { shmid, cmd, set } => dsm.shm_ctl(who, shmid, cmd, set).await?,
        Request::Ipcs => dsm.ipcs().await,
        other => return Err(super::common::misrouted(&other)),
    };
    Ok((r, Vec::new()))
}

impl Dsm {
    pub fn new(node: Arc<Node>) -> Dsm {
        Dsm {
            node,
            links: Mutex::default(),
            keys: Mutex::default(),
            names: Mutex::default(),
            homes: Mutex::default(),
            seq: AtomicU32::default(),
            locals: Mutex::default(),
            mems: Mutex::default(),
            owed: Mutex::default(),
            watched: Mutex::default(),
            faults: Mutex::default(),
        }
    }

    /// The shared-memory link to node `id`, connecting if needed.
    async fn dsm_link(&self, id: u32) -> Result<Arc<link::Link>, ErrorReply> {
        {
            let l = lock(&self.links);
            if let Some(k) = l.get(&id).filter(|k| !k.is_dead()) {
                return Ok(k.clone());
            }
        }
        let addr = self.node.addr_of(id)?;
        let cfg = &self.node.cfg;
        let k = link::Link::connect(addr, &cfg.key, cfg.node_id, id)
            .await
            .map_err(|e| err(libc::EHOSTUNREACH, format!("node {id} at {addr}: {e}")))?;
        lock(&self.links).insert(id, k.clone());
        Ok(k)
    }

    /// A call to node `node` on the shared-memory link.
    async fn link_call(&self, node: u32, req: Req) -> Result<Resp, ErrorReply> {
        self.dsm_link(node).await?.call(node, req).await
    }

    // -- calls, local or remote ---------------------------------------------

    async fn dsm_home(self: &Arc<Self>, home: u32, op: HomeOp) -> Result<HomeReply, ErrorReply> {
        if home == self.node.node_id() {
            return Box::pin(self.home_op(op)).await;
        }
        if !self.node.is_up(home) {
            return Err(err(
                libc::EIO,
                format!("the home node {home} of the segment is down"),
            ));
        }
        if matches!(op, HomeOp::AcquireRead { .. }) {
            let c = self.node.client(home).await?;
            return c
                .dsm_home(super::common::ctx(), op)
                .await
                .map_err(|e| self.node.peer_lost(home, "segment home", e))?;
        }
        match self.link_call(home, Req::Home(op)).await? {
            Resp::Home(r) => r,
            other => Err(unexpected(home, &other)),
        }
    }

    async fn dsm_node(
        self: &Arc<Self>,
        node: u32,
        op: NodeOp,
    ) -> Result<Option<ByteBuf>, ErrorReply> {
        if node == self.node.node_id() {
            return self.node_op(op).await;
        }
        match self.link_call(node, Req::Node(op)).await? {
            Resp::Node(r) => r,
            other => Err(unexpected(node, &other)),
        }
    }

    // -- the application's requests (local socket) --------------------------

    async fn shm_get(
        self: &Arc<Self>,
        who: Caller,
        key: i32,
        size: u64,
        flags: i32,
    ) -> Result<Response, ErrorReply> {
        let op = HomeOp::Get {
            key,
            size,
            flags,
            cred: cred(who),
            pid: self.node.caller_gpid(who),
        };
        match self.dsm_home(self.node.home_for_key(key), op).await? {
            HomeReply::Id(id) => Ok(Response::Id(id)),
            r => Err(err(libc::EIO, format!("shmget: unexpected {r:?}"))),
        }
    }

    async fn shm_open(
        self: &Arc<Self>,
        who: Caller,
        name: String,
        oflag: i32,
        mode: u32,
        size: u64,
        init: Option<Vec<u8>>,
    ) -> Result<Response, ErrorReply> {
        let op = HomeOp::Open {
            name,
            oflag,
            mode,
            size,
            init: init.map(ByteBuf::from),
            cred: cred(who),
            pid: self.node.caller_gpid(who),
        };
        match self.dsm_home(self.node.key_home(), op).await? {
            HomeReply::Id(id) => Ok(Response::Id(id)),
            r => Err(err(libc::EIO, format!("open: unexpected {r:?}"))),
        }
    }

    async fn shm_unlink(
        self: &Arc<Self>,
        who: Caller,
        name: String,
    ) -> Result<Response, ErrorReply> {
        let op = HomeOp::Unlink {
            name,
            cred: cred(who),
        };
        self.dsm_home(self.node.key_home(), op).await?;
        Ok(Response::Ok)
    }

    /// `ShmAttach`: count the attachment at the home, make sure this node
    /// has the segment's memfd, and hand it over (with `/dev/userfaultfd`
    /// if asked).
    async fn shm_attach(
        self: &Arc<Self>,
        who: Caller,
        shmid: i32,
        rdonly: bool,
        inherited: bool,
        need_uffd: bool,
    ) -> Result<Answer, ErrorReply> {
        if who.pid <= 0 {
            return Err(err(libc::EPERM, "caller not visible from this node"));
        }
        if self.node.node_id() > MAX_NODE {
            return Err(err(
                libc::ENOSYS,
                format!("shared memory needs node ids <= {MAX_NODE}"),
            ));
        }
        let gpid = self.node.caller_gpid(who);
        let op = HomeOp::Attach {
            shmid,
            rdonly,
            cred: cred(who),
            pid: gpid,
            node: self.node.node_id(),
        };
        let info = match self.dsm_home(home_of(shmid), op).await? {
            HomeReply::Info(i) => i,
            r => return Err(err(libc::EIO, format!("shmat: unexpected {r:?}"))),
        };
        lock(&self.owed)
            .entry(who.pid)
            .or_default()
            .push((shmid, gpid));
        self.watch_exit(who.pid);
        let undo = |a: &Arc<Self>, e: ErrorReply| {
            let a = a.clone();
            tokio::spawn(async move { a.shm_detach(who, shmid, 0).await });
            e
        };
        let seg = match self
            .local_or_new(shmid, info.size)
            .and_then(|s| s.grow(info.size).map(|_| s))
        {
            Ok(s) => s,
            Err(e) => return Err(undo(self, e)),
        };
        let mut fds = Vec::new();
        if !inherited {
            match seg.mem.try_clone() {
                Ok(f) => fds.push(OwnedFd::from(f)),
                Err(e) => return Err(undo(self, io_err(format!("segment {shmid}"), e))),
            }
        }
        if need_uffd {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
            {
                Ok(f) => fds.push(OwnedFd::from(f)),
                Err(e) => return Err(undo(self, io_err("/dev/userfaultfd".into(), e))),
            }
        }
        Ok((
            Response::ShmAttached {
                size: info.size,
                fds: fds.len() as u8,
            },
            fds,
        ))
    }

    /// `ShmFd`: this node's memory object of a POSIX object, for a caller
    /// that may open it.
    async fn shm_fd(
        self: &Arc<Self>,
        who: Caller,
        shmid: i32,
        write: bool,
    ) -> Result<Answer, ErrorReply> {
        let op = HomeOp::Check {
            shmid,
            want: if write { 0o6 } else { 0o4 },
            cred: cred(who),
        };
        let info = match self.dsm_home(home_of(shmid), op).await? {
            HomeReply::Info(i) => i,
            r => return Err(err(libc::EIO, format!("shm_open: unexpected {r:?}"))),
        };
        let seg = self.local_or_new(shmid, info.size)?;
        seg.grow(info.size)?;
        let f = seg
            .mem
            .try_clone()
            .map_err(|e| io_err(format!("object {shmid}"), e))?;
        Ok((
            Response::ShmAttached {
                size: info.size,
                fds: 1,
            },
            vec![OwnedFd::from(f)],
        ))
    }

    /// `ShmResize`: `ftruncate` of a POSIX object.
    async fn shm_resize(
        self: &Arc<Self>,
        who: Caller,
        shmid: i32,
        size: u64,
    ) -> Result<Response, ErrorReply> {
        let op = HomeOp::Resize {
            shmid,
            size,
            cred: cred(who),
        };
        match self.dsm_home(home_of(shmid), op).await? {
            HomeReply::Info(i) => {
                // The caller's descriptor is this node's memfd: fstat and
                // mmap see the new size at once.
                self.local_or_new(shmid, i.size)?.grow(i.size)?;
                Ok(Response::Ok)
            }
            r => Err(err(libc::EIO, format!("ftruncate: unexpected {r:?}"))),
        }
    }

    /// `ShmMapped`: register the process's mapping with its userfaultfd.
    fn shm_mapped(
        self: &Arc<Self>,
        who: Caller,
        shmid: i32,
        addr: u64,
        len: u64,
        off: u64,
        uffd_fd: i32,
    ) -> Result<Response, ErrorReply> {
        let seg = self.local(shmid)?;
        if !lock(&self.owed)
            .get(&who.pid)
            .is_some_and(|v| v.iter().any(|(s, _)| *s == shmid))
        {
            return Err(err(
                libc::EINVAL,
                format!("segment {shmid}: not attached by pid {}", who.pid),
            ));
        }
        // A System V attachment maps the whole segment; a POSIX mapping
        // may map part of it, or more (beyond the end: SIGBUS, as for any
        // file).
        let seg_len = seg.npages() as u64 * PAGE;
        if len == 0
            || !addr.is_multiple_of(PAGE)
            || !off.is_multiple_of(PAGE)
            || addr.checked_add(len).is_none()
            || off.checked_add(len).is_none()
        {
            return Err(err(
                libc::EINVAL,
                format!("segment {shmid}: mapping {addr:#x}+{len:#x} (segment is {seg_len:#x})"),
            ));
        }
        let mem = if uffd_fd >= 0 {
            let fd = pidfd_getfd(who.pid, uffd_fd).map_err(super::common::os_err)?;
            let m = Arc::new(ProcMem {
                kpid: who.pid,
                uffd: fd,
            });
            if let Some(old) = lock(&self.mems).insert(who.pid, m.clone()) {
                self.unwatch(&old);
            }
            self.serve_faults(&m)?;
            m
        } else {
            lock(&self.mems).get(&who.pid).cloned().ok_or_else(|| {
                err(
                    libc::EINVAL,
                    format!("pid {}: no userfaultfd registered", who.pid),
                )
            })?
        };
        uffd::register(mem.uffd.as_fd(), addr, len)
            .map_err(|e| io_err(format!("segment {shmid}: register {addr:#x}+{len:#x}"), e))?;
        lock(&seg.atts).push(LAtt {
            kpid: who.pid,
            addr,
            len,
            off,
            mem,
        });
        Ok(Response::Ok)
    }

    /// `ShmFutex`: a local process waits on a synchronisation object.
    fn shm_futex(
        &self,
        who: Caller,
        shmid: i32,
        offset: u64,
        len: u32,
    ) -> Result<Response, ErrorReply> {
        if !lock(&self.owed)
            .get(&who.pid)
            .is_some_and(|v| v.iter().any(|(s, _)| *s == shmid))
        {
            return Err(err(
                libc::EINVAL,
                format!("segment {shmid}: not attached by pid {}", who.pid),
            ));
        }
        self.local(shmid)?.note_futex(offset, len as u64)?;
        Ok(Response::Ok)
    }

    /// `ShmDetach` (`addr` 0: an attachment that was never mapped).
    async fn shm_detach(self: &Arc<Self>, who: Caller, shmid: i32, addr: u64) -> Response {
        if addr != 0 {
            if let Ok(seg) = self.local(shmid) {
                let mut atts = lock(&seg.atts);
                if let Some(i) = atts
                    .iter()
                    .position(|a| a.kpid == who.pid && a.addr == addr)
                {
                    atts.remove(i);
                }
            }
        }
        let counted = {
            let mut owed = lock(&self.owed);
            let v = owed.entry(who.pid).or_default();
            let i = v.iter().position(|(s, _)| *s == shmid);
            i.map(|i| v.remove(i))
        };
        if let Some((_, gpid)) = counted {
            let op = HomeOp::Detach {
                shmid,
                pid: gpid,
                node: self.node.node_id(),
            };
            if let Err(e) = self.dsm_home(home_of(shmid), op).await {
                return Response::Err(e);
            }
        }
        Response::Ok
    }

    async fn shm_ctl(
        self: &Arc<Self>,
        who: Caller,
        shmid: i32,
        cmd: i32,
        set: Option<(u32, u32, u32)>,
    ) -> Result<Response, ErrorReply> {
        let op = HomeOp::Ctl {
            shmid,
            cmd,
            set,
            cred: cred(who),
        };
        match self.dsm_home(home_of(shmid), op).await? {
            HomeReply::Info(i) => Ok(Response::Shm(i)),
            HomeReply::Done => Ok(Response::Ok),
            r => Err(err(libc::EIO, format!("shmctl: unexpected {r:?}"))),
        }
    }

    /// Every segment of the cluster (`krg ipcs`).
    async fn ipcs(self: &Arc<Self>) -> Response {
        let mut nodes = self.node.up_peers();
        nodes.push(self.node.node_id());
        let calls = nodes
            .into_iter()
            .map(|n| async move { self.dsm_home(n, HomeOp::List).await });
        let mut all = Vec::new();
        for r in futures::future::join_all(calls).await {
            if let Ok(HomeReply::List(v)) = r {
                all.extend(v);
            }
        }
        all.sort_by_key(|i| i.shmid);
        Response::Ipcs(all)
    }

    /// A segment a local process has attached, if any.
    pub fn shm_attached(&self, kpid: i32) -> Option<i32> {
        lock(&self.owed)
            .get(&kpid)
            .and_then(|v| v.first().map(|(s, _)| *s))
    }

    /// A local process exec'd or exited: its attachments are gone.
    pub fn shm_forget(self: &Arc<Self>, kpid: i32) {
        if let Some(m) = lock(&self.mems).remove(&kpid) {
            self.unwatch(&m);
        }
        for s in lock(&self.locals).values() {
            lock(&s.atts).retain(|a| a.kpid != kpid);
        }
        let owed = lock(&self.owed).remove(&kpid).unwrap_or_default();
        if owed.is_empty() {
            return;
        }
        let a = self.clone();
        tokio::spawn(async move {
            for (shmid, gpid) in owed {
                let op = HomeOp::Detach {
                    shmid,
                    pid: gpid,
                    node: a.node.node_id(),
                };
                if let Err(e) = a.dsm_home(home_of(shmid), op).await {
                    warn!("pid {kpid}: detaching segment {shmid}: {}", e.msg);
                }
            }
        });
    }

    /// Detach a process's segments when it exits.
    fn watch_exit(self: &Arc<Self>, kpid: i32) {
        if !lock(&self.watched).insert(kpid) {
            return;
        }
        let a = self.clone();
        on_exit(kpid, move || {
            lock(&a.watched).remove(&kpid);
            a.shm_forget(kpid);
        });
    }
}
