//! Distributed shared memory, the application side: System V segments
//! (`shmget`, `shmat`, `shmdt`, `shmctl`) that name the same memory on
//! every node. See docs/architecture/dsm.md.
//!
//! The agent keeps one memory object (a memfd) per segment and node; the
//! process maps it and hands the agent a userfaultfd for the mapping, and
//! the agent keeps the pages coherent across nodes from outside the process
//! (missing and minor faults fetch a page, write-protect faults take
//! ownership). Nothing here runs on the fault path: a `read(2)` into a
//! segment page that is not here blocks in the kernel until the agent has
//! filled it, exactly like a user-space access.

#![deny(unsafe_code)]

pub mod uffd;

use crate::caps::Caps;
use crate::client::{self, CallError};
use crate::error::Error;
use crate::krg_log;
use crate::log::Level;
use crate::proto::{Request, Response, ShmInfo};
use crate::sys::user::PtrMut;
use libc::{c_int, c_void, key_t, shmid_ds, size_t};
use std::cell::RefCell;
use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// One attachment of this process.
#[derive(Debug, Clone, Copy)]
struct Att {
    shmid: i32,
    addr: u64,
    len: u64,
    /// Byte offset in the object (POSIX mappings; 0 for shmat).
    off: u64,
    rdonly: bool,
}

static ATTS: Mutex<Vec<Att>> = Mutex::new(Vec::new());
/// Whether `ATTS` is non-empty: the fast test of the synchronisation hooks.
static ANY: AtomicBool = AtomicBool::new(false);
/// Synchronisation objects already announced to the agent (segment,
/// offset).
static NOTED: Mutex<Vec<(i32, u64)>> = Mutex::new(Vec::new());
/// The agent holds this process's userfaultfd (reset in a forked child:
/// the kernel gives a child's mappings no userfaultfd).
static HAS_UFFD: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The attachment table held across `fork`, so that the child gets a
    /// consistent copy (see [`register_atfork`]).
    static HELD: RefCell<Option<MutexGuard<'static, Vec<Att>>>> = const { RefCell::new(None) };
}

/// Run `f` inside krg (the re-entrancy guard set): the `mmap`, `munmap`
/// and `close` it makes, directly or through std, go straight to libc
/// instead of back into these hooks (which take the same locks). Keeps the
/// errno `f` sets.
fn inside<R>(f: impl FnOnce() -> R) -> R {
    let (r, e) = crate::rt::guarded(|| {
        let r = f();
        (
            r,
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        )
    });
    crate::rt::set_errno(e);
    r
}

