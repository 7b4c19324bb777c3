//! The cluster-wide process namespace, in-process side: the process's own
//! gpid, translation between kernel pids and gpids, and fork/spawn handling.
//!
//! Every function here is called by a hook of `libkrg.so` after
//! [`crate::rt::enter`] said [`crate::rt::Entry::Krg`]; the real libc function
//! is passed in as a closure, so this module holds all decisions and the
//! preload crate none. Nothing here allocates or locks: the state is a handful
//! of atomics and a fixed-size lock-free table, agent calls go through
//! [`crate::rt::agent_call`] (stack buffers, raw syscalls). So every hook is
//! as async-signal-safe as the libc function it replaces, and a fork can never
//! catch another thread holding something the child needs.
//!
//! # Identity
//!
//! The gpid comes from `Hello` at load. In a forked child it becomes
//! *pending* (0) and is asked from the agent (`Ensure{kpid: self}`) on first
//! use; the parent has already registered the child (`Ensure{kpid: child}`)
//! before `fork` returned to it. A pending process resolves itself before it
//! forks or spawns, so a child can always translate its parent.
//!
//! # Caches
//!
//! * children: kernel pid ↔ gpid of the children this process created with
//!   `fork`/`vfork`/`_Fork`/`posix_spawn`, filled at creation and emptied
//!   when `wait*` reaps them. A miss falls back to the agent.
//! * `getppid`, `getpgrp`, `getsid`: the last answer, keyed by the kernel
//!   value just read, so a reparented process or one that changed group
//!   misses the cache instead of getting a stale answer.
//!
//! Values below 2^22 are kernel pids and pass through unchanged everywhere,
//! so programs that mix in pids from outside (a pid file of a plain daemon)
//! keep working on the local node.

#![deny(unsafe_code)]

use crate::gpid::is_gpid;
use crate::hookclient::{HookCallError, Reply};
use crate::proto::Request;
use crate::rt::{self, set_errno};
// Raw system calls: never through a hook.
use crate::sys::raw::{
    getpgid as sys_getpgid, getpid as sys_getpid, getppid as sys_getppid, getsid as sys_getsid,
};
use crate::sys::signal::child_pid;
use crate::sys::user::PtrMut;
use crate::{krg_log, log};
use libc::{c_int, idtype_t, pid_t, siginfo_t};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

// ---------------------------------------------------------------------------
// State

/// This process's gpid; 0 while pending (a forked child that has not asked).
static MY_GPID: AtomicI32 = AtomicI32::new(0);
/// This process's kernel pid.
static MY_KPID: AtomicI32 = AtomicI32::new(0);
/// The node this process runs on (as told by `Hello`).
static NODE: AtomicU32 = AtomicU32::new(0);
/// Effective capabilities as told by `Hello`.
static CAPS: AtomicU32 = AtomicU32::new(0);

/// Last translations of the kernel ppid, own pgid and own sid.
static PPID: Pair = Pair::new();
static PGID: Pair = Pair::new();
static SID: Pair = Pair::new();

/// Children created by this process.
static CHILDREN: PidTable = PidTable::new();

// ---------------------------------------------------------------------------
// Identity

/// Record the kernel pid (at initialisation, before `Hello`).
pub fn init_identity() {
    MY_KPID.store(sys_getpid(), Ordering::Release);
}

/// Record what `Hello` answered.
pub fn set_identity(gpid: pid_t, node: u32, caps: u32) {
    NODE.store(node, Ordering::Relaxed);
    CAPS.store(caps, Ordering::Relaxed);
    MY_GPID.store(gpid, Ordering::Release);
}

/// Register the atfork child handler that resets per-process state, so that
/// the application's own atfork child handlers (which run after ours) already
/// see the child's identity.
pub fn register_atfork() {
    extern "C" fn child() {
        after_fork_child();
    }
    crate::sys::process::atfork(None, None, Some(child));
}

/// The node this process runs on (0 if unknown).
pub fn node_id() -> u32 {
    NODE.load(Ordering::Relaxed)
}

/// Effective capabilities as told by `Hello`.
pub fn hello_caps() -> u32 {
    CAPS.load(Ordering::Relaxed)
}

/// This process's kernel pid.
pub fn my_kpid() -> pid_t {
    let k = MY_KPID.load(Ordering::Acquire);
    if k > 0 {
        k
    } else {
        sys_getpid()
    }
}

