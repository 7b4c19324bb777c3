//! The runtime of libkrg inside an application process: the initialisation
//! state machine, the re-entrancy guard, and the one way hooks talk to the
//! agent.
//!
//! # States
//!
//! ```text
//!   Uninit ──CAS──▶ Initialising ──▶ Active       (Hello answered: SSI process)
//!                                ├─▶ Standalone   (no agent: real pids, one warning)
//!                                └─▶ Disabled     (KRG_DISABLE=1: pure pass-through)
//! ```
//!
//! The constructor of `libkrg.so` calls [`init`]; every hook calls [`enter`].
//! A hook reached before that constructor ran (from the constructor of a
//! library initialised before ours, possibly inside that library's malloc
//! with its lock held: jemalloc reads `/etc/malloc.conf` there) passes
//! straight through ([`Why::Early`]): initialising from there would allocate
//! through the program's malloc and deadlock on the lock it holds. Exactly
//! one thread initialises; another thread arriving meanwhile waits for the
//! outcome, so no hook decides while the state is being settled.
//!
//! # Re-entrancy
//!
//! [`guarded`] marks the current thread as "inside krg" (a const-initialised
//! thread-local `Cell<bool>`: no allocation, no lazy registration) and blocks
//! every signal for the duration. A hook entered while the mark is set was
//! called by krg itself and goes straight to libc ([`Why::Reentrant`]). Because
//! signals are blocked while the mark is set, a signal handler can never run
//! under it, so an application's handler that calls `kill` or `getpid` is
//! always translated. The mark is *never* held while a real libc function
//! runs on behalf of the application (fork's atfork handlers and signal
//! handlers during `waitpid` are application code).
//!
//! # Agent calls
//!
//! [`agent_call`] sends one request with [`crate::hookclient`]: no allocation
//! and no lock, one connection per request, so it is async-signal-safe and
//! fork-safe. `errno` is preserved across it.

#![deny(unsafe_code)]

use crate::hookclient::{self, AgentAddr, HookCallError, Reply};
use crate::proto::{Request, PROTO_VERSION};
use crate::sys::{self, signal, signal::SigSet};
use crate::{krg_log, log};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The state of the library in this process image.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Mode {
    Uninit = 0,
    Initialising = 1,
    /// Registered with the agent: an SSI process.
    Active = 2,
    /// No agent: a plain local process with real pids.
    Standalone = 3,
    /// `KRG_DISABLE=1`: every hook calls the real function.
    Disabled = 4,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            1 => Mode::Initialising,
            2 => Mode::Active,
            3 => Mode::Standalone,
            4 => Mode::Disabled,
            _ => Mode::Uninit,
        }
    }
}

static STATE: AtomicU8 = AtomicU8::new(Mode::Uninit as u8);

/// Set by [`init`] (the constructor): from then on a hook may initialise
/// (a forked child of a process that was initialising starts over).
static STARTED: AtomicBool = AtomicBool::new(false);

/// The signal mask the process started with (the guard blocks everything
/// during initialisation; an exec from there must not pass that on).
static START_MASK: AtomicU64 = AtomicU64::new(0);

/// Where the agent listens, fixed at initialisation.
static AGENT: OnceLock<AgentAddr> = OnceLock::new();

/// Set once the "lost the agent" warning has been printed in this process.
static LOST_WARNED: AtomicBool = AtomicBool::new(false);

/// How long one agent exchange may take before the hook gives up.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variable that marks a process tree as standalone, so that the
/// "no agent" warning is printed once per tree, not once per process.
pub const STANDALONE_ENV: &str = "KRG_STANDALONE";

thread_local! {
    /// "This thread is inside krg": hooks pass straight through.
    static IN_KRG: Cell<bool> = const { Cell::new(false) };
}

/// What a hook must do, decided by [`enter`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Entry {
    /// Apply the SSI semantics (call into libkrg).
    Krg,
    /// Call the real function, for the reason given.
    PassThrough(Why),
}

/// Why a hook passes straight through to libc.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Why {
    /// Called by krg itself (the re-entrancy guard is set).
    Reentrant,
    /// `KRG_DISABLE=1`.
    Disabled,
    /// No agent: a plain local process.
    Standalone,
    /// Before libkrg.so's constructor: nothing of the library may run yet.
    Early,
}

/// The current mode, without initialising.
pub fn mode() -> Mode {
    Mode::from_u8(STATE.load(Ordering::Acquire))
}

/// Whether this process is an SSI process (one atomic load; no
/// initialisation).
#[inline]
pub fn active() -> bool {
    mode() == Mode::Active
}

/// Whether the current thread is inside krg.
pub fn in_krg() -> bool {
    IN_KRG.get()
}