fn atts() -> MutexGuard<'static, Vec<Att>> {
    ATTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this process's System V shared memory is krg's (capability
/// `dsm`); otherwise the kernel's, node-local.
pub fn active() -> bool {
    Caps::from_bits(crate::processes::hello_caps()).contains(Caps::DSM)
}

/// Whether its `MAP_SHARED|MAP_ANONYMOUS` memory is krg's too (`dsm` and
/// `dsm-anon`).
fn anon_active() -> bool {
    Caps::from_bits(crate::processes::hello_caps()).contains(Caps(Caps::DSM.0 | Caps::DSM_ANON.0))
}

fn fail<T>(errno: i32, err: T) -> T {
    crate::rt::set_errno(errno);
    err
}

fn call(req: &Request) -> Result<Response, CallError> {
    client::call(req)
}

fn call_err<T>(what: &str, e: CallError, err: T) -> T {
    krg_log!(Level::Debug, "{what}: {e}");
    fail(e.errno(), err)
}

/// `shmget(key, size, flags)`.
pub fn shmget(key: key_t, size: size_t, flags: c_int) -> c_int {
    let req = Request::ShmGet {
        key,
        size: size as u64,
        flags,
    };
    match call(&req) {
        Ok(Response::Id(id)) => id,
        Ok(other) => fail(libc::EIO, unexpected("shmget", &other)),
        Err(e) => call_err(&format!("shmget key {key:#x}"), e, -1),
    }
}

fn unexpected(what: &str, r: &Response) -> c_int {
    krg_log!(
        Level::Warn,
        "{what}: unexpected answer from the agent: {r:?}"
    );
    -1
}

/// What the agent gave for an attachment: the segment's size, its memory
/// object, `/dev/userfaultfd`.
type Granted = (u64, Option<OwnedFd>, Option<OwnedFd>);

/// Ask the agent for an attachment: the memory object (unless
/// `inherited`) and `/dev/userfaultfd` if this process has no userfaultfd
/// with the agent yet.
fn attach_req(shmid: i32, rdonly: bool, inherited: bool) -> Result<Granted, Error> {
    let need_uffd = !HAS_UFFD.load(Ordering::Acquire);
    let req = Request::ShmAttach {
        shmid,
        rdonly,
        inherited,
        need_uffd,
    };
    let (r, fds) = client::call_fds(&req)?;
    let size = match r {
        Response::ShmAttached { size, .. } => size,
        other => return Err(Error::other(format!("unexpected answer {other:?}"))),
    };
    let mut fds = fds.into_iter();
    let mem = if inherited { None } else { fds.next() };
    if !inherited && mem.is_none() {
        return Err(Error::other("the agent sent no memory object"));
    }
    let dev = if need_uffd { fds.next() } else { None };
    if need_uffd && dev.is_none() {
        return Err(Error::other("the agent sent no /dev/userfaultfd"));
    }
    Ok((size, mem, dev))
}

/// Tell the agent about a mapping at `addr`; hands over a new userfaultfd
/// made from `dev` if there is one.
fn mapped(
    shmid: i32,
    addr: u64,
    len: u64,
    off: u64,
    rdonly: bool,
    dev: Option<OwnedFd>,
) -> Result<(), Error> {
    let uffd = match &dev {
        Some(d) => Some(uffd::create(d.as_fd()).map_err(|e| {
            Error::errno(
                libc::ENOSYS,
                format!("userfaultfd from /dev/userfaultfd: {e}"),
            )
        })?),
        None => None,
    };
    drop(dev);
    let req = Request::ShmMapped {
        shmid,
        addr,
        len,
        off,
        rdonly,
        uffd: uffd.as_ref().map_or(-1, |u| u.as_raw_fd()),
    };
    // The agent copies our userfaultfd (pidfd_getfd) before it answers;
    // ours is closed on return, so the application never sees it.
    match call(&req) {
        Ok(Response::Ok) => {
            if uffd.is_some() {
                HAS_UFFD.store(true, Ordering::Release);
            }
            Ok(())
        }
        Ok(other) => Err(Error::other(format!("unexpected answer {other:?}"))),
        Err(e) => Err(e.into()),
    }
}

fn page_up(n: u64) -> u64 {
    n.div_ceil(uffd::PAGE) * uffd::PAGE
}

/// `shmat(shmid, addr, flags)`.
pub fn shmat(shmid: c_int, addr: *const c_void, flags: c_int) -> *mut c_void {
    match inside(|| attach_at(shmid, addr as u64, flags)) {
        Ok(p) => p,
        Err(errno) => fail(errno, libc::MAP_FAILED),
    }
}

/// Attach segment `shmid` (shmat's semantics for `addr` and `flags`).
fn attach_at(shmid: c_int, addr: u64, flags: c_int) -> Result<*mut c_void, i32> {
    let rdonly = flags & libc::SHM_RDONLY != 0;
    let mut want = addr;
    if want != 0 {
        if flags & libc::SHM_RND != 0 {
            want &= !(uffd::PAGE - 1);
        } else if !want.is_multiple_of(uffd::PAGE) {
            return Err(libc::EINVAL);
        }
    }
    let mut held = atts();
    let (size, mem, dev) = match attach_req(shmid, rdonly, false) {
        Ok(x) => x,
        Err(e @ Error { errno, .. }) => {
            krg_log!(Level::Debug, "shmat {shmid}: {e}");
            return Err(errno);
        }
    };
    let Some(mem) = mem else {
        return Err(libc::EIO);
    };
    let len = page_up(size);
    let mut prot = libc::PROT_READ;
    if !rdonly {
        prot |= libc::PROT_WRITE;
    }
    if flags & libc::SHM_EXEC != 0 {
        prot |= libc::PROT_EXEC;
    }
    let mut mflags = libc::MAP_SHARED;
    if want != 0 {
        mflags |= if flags & libc::SHM_REMAP != 0 {
            libc::MAP_FIXED
        } else {
            libc::MAP_FIXED_NOREPLACE
        };
    }
    // With an address it is either placed there or fails (MAP_FIXED only
    // with SHM_REMAP, which asks for exactly that replacement).
    let p = abi::map(
        want as *mut c_void,
        len as usize,
        prot,
        mflags,
        mem.as_raw_fd(),
        0,
    );
    drop(mem);
    // Undo the attachment the agent counted (no mapping at address 0).
    let detach_at_home = || {
        let _ = call(&Request::ShmDetach { shmid, addr: 0 });
    };
    let p = match p {
        Ok(p) => p,
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
            detach_at_home();
            return Err(if errno == libc::EEXIST {
                libc::EINVAL
            } else {
                errno
            });
        }
    };
    let at = p as u64;
    if let Err(e @ Error { errno, .. }) = mapped(shmid, at, len, 0, rdonly, dev) {
        krg_log!(Level::Warn, "shmat {shmid}: {e}");
        // The mapping just made, not yet handed to the caller.
        let _ = abi::unmap(p, len as usize);
        detach_at_home();
        return Err(errno);
    }
    held.push(Att {
        shmid,
        addr: at,
        len,
        off: 0,
        rdonly,
    });
    ANY.store(true, Ordering::Release);
    Ok(p)
}