/// This process's gpid, asking the agent if it is pending. If the agent
/// cannot answer, the kernel pid becomes the process's pid for good (getpid
/// must never change within a process).
pub fn my_gpid() -> pid_t {
    let g = MY_GPID.load(Ordering::Acquire);
    if g != 0 {
        return g;
    }
    let k = my_kpid();
    let g = match ask_pid(&Request::Ensure { kpid: k }) {
        Ok(g) if is_gpid(g) => g,
        Ok(other) => {
            krg_log!(
                log::Level::Warn,
                "the agent gave no gpid to this process ({other}); using the kernel pid"
            );
            k
        }
        Err(e) => {
            krg_log!(
                log::Level::Warn,
                "no gpid for this process ({e}); using the kernel pid"
            );
            k
        }
    };
    match MY_GPID.compare_exchange(0, g, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => g,
        Err(cur) => cur,
    }
}

/// Reset per-process state in a forked child. Idempotent: runs from our
/// atfork child handler and again from the fork hook (and alone after
/// `_Fork`, which runs no handlers).
pub fn after_fork_child() {
    let k = sys_getpid();
    let parent_k = MY_KPID.load(Ordering::Acquire);
    if parent_k == k {
        return;
    }
    let parent_g = MY_GPID.load(Ordering::Acquire);
    MY_KPID.store(k, Ordering::Release);
    MY_GPID.store(0, Ordering::Release);
    CHILDREN.clear();
    PGID.clear();
    SID.clear();
    // The parent is the process that forked: its identity is known.
    if parent_g != 0 && parent_k > 0 {
        PPID.set(parent_k, parent_g);
    } else {
        PPID.clear();
    }
    rt::after_fork_child();
    if let Some(h) = FORK_HOOKS.get() {
        (h.child)();
    }
}

/// What the subsystems above this one do around a `fork` (set once by
/// `crate::start`: processes never calls up into them).
pub struct ForkHooks {
    /// In the parent, before the child is created.
    pub before: fn(),
    /// In the child, once its identity is reset.
    pub child: fn(),
}

static FORK_HOOKS: std::sync::OnceLock<ForkHooks> = std::sync::OnceLock::new();

/// Say what the subsystems above do around a fork (once).
pub fn set_fork_hooks(h: ForkHooks) {
    let _ = FORK_HOOKS.set(h);
}

/// `k` is this process's kernel child standing for gpid `g` (a child
/// shadow, started after a restore).
pub fn note_child(k: pid_t, g: pid_t) {
    CHILDREN.insert(k, g);
}

/// Whether kernel child `k` is known to the program by its gpid: created
/// through the hooks (`fork`, `posix_spawn`, ...) or a child shadow, and
/// not reaped. A child libc started itself (`popen`, `system`) is known to
/// the program by its kernel pid only. (The cache may have evicted a
/// child: then it is taken as unknown.)
pub fn knows_child(k: pid_t) -> bool {
    CHILDREN.gpid_of(k).is_some()
}

/// How many times this process was restored (a wait in progress then
/// names its child by an old node's kernel pid).
static RESTORES: AtomicU32 = AtomicU32::new(0);

