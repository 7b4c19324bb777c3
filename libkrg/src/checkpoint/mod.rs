//! Checkpoint, restart and migration by in-library state capture.
//!
//! # Capture
//! The agent asks for a capture by sending [`SIGCKPT`] to the process. The
//! thread that takes it becomes the *leader*: it asks the agent what is
//! wanted (the order), signals every other thread, and each of them *parks*
//! inside the handler after saving its callee-saved registers, thread
//! pointer, tid address, robust list, rseq area and signal mask
//! ([`ThreadRaw`]). The leader saves its own, then writes the image
//! ([`image`]): metadata, then every page worth saving. Because every thread
//! is inside the handler, the kernel's signal frames (the interrupted
//! registers, FPU state, masks) are ordinary stack memory in the image.
//!
//! # Restore
//! A fresh instance of the same executable is started with the same
//! command line, environment and `ADDR_NO_RANDOMIZE`, so the executable, the
//! libraries (libkrg among them) and the vDSO land where they were. libkrg's
//! constructor sees `KRG_RESTORE` and runs [`restore`]: it reopens the fds,
//! then on a private stack with raw system calls replaces the address space
//! with the image's, recreates the threads with `clone` and resumes each in
//! its saved context: every thread "returns a second time" from the context
//! save in the handler. The leader then re-registers with the agent and
//! releases the others; each handler returns and the kernel's
//! `rt_sigreturn` resumes the application where it was interrupted.
//!
//! # Unsafe
//! Denied, but in the code that runs without libc or below Rust's rules:
//! the restorer ([`restore`]), the x86_64 pieces ([`arch`]), the capture
//! allocator ([`alloc`]), the post-copy thread (`postcopy`), this file's
//! `handler` fence (the signal handler, the parked threads' slots and
//! context saves, what relies on them being parked) and the leader's own
//! context save in `save_and_capture`, which returns twice in its frame.
//! The rest (capture, image, descriptor kinds, migration, children) calls
//! `sys`.

// The capture allocator: a global allocator over raw mappings.
#[allow(unsafe_code)]
pub mod alloc;
// The x86_64 pieces: the context save that returns twice, raw clone and
// system calls.
#[allow(unsafe_code)]
pub mod arch;
pub mod capture;
pub mod children;
pub mod fds;
pub mod image;
mod migrate;
// The post-copy thread: raw system calls on a mapping of its own, no libc.
#[allow(unsafe_code)]
mod postcopy;
// The restorer: replaces the address space on a private stack, no libc.
#[allow(unsafe_code)]
pub mod restore;

use crate::error::{Error, ResultExt};
use crate::proto::{CkptAction, ErrorKind, Request, Response};
use crate::sys::process::{self, CLocale};
use crate::sys::signal::{self, SigSet};
use crate::sys::{futex, raw};
use crate::{krg_log, log};
use handler::{exec_ident, park, rseq_of, take_slot};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The signal the agent sends to ask for a capture (and the leader sends
/// to park the other threads). SIGRTMAX-2: glibc keeps the first real-time
/// signals for itself; applications that use real-time signals usually
/// count up from SIGRTMIN.
pub const SIGCKPT: i32 = crate::proto::CKPT_SIGNAL;

/// Most threads a capture handles.
pub const MAX_THREADS: usize = 1024;

/// One thread's state at the capture, saved by itself in the handler.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ThreadRaw {
    pub tid: i32,
    pub main: u32,
    pub ctx: arch::Ctx,
    pub fs: u64,
    pub tid_addr: u64,
    pub robust_head: u64,
    pub robust_len: u64,
    pub rseq: u64,
    pub rseq_len: u32,
    pub _pad: u32,
    pub sigmask: u64,
}

static NSLOTS: AtomicUsize = AtomicUsize::new(0);
/// 1 while a capture runs in this process.
static BUSY: AtomicU32 = AtomicU32::new(0);
/// Parked threads wait for this to change.
static GO: AtomicU32 = AtomicU32::new(0);
static PARKED: AtomicU32 = AtomicU32::new(0);
/// Threads of a restored image that left the restorer's stacks.
pub(crate) static RESUMED: AtomicU32 = AtomicU32::new(0);
/// The restorer's private area (address, length), unmapped by the leader
/// once every thread has left it.
pub(crate) static RESTORE_AREA: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
/// A static whose address says where libkrg's data is: the image records
/// it and a restore refuses a libkrg mapped elsewhere.
pub(crate) static ANCHOR: AtomicI32 = AtomicI32::new(0);

fn futex_wait(word: &AtomicU32, val: u32, ms: u64) {
    futex::wait(word, val, Duration::from_millis(ms), true);
}