// ---------------------------------------------------------------------------
// POSIX shared memory objects: shm_open, ftruncate, mmap, munmap, close

/// Descriptors this process got from `shm_open`: (fd, object id, writable).
static FDS: Mutex<Vec<(c_int, i32, bool)>> = Mutex::new(Vec::new());
/// Whether `FDS` is non-empty (the fast test of the mmap/ftruncate/close
/// hooks).
static ANY_FD: AtomicBool = AtomicBool::new(false);

fn fds() -> MutexGuard<'static, Vec<(c_int, i32, bool)>> {
    FDS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The object behind a descriptor from `shm_open`, if it is one.
fn object_of(fd: c_int) -> Option<(i32, bool)> {
    if !ANY_FD.load(Ordering::Acquire) || fd < 0 {
        return None;
    }
    fds().iter().find(|f| f.0 == fd).map(|f| (f.1, f.2))
}

/// The object name of a POSIX name (`/NAME` or `NAME`): `KIND.NAME`, one
/// namespace per kind as in /dev/shm (`shm`, `sem`).
fn object_name(kind: &str, name: &CStr) -> Result<String, i32> {
    let n = name
        .to_str()
        .map_err(|_| libc::EINVAL)?
        .trim_start_matches('/');
    if n.is_empty() || n.contains('/') || n.len() > 250 {
        return Err(libc::EINVAL);
    }
    Ok(format!("{kind}.{n}"))
}

/// `kind_open`: the id of POSIX object `name` of `kind` (`shm`, `sem`),
/// made by `O_CREAT` with `size` bytes holding `init`; or the errno.
fn open_object(
    kind: &str,
    name: &CStr,
    oflag: c_int,
    mode: libc::mode_t,
    size: u64,
    init: Option<Vec<u8>>,
) -> Result<i32, i32> {
    let name = object_name(kind, name)?;
    let what = format!("{kind}_open {name}");
    let req = Request::ShmOpen {
        name,
        oflag,
        mode: mode & 0o777 & !crate::proc_self::umask(),
        size,
        init,
    };
    match call(&req) {
        Ok(Response::Id(id)) => Ok(id),
        Ok(other) => {
            unexpected(&what, &other);
            Err(libc::EIO)
        }
        Err(e) => {
            krg_log!(Level::Debug, "{what}: {e}");
            Err(e.errno())
        }
    }
}

/// `kind_unlink(name)` of POSIX object `name` of `kind` (`shm`, `sem`).
fn unlink_object(kind: &str, name: &CStr) -> c_int {
    let obj = match object_name(kind, name) {
        Ok(n) => n,
        Err(e) => return fail(e, -1),
    };
    match call(&Request::ShmUnlink { name: obj.clone() }) {
        Ok(_) => 0,
        Err(e) => call_err(&format!("{kind}_unlink {obj}"), e, -1),
    }
}

/// `shm_open(name, oflag, mode)`: a descriptor of the cluster-wide object
/// (this node's memory object for it). Its pages are kept coherent when it
/// is mapped with `MAP_SHARED`; `read`/`write` on the descriptor itself
/// bypass the coherence (use mmap).
pub fn shm_open(name: &CStr, oflag: c_int, mode: libc::mode_t) -> c_int {
    inside(|| shm_open_inner(name, oflag, mode))
}

fn shm_open_inner(name: &CStr, oflag: c_int, mode: libc::mode_t) -> c_int {
    let acc = oflag & libc::O_ACCMODE;
    if acc != libc::O_RDONLY && acc != libc::O_RDWR {
        return fail(libc::EINVAL, -1);
    }
    let id = match open_object("shm", name, oflag, mode, 0, None) {
        Ok(id) => id,
        Err(e) => return fail(e, -1),
    };
    let (r, got) = match client::call_fds(&Request::ShmFd {
        shmid: id,
        write: acc == libc::O_RDWR,
    }) {
        Ok(x) => x,
        Err(e) => return call_err(&format!("shm_open {}", name.to_string_lossy()), e, -1),
    };
    if !matches!(r, Response::ShmAttached { .. }) {
        return fail(libc::EIO, unexpected("shm_open", &r));
    }
    let Some(fd) = got.into_iter().next() else {
        return fail(libc::EIO, -1);
    };
    let raw = fd.into_raw_fd();
    let mut t = fds();
    t.retain(|f| f.0 != raw);
    t.push((raw, id, acc == libc::O_RDWR));
    ANY_FD.store(true, Ordering::Release);
    raw
}

