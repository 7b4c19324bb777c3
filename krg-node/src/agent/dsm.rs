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

use super::dsm_link::{FaultLink, Pace, Req, Resp};
use super::{err, Agent, Caller};
use libkrg::dsm::uffd;
use libkrg::proto::{ErrorReply, Response, ShmInfo};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::unix::AsyncFd;
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

/// Credentials of the caller, as the home checks them.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
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

/// A request to a segment's home.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum HomeOp {
    Get {
        key: i32,
        size: u64,
        flags: i32,
        cred: Cred,
        pid: i32,
    },
    Open {
        name: String,
        oflag: i32,
        mode: u32,
        size: u64,
        init: Option<ByteBuf>,
        cred: Cred,
        pid: i32,
    },
    Unlink {
        name: String,
        cred: Cred,
    },
    /// May this caller open the object (`want`: rwx bits)? Answered with
    /// its `Info`.
    Check {
        shmid: i32,
        want: u32,
        cred: Cred,
    },
    /// `ftruncate`: grow a POSIX object to `size` bytes.
    Resize {
        shmid: i32,
        size: u64,
        cred: Cred,
    },
    Attach {
        shmid: i32,
        rdonly: bool,
        cred: Cred,
        pid: i32,
        node: u32,
    },
    Detach {
        shmid: i32,
        pid: i32,
        node: u32,
    },
    Ctl {
        shmid: i32,
        cmd: i32,
        set: Option<(u32, u32, u32)>,
        cred: Cred,
    },
    /// `node` reads ahead: read copies of these pages, those the home can
    /// give (`Grants`).
    AcquireRead {
        shmid: i32,
        pages: Vec<u32>,
        node: u32,
    },
    /// `node` wants page `page` readable (or writable): answered with the
    /// page (`Grant`).
    Acquire {
        shmid: i32,
        page: u32,
        node: u32,
        write: bool,
    },
    List,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum HomeReply {
    Id(i32),
    Info(ShmInfo),
    List(Vec<ShmInfo>),
    Grant(Grant),
    Grants(Vec<(u32, Grant)>),
    Done,
}

/// The home's answer to `Acquire`: the page for the requester, version
/// `ver` of the page's grants (a node applies grants and revocations in
/// version order, so a revocation that overtakes the grant it revokes
/// waits for it).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Grant {
    pub ver: u64,
    pub write: bool,
    /// The contents, or `None`: zeros if the requester has no copy, its
    /// own copy if it has one.
    pub data: Option<ByteBuf>,
}

/// What a home asks of a node that holds a page. `ver` is the version of
/// the last grant this node got for the page: the request waits until the
/// node has applied it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum NodeOp {
    /// Drop the page here, returning its contents if `want`.
    Invalidate {
        shmid: i32,
        page: u32,
        want: bool,
        ver: u64,
    },
    /// Keep a read-only copy, returning the contents.
    Downgrade { shmid: i32, page: u32, ver: u64 },
    /// The contents of a valid copy.
    Fetch { shmid: i32, page: u32, ver: u64 },
    /// The segment is gone: free its memory here.
    Drop { shmid: i32 },
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
    map: Mutex<Option<Mapping>>,
}

/// A shared mapping of a segment's memfd in the agent.
#[derive(Debug)]
struct Mapping {
    addr: usize,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this struct owns; nothing else
        // holds pointers into it (futex wakes use it only under the lock).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
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

/// The agent's shared-memory state.
#[derive(Debug, Default)]
pub struct Dsm {
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("{what}: {e}"),
    )
}

fn sys_fd(r: libc::c_long, what: &str) -> Result<OwnedFd, ErrorReply> {
    if r < 0 {
        return Err(io_err(what.into(), std::io::Error::last_os_error()));
    }
    // SAFETY: the system call just returned this new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Watch a descriptor we own with the runtime.
fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is moved into the AsyncFd, so the descriptor stays
    // open and the same for the AsyncFd's whole life.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn pidfd_open(kpid: i32) -> Result<OwnedFd, ErrorReply> {
    // SAFETY: pidfd_open takes a pid and flags.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, kpid, 0) };
    sys_fd(r, &format!("pidfd_open({kpid})"))
}

/// A copy of descriptor `fd` of process `kpid` (also the parks'; see
/// `parked`).
pub(super) fn pidfd_getfd(kpid: i32, fd: i32) -> Result<OwnedFd, ErrorReply> {
    let p = pidfd_open(kpid)?;
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, p.as_raw_fd(), fd, 0) };
    sys_fd(r, &format!("pid {kpid}: fd {fd}"))
}

/// The supplementary groups of a local process.
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

impl LocalSeg {
    fn new(shmid: i32, size: u64) -> Result<LocalSeg, ErrorReply> {
        let name = std::ffi::CString::new(format!("{}{shmid}", libkrg::dsm::MEMFD_PREFIX))
            .expect("no NUL");
        // SAFETY: memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        let fd = sys_fd(fd as libc::c_long, "memfd_create")?;
        let mem = File::from(fd);
        // The exact size: a POSIX object's fstat shows it. The tail of the
        // last page reads as zeros, as for any file.
        mem.set_len(size)
            .map_err(|e| io_err(format!("segment {shmid}: size {size}"), e))?;
        Ok(LocalSeg {
            size: AtomicU64::new(size),
            mem,
            pages: Mutex::new(HashMap::new()),
            applied: Notify::new(),
            last_read: AtomicU32::new(u32::MAX),
            ahead_until: AtomicU32::new(0),
            atts: Mutex::new(Vec::new()),
            futex: Mutex::new(BTreeSet::new()),
            map: Mutex::new(None),
        })
    }

    fn npages(&self) -> usize {
        pages_of(self.size.load(Ordering::Acquire))
    }

    /// Grow to `size` bytes (the memfd too, so that mappings and fstat
    /// see it).
    fn grow(&self, size: u64) -> Result<(), ErrorReply> {
        if size > self.size.load(Ordering::Acquire) {
            if size > self.mem.metadata().map(|m| m.len()).unwrap_or(0) {
                self.mem
                    .set_len(size)
                    .map_err(|e| io_err(format!("grow to {size}"), e))?;
            }
            self.size.fetch_max(size, Ordering::AcqRel);
        }
        Ok(())
    }

    /// A page's state (invalid until the first grant).
    fn page(&self, page: u32) -> Result<Arc<AsyncMutex<LPage>>, ErrorReply> {
        if page as usize >= self.npages() {
            return Err(err(libc::EINVAL, format!("page {page} out of range")));
        }
        Ok(lock(&self.pages)
            .entry(page)
            .or_insert_with(|| {
                Arc::new(AsyncMutex::new(LPage {
                    st: PState::Invalid,
                    ver: 0,
                }))
            })
            .clone())
    }

    /// Whether a page is known invalid here without waiting.
    fn idle_invalid(&self, page: u32) -> bool {
        lock(&self.pages)
            .get(&page)
            .is_none_or(|m| m.try_lock().is_ok_and(|l| l.st == PState::Invalid))
    }

    /// Apply a grant from the home (unless a later one was applied).
    async fn apply(&self, page: u32, g: Grant) -> Result<(), ErrorReply> {
        let mut p = self.page(page)?.lock_owned().await;
        if g.ver > p.ver {
            match g.data {
                Some(d) => self.write_page(page, &d)?,
                None if p.st == PState::Invalid => self.write_page(page, &[0u8; PAGE as usize])?,
                None => {}
            }
            p.st = if g.write { PState::Write } else { PState::Read };
            p.ver = g.ver;
        }
        drop(p);
        self.applied.notify_waiters();
        Ok(())
    }