fn futex_wake(word: &AtomicU32) {
    futex::wake_all(word, true);
}

fn gettid() -> i32 {
    raw::gettid()
}

fn getpid_raw() -> i32 {
    raw::getpid()
}

/// Fill the calling thread's slot (everything but the context).
fn fill_slot(t: &mut ThreadRaw) {
    t.tid = gettid();
    t.main = u32::from(t.tid == getpid_raw());
    t.fs = arch::fs_base() as u64;
    t.tid_addr = process::tid_address().unwrap_or(0);
    let (head, len) = raw::robust_list().unwrap_or((0, 0));
    t.robust_head = head;
    t.robust_len = len as u64;
    let (rseq, rseq_len) = rseq_of(t.fs);
    t.rseq = rseq;
    t.rseq_len = rseq_len;
    let mut mask: u64 = 0;
    // The calling thread's mask, queried.
    let _ = raw::sigprocmask(libc::SIG_BLOCK, None, Some(&mut mask));
    t.sigmask = mask;
}

/// The kernel name (`/proc/PID/task/TID/comm`) of the post-copy thread,
/// by which the agent sees that pages are still coming into a process.
pub const POSTCOPY_THREAD_NAME: &str = "krg-postcopy";

/// Wait until a post-copy migration into this process has received its
/// last page (returns at once when none runs).
pub fn wait_postcopy() {
    postcopy::wait_done();
}

/// Install the capture handler (once the process is an SSI process with
/// the checkpoint or migrate capability).
pub fn install() {
    handler::install();
    ANCHOR.store(1, Ordering::Relaxed);
}

/// The agent may send [`SIGCKPT`] (a capture, a stream hand-over) at any
/// time to a process that catches it; if the process is inside `execve`
/// at that moment, the new image starts with the default action (death)
/// until its constructor installs the handler. The exec hooks therefore
/// block it across the exec: an order that arrives then stays pending and
/// reaches the new image's handler once [`release_held_order`] unblocks
/// it. Returns whether this call blocked it (it was not blocked before).
pub fn hold_for_exec() -> bool {
    let old = signal::set_thread_mask(libc::SIG_BLOCK, &SigSet::empty().with(SIGCKPT));
    !old.contains(SIGCKPT)
}

/// Run an exec function with [`SIGCKPT`] held (see [`hold_for_exec`]);
/// it returns only if the exec failed, with its errno kept.
pub fn around_exec(exec: impl FnOnce() -> libc::c_int) -> libc::c_int {
    let held = hold_for_exec();
    let r = exec();
    let e = crate::rt::errno();
    release_after_failed_exec(held);
    crate::rt::set_errno(e);
    r
}

/// The exec failed: the old image runs on, its handler in place.
pub fn release_after_failed_exec(held: bool) {
    if held {
        signal::set_thread_mask(libc::SIG_UNBLOCK, &SigSet::empty().with(SIGCKPT));
    }
}

/// In the constructor, once the mode is known: `SIGCKPT` blocked from the
/// start means the previous image held it across its exec. With the
/// handler installed, a held order is taken now; without one (not an SSI
/// process any more, or without the capabilities) it is dropped, and the
/// program starts with the mask it would have had.
pub fn release_held_order(start_mask: u64) {
    if start_mask & (1u64 << (SIGCKPT - 1)) == 0 {
        return;
    }
    if ANCHOR.load(Ordering::Relaxed) == 0 {
        // Ignoring a pending signal discards it; then the default
        // disposition again.
        let _ = signal::set_plain(SIGCKPT, libc::SIG_IGN);
        let _ = signal::set_plain(SIGCKPT, libc::SIG_DFL);
    }
    signal::set_thread_mask(libc::SIG_UNBLOCK, &SigSet::empty().with(SIGCKPT));
}

/// The handler's work for a [`SIGCKPT`] with `si_code` `code` from
/// `sender`: park (the leader's own signal) or lead a capture.
fn on_order(code: i32, sender: i32) {
    let saved = crate::rt::errno();
    let from_self = code == libc::SI_TKILL && sender == getpid_raw();
    let own_order = from_self && LOCAL_PENDING.load(Ordering::Acquire);
    if from_self && !own_order {
        // The leader parks us; a late one (the capture is over) is dropped.
        let gen = GO.load(Ordering::Acquire);
        if BUSY.load(Ordering::Acquire) == 1 {
            park(gen);
        }
    } else if BUSY
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        crate::rt::guarded(lead);
    }
    crate::rt::set_errno(saved);
}