/// `shm_unlink(name)`.
pub fn shm_unlink(name: &CStr) -> c_int {
    unlink_object("shm", name)
}

/// `ftruncate(fd, len)` on a descriptor from `shm_open`: the object's
/// size, cluster-wide (it may grow, not shrink). `None`: not such a
/// descriptor.
pub fn ftruncate(fd: c_int, len: libc::off_t) -> Option<c_int> {
    let (id, writable) = object_of(fd)?;
    if !writable {
        return Some(fail(libc::EINVAL, -1));
    }
    if len < 0 {
        return Some(fail(libc::EINVAL, -1));
    }
    Some(inside(|| {
        match call(&Request::ShmResize {
            shmid: id,
            size: len as u64,
        }) {
            Ok(_) => 0,
            Err(e) => call_err(&format!("ftruncate of object {id}"), e, -1),
        }
    }))
}

/// `mmap(addr, len, prot, flags, fd, off)` of a descriptor from
/// `shm_open` with `MAP_SHARED`: mapped and registered with the agent.
/// `None`: not such a mapping (the real mmap does it).
pub fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> Option<*mut c_void> {
    if fd == -1
        && flags & libc::MAP_ANONYMOUS != 0
        && flags & libc::MAP_SHARED != 0
        && len != 0
        && anon_active()
    {
        return Some(inside(|| map_anon(addr, len, prot, flags)));
    }
    let (id, writable) = object_of(fd)?;
    if flags & libc::MAP_SHARED == 0 || len == 0 {
        return None;
    }
    Some(inside(|| {
        map_object(id, writable, addr, len, prot, flags, fd, off)
    }))
}

/// `MAP_SHARED|MAP_ANONYMOUS` memory (capability `dsm-anon`): a new
/// private segment, removed at once so that it lives exactly as long as a
/// mapping of it (this process's, its children's: `fork` shares it as any
/// attachment, and a child that migrates keeps it). Mapped from the
/// segment's memory object with the caller's address, protection and
/// flags, but for `MAP_POPULATE`/`MAP_LOCKED` (pages filled before the
/// agent serves the mapping would escape coherence).
fn map_anon(addr: *mut c_void, len: size_t, prot: c_int, flags: c_int) -> *mut c_void {
    let bad = libc::MAP_FAILED;
    let plen = page_up(len as u64);
    let id = match call(&Request::ShmGet {
        key: libc::IPC_PRIVATE,
        size: plen,
        flags: libc::IPC_CREAT | 0o600,
    }) {
        Ok(Response::Id(id)) => id,
        Ok(other) => {
            unexpected("mmap (shared anonymous)", &other);
            return fail(libc::EIO, bad);
        }
        Err(e) => return call_err("mmap (shared anonymous): new segment", e, bad),
    };
    let remove = || {
        let _ = call(&Request::ShmCtl {
            shmid: id,
            cmd: libc::IPC_RMID,
            set: None,
        });
    };
    let mut held = atts();
    let (mem, dev) = match attach_req(id, false, false) {
        Ok((_, Some(mem), dev)) => (mem, dev),
        Ok(_) => {
            remove();
            return fail(libc::EIO, bad);
        }
        Err(e @ Error { errno, .. }) => {
            krg_log!(Level::Debug, "mmap (shared anonymous) {id}: {e}");
            remove();
            return fail(errno, bad);
        }
    };
    // Gone for everyone else from now on; freed at the last detach.
    remove();
    let flags =
        (flags & !(libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED)) | libc::MAP_SHARED;
    // The caller's mmap (its address, protection and flags), of the
    // segment's memory object instead of anonymous memory.
    let p = abi::map(addr, len, prot, flags, mem.as_raw_fd(), 0);
    drop(mem);
    match register_mapping(id, p, len, 0, false, dev, "mmap (shared anonymous)") {
        Ok(a) => {
            held.push(a);
            ANY.store(true, Ordering::Release);
            a.addr as *mut c_void
        }
        Err(errno) => fail(errno, bad),
    }
}