/// In a restored image: the kernel pid is new and this node's agent
/// registered it (under the image's gpid, or a new one if that is taken);
/// cached translations of the old node's kernel ids mean nothing here.
pub fn after_restore() {
    RESTORES.fetch_add(1, Ordering::AcqRel);
    MY_KPID.store(sys_getpid(), Ordering::Release);
    CHILDREN.clear();
    PPID.clear();
    PGID.clear();
    SID.clear();
    match rt::agent_call(&Request::Whoami) {
        Ok(Reply::Hello {
            gpid, node, caps, ..
        }) => set_identity(gpid, node, caps),
        Ok(_) | Err(_) => {
            crate::krg_log!(
                crate::log::Level::Warn,
                "restored, but the agent did not say who this process is"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Agent helpers

/// A request answered with a pid.
fn ask_pid(req: &Request) -> Result<pid_t, HookCallError> {
    match rt::agent_call(req)? {
        Reply::Pid(p) => Ok(p),
        _ => Err(HookCallError::Protocol(
            "the agent answered a pid request with no pid".into(),
        )),
    }
}

/// A request answered with `Ok`: 0, or -1 with errno.
fn ask_ok(req: &Request) -> c_int {
    match rt::agent_call(req) {
        Ok(Reply::Ok) => 0,
        Ok(_) => {
            set_errno(libc::EIO);
            -1
        }
        Err(e) => {
            set_errno(e.errno());
            -1
        }
    }
}

// ---------------------------------------------------------------------------
// Translation

/// Kernel pid → gpid for any local process (a kernel pid that is not an SSI
/// process comes back unchanged; so does everything if the agent is gone).
pub fn to_global(k: pid_t) -> pid_t {
    if k <= 0 || is_gpid(k) {
        return k;
    }
    if k == my_kpid() {
        return my_gpid();
    }
    if let Some(g) = CHILDREN.gpid_of(k) {
        return g;
    }
    ask_pid(&Request::Translate { kpid: k }).unwrap_or(k)
}

/// The question for the agent about a kernel id: a process, or a process
/// group / session. Groups are always asked (once per id, for our own group
/// and session): a program started for a shadow leads a kernel group of its
/// own yet belongs to its shadow's group, so "it is my own pid" does not
/// answer.
fn translate_req(k: pid_t, group: bool) -> Request {
    if group {
        Request::TranslateGroup { kpgid: k }
    } else {
        Request::Translate { kpid: k }
    }
}

/// Kernel id → gpid through a one-entry cache keyed by the kernel id.
fn cached(cache: &Pair, k: pid_t, group: bool) -> pid_t {
    if k <= 0 {
        return k;
    }
    if !group && k == my_kpid() {
        return my_gpid();
    }
    if let Some(g) = cache.get(k) {
        return g;
    }
    if let Some(g) = (!group).then(|| CHILDREN.gpid_of(k)).flatten() {
        return g;
    }
    match ask_pid(&translate_req(k, group)) {
        Ok(g) => {
            cache.set(k, g);
            g
        }
        Err(_) => k,
    }
}

fn to_global_cached(cache: &Pair, k: pid_t) -> pid_t {
    cached(cache, k, false)
}

fn group_to_global_cached(cache: &Pair, k: pid_t) -> pid_t {
    cached(cache, k, true)
}

fn group_to_global_uncached(k: pid_t) -> pid_t {
    if k <= 0 {
        return k;
    }
    ask_pid(&translate_req(k, true)).unwrap_or(k)
}

/// A process group id (kernel) → gpid.
pub(crate) fn group_to_global(kpg: pid_t) -> pid_t {
    if kpg > 0 && kpg == sys_getpgid(0) {
        group_to_global_cached(&PGID, kpg)
    } else {
        group_to_global_uncached(kpg)
    }
}

/// A session id (kernel) → gpid.
pub(crate) fn session_to_global(ksid: pid_t) -> pid_t {
    if ksid > 0 && ksid == sys_getsid(0) {
        group_to_global_cached(&SID, ksid)
    } else {
        group_to_global_uncached(ksid)
    }
}

/// gpid → local kernel pid (kernel pids pass through). Errors carry the
/// agent's errno (ESRCH for a gpid that does not run here).
pub fn to_kernel(g: pid_t) -> Result<pid_t, c_int> {
    if !is_gpid(g) {
        return Ok(g);
    }
    if g == MY_GPID.load(Ordering::Acquire) {
        return Ok(my_kpid());
    }
    if let Some(k) = CHILDREN.kpid_of(g) {
        return Ok(k);
    }
    // Own group and session are alive while we are in them.
    if let Some(k) = PGID.kernel_of(g) {
        if k == sys_getpgid(0) {
            return Ok(k);
        }
    }
    if let Some(k) = SID.kernel_of(g) {
        if k == sys_getsid(0) {
            return Ok(k);
        }
    }
    match ask_pid(&Request::Resolve { gpid: g }) {
        Ok(k) if k > 0 && !is_gpid(k) => Ok(k),
        Ok(_) => Err(libc::ESRCH),
        Err(e) => Err(e.errno()),
    }
}

/// gpid → local kernel pid of a process whose program runs on this node
/// (kernel pids, 0 and negative values pass through): for calls on the
/// process's own state (priority, affinity, limits, memory), which must
/// reach the program itself. Unlike [`to_kernel`] it never gives a shadow
/// standing here for a program that runs elsewhere, nor trusts the
/// children table (a child's program may have been placed on another node
/// at its exec): every gpid but the own one is asked (`ResolveRunning`).
pub fn to_kernel_running(g: pid_t) -> Result<pid_t, c_int> {
    if !is_gpid(g) {
        return Ok(g);
    }
    if g == MY_GPID.load(Ordering::Acquire) {
        return Ok(my_kpid());
    }
    match ask_pid(&Request::ResolveRunning { gpid: g }) {
        Ok(k) if k > 0 && !is_gpid(k) => Ok(k),
        Ok(_) => Err(libc::ESRCH),
        Err(e) => {
            krg_log!(log::Level::Debug, "pid {g} does not run here: {e}");
            Err(e.errno())
        }
    }
}

// ---------------------------------------------------------------------------
// getpid family

/// `getpid()`: a cached atomic load once known.
pub fn getpid() -> pid_t {
    my_gpid()
}

/// `getppid()`: the parent's gpid (its kernel pid if it is not an SSI
/// process, e.g. the shell that started the tree, or init after reparenting).
pub fn getppid() -> pid_t {
    to_global_cached(&PPID, sys_getppid())
}

/// `getpgrp()`.
pub fn getpgrp(real: impl FnOnce() -> pid_t) -> pid_t {
    let k = real();
    if k <= 0 {
        return k;
    }
    group_to_global_cached(&PGID, k)
}

/// Map a pid argument of getpgid/getsid (0 = self).
fn pid_arg(pid: pid_t) -> Result<pid_t, c_int> {
    if pid == 0 {
        return Ok(0);
    }
    to_kernel(pid).map_err(|_| libc::ESRCH)
}

/// `getpgid(pid)`.
pub fn getpgid(pid: pid_t, real: impl FnOnce(pid_t) -> pid_t) -> pid_t {
    group_query(pid, real, group_to_global)
}

/// `getsid(pid)`.
pub fn getsid(pid: pid_t, real: impl FnOnce(pid_t) -> pid_t) -> pid_t {
    group_query(pid, real, session_to_global)
}

/// getpgid/getsid: translate the pid argument, ask, translate the answer.
fn group_query(
    pid: pid_t,
    real: impl FnOnce(pid_t) -> pid_t,
    to_global: fn(pid_t) -> pid_t,
) -> pid_t {
    let k = match pid_arg(pid) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let r = real(k);
    if r <= 0 {
        return r;
    }
    to_global(r)
}

/// `setpgid(pid, pgid)`: gpid arguments become kernel pids.
pub fn setpgid(pid: pid_t, pgid: pid_t, real: impl FnOnce(pid_t, pid_t) -> c_int) -> c_int {
    if pid < 0 || pgid < 0 {
        return real(pid, pgid); // EINVAL from libc
    }
    let kp = match pid {
        0 => 0,
        p => match to_kernel(p) {
            Ok(k) => k,
            Err(_) => return fail(libc::ESRCH),
        },
    };
    let kg = match pgid {
        0 => 0,
        g => match to_kernel(g) {
            Ok(k) => k,
            // No such group in this session.
            Err(_) => return fail(libc::EPERM),
        },
    };
    let r = real(kp, kg);
    if r == 0 {
        // A process's group changed (perhaps ours): drop the cached one.
        PGID.clear();
    }
    r
}

/// `setsid()`: the new session id is the caller's own pid.
pub fn setsid(real: impl FnOnce() -> pid_t) -> pid_t {
    let r = real();
    if r <= 0 {
        return r;
    }
    // New session and group: what was cached about the old ones is stale.
    PGID.clear();
    SID.clear();
    to_global_cached(&SID, r)
}

/// `tcgetpgrp(fd)`.
pub fn tcgetpgrp(real: impl FnOnce() -> pid_t) -> pid_t {
    let r = real();
    if r <= 0 {
        return r;
    }
    group_to_global(r)
}

/// `tcsetpgrp(fd, pgrp)`.
pub fn tcsetpgrp(pgrp: pid_t, real: impl FnOnce(pid_t) -> c_int) -> c_int {
    match to_kernel(pgrp) {
        Ok(k) => real(k),
        Err(_) => fail(libc::EPERM),
    }
}

/// `tcgetsid(fd)`.
pub fn tcgetsid(real: impl FnOnce() -> pid_t) -> pid_t {
    let r = real();
    if r <= 0 {
        return r;
    }
    session_to_global(r)
}

// ---------------------------------------------------------------------------
// Signals

pub(crate) fn fail(errno: c_int) -> c_int {
    set_errno(errno);
    -1
}

fn valid_signal(sig: c_int) -> bool {
    (0..=libc::SIGRTMAX()).contains(&sig)
}

/// `Kill{pid, sig}` through the agent, with errno on failure.
fn agent_kill(pid: pid_t, sig: c_int) -> c_int {
    if !valid_signal(sig) {
        return fail(libc::EINVAL);
    }
    krg_log!(log::Level::Debug, "kill({pid}, {sig}) through the agent");
    ask_ok(&Request::Kill { pid, sig })
}

/// `kill(pid, sig)`.
///
/// * `pid` a gpid: through the agent, wherever the process runs; except the
///   caller itself, which gets the real kill on its own kernel pid (POSIX:
///   a signal to oneself is delivered before `kill` returns).
/// * `pid < -1` with `-pid` a gpid: the process group, through the agent.
/// * `0`: the caller's group, through the agent if it has a gpid.
/// * `-1` and kernel pids: the real kill, on this node.
pub fn kill(pid: pid_t, sig: c_int, real: impl FnOnce(pid_t, c_int) -> c_int) -> c_int {
    if pid > 0 {
        if !is_gpid(pid) {
            return real(pid, sig);
        }
        if pid == my_gpid() {
            return real(my_kpid(), sig);
        }
        return agent_kill(pid, sig);
    }
    if pid == 0 {
        return killpg(0, sig, |_, s| real(0, s));
    }
    match pid.checked_neg() {
        Some(grp) if grp > 1 && is_gpid(grp) => agent_kill(pid, sig),
        _ => real(pid, sig),
    }
}

/// `killpg(pgrp, sig)`; `pgrp == 0` is the caller's own group.
pub fn killpg(pgrp: pid_t, sig: c_int, real: impl FnOnce(pid_t, c_int) -> c_int) -> c_int {
    if pgrp == 0 {
        let g = group_to_global_cached(&PGID, sys_getpgid(0));
        if is_gpid(g) {
            // The agent signals every member, this process included, before
            // it answers; the signal is delivered here as soon as the hook
            // unblocks signals, i.e. before killpg returns.
            return agent_kill(-g, sig);
        }
        return real(0, sig);
    }
    if is_gpid(pgrp) {
        return agent_kill(-pgrp, sig);
    }
    real(pgrp, sig)
}

/// `sigqueue(pid, sig, value)`: a gpid is resolved to its local kernel pid
/// (processes of other nodes: ESRCH for now; the protocol has no queued
/// signal yet).
pub fn sigqueue(pid: pid_t, real: impl FnOnce(pid_t) -> c_int) -> c_int {
    if !is_gpid(pid) {
        return real(pid);
    }
    if pid == my_gpid() {
        return real(my_kpid());
    }
    match to_kernel(pid) {
        Ok(k) => real(k),
        Err(e) => fail(e),
    }
}

/// `pidfd_open(pid, flags)`: a gpid is resolved to its local kernel pid.
pub fn pidfd_open(pid: pid_t, real: impl FnOnce(pid_t) -> c_int) -> c_int {
    match to_kernel(pid) {
        Ok(k) => real(k),
        Err(e) => fail(e),
    }
}

// ---------------------------------------------------------------------------
// Process creation

/// Register a child just created and remember it; returns its gpid (or its
/// kernel pid if the agent cannot register it).
fn adopt_child(k: pid_t) -> pid_t {
    match ask_pid(&Request::Ensure { kpid: k }) {
        Ok(g) if is_gpid(g) => {
            CHILDREN.insert(k, g);
            krg_log!(log::Level::Debug, "child {k} is gpid {g}");
            g
        }
        Ok(other) => {
            krg_log!(
                log::Level::Warn,
                "the agent gave no gpid to child {k} ({other})"
            );
            k
        }
        Err(e) => {
            krg_log!(log::Level::Warn, "no gpid for child {k} ({e})");
            k
        }
    }
}

/// `fork()` (and `vfork()`, `_Fork()`): `real` creates the child.
pub fn fork(real: impl FnOnce() -> pid_t) -> pid_t {
    // A pending process registers itself before it has children, so that
    // they can translate their parent.
    let _ = my_gpid();
    if let Some(h) = FORK_HOOKS.get() {
        (h.before)();
    }
    let k = real();
    if k == 0 {
        after_fork_child();
        return 0;
    }
    if k < 0 {
        return k;
    }
    adopt_child(k)
}

/// `posix_spawn`/`posix_spawnp`: `real` spawns and writes the kernel pid;
/// the caller's `pid` (if any) gets the child's gpid.
fn spawn_into(pid: Option<PtrMut<'_, pid_t>>, real: impl FnOnce(&mut pid_t) -> c_int) -> c_int {
    let _ = my_gpid();
    let mut k: pid_t = 0;
    let rc = real(&mut k);
    if rc == 0 && k > 0 {
        if let Some(p) = pid {
            p.write(adopt_child(k));
        }
    }
    rc
}

pub use abi::spawn;

/// The fence of this module's entry points that take the application's
/// raw pointers (allowed `unsafe`: their contract is the C call's).
#[allow(unsafe_code)]
mod abi {
    use super::*;

    /// `posix_spawn`/`posix_spawnp`: `real` spawns and writes the kernel
    /// pid; the caller's `pid` (if not null) gets the child's gpid.
    ///
    /// # Safety
    /// `pid` is null or writable, as posix_spawn's contract requires.
    pub unsafe fn spawn(pid: *mut pid_t, real: impl FnOnce(&mut pid_t) -> c_int) -> c_int {
        // SAFETY: the function's contract.
        spawn_into(unsafe { PtrMut::new(pid) }, real)
    }
}

// ---------------------------------------------------------------------------
// wait family

/// The kernel pid of a child named by gpid (wait: not a child → ECHILD).
fn child_kernel(g: pid_t) -> Result<pid_t, c_int> {
    to_kernel(g).map_err(|_| libc::ECHILD)
}

/// Translate the pid argument of waitpid/wait4.
fn wait_arg(pid: pid_t) -> Result<pid_t, c_int> {
    if pid > 0 {
        return child_kernel(pid);
    }
    match pid.checked_neg() {
        Some(g) if g > 1 && is_gpid(g) => child_kernel(g).map(|k| -k),
        _ => Ok(pid),
    }
}

/// A child reported by wait: translate it, and forget it if it was reaped.
fn waited(k: pid_t, reaped: bool) -> pid_t {
    let g = to_global(k);
    if reaped {
        CHILDREN.forget_kpid(k);
    }
    g
}

/// `waitpid`/`wait4`/`wait`/`wait3`. `pid` is `None` for wait and wait3.
/// `real` gets the kernel pid argument and returns the result and the
/// status it stored.
pub fn wait(pid: Option<pid_t>, mut real: impl FnMut(pid_t) -> (pid_t, c_int)) -> pid_t {
    let mut kp = match pid {
        None => -1,
        Some(p) => match wait_arg(p) {
            Ok(k) => k,
            Err(e) => return fail(e),
        },
    };
    // Bounded: one more try per move of this process during the wait.
    for _ in 0..16 {
        let moves = RESTORES.load(Ordering::Acquire);
        let (r, status) = real(kp);
        if r < 0 {
            if let Some(k) = pid.and_then(|p| retranslated(p, kp, moves)) {
                kp = k;
                continue;
            }
            return r;
        }
        if r == 0 {
            return r;
        }
        return waited(r, libc::WIFEXITED(status) || libc::WIFSIGNALED(status));
    }
    fail(libc::ECHILD)
}

/// A wait for child `g` (kernel pid `kp` when it began, `moves` restores
/// before) failed: if this process was restored meanwhile, the kernel
/// restarted the call on the new node with the child's kernel pid on the
/// old one (`ECHILD`: no such child here, or not yet its child shadow
/// with that number), and the gpid now names the child shadow here. Its
/// kernel id to wait for again.
fn retranslated(g: pid_t, kp: pid_t, moves: u32) -> Option<pid_t> {
    if rt::errno() != libc::ECHILD
        || kp == -1
        || kp == 0
        || RESTORES.load(Ordering::Acquire) == moves
    {
        return None;
    }
    let k = wait_arg(g).ok();
    rt::set_errno(libc::ECHILD);
    k
}

/// `waitid(idtype, id, info, options)`. `real` is called with the kernel id
/// and returns the result and, when it is 0, the siginfo the kernel filled,
/// whose `si_pid` is then translated in place.
pub fn waitid<'a>(
    idtype: idtype_t,
    id: libc::id_t,
    options: c_int,
    mut real: impl FnMut(idtype_t, libc::id_t) -> (c_int, Option<&'a mut siginfo_t>),
) -> c_int {
    let pid = id as pid_t;
    let kid = if (idtype == libc::P_PID || idtype == libc::P_PGID) && is_gpid(pid) {
        match child_kernel(pid) {
            Ok(k) => k as libc::id_t,
            Err(e) => return fail(e),
        }
    } else {
        id
    };
    let moves = RESTORES.load(Ordering::Acquire);
    let (r, info) = match real(idtype, kid) {
        // Restored while waiting for one child: see `retranslated`.
        (r, None) if r < 0 && idtype == libc::P_PID && is_gpid(pid) => {
            match retranslated(pid, kid as pid_t, moves) {
                Some(k) => real(idtype, k as libc::id_t),
                None => return r,
            }
        }
        ri => ri,
    };
    let Some(info) = info else {
        return r;
    };
    let k = *child_pid(info);
    if r == 0 && k > 0 {
        let reaped = options & libc::WNOWAIT == 0
            && matches!(
                info.si_code,
                libc::CLD_EXITED | libc::CLD_KILLED | libc::CLD_DUMPED
            );
        *child_pid(info) = waited(k, reaped);
    }
    r
}

// ---------------------------------------------------------------------------
// Lock-free caches

fn pack(key: i32, val: i32) -> u64 {
    (u64::from(key as u32) << 32) | u64::from(val as u32)
}

fn key_of(v: u64) -> i32 {
    (v >> 32) as u32 as i32
}

fn val_of(v: u64) -> i32 {
    v as u32 as i32
}

/// One (kernel id, gpid) pair in one atomic word; 0 = empty.
struct Pair(AtomicU64);

impl Pair {
    const fn new() -> Pair {
        Pair(AtomicU64::new(0))
    }

    fn get(&self, k: pid_t) -> Option<pid_t> {
        let v = self.0.load(Ordering::Acquire);
        (v != 0 && key_of(v) == k).then_some(val_of(v))
    }

    fn kernel_of(&self, g: pid_t) -> Option<pid_t> {
        let v = self.0.load(Ordering::Acquire);
        (v != 0 && val_of(v) == g).then_some(key_of(v))
    }

    fn set(&self, k: pid_t, g: pid_t) {
        self.0.store(pack(k, g), Ordering::Release);
    }

    fn clear(&self) {
        self.0.store(0, Ordering::Release);
    }
}

const LOG2_SLOTS: u32 = 9;
const SLOTS: usize = 1 << LOG2_SLOTS;
/// Slots probed from a key's home slot.
const WINDOW: usize = 8;

/// A direct-mapped table of (key, value) words with a short probe window.
/// Lock-free; a full window evicts (a later lookup then misses and asks the
/// agent, which is slower but still right).
struct Direct {
    slots: [AtomicU64; SLOTS],
}

impl Direct {
    const fn new() -> Direct {
        Direct {
            slots: [const { AtomicU64::new(0) }; SLOTS],
        }
    }

    fn home(key: i32) -> usize {
        ((key as u32).wrapping_mul(0x9E37_79B1) >> (32 - LOG2_SLOTS)) as usize
    }

    fn window(key: i32) -> impl Iterator<Item = usize> {
        let h = Self::home(key);
        (0..WINDOW).map(move |i| (h + i) % SLOTS)
    }

    fn get(&self, key: i32) -> Option<i32> {
        Self::window(key).find_map(|i| {
            let v = self.slots[i].load(Ordering::Acquire);
            (v != 0 && key_of(v) == key).then_some(val_of(v))
        })
    }

    fn put(&self, key: i32, val: i32) {
        let new = pack(key, val);
        for i in Self::window(key) {
            let v = self.slots[i].load(Ordering::Acquire);
            if v != 0 && key_of(v) == key {
                self.slots[i].store(new, Ordering::Release);
                return;
            }
        }
        for i in Self::window(key) {
            if self.slots[i]
                .compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
        self.slots[Self::home(key)].store(new, Ordering::Release);
    }

    /// Remove every copy of exactly (key, val).
    fn remove(&self, key: i32, val: i32) {
        let old = pack(key, val);
        for i in Self::window(key) {
            let _ = self.slots[i].compare_exchange(old, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    fn clear(&self) {
        for s in &self.slots {
            s.store(0, Ordering::Release);
        }
    }
}

/// Kernel pid ↔ gpid of this process's children.
struct PidTable {
    by_kpid: Direct,
    by_gpid: Direct,
}

impl PidTable {
    const fn new() -> PidTable {
        PidTable {
            by_kpid: Direct::new(),
            by_gpid: Direct::new(),
        }
    }

    fn insert(&self, k: pid_t, g: pid_t) {
        self.by_kpid.put(k, g);
        self.by_gpid.put(g, k);
    }

    fn gpid_of(&self, k: pid_t) -> Option<pid_t> {
        self.by_kpid.get(k)
    }

    fn kpid_of(&self, g: pid_t) -> Option<pid_t> {
        self.by_gpid.get(g)
    }

    fn forget_kpid(&self, k: pid_t) {
        if let Some(g) = self.by_kpid.get(k) {
            self.by_kpid.remove(k, g);
            self.by_gpid.remove(g, k);
        }
    }

    fn clear(&self) {
        self.by_kpid.clear();
        self.by_gpid.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_is_keyed() {
        let p = Pair::new();
        assert_eq!(p.get(5), None);
        p.set(5, 1 << 22 | 5);
        assert_eq!(p.get(5), Some(1 << 22 | 5));
        assert_eq!(p.get(6), None);
        assert_eq!(p.kernel_of(1 << 22 | 5), Some(5));
        p.clear();
        assert_eq!(p.get(5), None);
        assert_eq!(p.kernel_of(0), None);
    }

    #[test]
    fn table_insert_lookup_forget() {
        let t = PidTable::new();
        for k in 1..=300 {
            t.insert(k, 1 << 22 | (k + 1000));
        }
        for k in 1..=300 {
            assert_eq!(t.gpid_of(k), Some(1 << 22 | (k + 1000)), "{k}");
            assert_eq!(t.kpid_of(1 << 22 | (k + 1000)), Some(k));
        }
        t.forget_kpid(7);
        assert_eq!(t.gpid_of(7), None);
        assert_eq!(t.kpid_of(1 << 22 | 1007), None);
        assert_eq!(t.gpid_of(8), Some(1 << 22 | 1008));
        // Re-insert with a new gpid replaces.
        t.insert(8, 2 << 22 | 8);
        assert_eq!(t.gpid_of(8), Some(2 << 22 | 8));
        t.clear();
        assert_eq!(t.gpid_of(8), None);
    }

    #[test]
    fn table_overflow_evicts_without_lying() {
        // Far more entries than slots: every answer given must be right.
        let t = PidTable::new();
        for k in 1..=5000 {
            t.insert(k, 1 << 22 | k);
        }
        let mut hits = 0;
        for k in 1..=5000 {
            if let Some(g) = t.gpid_of(k) {
                assert_eq!(g, 1 << 22 | k);
                hits += 1;
            }
        }
        assert!(hits > 0 && hits <= SLOTS);
    }

    #[test]
    fn table_is_safe_under_concurrency() {
        static T: PidTable = PidTable::new();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let k = t * 10_000 + i + 1;
                        T.insert(k, 1 << 22 | k);
                        if let Some(g) = T.gpid_of(k) {
                            assert_eq!(g, 1 << 22 | k);
                        }
                        T.forget_kpid(k);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for k in 1..40_000 {
            assert_eq!(T.gpid_of(k), None);
        }
    }

    #[test]
    fn wait_arg_passes_kernel_values() {
        assert_eq!(wait_arg(-1), Ok(-1));
        assert_eq!(wait_arg(0), Ok(0));
        assert_eq!(wait_arg(123), Ok(123));
        assert_eq!(wait_arg(-123), Ok(-123));
        assert_eq!(wait_arg(i32::MIN), Ok(i32::MIN));
    }
}