/// After the context save of a parked thread (`restored`: returning the
/// second time, in a restored process): count it, and wait for the
/// leader.
fn parked(gen: u32, restored: bool) {
    if restored {
        RESUMED.fetch_add(1, Ordering::AcqRel);
        futex_wake(&RESUMED);
    } else {
        PARKED.fetch_add(1, Ordering::AcqRel);
        futex_wake(&PARKED);
    }
    while GO.load(Ordering::Acquire) == gen && BUSY.load(Ordering::Acquire) == 1 {
        futex_wait(&GO, gen, 200);
    }
}

/// Let the parked threads go and end the capture.
fn release() {
    GO.fetch_add(1, Ordering::AcqRel);
    futex_wake(&GO);
    BUSY.store(0, Ordering::Release);
}

/// What the leader does for one order.
pub(crate) struct Order {
    pub(crate) action: CkptAction,
    pub(crate) path: Vec<u8>,
    pub(crate) kill: bool,
    pub(crate) node: u32,
    /// `StreamSwap`: (fd, stream id) of each connection to hand over.
    pub(crate) streams: Vec<(i32, u64)>,
    /// A migration without post-copy.
    pub(crate) precopy: bool,
}

/// An order the process gave itself (`krg_checkpoint`, `krg_migrate`):
/// taken by the leader instead of asking the agent. Set and raised by the
/// same thread, which then is the leader.
struct LocalOrder(std::sync::Mutex<Option<Order>>);
static LOCAL: LocalOrder = LocalOrder(std::sync::Mutex::new(None));
/// Outcome of the last self-ordered capture: 0 taken, 1 restored, -errno.
static SELF_RESULT: AtomicI32 = AtomicI32::new(0);
/// A self order waits for the signal the same thread raises.
static LOCAL_PENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Callbacks run before a capture and after a restore (C function
/// pointers, at most 16 of each).
static BEFORE: [AtomicUsize; 16] = [const { AtomicUsize::new(0) }; 16];
static AFTER: [AtomicUsize; 16] = [const { AtomicUsize::new(0) }; 16];

fn register(list: &[AtomicUsize; 16], f: usize) -> bool {
    list.iter().any(|s| {
        s.compare_exchange(0, f, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })
}

fn run_callbacks(list: &[AtomicUsize; 16]) {
    for s in list {
        let f = s.load(Ordering::Acquire);
        if f != 0 {
            handler::call_registered(f);
        }
    }
}

/// Run `f` in the capturing thread before every capture (other threads
/// still run; it must not wait for them). False if 16 are registered.
pub fn on_checkpoint(f: extern "C" fn()) -> bool {
    register(&BEFORE, f as usize)
}

/// Run `f` in a restored process before its threads go on.
pub fn on_restart(f: extern "C" fn()) -> bool {
    register(&AFTER, f as usize)
}

/// Capture this process by its own request, from the calling thread.
/// `Ok(false)`: the image was taken (or the process migrated and this is
/// the restored copy for a migration: `Ok(true)`); `Ok(true)` when this
/// call returns in a process restored from the image.
fn capture_self(order: Order) -> Result<bool, Error> {
    if crate::rt::mode() != crate::rt::Mode::Active {
        return Err(Error::errno(libc::ENOTCONN, "not an SSI process"));
    }
    *LOCAL.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(order);
    SELF_RESULT.store(-libc::EAGAIN, Ordering::Release);
    SELF_MSG.lock().unwrap_or_else(|e| e.into_inner()).1 = 0;
    LOCAL_PENDING.store(true, Ordering::Release);
    // To the calling thread: its handler runs before tgkill returns (the
    // signal is not blocked outside krg).
    let _ = raw::tgkill(getpid_raw(), gettid(), SIGCKPT);
    LOCAL_PENDING.store(false, Ordering::Release);
    if let Ok(mut l) = LOCAL.0.lock() {
        // Not taken (another capture was under way): withdrawn.
        if l.take().is_some() {
            return Err(Error::new(
                ErrorKind::CaptureBusy,
                libc::EBUSY,
                "another capture of this process is under way",
            ));
        }
    }
    match SELF_RESULT.load(Ordering::Acquire) {
        0 => Ok(false),
        1 => Ok(true),
        e => Err(Error::errno(-e, {
            let m = SELF_MSG.lock().unwrap_or_else(|e| e.into_inner());
            String::from_utf8_lossy(&m.0[..m.1]).into_owned()
        })),
    }
}

/// Why the last self-ordered capture was refused (bytes, length): fixed,
/// written in the handler.
static SELF_MSG: std::sync::Mutex<([u8; 512], usize)> = std::sync::Mutex::new(([0; 512], 0));

/// `krg_checkpoint(dir)`: write this process's image to `dir` and go on.
/// Returns `Ok(false)` after taking it, `Ok(true)` in a process restarted
/// from it.
pub fn checkpoint_self(dir: &std::path::Path) -> Result<bool, Error> {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::fs::canonicalize(dir).during(dir.display())?;
    capture_self(Order {
        action: CkptAction::Checkpoint,
        path: dir.as_os_str().as_bytes().to_vec(),
        kill: false,
        node: 0,
        streams: Vec::new(),
        precopy: false,
    })
}

/// `krg_migrate(node)`: move this process to `node`. Returns in the moved
/// process (`Ok`), or here with the reason it could not move.
pub fn migrate_self(node: u32) -> Result<(), Error> {
    if node == crate::processes::node_id() {
        return Err(Error::errno(
            libc::EINVAL,
            format!("already on node {node}"),
        ));
    }
    capture_self(Order {
        action: CkptAction::Migrate,
        path: Vec::new(),
        kill: false,
        node,
        streams: Vec::new(),
        precopy: false,
    })
    .map(|_| ())
}

fn ask_order() -> Result<Option<Order>, Error> {
    // try_lock: this runs in a signal handler.
    if LOCAL_PENDING.swap(false, Ordering::AcqRel) {
        if let Some(o) = LOCAL.0.try_lock().ok().and_then(|mut l| l.take()) {
            return Ok(Some(o));
        }
    }
    match crate::client::call(&Request::CkptOrder) {
        Ok(Response::CkptOrder(o)) => Ok(match o.action {
            CkptAction::None => None,
            a => Some(Order {
                action: a,
                path: o.path,
                kill: o.kill,
                node: o.node,
                streams: o.streams,
                precopy: o.precopy,
            }),
        }),
        Ok(other) => Err(Error::other(format!("unexpected answer {other:?}"))),
        Err(e) => Err(e.into()),
    }
}

/// Tell the agent how the capture it ordered ended: `Ok`, or the kind of
/// failure (`msg` says what).
pub(crate) fn report(r: Result<(), ErrorKind>, msg: String, bytes: u64) {
    let (ok, kind) = match r {
        Ok(()) => (true, ErrorKind::Other),
        Err(k) => (false, k),
    };
    let _ = crate::client::call(&Request::CkptDone {
        ok,
        kind,
        msg,
        bytes,
    });
}

// The leader runs in the C locale ([`CLocale`]): glibc's `strerror_r`
// (every io::Error the capture formats: a vanished fd's readlink, any
// refusal) goes through gettext, which under a program's own locale
// (`setlocale(LC_ALL, "")`: coreutils, sort, awk) mallocs and frees on
// each call, in a handler that may have interrupted malloc.

fn lead() {
    let _c = CLocale::enter();
    // A process still receiving its memory by post-copy is not captured
    // before the last page is in (its fault handler is no application
    // thread and would never park).
    postcopy::wait_done();
    if alloc::begin().is_none() {
        report(Err(ErrorKind::Other), "no memory for the capture".into(), 0);
        BUSY.store(0, Ordering::Release);
        return;
    }
    let order = match ask_order() {
        Ok(Some(o)) => o,
        Ok(None) => {
            alloc::end();
            BUSY.store(0, Ordering::Release);
            return;
        }
        Err(e) => {
            krg_log!(log::Level::Warn, "checkpoint: asking the agent: {e}");
            alloc::end();
            BUSY.store(0, Ordering::Release);
            return;
        }
    };
    let kill = order.kill;
    // A stream swap is not a capture: the program's callbacks stay out.
    if order.action != CkptAction::StreamSwap {
        run_callbacks(&BEFORE);
    }
    // `order` lives until the threads are released: a self order's is
    // malloc's memory, whose free could wait for a lock a parked thread
    // holds (an agent's order is in the arena: its free is nothing).
    match lead_capture(&order) {
        Ok(Some(bytes)) => {
            SELF_RESULT.store(0, Ordering::Release);
            report(Ok(()), String::new(), bytes);
            if kill {
                // The image is the process now: it must not run on (a
                // record appended after the capture would be replayed).
                // Kills this process.
                let _ = process::kill(getpid_raw(), libc::SIGKILL);
            }
        }
        Ok(None) => {
            // Restored: this is the new process.
            after_restore();
            return;
        }
        Err(e) => {
            krg_log!(log::Level::Warn, "checkpoint refused: {e}");
            SELF_RESULT.store(-libc::EBUSY, Ordering::Release);
            // For the caller of a self order, in a fixed buffer: nothing
            // here may call malloc (this handler may have interrupted it).
            let (kind, e) = (e.kind, e.to_string());
            if let Ok(mut m) = SELF_MSG.try_lock() {
                let n = e.len().min(m.0.len());
                m.0[..n].copy_from_slice(&e.as_bytes()[..n]);
                m.1 = n;
            }
            report(Err(kind), e, 0);
        }
    }
    // The arena is ended before the capture is: once BUSY is 0 another
    // thread may take the next order and start the arena again.
    alloc::end();
    release();
}

/// Park the other threads and take the image. `Ok(None)` when this call
/// returns in a restored process.
fn lead_capture(order: &Order) -> Result<Option<u64>, Error> {
    let me = gettid();
    let pid = getpid_raw();
    NSLOTS.store(0, Ordering::Release);
    PARKED.store(0, Ordering::Release);
    // Refuse early, before any thread is disturbed.
    if personality() & libc::ADDR_NO_RANDOMIZE as u32 == 0 {
        return Err("the process runs with address randomisation (start it under krg so that it inherits ADDR_NO_RANDOMIZE)".into());
    }
    let mut signalled: Vec<i32> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tasks = crate::dirs::numbers("/proc/self/task")?;
        let mut new = false;
        for t in tasks {
            if t != me && !signalled.contains(&t) {
                // A thread of this process.
                let _ = raw::tgkill(pid, t, SIGCKPT);
                signalled.push(t);
                new = true;
            }
        }
        let parked = PARKED.load(Ordering::Acquire) as usize;
        if !new && parked >= signalled.len() {
            break;
        }
        if Instant::now() > deadline {
            let stuck: Vec<String> = signalled.iter().map(|t| t.to_string()).collect();
            return Err(Error::other(format!(
                "{} of the threads ({}) did not stop within 5 s (signal {SIGCKPT} blocked?)",
                signalled.len() - parked,
                stuck.join(" ")
            )));
        }
        futex_wait(&PARKED, parked as u32, 20);
    }
    if order.action == CkptAction::StreamSwap {
        // Every thread is parked (a blocked read or write of the old
        // connection was interrupted and restarts on the new one).
        return crate::streams::moving::swap(&order.streams).map(|()| Some(0));
    }
    if signalled.len() + 1 > MAX_THREADS {
        return Err(Error::other(format!("more than {MAX_THREADS} threads")));
    }
    let slot = take_slot().ok_or("no thread slot")?;
    // The slot is ours.
    handler::fill(slot);
    // On an error the parked threads go on: `lead` releases them.
    save_and_capture(slot, order)
}

fn personality() -> u32 {
    // 0xffffffff queries without changing.
    process::personality(0xffff_ffff).map_or(u32::MAX, |p| p as u32)
}

// The context save returns twice, so it stays in the frame that goes on:
// the one unsafe block of this file outside the handler's fence.
#[allow(unsafe_code)]
/// The context save of the leader and, in the same frame, the capture.
#[inline(never)]
fn save_and_capture(slot: *mut ThreadRaw, order: &Order) -> Result<Option<u64>, Error> {
    // Written into libkrg's memory now, before the pages to save are
    // listed: a page first touched after the pagemap scan is not saved.
    exec_ident()?;
    // SAFETY: the slot is ours; this frame stays live during the capture.
    if unsafe { arch::ctx_save(&mut (*slot).ctx) } != 0 {
        return Ok(None);
    }
    match order.action {
        CkptAction::Migrate => migrate::out(order).map(Some),
        _ => take_image(order).map(Some),
    }
}

pub(crate) fn threads_of_slots() -> Vec<image::ThreadState> {
    handler::with_filled_slots(|slots| slots.iter().map(thread_state).collect())
}

fn thread_state(t: &ThreadRaw) -> image::ThreadState {
    image::ThreadState {
        tid: t.tid,
        main: t.main != 0,
        ctx: vec![
            t.ctx.rbx,
            t.ctx.rbp,
            t.ctx.r12,
            t.ctx.r13,
            t.ctx.r14,
            t.ctx.r15,
            t.ctx.rsp,
            t.ctx.rip,
            u64::from(t.ctx.mxcsr) | (u64::from(t.ctx.fcw) << 32),
        ],
        fs: t.fs,
        tid_addr: t.tid_addr,
        robust_head: t.robust_head,
        robust_len: t.robust_len,
        rseq: t.rseq,
        rseq_len: t.rseq_len,
        sigmask: t.sigmask,
    }
}

/// The threads of the capture; refused without a main thread.
fn capture_threads() -> Result<Vec<image::ThreadState>, Error> {
    let threads = threads_of_slots();
    if !threads.iter().any(|t| t.main) {
        return Err("the main thread has exited; such a process cannot be restored".into());
    }
    Ok(threads)
}

/// Streams in a checkpoint image: a standard fd's is the restarting
/// command's (relayed), a self-pipe or socketpair is made again with what
/// is in it. A connection, listener, FIFO or pipe leading out of the process is
/// parked in this node's agent when the process is killed after the
/// checkpoint (`kill`): the image names the park, the restore takes the
/// same socket or pipe back. Answers the parks made (to release if the
/// image fails).
fn streams_for_disk(fds: &mut [image::FdState], kill: bool) -> Result<Vec<i32>, Error> {
    fds::settle(fds, fds::Purpose::Checkpoint)?;
    fds::relay_stdio(fds, fds::Purpose::Checkpoint);
    let out: Vec<(usize, String)> = (0..fds.len())
        .filter_map(|i| {
            fds::of(&fds[i].kind)
                .leads_out(&fds[i], fds)
                .map(|w| (i, w))
        })
        .collect();
    if let (false, Some((i, what))) = (kill, out.first()) {
        return Err(Error::refused(format!(
            "{what}: it stays with the process, which keeps running; checkpoint with --kill to take it into the image (its other end then waits for the restart)"
        ))
        .fd(fds[*i].fd));
    }
    let node = crate::processes::node_id();
    let mut parks = Vec::new();
    for (i, _) in out {
        let fd = fds[i].fd;
        match crate::client::call(&crate::proto::Request::Park { fd, moving: false }) {
            Ok(crate::proto::Response::Id(id)) => {
                parks.push(id);
                fds[i].kind = fds::parked_entry(node, id);
            }
            other => {
                unpark(&parks);
                return Err(match other {
                    Err(e) => Error::from(e),
                    Ok(r) => Error::other(format!("unexpected answer {r:?}")),
                }
                .during("parking it for the restart")
                .fd(fd));
            }
        }
    }
    Ok(parks)
}

/// Take parks back and close them (a checkpoint that failed: the process
/// goes on with its own fds).
fn unpark(parks: &[i32]) {
    for id in parks {
        let _ = crate::client::call_fds(&crate::proto::Request::Unpark { id: *id });
    }
}

fn take_image(order: &Order) -> Result<u64, Error> {
    let threads = capture_threads()?;
    let dir = std::path::PathBuf::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&order.path),
    );
    let path = dir.join(image::IMAGE_FILE);
    let tmp = dir.join(format!(".{}.tmp", image::IMAGE_FILE));
    // 0600: an image is this process's memory.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
    }
    .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let r = write_image(threads, &file, order.kill);
    drop(file);
    match r {
        Ok((n, parks)) => std::fs::rename(&tmp, &path).map(|()| n).map_err(|e| {
            unpark(&parks);
            Error::io(path.display(), &e)
        }),
        Err(e) => {
            // Refused or failed half-way: no partial image is left behind.
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Capture this process into `file` (`kill`: parking its connections is
/// allowed): bytes written and the parks made (taken back if it fails).
fn write_image(
    threads: Vec<image::ThreadState>,
    file: &std::fs::File,
    kill: bool,
) -> Result<(u64, Vec<i32>), Error> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    let maps_text = crate::proc_self::read_file("/proc/self/maps")?;
    // The capture arena is left out of the image.
    let maps = capture::without(
        capture::parse_maps(&String::from_utf8_lossy(&maps_text)),
        alloc::range(),
    );
    let (regions, runs) = capture::regions(&maps)?;
    let mut fds = fds::capture(&[fd])?;
    fds::refuse_shared(&maps, &fds, false)?;
    let parks = streams_for_disk(&mut fds, kill)?;
    let r = capture::meta(&maps, regions.clone(), &runs, threads, fds)
        .and_then(|meta| capture::write_image(fd, &meta, &regions, &runs));
    match r {
        Ok(n) => Ok((n, parks)),
        Err(e) => {
            unpark(&parks);
            Err(e)
        }
    }
}

/// In the leader of a restored process: the address space is the image's
/// and every thread runs again. Re-register, wait for the others to leave
/// the restorer's stacks, free those, let everyone go.
fn after_restore() {
    let _ = alloc::restart_after_restore();
    crate::streams::moving::bind_after_restore();
    crate::processes::after_restore();
    // Shared memory attached again, from this node (needs the agent to
    // know this process: after `processes`).
    crate::dsm::after_restore();
    // The children it had stayed where they run: a child shadow here for
    // each, before any thread of the program can wait for them.
    children::adopt();
    // Connections that waited to be accepted wait again.
    crate::streams::accepted::requeue();
    let others = NSLOTS.load(Ordering::Acquire).saturating_sub(1) as u32;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = RESUMED.load(Ordering::Acquire);
        if n >= others || Instant::now() > deadline {
            break;
        }
        futex_wait(&RESUMED, n, 50);
    }
    handler::free_restore_area(others);
    krg_log!(
        log::Level::Info,
        "restored as gpid {} on node {}",
        crate::processes::my_gpid(),
        crate::processes::node_id()
    );
    SELF_RESULT.store(1, Ordering::Release);
    alloc::end();
    run_callbacks(&AFTER);
    release();
}

/// The capture handler's fence (allowed `unsafe`): the handler itself
/// (installed with `sigaction`, reading its siginfo), the context save of
/// a parked thread, which returns twice, the threads' slots written in
/// place, the start-time identity kept in libkrg's memory, glibc's rseq
/// symbols, the registered C callbacks, and what relies on every other
/// thread being parked: memory protection changed for the copy, the
/// restorer's area unmapped.
#[allow(unsafe_code)]
mod handler {
    use super::*;
    use std::cell::UnsafeCell;

    struct Slots(UnsafeCell<[ThreadRaw; MAX_THREADS]>);
    // SAFETY: each slot is written by exactly one thread (index from NSLOTS)
    // and read by the leader only after that thread counted itself parked.
    unsafe impl Sync for Slots {}

    static SLOTS: Slots = Slots(UnsafeCell::new(
        [ThreadRaw {
            tid: 0,
            main: 0,
            ctx: arch::Ctx {
                rbx: 0,
                rbp: 0,
                r12: 0,
                r13: 0,
                r14: 0,
                r15: 0,
                rsp: 0,
                rip: 0,
                mxcsr: 0,
                fcw: 0,
                _pad: 0,
            },
            fs: 0,
            tid_addr: 0,
            robust_head: 0,
            robust_len: 0,
            rseq: 0,
            rseq_len: 0,
            _pad: 0,
            sigmask: 0,
        }; MAX_THREADS],
    ));

    /// A slot of this thread's own for the capture (`None` past
    /// [`MAX_THREADS`]).
    pub(super) fn take_slot() -> Option<*mut ThreadRaw> {
        let i = NSLOTS.fetch_add(1, Ordering::AcqRel);
        if i >= MAX_THREADS {
            return None;
        }
        // SAFETY: index i is this thread's alone (fetch_add), within the
        // array.
        Some(unsafe { (SLOTS.0.get() as *mut ThreadRaw).add(i) })
    }

    /// Fill `slot`, which [`take_slot`] gave the calling thread (everything
    /// but the context).
    pub(super) fn fill(slot: *mut ThreadRaw) {
        let base = SLOTS.0.get() as *mut ThreadRaw;
        let i = (slot as usize).wrapping_sub(base as usize) / std::mem::size_of::<ThreadRaw>();
        assert!(
            i < MAX_THREADS && std::ptr::eq(slot, base.wrapping_add(i)),
            "not a thread slot"
        );
        // SAFETY: a slot of SLOTS (checked above), the calling thread's
        // alone (take_slot's index).
        fill_slot(unsafe { &mut *slot });
    }

    /// `f` of the slots filled by the capture (by the parked threads and
    /// the leader: run in the leader once they are parked).
    pub(super) fn with_filled_slots<R>(f: impl FnOnce(&[ThreadRaw]) -> R) -> R {
        let n = NSLOTS.load(Ordering::Acquire).min(MAX_THREADS);
        // SAFETY: every slot below n was filled by a parked thread or the
        // leader, and none is written while they stay parked.
        f(unsafe { &(&*SLOTS.0.get())[..n] })
    }

    /// The command line and environment the process image was started with
    /// (NUL-separated, as in /proc/self/cmdline and /proc/self/environ), kept
    /// in libkrg's memory at the first capture: after a restore, /proc shows
    /// the restoring process's own start instead, so a second capture of a
    /// restored process must take them from here. A fixed buffer because a
    /// capture may not allocate anything that outlives it.
    struct ExecIdent(UnsafeCell<[u8; IDENT_MAX]>);
    // SAFETY: only the leader of a capture touches it (every other thread of
    // the process is parked meanwhile).
    unsafe impl Sync for ExecIdent {}
    const IDENT_MAX: usize = 256 * 1024;
    static IDENT: ExecIdent = ExecIdent(UnsafeCell::new([0; IDENT_MAX]));
    /// Lengths of the command line and environment in `IDENT` (0, 0: unset).
    static IDENT_LEN: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

    /// The start-time command line and environment (raw, NUL-separated).
    pub(crate) fn exec_ident() -> Result<(Vec<u8>, Vec<u8>), Error> {
        let (a, e) = (
            IDENT_LEN[0].load(Ordering::Acquire),
            IDENT_LEN[1].load(Ordering::Acquire),
        );
        if a > 0 {
            // SAFETY: the first a + e bytes were written by a previous capture.
            let buf = unsafe { &*IDENT.0.get() };
            return Ok((buf[..a].to_vec(), buf[a..a + e].to_vec()));
        }
        let argv = crate::proc_self::read_file("/proc/self/cmdline")?;
        let env = crate::proc_self::read_file("/proc/self/environ")?;
        if argv.len() + env.len() <= IDENT_MAX && !argv.is_empty() {
            // SAFETY: the leader alone writes the buffer, within its bounds.
            let buf = unsafe { &mut *IDENT.0.get() };
            buf[..argv.len()].copy_from_slice(&argv);
            buf[argv.len()..argv.len() + env.len()].copy_from_slice(&env);
            IDENT_LEN[1].store(env.len(), Ordering::Release);
            IDENT_LEN[0].store(argv.len(), Ordering::Release);
        }
        Ok((argv, env))
    }

    extern "C" {
        /// glibc ≥ 2.35: offset of the rseq area from the thread pointer, and
        /// its size (0 when glibc did not register one).
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }

    pub(super) fn rseq_of(fs: u64) -> (u64, u32) {
        // SAFETY: plain reads of two constants glibc sets before main.
        let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
        if size == 0 {
            (0, 0)
        } else {
            // glibc registers the whole struct rseq (32 bytes) whatever the
            // feature size it exports.
            ((fs as i64 + off as i64) as u64, 32)
        }
    }

    /// Install [`on_signal`] for [`SIGCKPT`], every other signal blocked
    /// while it runs but faults (a fault inside a capture must still kill
    /// the process loudly).
    pub(super) fn install() {
        // SAFETY: a zeroed sigaction is valid; we fill handler, flags, mask.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: fills the mask we own.
        unsafe { libc::sigfillset(&mut sa.sa_mask) };
        for s in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE] {
            // SAFETY: as above.
            unsafe { libc::sigdelset(&mut sa.sa_mask, s) };
        }
        // SAFETY: installs our handler, which only reads its siginfo and
        // calls the capture, for our reserved signal.
        unsafe { libc::sigaction(SIGCKPT, &sa, std::ptr::null_mut()) };
    }

    extern "C" fn on_signal(_sig: i32, info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        let (code, sender) = unsafe { ((*info).si_code, (*info).si_pid()) };
        on_order(code, sender);
    }

    /// Park the calling thread (the leader's signal) in a slot of its own.
    pub(super) fn park(gen: u32) {
        let Some(slot) = take_slot() else {
            return;
        };
        fill(slot);
        park_here(slot, gen);
    }

    /// Save the context and wait for the leader; runs twice after a restore.
    #[inline(never)]
    fn park_here(slot: *mut ThreadRaw, gen: u32) {
        // SAFETY: the slot is ours; this frame stays live until the wait ends.
        let restored = unsafe { arch::ctx_save(&mut (*slot).ctx) } != 0;
        parked(gen, restored);
    }

    /// Call a callback registered with [`on_checkpoint`] or [`on_restart`]
    /// (its address).
    pub(super) fn call_registered(f: usize) {
        // SAFETY: only `extern "C" fn()` pointers are registered.
        let f: extern "C" fn() = unsafe { std::mem::transmute::<usize, extern "C" fn()>(f) };
        f();
    }

    /// Give the pages of the mapping `[start, end)` protection `prot`: the
    /// capture's copy of memory the process itself cannot read (made
    /// readable, then given its protection back).
    pub(super) fn set_protection(start: u64, end: u64, prot: i32) {
        // SAFETY: a mapping of /proc/self/maps that no thread uses while
        // the others are parked in the handler; its protection is put back
        // before they run.
        let _ = unsafe {
            crate::sys::mem::protect(start as *mut libc::c_void, (end - start) as usize, prot)
        };
    }

    /// In a restored process: unmap the restorer's area once the `others`
    /// threads (all but the leader) have left it.
    pub(super) fn free_restore_area(others: u32) {
        let (a, l) = (
            RESTORE_AREA[0].swap(0, Ordering::AcqRel),
            RESTORE_AREA[1].swap(0, Ordering::AcqRel),
        );
        if a != 0 && RESUMED.load(Ordering::Acquire) >= others {
            // SAFETY: the restorer's area; no thread runs on it any more.
            let _ = unsafe { crate::sys::mem::unmap(a as *mut libc::c_void, l) };
        }
    }
}