/// After the `mmap` of an attachment counted by the agent (`p`, its
/// outcome): tell the agent where it is mapped. On failure (of the mmap
/// or of the registration) the mapping and the agent's count are undone
/// and the errno comes back.
#[allow(clippy::too_many_arguments)]
fn register_mapping(
    id: i32,
    p: std::io::Result<*mut c_void>,
    len: size_t,
    off: u64,
    rdonly: bool,
    dev: Option<OwnedFd>,
    what: &str,
) -> Result<Att, i32> {
    let undo = || {
        let _ = call(&Request::ShmDetach { shmid: id, addr: 0 });
    };
    let p = match p {
        Ok(p) => p,
        Err(e) => {
            undo();
            return Err(e.raw_os_error().unwrap_or(libc::EINVAL));
        }
    };
    let plen = page_up(len as u64);
    if let Err(e @ Error { errno, .. }) = mapped(id, p as u64, plen, off, rdonly, dev) {
        krg_log!(Level::Warn, "{what} {id}: {e}");
        // The mapping just made, not yet handed to the caller.
        let _ = abi::unmap(p, len);
        undo();
        return Err(errno);
    }
    Ok(Att {
        shmid: id,
        addr: p as u64,
        len: plen,
        off,
        rdonly,
    })
}

#[allow(clippy::too_many_arguments)]
fn map_object(
    id: i32,
    writable: bool,
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    let bad = libc::MAP_FAILED;
    if prot & libc::PROT_WRITE != 0 && !writable {
        return fail(libc::EACCES, bad);
    }
    if off < 0 || !(off as u64).is_multiple_of(uffd::PAGE) {
        return fail(libc::EINVAL, bad);
    }
    let rdonly = prot & libc::PROT_WRITE == 0;
    let mut held = atts();
    let dev = match attach_req(id, rdonly, true) {
        Ok((_, _, dev)) => dev,
        Err(e @ Error { errno, .. }) => {
            krg_log!(Level::Debug, "mmap of object {id}: {e}");
            return fail(errno, bad);
        }
    };
    // The caller's mmap, with its own arguments, on the object's
    // descriptor it gave us.
    let p = abi::map(addr, len, prot, flags, fd, off);
    match register_mapping(id, p, len, off as u64, rdonly, dev, "mmap of object") {
        Ok(a) => {
            held.push(a);
            ANY.store(true, Ordering::Release);
            a.addr as *mut c_void
        }
        Err(errno) => fail(errno, bad),
    }
}

/// `munmap(addr, len)` of a whole mapping made by [`mmap`] (or an
/// attachment): detached from the agent. `None`: not one (the real munmap
/// does it; unmapping part of an object's mapping leaves it attached).
fn unmap_attached(addr: *mut c_void, len: size_t) -> Option<c_int> {
    if !ANY.load(Ordering::Acquire) {
        return None;
    }
    let a = {
        let mut held = atts();
        let i = held
            .iter()
            .position(|a| a.addr == addr as u64 && page_up(len as u64) >= a.len)?;
        let a = held.remove(i);
        ANY.store(!held.is_empty(), Ordering::Release);
        a
    };
    Some(inside(|| {
        // The caller's munmap of its own mapping.
        let r = abi::unmap(addr, len);
        let _ = call(&Request::ShmDetach {
            shmid: a.shmid,
            addr: a.addr,
        });
        match r {
            Ok(()) => 0,
            Err(e) => fail(e.raw_os_error().unwrap_or(libc::EINVAL), -1),
        }
    }))
}

/// `close(fd)`: forget a descriptor from `shm_open` (mappings stay).
pub fn closed(fd: c_int) {
    if !ANY_FD.load(Ordering::Acquire) {
        return;
    }
    let mut t = fds();
    t.retain(|f| f.0 != fd);
    ANY_FD.store(!t.is_empty(), Ordering::Release);
}

/// `sem_open(name, oflag, mode, value)`: a named semaphore shared by the
/// whole cluster. Created with its value already in place at its home, so
/// no node ever sees it half made.
pub fn sem_open(
    name: &CStr,
    oflag: c_int,
    mode: libc::mode_t,
    value: libc::c_uint,
) -> *mut libc::sem_t {
    let failed = std::ptr::null_mut();
    let init = if oflag & libc::O_CREAT != 0 {
        if value > i32::MAX as u32 {
            return fail(libc::EINVAL, failed);
        }
        let Ok(bytes) = crate::sys::mem::shared_sem(value) else {
            return fail(libc::EINVAL, failed);
        };
        Some(bytes.to_vec())
    } else {
        None
    };
    let size = std::mem::size_of::<libc::sem_t>() as u64;
    let id = match open_object("sem", name, oflag, mode, size, init) {
        Ok(id) => id,
        Err(e) => return fail(e, failed),
    };
    match inside(|| attach_at(id, 0, 0)) {
        Ok(p) => p.cast(),
        Err(errno) => fail(errno, failed),
    }
}

