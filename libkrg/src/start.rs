//! How a process that loads libkrg starts: the constructor of
//! `libkrg.so` calls [`init`], which hands the runtime ([`crate::rt`]) the
//! start-up below and runs it. It sits above every subsystem: a process
//! started to become an image, a shadow or a child shadow turns into one
//! here; an SSI process registers with the agent, may be placed on another
//! node at once, and gets the subsystems' fork handlers and the checkpoint
//! handler. The runtime never calls up: it only calls what it was given.

#![deny(unsafe_code)]

use crate::hookclient::{self, AgentAddr, HookCallError, Reply};
use crate::proto::{Request, PROTO_VERSION};
use crate::rt::{self, Mode};
use crate::sys;
use crate::{krg_log, log};
use std::sync::atomic::{AtomicU64, Ordering};

/// The signal mask the process started with (the guard blocks everything
/// during initialisation; an exec from there must not pass that on).
static START_MASK: AtomicU64 = AtomicU64::new(0);

/// Initialise the library once per process image (the constructor;
/// idempotent, thread-safe).
pub fn init() {
    crate::processes::set_fork_hooks(crate::processes::ForkHooks {
        // A child forked while pages are still arriving by post-copy would
        // see zeros where they are missing: wait for the last one.
        before: crate::checkpoint::wait_postcopy,
        // The capture arena of the parent is not the child's.
        child: crate::checkpoint::alloc::after_fork_child,
    });
    rt::set_starter(rt::Starter {
        initialise,
        // An order held across the exec that started this image (see
        // `checkpoint::hold_for_exec`): taken or dropped now.
        after: crate::checkpoint::release_held_order,
    });
    rt::init();
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Decide the mode and register with the agent (the runtime's
/// [`rt::Starter::initialise`]); `mask`: the signal mask the process
/// started with.
fn initialise(mask: u64) -> Mode {
    START_MASK.store(
        mask & !(1u64 << (crate::checkpoint::SIGCKPT - 1)),
        Ordering::Relaxed,
    );
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
    if env_flag(rt::STANDALONE_ENV) {
        krg_log!(
            log::Level::Debug,
            "{} is set: running as a plain local process",
            rt::STANDALONE_ENV
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
    let addr = rt::set_agent(addr);
    if path.exists() {
        ensure_no_aslr();
    }
    restore_comm();
    let caps_env = std::env::var("KRG_CAPS").ok();
    // KRG_NODE pins the program it is given to, not its children: consume
    // it (this runs in the constructor, before any other thread exists).
    let pinned = rt::take_env(crate::proto::NODE_PIN_ENV)
        .and_then(|v| String::from_utf8_lossy(&v).trim().parse::<u32>().ok());
    let hello = Request::Hello {
        version: PROTO_VERSION,
        caps_env,
        pinned,
    };
    match hookclient::call(addr, &hello, Some(rt::AGENT_TIMEOUT)) {
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
                rt::Errno(errno)
            ));
            Mode::Standalone
        }
        Err(HookCallError::Agent { errno, msg, .. }) => {
            go_standalone(format_args!(
                "the agent at {} refused this process ({msg} ({}))",
                addr.display(),
                rt::Errno(errno)
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

/// Set by the re-exec of [`ensure_no_aslr`]: the process name to keep.
const COMM_ENV: &str = "KRG_COMM";

/// After that re-exec: take the program's name back, drop the variable.
fn restore_comm() {
    if let Some(c) = rt::take_env(COMM_ENV) {
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
    std::env::set_var(rt::STANDALONE_ENV, "1");
}