    /// Lock a page once the grant of version `ver` has been applied (or
    /// after a while: a grant whose answer was lost never comes).
    async fn page_at(
        &self,
        page: u32,
        ver: u64,
    ) -> Result<tokio::sync::OwnedMutexGuard<LPage>, ErrorReply> {
        let m = self.page(page)?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let wait = self.applied.notified();
            let p = lock_now(m.clone()).await;
            if p.ver >= ver || tokio::time::Instant::now() >= deadline {
                return Ok(p);
            }
            drop(p);
            let _ = tokio::time::timeout_at(deadline, wait).await;
        }
    }

    /// After a read fault on `page`: the next window of pages to read
    /// ahead, when the faults look sequential and less than a window and a
    /// half is ahead of the reader (so that two windows are in flight; a
    /// window's middle page stays unmapped to tell when the reader gets
    /// there).
    fn next_window(&self, page: u32) -> Option<Vec<u32>> {
        let last = self.last_read.swap(page, Ordering::Relaxed);
        if last == u32::MAX || page <= last || page - last > READ_AHEAD {
            return None;
        }
        let until = self.ahead_until.load(Ordering::Relaxed);
        let start = if until <= page {
            page + 1
        } else if page + READ_AHEAD + READ_AHEAD / 2 >= until {
            until
        } else {
            return None;
        };
        let end = (start as usize + READ_AHEAD as usize).min(self.npages());
        if start as usize >= end {
            return None;
        }
        self.ahead_until.store(end as u32, Ordering::Relaxed);
        Some(
            (start as usize..end)
                .filter(|&p| self.idle_invalid(p as u32))
                .map(|p| p as u32)
                .collect(),
        )
    }

    /// Apply read-ahead grants and map the pages into the reader (but
    /// `skip`), so that its accesses do not fault.
    async fn apply_mapped(
        &self,
        gs: Vec<(u32, Grant)>,
        mem: &ProcMem,
        base: u64,
        skip: Option<u32>,
    ) {
        // Lock every page first (ascending, as the home sent them), then
        // one pwritev per run of consecutive pages and one UFFDIO_CONTINUE
        // per run to map: a window costs a few system calls, not three per
        // page.
        let mut locked = Vec::with_capacity(gs.len());
        for (page, g) in gs {
            if let Ok(m) = self.page(page) {
                locked.push((page, g, lock_now(m).await));
            }
        }
        let zero = [0u8; PAGE as usize];
        let fresh: Vec<(u32, &[u8])> = locked
            .iter()
            .filter(|(_, g, p)| g.ver > p.ver)
            .map(|(page, g, p)| match &g.data {
                Some(d) => (*page, &d[..]),
                None if p.st == PState::Invalid => (*page, &zero[..]),
                None => (*page, &zero[..0]),
            })
            .collect();
        let failed = self.write_runs(&fresh);
        for (page, g, p) in locked.iter_mut() {
            if g.ver > p.ver && !failed.contains(page) {
                p.st = if g.write { PState::Write } else { PState::Read };
                p.ver = g.ver;
            }
        }
        // Map runs of pages in the same state.
        let mut run: Option<(u32, u32, PState)> = None;
        let fd = mem.uffd.as_fd();
        let flush = |r: Option<(u32, u32, PState)>| {
            if let Some((first, n, st)) = r {
                cont_range(fd, base + first as u64 * PAGE, n, st == PState::Read);
            }
        };
        for (page, _, p) in locked.iter() {
            let mappable = p.st != PState::Invalid && Some(*page) != skip;
            run = match run {
                Some((first, n, st)) if mappable && st == p.st && first + n == *page => {
                    Some((first, n + 1, st))
                }
                r => {
                    flush(r);
                    mappable.then_some((*page, 1, p.st))
                }
            };
        }
        flush(run);
        drop(locked);
        self.applied.notify_waiters();
    }

    /// Write pages (`(page, bytes)`, an empty slice for "keep") with one
    /// pwritev per run of consecutive pages. Returns the pages that failed.
    fn write_runs(&self, pages: &[(u32, &[u8])]) -> Vec<u32> {
        let mut failed = Vec::new();
        let mut i = 0;
        while i < pages.len() {
            if pages[i].1.is_empty() {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < pages.len()
                && j - i < 512
                && !pages[j].1.is_empty()
                && pages[j].0 == pages[j - 1].0 + 1
            {
                j += 1;
            }
            let iov: Vec<libc::iovec> = pages[i..j]
                .iter()
                .map(|(page, d)| libc::iovec {
                    iov_base: d.as_ptr() as *mut libc::c_void,
                    iov_len: self.in_page(*page).min(d.len()),
                })
                .collect();
            let want: usize = iov.iter().map(|v| v.iov_len).sum();
            // SAFETY: the iovecs point into slices that outlive the call;
            // pwritev only reads them.
            let r = unsafe {
                libc::pwritev(
                    self.mem.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as i32,
                    (pages[i].0 as u64 * PAGE) as libc::off_t,
                )
            };
            if r < 0 || r as usize != want {
                // Short or failed: fall back to one page at a time.
                for (page, d) in &pages[i..j] {
                    if self.write_page(*page, d).is_err() {
                        failed.push(*page);
                    }
                }
            }
            i = j;
        }
        failed
    }

    /// Remember futex words (`len` bytes at `offset`) to wake on
    /// invalidation.
    fn note_futex(&self, offset: u64, len: u64) -> Result<(), ErrorReply> {
        let mapped = self.npages() as u64 * PAGE;
        if len == 0 || len > 256 || offset.checked_add(len).is_none_or(|e| e > mapped) {
            return Err(err(libc::EINVAL, format!("futex range {offset}+{len}")));
        }
        {
            let mut m = lock(&self.map);
            if m.is_none() {
                // SAFETY: a new shared mapping of our memfd, at an address
                // the kernel picks.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        mapped as usize,
                        libc::PROT_READ,
                        libc::MAP_SHARED,
                        self.mem.as_raw_fd(),
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(io_err(
                        "map segment".into(),
                        std::io::Error::last_os_error(),
                    ));
                }
                *m = Some(Mapping {
                    addr: p as usize,
                    len: mapped as usize,
                });
            }
        }
        let mut f = lock(&self.futex);
        let mut w = offset & !3;
        while w < offset + len {
            f.insert(w);
            w += 4;
        }
        Ok(())
    }

    /// Wake every local waiter on the page's futex words. Returns whether
    /// there were any (the wake itself may have put a page back).
    fn wake_futexes(&self, page: u32) -> bool {
        let start = page as u64 * PAGE;
        let words: Vec<u64> = lock(&self.futex)
            .range(start..start + PAGE)
            .copied()
            .collect();
        if words.is_empty() {
            return false;
        }
        let m = lock(&self.map);
        let Some(map) = m.as_ref() else {
            return false;
        };
        for w in words {
            // SAFETY: FUTEX_WAKE on an address inside our own mapping; it
            // reads nothing the kernel does not check.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    map.addr + w as usize,
                    libc::FUTEX_WAKE,
                    i32::MAX,
                    std::ptr::null::<libc::timespec>(),
                    std::ptr::null::<u32>(),
                    0,
                );
            }
        }
        true
    }

    /// The bytes of page `page` inside the object (the last page may be
    /// partial); the page is always sent whole, the tail as zeros.
    fn in_page(&self, page: u32) -> usize {
        let off = page as u64 * PAGE;
        self.size
            .load(Ordering::Acquire)
            .saturating_sub(off)
            .min(PAGE) as usize
    }

    fn read_page(&self, page: u32) -> Result<ByteBuf, ErrorReply> {
        let mut b = vec![0u8; PAGE as usize];
        let n = self.in_page(page);
        self.mem
            .read_exact_at(&mut b[..n], page as u64 * PAGE)
            .map_err(|e| io_err(format!("page {page}: read"), e))?;
        Ok(ByteBuf::from(b))
    }

    fn write_page(&self, page: u32, data: &[u8]) -> Result<(), ErrorReply> {
        if data.len() != PAGE as usize {
            return Err(err(
                libc::EINVAL,
                format!("page {page}: {} bytes", data.len()),
            ));
        }
        let n = self.in_page(page);
        self.mem
            .write_all_at(&data[..n], page as u64 * PAGE)
            .map_err(|e| io_err(format!("page {page}: write"), e))
    }

    /// Take the page out of the memfd: every local mapping loses it.
    fn punch(&self, page: u32) -> Result<(), ErrorReply> {
        // SAFETY: fallocate on our memfd with a range inside it.
        let r = unsafe {
            libc::fallocate(
                self.mem.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (page as u64 * PAGE) as libc::off_t,
                PAGE as libc::off_t,
            )
        };
        if r < 0 {
            return Err(io_err(
                format!("page {page}: punch"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Write-protect pages (ascending) in every local mapping, one ioctl
    /// per run of consecutive pages.
    fn protect_runs(&self, pages: &[u32]) {
        if pages.is_empty() {
            return;
        }
        for a in lock(&self.atts).iter() {
            let mut i = 0;
            while i < pages.len() {
                let mut j = i + 1;
                while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                    j += 1;
                }
                let start = pages[i] as u64 * PAGE;
                let end = pages[j - 1] as u64 * PAGE + PAGE;
                let lo = start.max(a.off);
                let hi = end.min(a.off + a.len);
                if lo < hi {
                    let at = a.addr + (lo - a.off);
                    if let Err(e) = uffd::write_protect(a.mem.uffd.as_fd(), at, hi - lo, true) {
                        debug!("pid {}: write-protect {at:#x}: {e}", a.kpid);
                    }
                }
                i = j;
            }
        }
    }

    /// Write-protect the page in every local mapping, so that its contents
    /// stay still while they are read for another node.
    fn protect_all(&self, page: u32) {
        let at = page as u64 * PAGE;
        for a in lock(&self.atts).iter() {
            let Some(rel) = at.checked_sub(a.off).filter(|r| *r < a.len) else {
                continue;
            };
            if let Err(e) = uffd::write_protect(a.mem.uffd.as_fd(), a.addr + rel, PAGE, true) {
                debug!("pid {}: write-protect {:#x}: {e}", a.kpid, a.addr + rel);
            }
        }
    }
}

/// Map `n` pages from `start` into a process (after read ahead); pages
/// already mapped are skipped.
fn cont_range(fd: std::os::fd::BorrowedFd<'_>, start: u64, n: u32, wp: bool) {
    if uffd::cont(fd, start, n as u64 * PAGE, wp).is_ok() {
        return;
    }
    for k in 0..n as u64 {
        let _ = uffd::cont(fd, start + k * PAGE, PAGE, wp);
    }
}

/// Map the page in for a faulting thread, or lift its write protection.
fn resolve(mem: &ProcMem, addr: u64, st: PState, wp_fault: bool) {
    let fd = mem.uffd.as_fd();
    let r = if wp_fault {
        uffd::write_protect(fd, addr, PAGE, false)
    } else {
        uffd::cont(fd, addr, PAGE, st == PState::Read)
    };
    if let Err(e) = r {
        // EEXIST: another fault mapped it already; the thread just retries.
        if e.raw_os_error() != Some(libc::EEXIST) {
            debug!("pid {}: resolve {addr:#x}: {e}", mem.kpid);
        }
        let _ = uffd::wake(fd, addr, PAGE);
    }
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

impl Agent {
    pub(crate) fn cred(&self, who: Caller) -> Cred {
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

    pub(crate) fn caller_gpid(&self, who: Caller) -> i32 {
        self.procs().translate(who.pid).unwrap_or(who.pid)
    }

    /// Where the segment of a System V key lives: the lowest node id this
    /// agent has known (down ones included), so that every node finds the
    /// same segment for a key.
    /// The home of a new or keyed object: here for IPC_PRIVATE.
    pub(crate) fn home_for_key(&self, key: i32) -> u32 {
        if key == libc::IPC_PRIVATE {
            self.node_id()
        } else {
            self.key_home()
        }
    }

    pub(crate) fn key_home(&self) -> u32 {
        let m = self.members();
        m.keys()
            .copied()
            .chain(std::iter::once(self.node_id()))
            .min()
            .unwrap_or(self.node_id())
    }

    // -- calls, local or remote ---------------------------------------------

    async fn dsm_home(self: &Arc<Self>, home: u32, op: HomeOp) -> Result<HomeReply, ErrorReply> {
        if home == self.node_id() {
            return Box::pin(self.home_op(op)).await;
        }
        if !self.is_up(home) {
            return Err(err(
                libc::EIO,
                format!("the home node {home} of the segment is down"),
            ));
        }
        if matches!(op, HomeOp::AcquireRead { .. }) {
            let c = self.client(home).await?;
            return c
                .dsm_home(super::ctx(), op)
                .await
                .map_err(|e| self.peer_lost(home, "segment home", e))?;
        }
        let link = self.dsm_link(home).await?;
        match link.call(home, Req::Home(op)).await? {
            Resp::Home(r) => r,
            other => Err(err(libc::EIO, format!("node {home}: unexpected {other:?}"))),
        }
    }

    async fn dsm_node(
        self: &Arc<Self>,
        node: u32,
        op: NodeOp,
    ) -> Result<Option<ByteBuf>, ErrorReply> {
        if node == self.node_id() {
            return self.node_op(op).await;
        }
        let link = self.dsm_link(node).await?;
        match link.call(node, Req::Node(op)).await? {
            Resp::Node(r) => r,
            other => Err(err(libc::EIO, format!("node {node}: unexpected {other:?}"))),
        }
    }

    // -- the application's requests (local socket) --------------------------

    pub async fn shm_get(
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
            cred: self.cred(who),
            pid: self.caller_gpid(who),
        };
        match self.dsm_home(self.home_for_key(key), op).await? {
            HomeReply::Id(id) => Ok(Response::Id(id)),
            r => Err(err(libc::EIO, format!("shmget: unexpected {r:?}"))),
        }
    }

    pub async fn shm_open(
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
            cred: self.cred(who),
            pid: self.caller_gpid(who),
        };
        match self.dsm_home(self.key_home(), op).await? {
            HomeReply::Id(id) => Ok(Response::Id(id)),
            r => Err(err(libc::EIO, format!("open: unexpected {r:?}"))),
        }
    }

    pub async fn shm_unlink(
        self: &Arc<Self>,
        who: Caller,
        name: String,
    ) -> Result<Response, ErrorReply> {
        let op = HomeOp::Unlink {
            name,
            cred: self.cred(who),
        };
        self.dsm_home(self.key_home(), op).await?;
        Ok(Response::Ok)
    }

    /// `ShmAttach`: count the attachment at the home, make sure this node
    /// has the segment's memfd, and hand it over (with `/dev/userfaultfd`
    /// if asked).
    pub async fn shm_attach(
        self: &Arc<Self>,
        who: Caller,
        shmid: i32,
        rdonly: bool,
        inherited: bool,
        need_uffd: bool,
    ) -> Result<(Response, Vec<OwnedFd>), ErrorReply> {
        if who.pid <= 0 {
            return Err(err(libc::EPERM, "caller not visible from this node"));
        }
        if self.node_id() > MAX_NODE {
            return Err(err(
                libc::ENOSYS,
                format!("shared memory needs node ids <= {MAX_NODE}"),
            ));
        }
        let gpid = self.caller_gpid(who);
        let op = HomeOp::Attach {
            shmid,
            rdonly,
            cred: self.cred(who),
            pid: gpid,
            node: self.node_id(),
        };
        let info = match self.dsm_home(home_of(shmid), op).await? {
            HomeReply::Info(i) => i,
            r => return Err(err(libc::EIO, format!("shmat: unexpected {r:?}"))),
        };
        lock(&self.dsm.owed)
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
            .dsm
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
    pub async fn shm_fd(
        self: &Arc<Self>,
        who: Caller,
        shmid: i32,
        write: bool,
    ) -> Result<(Response, Vec<OwnedFd>), ErrorReply> {
        let op = HomeOp::Check {
            shmid,
            want: if write { 0o6 } else { 0o4 },
            cred: self.cred(who),
        };
        let info = match self.dsm_home(home_of(shmid), op).await? {
            HomeReply::Info(i) => i,
            r => return Err(err(libc::EIO, format!("shm_open: unexpected {r:?}"))),
        };
        let seg = self.dsm.local_or_new(shmid, info.size)?;
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
    pub async fn shm_resize(
        self: &Arc<Self>,
        who: Caller,
        shmid: i32,
        size: u64,
    ) -> Result<Response, ErrorReply> {
        let op = HomeOp::Resize {
            shmid,
            size,
            cred: self.cred(who),
        };
        match self.dsm_home(home_of(shmid), op).await? {
            HomeReply::Info(i) => {
                // The caller's descriptor is this node's memfd: fstat and
                // mmap see the new size at once.
                self.dsm.local_or_new(shmid, i.size)?.grow(i.size)?;
                Ok(Response::Ok)
            }
            r => Err(err(libc::EIO, format!("ftruncate: unexpected {r:?}"))),
        }
    }

    /// `ShmMapped`: register the process's mapping with its userfaultfd.
    pub fn shm_mapped(
        self: &Arc<Self>,
        who: Caller,
        shmid: i32,
        addr: u64,
        len: u64,
        off: u64,
        uffd_fd: i32,
    ) -> Result<Response, ErrorReply> {
        let seg = self.dsm.local(shmid)?;
        if !lock(&self.dsm.owed)
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
            let fd = pidfd_getfd(who.pid, uffd_fd)?;
            let m = Arc::new(ProcMem {
                kpid: who.pid,
                uffd: fd,
            });
            if let Some(old) = lock(&self.dsm.mems).insert(who.pid, m.clone()) {
                self.unwatch(&old);
            }
            self.serve_faults(&m)?;
            m
        } else {
            lock(&self.dsm.mems).get(&who.pid).cloned().ok_or_else(|| {
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
    pub fn shm_futex(
        &self,
        who: Caller,
        shmid: i32,
        offset: u64,
        len: u32,
    ) -> Result<Response, ErrorReply> {
        if !lock(&self.dsm.owed)
            .get(&who.pid)
            .is_some_and(|v| v.iter().any(|(s, _)| *s == shmid))
        {
            return Err(err(
                libc::EINVAL,
                format!("segment {shmid}: not attached by pid {}", who.pid),
            ));
        }
        self.dsm.local(shmid)?.note_futex(offset, len as u64)?;
        Ok(Response::Ok)
    }

    /// `ShmDetach` (`addr` 0: an attachment that was never mapped).
    pub async fn shm_detach(self: &Arc<Self>, who: Caller, shmid: i32, addr: u64) -> Response {
        if addr != 0 {
            if let Ok(seg) = self.dsm.local(shmid) {
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
            let mut owed = lock(&self.dsm.owed);
            let v = owed.entry(who.pid).or_default();
            let i = v.iter().position(|(s, _)| *s == shmid);
            i.map(|i| v.remove(i))
        };
        if let Some((_, gpid)) = counted {
            let op = HomeOp::Detach {
                shmid,
                pid: gpid,
                node: self.node_id(),
            };
            if let Err(e) = self.dsm_home(home_of(shmid), op).await {
                return Response::Err(e);
            }
        }
        Response::Ok
    }

    pub async fn shm_ctl(
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
            cred: self.cred(who),
        };
        match self.dsm_home(home_of(shmid), op).await? {
            HomeReply::Info(i) => Ok(Response::Shm(i)),
            HomeReply::Done => Ok(Response::Ok),
            r => Err(err(libc::EIO, format!("shmctl: unexpected {r:?}"))),
        }
    }

    /// Every segment of the cluster (`krg ipcs`).
    pub async fn ipcs(self: &Arc<Self>) -> Response {
        let mut nodes = self.up_peers();
        nodes.push(self.node_id());
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
        lock(&self.dsm.owed)
            .get(&kpid)
            .and_then(|v| v.first().map(|(s, _)| *s))
    }

    /// A local process exec'd or exited: its attachments are gone.
    pub fn shm_forget(self: &Arc<Self>, kpid: i32) {
        if let Some(m) = lock(&self.dsm.mems).remove(&kpid) {
            self.unwatch(&m);
        }
        for s in lock(&self.dsm.locals).values() {
            lock(&s.atts).retain(|a| a.kpid != kpid);
        }
        let owed = lock(&self.dsm.owed).remove(&kpid).unwrap_or_default();
        if owed.is_empty() {
            return;
        }
        let a = self.clone();
        tokio::spawn(async move {
            for (shmid, gpid) in owed {
                let op = HomeOp::Detach {
                    shmid,
                    pid: gpid,
                    node: a.node_id(),
                };
                if let Err(e) = a.dsm_home(home_of(shmid), op).await {
                    warn!("pid {kpid}: detaching segment {shmid}: {}", e.msg);
                }
            }
        });
    }

    /// Detach a process's segments when it exits.
    fn watch_exit(self: &Arc<Self>, kpid: i32) {
        if !lock(&self.dsm.watched).insert(kpid) {
            return;
        }
        let a = self.clone();
        self.on_exit(kpid, move || {
            lock(&a.dsm.watched).remove(&kpid);
            a.shm_forget(kpid);
        });
    }

    /// Run `f` when local process `kpid` exits (at once if it is gone).
    pub(crate) fn on_exit(&self, kpid: i32, f: impl FnOnce() + Send + 'static) {
        tokio::spawn(async move {
            if let Ok(fd) = pidfd_open(kpid) {
                if let Ok(afd) = async_fd(fd) {
                    let _ = afd.readable().await;
                }
            }
            f();
        });
    }

    // -- faults -------------------------------------------------------------

    /// Have the fault thread serve a process's page faults.
    fn serve_faults(self: &Arc<Self>, mem: &ProcMem) -> Result<(), ErrorReply> {
        let ep = self.fault_thread()?;
        ep.add(
            mem.uffd.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, mem.kpid as u32 as u64),
        )
        .map_err(|e| io_err(format!("pid {}: userfaultfd", mem.kpid), e.into()))
    }

    /// A process's userfaultfd is no longer served.
    fn unwatch(&self, mem: &ProcMem) {
        if let Some(ep) = lock(&self.dsm.faults).as_ref() {
            let _ = ep.delete(mem.uffd.as_fd());
        }
    }

    /// The fault thread's epoll set (the thread is started with it).
    fn fault_thread(self: &Arc<Self>) -> Result<Arc<Epoll>, ErrorReply> {
        let mut g = lock(&self.dsm.faults);
        if let Some(ep) = g.as_ref() {
            return Ok(ep.clone());
        }
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| io_err("epoll for the fault thread".into(), e.into()))?;
        let ep = Arc::new(ep);
        let (a, e, rt) = (self.clone(), ep.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name("krg-dsm-faults".into())
            .spawn(move || a.fault_loop(&rt, &e))
            .map_err(|e| io_err("the fault thread".into(), e))?;
        *g = Some(ep.clone());
        Ok(ep)
    }

    /// The fault thread: every local process's page faults, one at a time,
    /// outside tokio. After each it polls for the next for a while instead
    /// of sleeping (see `dsm_link::SPIN_IDLE`), and it waits for a home's
    /// answer the same way: a fault then costs the application's wake-up
    /// and the network, not three more wake-ups of idle vCPUs.
    fn fault_loop(self: Arc<Self>, rt: &tokio::runtime::Handle, ep: &Epoll) {
        let _rt = rt.enter();
        let mut links: HashMap<u32, FaultLink> = HashMap::new();
        let mut evs = [EpollEvent::empty(); 16];
        let mut buf = [0u8; uffd::MSG_SIZE * 16];
        let mut pace = Pace::default();
        loop {
            let spin = pace.spinning();
            let timeout = if spin {
                EpollTimeout::ZERO
            } else {
                EpollTimeout::NONE
            };
            let n = match ep.wait(&mut evs, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("the fault thread stops: epoll: {e}");
                    return;
                }
            };
            if n == 0 {
                std::thread::yield_now();
                continue;
            }
            for ev in &evs[..n] {
                let kpid = ev.data() as u32 as i32;
                let Some(mem) = lock(&self.dsm.mems).get(&kpid).cloned() else {
                    continue;
                };
                loop {
                    // SAFETY: reading whole uffd_msg records into our buffer.
                    let n = unsafe {
                        libc::read(mem.uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                    };
                    if n <= 0 {
                        // EAGAIN: all read; anything else: the process is
                        // going (its exit unwatches it).
                        break;
                    }
                    for f in uffd::faults(&buf[..n as usize]) {
                        if self.fault(rt, &mut links, &mem, f, spin) {
                            pace.note();
                        }
                    }
                }
            }
        }
    }

    /// A home's answer to `op`, through this thread's fault connection to
    /// it (made at the first call, dropped at an error).
    fn fault_call(
        &self,
        rt: &tokio::runtime::Handle,
        links: &mut HashMap<u32, FaultLink>,
        home: u32,
        op: HomeOp,
        poll: bool,
    ) -> Result<HomeReply, ErrorReply> {
        if !self.is_up(home) {
            return Err(err(
                libc::EIO,
                format!("the home node {home} of the segment is down"),
            ));
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = links.entry(home) {
            let addr = self.members().get(&home).map(|m| m.addr).ok_or_else(|| {
                err(
                    libc::ESRCH,
                    format!("node {home} is not a member of the cluster"),
                )
            })?;
            let l = rt
                .block_on(FaultLink::connect(
                    addr,
                    &self.cfg.key,
                    self.cfg.node_id,
                    home,
                ))
                .map_err(|e| err(libc::EHOSTUNREACH, format!("node {home} at {addr}: {e}")))?;
            slot.insert(l);
        }
        let link = links.get_mut(&home).expect("inserted above");
        match link.call(home, &Req::Home(op), poll) {
            Ok(Resp::Home(r)) => r,
            Ok(other) => Err(err(libc::EIO, format!("node {home}: unexpected {other:?}"))),
            Err(e) => {
                links.remove(&home);
                Err(e)
            }
        }
    }

    /// Serve one fault; whether it asked the home (faults served from
    /// pages already here, as a sequential read's, start no polling: the
    /// read-ahead that brought them needs the CPU).
    fn fault(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        links: &mut HashMap<u32, FaultLink>,
        mem: &Arc<ProcMem>,
        f: uffd::Fault,
        poll: bool,
    ) -> bool {
        let addr = f.addr & !(PAGE - 1);
        let Some((shmid, seg, base)) = self.dsm.find(mem.kpid, addr) else {
            debug!("pid {}: fault at {addr:#x} outside its segments", mem.kpid);
            let _ = uffd::wake(mem.uffd.as_fd(), addr, PAGE);
            return false;
        };
        let page = (addr.wrapping_sub(base) / PAGE) as u32;
        if page as usize >= seg.npages() {
            let _ = uffd::wake(mem.uffd.as_fd(), addr, PAGE);
            return false;
        }
        let write = f.flags & uffd::FLAG_WRITE != 0;
        let wp = f.flags & uffd::FLAG_WP != 0;
        let mut asked = false;
        loop {
            // Made before the check: a grant applied meanwhile wakes it.
            let applied = seg.applied.notified();
            {
                let Ok(m) = seg.page(page) else {
                    let _ = uffd::wake(mem.uffd.as_fd(), addr, PAGE);
                    return asked;
                };
                let p = rt.block_on(m.lock_owned());
                if p.st == PState::Write || (p.st == PState::Read && !write) {
                    resolve(mem, addr, p.st, wp);
                    drop(p);
                    if !write {
                        self.read_ahead(&seg, shmid, mem, base, page);
                    }
                    return asked;
                }
            }
            let op = HomeOp::Acquire {
                shmid,
                page,
                node: self.node_id(),
                write,
            };
            let home = home_of(shmid);
            if write && home == self.node_id() {
                let gs = self.acquire_fresh(shmid, page, self.node_id());
                if !gs.is_empty() {
                    rt.block_on(seg.apply_mapped(gs, mem, base, None));
                    asked = true;
                    continue;
                }
            }
            let got = if home == self.node_id() {
                rt.block_on(self.home_op(op))
            } else {
                self.fault_call(rt, links, home, op, poll)
            };
            asked = true;
            let r = match got {
                // The home counts this node a holder already: a read-ahead
                // window with the page is on its way. Wait for it rather
                // than ask again at once.
                Ok(HomeReply::Grant(g)) if g.ver == 0 => {
                    rt.block_on(async {
                        let _ = tokio::time::timeout(WAIT_IN_FLIGHT, applied).await;
                    });
                    Ok(())
                }
                Ok(HomeReply::Grant(g)) => rt.block_on(seg.apply(page, g)),
                Ok(r) => Err(err(libc::EIO, format!("acquire: unexpected {r:?}"))),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                // The page cannot be had (its only copy was on a node that
                // is gone, or the home is): the access fails loudly.
                warn!(
                    "pid {}: segment {shmid} page {page}: {}; sending SIGBUS",
                    mem.kpid, e.msg
                );
                if let Ok(p) = pidfd_open(mem.kpid) {
                    // SAFETY: pidfd_send_signal with a valid pidfd.
                    unsafe {
                        libc::syscall(
                            libc::SYS_pidfd_send_signal,
                            p.as_raw_fd(),
                            libc::SIGBUS,
                            std::ptr::null::<libc::siginfo_t>(),
                            0,
                        );
                    }
                }
                let _ = uffd::wake(mem.uffd.as_fd(), addr, PAGE);
                return asked;
            }
        }
    }

    /// Sequential reads: fetch the next window of pages in the background
    /// (one message per holder) and map them into the reader, so that it
    /// finds them in place instead of faulting on each.
    fn read_ahead(
        self: &Arc<Self>,
        seg: &Arc<LocalSeg>,
        shmid: i32,
        mem: &Arc<ProcMem>,
        base: u64,
        page: u32,
    ) {
        let Some(pages) = seg.next_window(page) else {
            return;
        };
        if pages.is_empty() {
            return;
        }
        let (a, seg, mem) = (self.clone(), seg.clone(), mem.clone());
        tokio::spawn(async move {
            let op = HomeOp::AcquireRead {
                shmid,
                pages,
                node: a.node_id(),
            };
            if let Ok(HomeReply::Grants(gs)) = a.dsm_home(home_of(shmid), op).await {
                // The middle page stays unmapped: the reader's (cheap,
                // local) fault there asks for the next window in time.
                let marker = gs.get(gs.len() / 2).map(|g| g.0);
                seg.apply_mapped(gs, &mem, base, marker).await;
            }
        });
    }

    // -- the home -----------------------------------------------------------

    pub async fn home_op(self: &Arc<Self>, op: HomeOp) -> Result<HomeReply, ErrorReply> {
        match op {
            HomeOp::Get {
                key,
                size,
                flags,
                cred,
                pid,
            } => self.home_get(key, size, flags, &cred, pid),
            HomeOp::Open {
                name,
                oflag,
                mode,
                size,
                init,
                cred,
                pid,
            } => self.home_open(name, oflag, mode, size, init, &cred, pid),
            HomeOp::Check { shmid, want, cred } => {
                let h = self.dsm.home(shmid)?;
                let m = lock(&h.meta);
                if !cred.allowed(&m.info, want) {
                    return Err(err(
                        libc::EACCES,
                        format!("object {shmid}: permission denied"),
                    ));
                }
                Ok(HomeReply::Info(m.info.clone()))
            }
            HomeOp::Resize { shmid, size, cred } => {
                let h = self.dsm.home(shmid)?;
                let mut m = lock(&h.meta);
                if m.info.name.is_empty() {
                    return Err(err(
                        libc::EINVAL,
                        format!("segment {shmid} is not a POSIX object"),
                    ));
                }
                if !cred.allowed(&m.info, 0o2) {
                    return Err(err(
                        libc::EACCES,
                        format!("object {shmid}: permission denied"),
                    ));
                }
                if size < m.info.size {
                    return Err(err(
                        libc::EINVAL,
                        format!("object {shmid}: shrinking a shared memory object ({} to {size} bytes) is not supported", m.info.size),
                    ));
                }
                if size > SHM_MAX {
                    return Err(err(libc::EFBIG, format!("object {shmid}: {size} bytes")));
                }
                m.info.size = size;
                m.info.ctime = now();
                Ok(HomeReply::Info(m.info.clone()))
            }
            HomeOp::Unlink { name, cred } => {
                let id = lock(&self.dsm.names)
                    .get(&name)
                    .copied()
                    .ok_or_else(|| err(libc::ENOENT, format!("no object named {name}")))?;
                let h = self.dsm.home(id)?;
                let gone = {
                    let mut m = lock(&h.meta);
                    // /dev/shm is sticky: only the owner (or root) unlinks.
                    if !cred.owns(&m.info) {
                        return Err(err(libc::EACCES, format!("{name}: not its owner")));
                    }
                    m.removed = true;
                    m.info.mode |= SHM_DEST;
                    m.info.ctime = now();
                    m.info.attached.is_empty()
                };
                lock(&self.dsm.names).remove(&name);
                if gone {
                    self.destroy(id);
                }
                Ok(HomeReply::Done)
            }
            HomeOp::Attach {
                shmid,
                rdonly,
                cred,
                pid,
                node,
            } => {
                let h = self.dsm.home(shmid)?;
                let mut m = lock(&h.meta);
                let want = if rdonly { 0o4 } else { 0o6 };
                if !cred.allowed(&m.info, want) {
                    return Err(err(
                        libc::EACCES,
                        format!("segment {shmid}: permission denied"),
                    ));
                }
                m.info.attached.push((pid, node));
                m.nodes.insert(node);
                m.info.atime = now();
                m.info.lpid = pid;
                Ok(HomeReply::Info(m.info.clone()))
            }
            HomeOp::Detach { shmid, pid, node } => {
                let h = self.dsm.home(shmid)?;
                let gone = {
                    let mut m = lock(&h.meta);
                    if let Some(i) = m.info.attached.iter().position(|x| *x == (pid, node)) {
                        m.info.attached.remove(i);
                    }
                    m.info.dtime = now();
                    m.info.lpid = pid;
                    m.removed && m.info.attached.is_empty()
                };
                if gone {
                    self.destroy(shmid);
                }
                Ok(HomeReply::Done)
            }
            HomeOp::Ctl {
                shmid,
                cmd,
                set,
                cred,
            } => self.home_ctl(shmid, cmd, set, &cred),
            HomeOp::AcquireRead { shmid, pages, node } => {
                if node > MAX_NODE || pages.len() > READ_AHEAD as usize {
                    return Err(err(
                        libc::EINVAL,
                        format!("read of {} pages by node {node}", pages.len()),
                    ));
                }
                Ok(HomeReply::Grants(
                    self.acquire_read(shmid, &pages, node).await?,
                ))
            }
            HomeOp::Acquire {
                shmid,
                page,
                node,
                write,
            } => {
                if node > MAX_NODE {
                    return Err(err(libc::EINVAL, format!("node {node}")));
                }
                Ok(HomeReply::Grant(
                    self.acquire(shmid, page, node, write).await?,
                ))
            }
            HomeOp::List => Ok(HomeReply::List(self.dsm.list())),
        }
    }

    fn home_get(
        &self,
        key: i32,
        size: u64,
        flags: i32,
        cred: &Cred,
        pid: i32,
    ) -> Result<HomeReply, ErrorReply> {
        let mut keys = lock(&self.dsm.keys);
        if key != libc::IPC_PRIVATE {
            if let Some(&id) = keys.get(&key) {
                if flags & libc::IPC_CREAT != 0 && flags & libc::IPC_EXCL != 0 {
                    return Err(err(
                        libc::EEXIST,
                        format!("key {key:#x}: segment {id} exists"),
                    ));
                }
                let h = self.dsm.home(id)?;
                let m = lock(&h.meta);
                if size > m.info.size {
                    return Err(err(
                        libc::EINVAL,
                        format!(
                            "key {key:#x}: segment {id} is {} bytes, {size} asked",
                            m.info.size
                        ),
                    ));
                }
                let f = flags as u32;
                if !cred.allowed(&m.info, ((f >> 6) | (f >> 3) | f) & 0o7) {
                    return Err(err(
                        libc::EACCES,
                        format!("key {key:#x}: segment {id}: permission denied"),
                    ));
                }
                return Ok(HomeReply::Id(id));
            }
            if flags & libc::IPC_CREAT == 0 {
                return Err(err(libc::ENOENT, format!("no segment with key {key:#x}")));
            }
        }
        let id = self.create(key, String::new(), size, flags as u32 & 0o777, cred, pid)?;
        if key != libc::IPC_PRIVATE {
            keys.insert(key, id);
        }
        Ok(HomeReply::Id(id))
    }

    /// A named object (POSIX semaphore): open it, or create it with its
    /// first bytes (`init`) already in place, so that no other node can
    /// see it uninitialised.
    #[allow(clippy::too_many_arguments)]
    fn home_open(
        &self,
        name: String,
        oflag: i32,
        mode: u32,
        size: u64,
        init: Option<ByteBuf>,
        cred: &Cred,
        pid: i32,
    ) -> Result<HomeReply, ErrorReply> {
        let mut names = lock(&self.dsm.names);
        if let Some(&id) = names.get(&name) {
            if oflag & libc::O_CREAT != 0 && oflag & libc::O_EXCL != 0 {
                return Err(err(libc::EEXIST, format!("{name} exists")));
            }
            let h = self.dsm.home(id)?;
            if !cred.allowed(&lock(&h.meta).info, 0o6) {
                return Err(err(libc::EACCES, format!("{name}: permission denied")));
            }
            return Ok(HomeReply::Id(id));
        }
        if oflag & libc::O_CREAT == 0 {
            return Err(err(libc::ENOENT, format!("no object named {name}")));
        }
        let id = self.create(
            libc::IPC_PRIVATE,
            name.clone(),
            size,
            mode & 0o777,
            cred,
            pid,
        )?;
        if let Some(bytes) = init {
            let h = self.dsm.home(id)?;
            let seg = self.dsm.local_or_new(id, size)?;
            let mut page = vec![0u8; PAGE as usize];
            let n = bytes.len().min(page.len());
            page[..n].copy_from_slice(&bytes[..n]);
            seg.write_page(0, &page)?;
            let me = self.node_id();
            // Fresh objects: nobody else can hold these locks yet.
            let (sp, hp) = (seg.page(0)?, h.dir(id, 0)?);
            if let (Ok(mut p), Ok(mut d)) = (sp.try_lock_owned(), hp.try_lock_owned()) {
                d.ver = 1;
                d.writer = Some(me);
                d.holders = vec![(me, 1)];
                *p = LPage {
                    st: PState::Write,
                    ver: 1,
                };
            }
            lock(&h.meta).nodes.insert(me);
        }
        names.insert(name, id);
        Ok(HomeReply::Id(id))
    }

    /// A new segment homed here.
    fn create(
        &self,
        key: i32,
        name: String,
        size: u64,
        mode: u32,
        cred: &Cred,
        pid: i32,
    ) -> Result<i32, ErrorReply> {
        // POSIX objects start empty (ftruncate sizes them).
        if (size == 0 && name.is_empty()) || size > SHM_MAX {
            return Err(err(libc::EINVAL, format!("segment size {size}")));
        }
        let me = self.node_id();
        let seq = self.dsm.seq.fetch_add(1, Ordering::Relaxed) & ((1 << SEQ_BITS) - 1);
        let id = ((me << SEQ_BITS) | seq) as i32;
        let t = now();
        let info = ShmInfo {
            shmid: id,
            key,
            name,
            home: me,
            size,
            uid: cred.uid,
            gid: cred.gid,
            cuid: cred.uid,
            cgid: cred.gid,
            mode,
            atime: 0,
            dtime: 0,
            ctime: t,
            cpid: pid,
            lpid: 0,
            attached: Vec::new(),
        };
        let h = Arc::new(Home {
            meta: Mutex::new(Meta {
                info,
                removed: false,
                nodes: BTreeSet::new(),
            }),
            pages: Mutex::new(HashMap::new()),
        });
        lock(&self.dsm.homes).insert(id, h);
        debug!("segment {id} (key {key:#x}, {size} bytes) created by pid {pid}");
        Ok(id)
    }

    fn home_ctl(
        self: &Arc<Self>,
        shmid: i32,
        cmd: i32,
        set: Option<(u32, u32, u32)>,
        cred: &Cred,
    ) -> Result<HomeReply, ErrorReply> {
        let h = self.dsm.home(shmid)?;
        let mut m = lock(&h.meta);
        match cmd {
            libc::IPC_STAT => {
                if !cred.allowed(&m.info, 0o4) {
                    return Err(err(
                        libc::EACCES,
                        format!("segment {shmid}: permission denied"),
                    ));
                }
                Ok(HomeReply::Info(m.info.clone()))
            }
            libc::IPC_SET | libc::IPC_RMID => {
                if !cred.owns(&m.info) {
                    return Err(err(
                        libc::EPERM,
                        format!("segment {shmid}: not its owner or creator"),
                    ));
                }
                if cmd == libc::IPC_SET {
                    let (uid, gid, mode) = set.ok_or_else(|| err(libc::EINVAL, "IPC_SET"))?;
                    m.info.uid = uid;
                    m.info.gid = gid;
                    m.info.mode = (m.info.mode & !0o777) | (mode & 0o777);
                    m.info.ctime = now();
                    return Ok(HomeReply::Done);
                }
                if !m.removed {
                    m.removed = true;
                    m.info.mode |= SHM_DEST;
                    let mut keys = lock(&self.dsm.keys);
                    if keys.get(&m.info.key) == Some(&shmid) {
                        keys.remove(&m.info.key);
                    }
                    m.info.key = libc::IPC_PRIVATE;
                    m.info.ctime = now();
                }
                let gone = m.info.attached.is_empty();
                drop(m);
                if gone {
                    self.destroy(shmid);
                }
                Ok(HomeReply::Done)
            }
            _ => Err(err(libc::EINVAL, format!("shmctl command {cmd}"))),
        }
    }

    /// The last attachment of a removed segment went: free it everywhere.
    fn destroy(self: &Arc<Self>, shmid: i32) {
        let Some(h) = lock(&self.dsm.homes).remove(&shmid) else {
            return;
        };
        let nodes: Vec<u32> = lock(&h.meta).nodes.iter().copied().collect();
        debug!("segment {shmid} destroyed");
        let a = self.clone();
        tokio::spawn(async move {
            for n in nodes {
                if let Err(e) = a.dsm_node(n, NodeOp::Drop { shmid }).await {
                    debug!("segment {shmid}: drop on node {n}: {}", e.msg);
                }
            }
        });
    }

    /// Give `node` a readable or writable copy of a page, invalidating the
    /// others for a write. One request per page at a time; the answer
    /// carries the page.
    async fn acquire(
        self: &Arc<Self>,
        shmid: i32,
        page: u32,
        node: u32,
        write: bool,
    ) -> Result<Grant, ErrorReply> {
        let h = self.dsm.home(shmid)?;
        let mut d = h.dir(shmid, page)?.lock_owned().await;
        // Nothing to do (another fault of the same node got it first).
        let noop = Grant {
            ver: 0,
            write,
            data: None,
        };
        let lost = |n: u32, e: ErrorReply| {
            err(
                libc::EIO,
                format!("segment {shmid} page {page}: node {n}: {}", e.msg),
            )
        };
        if d.lost {
            return Err(err(
                libc::EIO,
                format!("segment {shmid} page {page}: lost with the node that held it"),
            ));
        }
        if write {
            if d.writer == Some(node) {
                return Ok(noop);
            }
            let have = d.holds(node).is_some();
            let src = if have {
                None
            } else {
                d.writer.or_else(|| d.holders.first().map(|h| h.0))
            };
            let others: Vec<(u32, u64)> =
                d.holders.iter().copied().filter(|h| h.0 != node).collect();
            let calls = others.iter().map(|&(n, ver)| {
                self.dsm_node(
                    n,
                    NodeOp::Invalidate {
                        shmid,
                        page,
                        want: Some(n) == src,
                        ver,
                    },
                )
            });
            let mut data = None;
            let results = futures::future::join_all(calls).await;
            // Every other copy is gone (or its node is): from here the page
            // is `node`'s alone.
            d.holders.retain(|h| h.0 == node);
            d.writer = None;
            for ((n, _), r) in others.iter().zip(results) {
                match r {
                    Ok(r) if Some(*n) == src => data = r,
                    Ok(_) => {}
                    // A reader's copy dies with its node; the source's
                    // was the page.
                    Err(e) if Some(*n) == src => {
                        d.lost = true;
                        return Err(lost(*n, e));
                    }
                    Err(e) => warn!("segment {shmid} page {page}: node {n}: {}", e.msg),
                }
            }
            if src.is_some() && data.is_none() {
                return Err(err(
                    libc::EIO,
                    format!("segment {shmid} page {page}: no contents from its holder"),
                ));
            }
            d.ver += 1;
            d.writer = Some(node);
            d.holders = vec![(node, d.ver)];
            Ok(Grant {
                ver: d.ver,
                write: true,
                data,
            })
        } else {
            if d.holds(node).is_some() {
                return Ok(noop);
            }
            let data = if let Some(w) = d.writer {
                let ver = d.holds(w).unwrap_or(0);
                match self
                    .dsm_node(w, NodeOp::Downgrade { shmid, page, ver })
                    .await
                {
                    Ok(r) => {
                        d.writer = None;
                        r
                    }
                    Err(e) => {
                        d.lost = true;
                        return Err(lost(w, e));
                    }
                }
            } else if !d.holders.is_empty() {
                // Any reader's copy will do; readers on dead nodes drop out.
                let mut got = None;
                while let Some((n, ver)) = d.holders.first().copied() {
                    match self.dsm_node(n, NodeOp::Fetch { shmid, page, ver }).await {
                        Ok(r) => {
                            got = r;
                            break;
                        }
                        Err(e) => {
                            warn!("segment {shmid} page {page}: node {n}: {}", e.msg);
                            d.holders.remove(0);
                        }
                    }
                }
                if got.is_none() {
                    d.lost = true;
                    return Err(err(
                        libc::EIO,
                        format!("segment {shmid} page {page}: every copy is gone"),
                    ));
                }
                got
            } else {
                None
            };
            d.ver += 1;
            let ver = d.ver;
            d.holders.push((node, ver));
            Ok(Grant {
                ver,
                write: false,
                data,
            })
        }
    }

    /// A first write at the home to a page no node ever had: that page and
    /// the next ones in the same state (up to `FRESH_RUN`, while their
    /// entries are free) go to `node` for writing at once, as zeros. A
    /// program filling fresh memory (a new segment, shared anonymous
    /// memory) then takes one fault per run instead of one per page.
    /// Nothing else changes: another node that wants one of them later
    /// gets it from `node` as from any writer.
    fn acquire_fresh(&self, shmid: i32, page: u32, node: u32) -> Vec<(u32, Grant)> {
        let Ok(h) = self.dsm.home(shmid) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for p in page..page.saturating_add(FRESH_RUN) {
            let Some(mut d) = h.dir(shmid, p).ok().and_then(|d| d.try_lock_owned().ok()) else {
                break;
            };
            if d.writer.is_some() || !d.holders.is_empty() || d.ver != 0 || d.lost {
                break;
            }
            d.ver = 1;
            d.writer = Some(node);
            d.holders = vec![(node, 1)];
            out.push((
                p,
                Grant {
                    ver: 1,
                    write: true,
                    data: None,
                },
            ));
        }
        out
    }

    /// Read copies of `pages` for a node reading ahead: those the home can
    /// give by asking their holders, one message per holder; pages that
    /// fail are left out (the reader will fault on them).
    async fn acquire_read(
        self: &Arc<Self>,
        shmid: i32,
        pages: &[u32],
        node: u32,
    ) -> Result<Vec<(u32, Grant)>, ErrorReply> {
        let h = self.dsm.home(shmid)?;
        // Ascending order, as every multi-page lock here (no deadlock).
        let mut sorted = pages.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut dirs = Vec::with_capacity(sorted.len());
        for &p in &sorted {
            dirs.push((p, lock_now(h.dir(shmid, p)?).await));
        }
        // What to ask of whom.
        let mut asks: HashMap<u32, Vec<(u32, u64, bool)>> = HashMap::new();
        let mut zero = Vec::new();
        for (p, d) in dirs.iter() {
            if d.holds(node).is_some() || d.lost {
                continue;
            }
            if let Some(w) = d.writer {
                asks.entry(w)
                    .or_default()
                    .push((*p, d.holds(w).unwrap_or(0), true));
            } else if let Some((n, ver)) = d.holders.first().copied() {
                asks.entry(n).or_default().push((*p, ver, false));
            } else {
                zero.push(*p);
            }
        }
        let calls = asks.iter().map(|(&n, items)| async move {
            (n, self.dsm_read_many(n, shmid, items.clone()).await)
        });
        let mut got: HashMap<u32, ByteBuf> = HashMap::new();
        let mut failed: HashMap<u32, ErrorReply> = HashMap::new();
        for (n, r) in futures::future::join_all(calls).await {
            match r {
                Ok(v) => {
                    for ((p, _, _), d) in asks[&n].iter().zip(v) {
                        if let Some(d) = d {
                            got.insert(*p, d);
                        }
                    }
                }
                Err(e) => {
                    for (p, _, _) in &asks[&n] {
                        failed.insert(*p, e.clone());
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (p, d) in dirs.iter_mut() {
            if d.holds(node).is_some() {
                continue;
            }
            let data = if let Some(b) = got.remove(p) {
                Some(b)
            } else if zero.contains(p) {
                None
            } else {
                if let Some(e) = failed.remove(p) {
                    // As for a single read: the writer's copy was the page.
                    if d.writer.is_some() {
                        d.lost = true;
                    }
                    debug!("segment {shmid} page {p}: read ahead: {}", e.msg);
                }
                continue;
            };
            d.writer = None;
            d.ver += 1;
            let ver = d.ver;
            d.holders.push((node, ver));
            out.push((
                *p,
                Grant {
                    ver,
                    write: false,
                    data,
                },
            ));
        }
        Ok(out)
    }

    async fn dsm_read_many(
        self: &Arc<Self>,
        node: u32,
        shmid: i32,
        items: Vec<(u32, u64, bool)>,
    ) -> Result<Vec<Option<ByteBuf>>, ErrorReply> {
        if node == self.node_id() {
            return self.read_many(shmid, items).await;
        }
        let link = self.dsm_link(node).await?;
        match link.call(node, Req::ReadMany(shmid, items)).await? {
            Resp::Many(r) => r,
            other => Err(err(libc::EIO, format!("node {node}: unexpected {other:?}"))),
        }
    }

    /// `ReadMany` here: read copies of pages for another node.
    pub async fn read_many(
        self: &Arc<Self>,
        shmid: i32,
        items: Vec<(u32, u64, bool)>,
    ) -> Result<Vec<Option<ByteBuf>>, ErrorReply> {
        let seg = self.dsm.local(shmid)?;
        let mut locked = Vec::with_capacity(items.len());
        for &(page, ver, downgrade) in &items {
            locked.push((page, downgrade, seg.page_at(page, ver).await?));
        }
        let down: Vec<u32> = locked
            .iter()
            .filter(|(_, d, p)| *d && p.st == PState::Write)
            .map(|x| x.0)
            .collect();
        seg.protect_runs(&down);
        for (_, d, p) in locked.iter_mut() {
            if *d && p.st == PState::Write {
                p.st = PState::Read;
            }
        }
        // One pread per run of consecutive valid pages.
        let mut out: Vec<Option<ByteBuf>> = vec![None; locked.len()];
        let mut i = 0;
        while i < locked.len() {
            if locked[i].2.st == PState::Invalid {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < locked.len()
                && locked[j].2.st != PState::Invalid
                && locked[j].0 == locked[j - 1].0 + 1
            {
                j += 1;
            }
            let first = locked[i].0;
            let n = j - i;
            let mut buf = vec![0u8; n * PAGE as usize];
            let bytes = (0..n).map(|k| seg.in_page(first + k as u32)).sum::<usize>();
            seg.mem
                .read_exact_at(&mut buf[..bytes], first as u64 * PAGE)
                .map_err(|e| io_err(format!("pages {first}+{n}: read"), e))?;
            for (k, chunk) in buf.chunks(PAGE as usize).enumerate() {
                out[i + k] = Some(ByteBuf::from(chunk.to_vec()));
            }
            i = j;
        }
        Ok(out)
    }

    // -- a node holding pages -----------------------------------------------

    pub async fn node_op(self: &Arc<Self>, op: NodeOp) -> Result<Option<ByteBuf>, ErrorReply> {
        match op {
            NodeOp::Invalidate {
                shmid,
                page,
                want,
                ver,
            } => {
                let seg = self.dsm.local(shmid)?;
                let mut p = seg.page_at(page, ver).await?;
                if p.st == PState::Write {
                    seg.protect_all(page);
                }
                let data = if want {
                    Some(seg.read_page(page)?)
                } else {
                    None
                };
                seg.punch(page)?;
                // Waiters of this node went to sleep on the value the page
                // had; the writer to come is elsewhere. Wake them *after*
                // the punch, so that one that checks again faults and waits
                // for the new value instead of sleeping on the old one.
                // Naming the futex faults a zero page into the memfd:
                // punch again.
                if seg.wake_futexes(page) {
                    seg.punch(page)?;
                }
                p.st = PState::Invalid;
                Ok(data)
            }
            NodeOp::Downgrade { shmid, page, ver } => {
                let seg = self.dsm.local(shmid)?;
                let mut p = seg.page_at(page, ver).await?;
                if p.st == PState::Write {
                    seg.protect_all(page);
                    p.st = PState::Read;
                }
                Ok(Some(seg.read_page(page)?))
            }
            NodeOp::Fetch { shmid, page, ver } => {
                let seg = self.dsm.local(shmid)?;
                let p = seg.page_at(page, ver).await?;
                if p.st == PState::Invalid {
                    return Err(err(
                        libc::EIO,
                        format!("segment {shmid} page {page}: no valid copy here"),
                    ));
                }
                Ok(Some(seg.read_page(page)?))
            }
            NodeOp::Drop { shmid } => {
                lock(&self.dsm.locals).remove(&shmid);
                Ok(None)
            }
        }
    }
}