/// Whether `addr` is where this process attached a segment.
pub fn is_attachment(addr: *const c_void) -> bool {
    ANY.load(Ordering::Acquire) && atts().iter().any(|a| a.addr == addr as u64)
}

/// `sem_unlink(name)`.
pub fn sem_unlink(name: &CStr) -> c_int {
    unlink_object("sem", name)
}

/// A thread is about to wait on the synchronisation object of `len` bytes
/// at `addr`. If it lies in a segment, tell the agent once: a waiter sleeps
/// in the kernel on a futex of this node, and a post or unlock on another
/// node changes the page there, not here; the agent wakes this node's
/// waiters on the object whenever it takes the page away (they then
/// re-read it, as after any spurious wake-up).
pub fn sync_object(addr: usize, len: usize) {
    if !ANY.load(Ordering::Acquire) {
        return;
    }
    let addr = addr as u64;
    let found = atts()
        .iter()
        .find(|a| addr >= a.addr && addr < a.addr + a.len)
        .map(|a| (a.shmid, addr - a.addr));
    let Some((shmid, offset)) = found else {
        return;
    };
    {
        let mut n = NOTED.lock().unwrap_or_else(|e| e.into_inner());
        if n.contains(&(shmid, offset)) {
            return;
        }
        n.push((shmid, offset));
    }
    if let Err(e) = inside(|| {
        call(&Request::ShmFutex {
            shmid,
            offset,
            len: len as u32,
        })
    }) {
        krg_log!(
            Level::Warn,
            "segment {shmid}: waits at offset {offset} will not be woken from other nodes: {e}"
        );
    }
}

/// `shmdt(addr)`.
pub fn shmdt(addr: *const c_void) -> c_int {
    inside(|| shmdt_inner(addr))
}

fn shmdt_inner(addr: *const c_void) -> c_int {
    let mut held = atts();
    let Some(i) = held.iter().position(|a| a.addr == addr as u64) else {
        return fail(libc::EINVAL, -1);
    };
    let a = held.remove(i);
    ANY.store(!held.is_empty(), Ordering::Release);
    // An attachment this process made with shmat; the application gave
    // up the address by calling shmdt.
    let _ = abi::unmap(a.addr as *mut c_void, a.len as usize);
    match call(&Request::ShmDetach {
        shmid: a.shmid,
        addr: a.addr,
    }) {
        Ok(_) => 0,
        Err(e) => call_err(&format!("shmdt {:#x} (segment {})", a.addr, a.shmid), e, -1),
    }
}

/// `shmctl(shmid, cmd, buf)` for IPC_STAT, IPC_SET, IPC_RMID, SHM_LOCK and
/// SHM_UNLOCK, of the caller's `buf` (viewed as `ds`); IPC_INFO and
/// SHM_INFO (limits of the system) go to `real`.
fn control(
    shmid: c_int,
    cmd: c_int,
    buf: *mut shmid_ds,
    ds: Option<PtrMut<'_, shmid_ds>>,
    real: impl FnOnce(c_int, c_int, *mut shmid_ds) -> c_int,
) -> c_int {
    const IPC_64: c_int = 0x100;
    const IPC_INFO: c_int = 3;
    const SHM_INFO: c_int = 14;
    let c = cmd & !IPC_64;
    match c {
        IPC_INFO | SHM_INFO => return real(shmid, cmd, buf),
        libc::IPC_STAT | libc::IPC_SET | libc::IPC_RMID | libc::SHM_LOCK | libc::SHM_UNLOCK => {}
        _ => return fail(libc::EINVAL, -1),
    }
    let ds = match ds {
        None if c == libc::IPC_STAT || c == libc::IPC_SET => return fail(libc::EFAULT, -1),
        ds => ds,
    };
    let set = match &ds {
        Some(ds) if c == libc::IPC_SET => {
            let p = ds.read().shm_perm;
            Some((p.uid, p.gid, p.mode as u32))
        }
        _ => None,
    };
    // SHM_LOCK/UNLOCK: segments are never swapped by krg's choice; the
    // call checks that the segment exists and the caller may see it.
    let wire_cmd = if c == libc::SHM_LOCK || c == libc::SHM_UNLOCK {
        libc::IPC_STAT
    } else {
        c
    };
    match call(&Request::ShmCtl {
        shmid,
        cmd: wire_cmd,
        set,
    }) {
        Ok(Response::Shm(info)) => {
            if let Some(ds) = ds.filter(|_| c == libc::IPC_STAT) {
                let mut d = ds.read();
                fill_ds(&mut d, &info);
                ds.write(d);
            }
            0
        }
        Ok(Response::Ok) => 0,
        Ok(other) => fail(libc::EIO, unexpected("shmctl", &other)),
        Err(e) => call_err(&format!("shmctl {shmid} cmd {cmd}"), e, -1),
    }
}