/// Decide what a hook does; initialises the library first if needed, but
/// never before the constructor ran (see the module doc).
///
/// Never allocates or locks once initialised: one thread-local load and one
/// atomic load.
#[inline]
pub fn enter() -> Entry {
    if IN_KRG.get() {
        return Entry::PassThrough(Why::Reentrant);
    }
    loop {
        match mode() {
            Mode::Active => return Entry::Krg,
            Mode::Standalone => return Entry::PassThrough(Why::Standalone),
            Mode::Disabled => return Entry::PassThrough(Why::Disabled),
            Mode::Uninit if !STARTED.load(Ordering::Acquire) => {
                return Entry::PassThrough(Why::Early)
            }
            Mode::Uninit => init(),
            Mode::Initialising => {
                // Another thread is initialising (this one would have the
                // guard set otherwise): wait for its outcome.
                std::thread::yield_now();
            }
        }
    }
}

/// Initialise the library once per process image (idempotent, thread-safe).
pub fn init() {
    STARTED.store(true, Ordering::Release);
    if STATE
        .compare_exchange(
            Mode::Uninit as u8,
            Mode::Initialising as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_err()
    {
        return;
    }
    let mut mask: u64 = 0;
    let _ = sys::raw::sigprocmask(libc::SIG_BLOCK, None, Some(&mut mask));
    START_MASK.store(
        mask & !(1u64 << (crate::checkpoint::SIGCKPT - 1)),
        Ordering::Relaxed,
    );
    let outcome = guarded(initialise);
    STATE.store(outcome as u8, Ordering::Release);
    // An order held across the exec that started this image (see
    // `checkpoint::hold_for_exec`): taken or dropped now.
    crate::checkpoint::release_held_order(mask);
}

/// A forked child inherits the parent's state; if another thread of the
/// parent was initialising at the time of the fork, that thread does not
/// exist in the child, so the child starts over.
pub fn after_fork_child() {
    let _ = STATE.compare_exchange(
        Mode::Initialising as u8,
        Mode::Uninit as u8,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The body of [`init`]: decide the mode and register with the agent.
fn initialise() -> Mode {
    // A process started to become an image (or a migrated process's
    // shadow) exists for nothing else: before any other setting.
    if let Ok(spec) = std::env::var(crate::distant::SHADOW_ENV) {
        // A migrated process re-executed to stay behind as its shadow.
        let Err(e) = crate::distant::shadow_from_env(&spec);
        log::emit(format_args!("krg: {e}"));
        sys::process::exit_now(127);
    }
    if let Ok(spec) = std::env::var(crate::checkpoint::children::CHILD_SHADOW_ENV) {
        // Started by a restored parent to stand for one of its children.
        crate::checkpoint::children::child_shadow(&spec);
    }
    if let Some(image) = std::env::var_os(crate::checkpoint::restore::RESTORE_ENV) {
        // This process exists to become the image: never returns.
        crate::checkpoint::restore::run(&image);
    }
    // KRG_DISABLE is checked first and silences everything, the log included.
    if env_flag("KRG_DISABLE") {
        return Mode::Disabled;
    }
    log::init_from_env();
    crate::processes::init_identity();
    if env_flag(STANDALONE_ENV) {
        krg_log!(
            log::Level::Debug,
            "{STANDALONE_ENV} is set: running as a plain local process"
        );
        return Mode::Standalone;
    }
    let path = crate::client::sock_path();
    let Some(addr) = AgentAddr::new(path.as_os_str().as_encoded_bytes()) else {
        go_standalone(format_args!(
            "agent socket path {} is too long",
            path.display()
        ));
        return Mode::Standalone;
    };
    let addr = AGENT.get_or_init(|| addr);
    if path.exists() {
        ensure_no_aslr();
    }
    restore_comm();
    let caps_env = std::env::var("KRG_CAPS").ok();
    // KRG_NODE pins the program it is given to, not its children: consume
    // it (this runs in the constructor, before any other thread exists).
    let pinned = take_env(crate::proto::NODE_PIN_ENV)
        .and_then(|v| String::from_utf8_lossy(&v).trim().parse::<u32>().ok());
    let hello = Request::Hello {
        version: PROTO_VERSION,
        caps_env,
        pinned,
    };
    match hookclient::call(addr, &hello, Some(AGENT_TIMEOUT)) {
        Ok(Reply::Hello {
            gpid,
            node,
            caps,
            place,
            spread,
        }) if crate::gpid::is_gpid(gpid) => {
            crate::processes::set_identity(gpid, node, caps);
            crate::distant::set_spread(spread);
            crate::streams::placed::note_from_env();
            if place != 0 && place != node {
                // Runs the program on `place` and never returns, unless it
                // could not start there: then it runs here after all.
                if let Err(e) = crate::distant::run_on(place, gpid) {
                    krg_log!(
                        log::Level::Warn,
                        "could not run on node {place} ({e}); running on node {node}"
                    );
                }
            }
            crate::processes::register_atfork();
            crate::dsm::register_atfork();
            let c = crate::caps::Caps::from_bits(caps);
            if c.contains(crate::caps::Caps::CHECKPOINT) || c.contains(crate::caps::Caps::MIGRATE) {
                crate::checkpoint::install();
            }
            krg_log!(
                log::Level::Info,
                "registered with the agent at {}: gpid {gpid}, node {node}, caps {}",
                addr.display(),
                crate::caps::Caps::from_bits(caps)
            );
            Mode::Active
        }
        Ok(other) => {
            go_standalone(format_args!(
                "unexpected answer to Hello from the agent at {}: {other:?}",
                addr.display()
            ));
            Mode::Standalone
        }
        Err(HookCallError::Io { errno, op }) => {
            go_standalone(format_args!(
                "no agent at {} ({op}: {})",
                addr.display(),
                Errno(errno)
            ));
            Mode::Standalone
        }
        Err(e) => {
            go_standalone(format_args!(
                "the agent at {} refused this process ({e})",
                addr.display()
            ));
            Mode::Standalone
        }
    }
}

/// Remove every `name=...` from the environment array itself and return the
/// first value (see [`sys::process::take_env`]). Called from the
/// constructor, before the program's own threads exist.
pub(crate) fn take_env(name: &str) -> Option<Vec<u8>> {
    sys::process::take_env(name)
}

/// Set by the re-exec of [`ensure_no_aslr`]: the process name to keep.
const COMM_ENV: &str = "KRG_COMM";

/// After that re-exec: take the program's name back, drop the variable.
fn restore_comm() {
    if let Some(c) = take_env(COMM_ENV) {
        if let Ok(c) = std::ffi::CString::new(c) {
            sys::process::set_name(&c);
        }
    }
}

/// SSI processes run without address randomisation, so that an image
/// restores at the same addresses on any node (the personality is
/// inherited: `krg run`, `krg cluster exec` and the agents set it, and this
/// re-exec is the fallback for a program started some other way).
fn ensure_no_aslr() {
    // 0xffffffff queries the personality without changing it.
    let Ok(cur) = sys::process::personality(0xffff_ffff) else {
        return;
    };
    if cur & libc::ADDR_NO_RANDOMIZE != 0 {
        return;
    }
    let (Ok(exe), Ok(cmdline), Ok(env)) = (
        std::fs::read_link("/proc/self/exe"),
        std::fs::read("/proc/self/cmdline"),
        std::fs::read("/proc/self/environ"),
    ) else {
        return;
    };
    // The kernel names the new image after the file exec'd (`dash` for
    // an `sh` symlink): keep the name the program had (see `COMM_ENV`).
    let comm = std::fs::read("/proc/self/comm").unwrap_or_default();
    let mut env = env;
    env.extend_from_slice(COMM_ENV.as_bytes());
    env.push(b'=');
    env.extend_from_slice(comm.strip_suffix(b"\n").unwrap_or(&comm));
    env.push(0);
    let to_c = |b: &[u8]| -> Vec<std::ffi::CString> {
        b.split(|c| *c == 0)
            .filter(|s| !s.is_empty())
            .filter_map(|s| std::ffi::CString::new(s).ok())
            .collect()
    };
    let (argv, envp) = (to_c(&cmdline), to_c(&env));
    let Ok(exe) = std::ffi::CString::new(exe.into_os_string().into_encoded_bytes()) else {
        return;
    };
    // Our own personality, then the same program in place of this image,
    // with the mask the process started with; on failure both are put
    // back and the program runs on as it is.
    let start = START_MASK.load(Ordering::Relaxed);
    let mut now: u64 = 0;
    let _ = sys::process::personality((cur | libc::ADDR_NO_RANDOMIZE) as libc::c_ulong);
    let _ = sys::raw::sigprocmask(libc::SIG_SETMASK, Some(&start), Some(&mut now));
    let _ = sys::process::execve(&exe, &argv, &envp);
    let _ = sys::raw::sigprocmask(libc::SIG_SETMASK, Some(&now), None);
    let _ = sys::process::personality(cur as libc::c_ulong);
    krg_log!(
        log::Level::Warn,
        "could not re-execute without address randomisation: checkpoints will be refused"
    );
}

/// Print the one warning of a standalone process tree and mark the tree.
fn go_standalone(why: std::fmt::Arguments<'_>) {
    log::emit(format_args!("krg: {why}; running as a plain local process"));
    // Children (exec'd images included) inherit the environment and start
    // standalone without a second warning.
    std::env::set_var(STANDALONE_ENV, "1");
}

/// Run `f` inside krg: the re-entrancy mark is set and every signal is
/// blocked on this thread; `errno` is restored afterwards.
pub fn guarded<R>(f: impl FnOnce() -> R) -> R {
    if IN_KRG.get() {
        return f();
    }
    IN_KRG.set(true);
    let saved_errno = errno();
    let old = block_all_signals();
    let r = f();
    // Leave krg *before* unblocking: a signal that became pending meanwhile
    // (SIGCHLD, or the caller's own kill to its group) is handled as soon as
    // the mask is restored, and its handler's calls must be translated.
    IN_KRG.set(false);
    restore_signals(&old);
    set_errno(saved_errno);
    r
}

fn block_all_signals() -> SigSet {
    signal::set_thread_mask(libc::SIG_BLOCK, &SigSet::full())
}

fn restore_signals(old: &SigSet) {
    signal::set_thread_mask(libc::SIG_SETMASK, old);
}

/// The calling thread's errno.
#[inline]
pub fn errno() -> i32 {
    sys::errno()
}

/// Set the calling thread's errno.
#[inline]
pub fn set_errno(e: i32) {
    sys::set_errno(e)
}

/// The agent's address, once the library is active.
pub fn agent_addr() -> Option<&'static AgentAddr> {
    AGENT.get()
}

/// Send one request to the agent from a hook: guarded, signal-safe,
/// allocation-free. Prints one warning per process the first time the agent
/// cannot be reached after a successful registration.
pub fn agent_call(req: &Request) -> Result<Reply, HookCallError> {
    let Some(addr) = AGENT.get() else {
        return Err(HookCallError::Io {
            op: "no agent address",
            errno: libc::ENOTCONN,
        });
    };
    let r = guarded(|| hookclient::call(addr, req, Some(AGENT_TIMEOUT)));
    match &r {
        Err(HookCallError::Io { op, errno }) => {
            if !LOST_WARNED.swap(true, Ordering::Relaxed) {
                log::emit(format_args!(
                    "krg: lost the agent at {} ({op}: {}); pids of this process may be wrong",
                    addr.display(),
                    Errno(*errno)
                ));
            }
        }
        Err(e) => krg_log!(log::Level::Debug, "agent: {req:?} -> {e}"),
        Ok(rep) => krg_log!(log::Level::Trace, "agent: {req:?} -> {rep:?}"),
    }
    r
}

/// Formats an errno value as `strerror` would, without allocating in the
/// "C" locale (under another, glibc's gettext mallocs: the capture handler
/// switches its thread to "C").
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; 128];
        match sys::strerror(self.0, &mut buf) {
            Some(s) => f.write_str(s),
            None => write!(f, "errno {}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_sets_and_clears_and_keeps_errno() {
        assert!(!in_krg());
        set_errno(libc::EINTR);
        let inside = guarded(|| {
            set_errno(libc::EBADF);
            // Nested use stays inside.
            guarded(in_krg)
        });
        assert!(inside);
        assert!(!in_krg());
        assert_eq!(errno(), libc::EINTR);
    }

    #[test]
    fn guard_blocks_signals() {
        let blocked = guarded(|| signal::thread_mask().contains(libc::SIGINT));
        assert!(blocked);
    }

    #[test]
    // Installing a signal handler of its own is the test.
    #[allow(unsafe_code)]
    fn pending_signal_is_handled_outside_krg() {
        // A signal that arrives inside krg is handled when krg unblocks it,
        // and its handler must not be taken for krg's own call (a SIGCHLD
        // handler calling waitpid would get an untranslated pid).
        use std::sync::atomic::AtomicI32;
        static SEEN: AtomicI32 = AtomicI32::new(-1);
        extern "C" fn handler(_: libc::c_int) {
            SEEN.store(i32::from(in_krg()), Ordering::SeqCst);
        }
        // SAFETY: installs a handler that only touches an atomic and a
        // thread-local; sends SIGUSR2 to this thread only.
        unsafe {
            libc::signal(libc::SIGUSR2, handler as *const () as libc::sighandler_t);
            guarded(|| {
                libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2);
                assert_eq!(SEEN.load(Ordering::SeqCst), -1, "delivered inside krg");
            });
            libc::signal(libc::SIGUSR2, libc::SIG_DFL);
        }
        assert_eq!(SEEN.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn errno_formats() {
        assert_eq!(Errno(libc::ENOENT).to_string(), "No such file or directory");
    }
}
