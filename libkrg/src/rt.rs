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
use crate::proto::Request;
use crate::sys::{self, signal, signal::SigSet};
use crate::{krg_log, log};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
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
    let Some(start) = STARTER.get() else {
        // Nothing above the runtime said how to start (a test binary):
        // a plain local process.
        STATE.store(Mode::Standalone as u8, Ordering::Release);
        return;
    };
    let mut mask: u64 = 0;
    let _ = sys::raw::sigprocmask(libc::SIG_BLOCK, None, Some(&mut mask));
    let outcome = guarded(|| (start.initialise)(mask));
    STATE.store(outcome as u8, Ordering::Release);
    (start.after)(mask);
}

/// How the process starts, given by the layer above the runtime
/// (`crate::start`): the runtime calls it, it never calls up.
pub struct Starter {
    /// Decide the mode (register with the agent...), with the signal mask
    /// the process started with; runs guarded.
    pub initialise: fn(u64) -> Mode,
    /// Once the mode is set, with the same mask.
    pub after: fn(u64),
}

static STARTER: OnceLock<Starter> = OnceLock::new();

/// Say how the process starts (once; later calls are ignored).
pub fn set_starter(s: Starter) {
    let _ = STARTER.set(s);
}

/// Remember the agent's address (once), for [`agent_call`].
pub(crate) fn set_agent(addr: AgentAddr) -> &'static AgentAddr {
    AGENT.get_or_init(|| addr)
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

/// Remove every `name=...` from the environment array itself and return the
/// first value (see [`sys::process::take_env`]). Called from the
/// constructor, before the program's own threads exist.
pub(crate) fn take_env(name: &str) -> Option<Vec<u8>> {
    sys::process::take_env(name)
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

pub use crate::sys::Errno;

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