fn fill_ds(ds: &mut shmid_ds, i: &ShmInfo) {
    ds.shm_perm.__key = i.key;
    ds.shm_perm.uid = i.uid;
    ds.shm_perm.gid = i.gid;
    ds.shm_perm.cuid = i.cuid;
    ds.shm_perm.cgid = i.cgid;
    ds.shm_perm.mode = i.mode as _;
    ds.shm_segsz = i.size as size_t;
    ds.shm_atime = i.atime;
    ds.shm_dtime = i.dtime;
    ds.shm_ctime = i.ctime;
    ds.shm_cpid = i.cpid;
    ds.shm_lpid = i.lpid;
    ds.shm_nattch = i.attached.len() as _;
}

/// Keep the attachment table locked across `fork` so the child's copy is
/// whole, and re-register the child's inherited attachments: the kernel
/// gives the child's mappings no userfaultfd, so until the agent has one
/// for them they must not be touched (nothing of the application runs
/// before this handler returns).
pub fn register_atfork() {
    extern "C" fn prepare() {
        let g = atts();
        HELD.with(|h| *h.borrow_mut() = Some(g));
    }
    extern "C" fn parent() {
        HELD.with(|h| drop(h.borrow_mut().take()));
    }
    extern "C" fn child() {
        let g = HELD.with(|h| h.borrow_mut().take());
        HAS_UFFD.store(false, Ordering::Release);
        if let Some(g) = g {
            inside(|| after_fork_child(g));
        }
    }
    crate::sys::process::atfork(Some(prepare), Some(parent), Some(child));
}

fn after_fork_child(mut held: MutexGuard<'static, Vec<Att>>) {
    if held.is_empty() {
        return;
    }
    let old = std::mem::take(&mut *held);
    for a in old {
        let r = attach_req(a.shmid, a.rdonly, true)
            .and_then(|(_, _, dev)| mapped(a.shmid, a.addr, a.len, a.off, a.rdonly, dev));
        match r {
            Ok(()) => held.push(a),
            Err(e) => {
                // Unregistered, the mapping would show stale or zero
                // pages: take it away so that a use faults loudly.
                krg_log!(
                    Level::Warn,
                    "fork: segment {} at {:#x} not shared with the child: {e}",
                    a.shmid,
                    a.addr
                );
                // The child's inherited copy of the attachment.
                let _ = abi::unmap(a.addr as *mut c_void, a.len as usize);
            }
        }
    }
    ANY.store(!held.is_empty(), Ordering::Release);
}

/// Whether this process has segments attached (checkpoint refuses them).
pub fn attached() -> Vec<i32> {
    atts().iter().map(|a| a.shmid).collect()
}

/// The name the agents give a segment's memory object on their node
/// (`memfd_create`): `/proc/PID/maps` shows `/memfd:krg-shm-ID (deleted)`.
pub const MEMFD_PREFIX: &str = "krg-shm-";

/// Whether a `/proc/self/maps` path is a segment's memory: a capture saves
/// none of it (its contents live in the cluster, not in the process).
pub fn is_segment_path(path: &str) -> bool {
    path.strip_prefix("/memfd:")
        .is_some_and(|p| p.starts_with(MEMFD_PREFIX))
}

/// Before a migration's capture (other threads parked): the attachment
/// table must be free, since the restored copy re-attaches from it.
pub fn capturable() -> Result<(), Error> {
    match ATTS.try_lock() {
        Ok(_) => Ok(()),
        Err(std::sync::TryLockError::Poisoned(_)) => Ok(()),
        Err(std::sync::TryLockError::WouldBlock) => {
            Err("a thread is attaching or detaching shared memory; try again".into())
        }
    }
}

/// In the leader of a process restored by a migration, before its other
/// threads run: this node's agent knows none of its attachments, and the
/// image held a zero placeholder where each was. Each comes back at its
/// address from this node's memory object, registered with a new
/// userfaultfd; its pages come from the cluster as any node's would. One
/// that cannot come back is unmapped (a use faults loudly, never reads
/// zeros). Runs while the capture allocator is active: nothing here may
/// keep heap memory (the table is changed in place).
pub fn after_restore() {
    HAS_UFFD.store(false, Ordering::Release);
    NOTED.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let Ok(mut held) = ATTS.try_lock() else {
        krg_log!(Level::Warn, "restore: the attachment table is locked");
        return;
    };
    if held.is_empty() {
        return;
    }
    inside(|| {
        held.retain(|a| match reattach(a) {
            Ok(()) => true,
            Err(e) => {
                krg_log!(
                    Level::Warn,
                    "restore: segment {} at {:#x} not attached here: {e}",
                    a.shmid,
                    a.addr
                );
                // The placeholder of the attachment, which the
                // application must not read as the segment.
                let _ = abi::unmap(a.addr as *mut c_void, a.len as usize);
                false
            }
        })
    });
    ANY.store(!held.is_empty(), Ordering::Release);
}

/// Map attachment `a` again from this node's memory object and register it.
fn reattach(a: &Att) -> Result<(), Error> {
    let (_, mem, dev) = attach_req(a.shmid, a.rdonly, false)?;
    let mem = mem.ok_or_else(|| Error::other("no memory object"))?;
    let prot = if a.rdonly {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    // Replaces the image's placeholder for this attachment (same address
    // and length) with the segment's memory object.
    let p = abi::map(
        a.addr as *mut c_void,
        a.len as usize,
        prot,
        libc::MAP_SHARED | libc::MAP_FIXED,
        mem.as_raw_fd(),
        a.off as libc::off_t,
    );
    drop(mem);
    if let Err(e) = p {
        let _ = call(&Request::ShmDetach {
            shmid: a.shmid,
            addr: 0,
        });
        return Err(Error::io("mmap", &e));
    }
    mapped(a.shmid, a.addr, a.len, a.off, a.rdonly, dev).inspect_err(|_| {
        let _ = call(&Request::ShmDetach {
            shmid: a.shmid,
            addr: 0,
        });
    })
}

pub use abi::{munmap, shmctl};

/// The fence of this module: its entry points that take the application's
/// raw pointers, and the one place where it maps and unmaps memory
/// (allowed `unsafe`).
///
/// [`map`](abi::map) and [`unmap`](abi::unmap) are safe to call because of
/// what this module maps and unmaps, never anything else: a range the
/// application named in its own `mmap`, `shmat`, `munmap` or `shmdt`
/// (which, by those calls' contracts, it gives up to their result), or an
/// attachment this module made for it (replaced or removed in its name
/// after a fork or a restore). libkrg keeps no Rust object in any of them.
#[allow(unsafe_code)]
mod abi {
    use super::*;

    /// `mmap(2)` of the application's memory (see the module's rule).
    pub(super) fn map(
        addr: *mut c_void,
        len: size_t,
        prot: c_int,
        flags: c_int,
        fd: c_int,
        off: libc::off_t,
    ) -> std::io::Result<*mut c_void> {
        // SAFETY: the fence's rule: the range is the application's.
        unsafe { crate::sys::mem::map(addr, len, prot, flags, fd, off) }
    }

    /// `munmap(2)` of the application's memory (see the module's rule).
    pub(super) fn unmap(addr: *mut c_void, len: size_t) -> std::io::Result<()> {
        // SAFETY: the fence's rule: the range is the application's.
        unsafe { crate::sys::mem::unmap(addr, len) }
    }

    /// `munmap(addr, len)`: see [`unmap_attached`].
    ///
    /// # Safety
    /// As munmap(2): the caller gives up `[addr, addr+len)`.
    pub unsafe fn munmap(addr: *mut c_void, len: size_t) -> Option<c_int> {
        unmap_attached(addr, len)
    }

    /// `shmctl(shmid, cmd, buf)`: see [`control`].
    ///
    /// # Safety
    /// `buf` is what the caller passed: valid for the command as shmctl(2)
    /// requires (read for IPC_SET, written for IPC_STAT).
    pub unsafe fn shmctl(
        shmid: c_int,
        cmd: c_int,
        buf: *mut shmid_ds,
        real: impl FnOnce(c_int, c_int, *mut shmid_ds) -> c_int,
    ) -> c_int {
        // SAFETY: the function's contract, for the duration of the call:
        // the commands that read or write `buf` are given a view of it.
        control(shmid, cmd, buf, unsafe { PtrMut::new(buf) }, real)
    }
}
