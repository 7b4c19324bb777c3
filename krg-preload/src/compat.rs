//! The compatibility table of `docs/architecture/preload.md`, generated
//! from the `hooks!` table (each hook's `status` and doc comment) and from
//! [`UNSEEN`], the calls no hook sees.
//!
//! The test fails when the region between the two markers in the docs
//! differs from what it renders; `KRG_BLESS=1 cargo test -p krg-preload
//! --lib compat` rewrites the region.

use crate::hook::{HookInfo, Status};

/// The file and the markers around the generated region.
const DOC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/architecture/preload.md"
);
const BEGIN: &str =
    "<!-- generated from krg-preload/src/compat.rs by `cargo test -p krg-preload --lib compat`: do not edit; KRG_BLESS=1 rewrites it. begin -->";
const END: &str = "<!-- generated from krg-preload/src/compat.rs: end -->";

/// The glibc the claims of [`UNSEEN`] were checked on.
const GLIBC: &str = "Debian GLIBC 2.36-9+deb12u14";

/// `vfork`, a hook outside the `hooks!` table (a naked trampoline: see
/// `vfork.rs`).
const VFORK: HookInfo = HookInfo {
    name: "vfork",
    status: Status::Partial(
        "in an SSI process it is a `fork` (POSIX allows it): it costs a fork, the parent does not wait for the child to exec or exit, and a child that writes the parent's memory (undefined in POSIX) no longer changes it",
    ),
    doc: &[" `vfork()`: the real vfork in pass-through modes; a fork that returns the child's gpid in an SSI process (the parent must run code after the child exists)."],
};

/// `execl`, `execle`, `execlp`: naked trampolines outside the `hooks!`
/// table (see `execl.rs`) that call the `execv`, `execve`, `execvp` hooks.
const EXECL: [HookInfo; 3] = [
    HookInfo {
        name: "execl",
        status: Status::Partial(crate::EXEC_ELSEWHERE),
        doc: &[" `execl(path, arg0, ..., NULL)`: the list gathered into an array (on the stack, or mmap'd beyond 256), then the `execv` hook."],
    },
    HookInfo {
        name: "execle",
        status: Status::Partial(crate::EXEC_ELSEWHERE),
        doc: &[" `execle(path, arg0, ..., NULL, envp)`: as `execl`, then the `execve` hook."],
    },
    HookInfo {
        name: "execlp",
        status: Status::Partial(crate::EXEC_ELSEWHERE),
        doc: &[" `execlp(file, arg0, ..., NULL)`: as `execl`, then the `execvp` hook."],
    },
];

/// The hooks outside the `hooks!` table, each listed after the hook named.
fn outside() -> [(&'static str, &'static HookInfo); 4] {
    [
        ("_Fork", &VFORK),
        ("execvpe", &EXECL[0]),
        ("execl", &EXECL[1]),
        ("execle", &EXECL[2]),
    ]
}

/// Why no hook sees a call.
enum Why {
    /// glibc makes these calls inside itself, without its PLT.
    Internal(&'static str),
    /// A glibc function krg does not hook.
    NotHooked,
    /// No glibc function: a program makes the system call itself.
    NoWrapper,
}

/// A call no hook sees, and what that means under krg.
struct Unseen {
    /// The calls, as the program writes them.
    calls: &'static str,
    why: Why,
    /// What happens under krg.
    effect: &'static str,
}

/// Every call krg knows no hook sees.
///
/// How each was checked, on this machine's glibc ([`GLIBC`]):
/// `objdump -R libc.so.6` lists the only symbols libc reaches through its
/// own PLT or GOT (malloc, calloc, realloc, free, `_IO_funlockfile`,
/// `__tls_get_addr` and data), none of them hooked, so any use glibc makes
/// of a hooked function inside itself bypasses the hook; then a probe
/// program per row run under `KRG_LOG=trace` (which hooks fired) and
/// `strace -f` (what reached the kernel), and for `execl` `objdump -d`
/// (`call <execve>` directly). The rows without an `Internal` reason are
/// functions or system calls krg does not hook at all.
const UNSEEN: &[Unseen] = &[
    Unseen {
        calls: "`system`, `popen`/`pclose`, `wordexp` with `$(...)`",
        why: Why::Internal("`posix_spawn` (clone3, execve) and `waitpid` (wait4)"),
        effect: "the `sh` started registers itself when it loads the library and is placed at its `Hello` (its `$$` is a gpid, its parent translated); the caller never sees the child's pid",
    },
    Unseen {
        calls: "`daemon`",
        why: Why::Internal("`fork` (clone) and `setsid`"),
        effect: "fine: the atfork child handler resets the child, which asks its gpid on first use; `getsid` translates its session later",
    },
    Unseen {
        calls: "`forkpty`, `login_tty`",
        why: Why::Internal("`fork` (clone), `setsid`, `ioctl(TIOCSCTTY)`"),
        effect: "`forkpty` is hooked itself, so the parent gets the gpid",
    },
    Unseen {
        calls: "`raise`, `abort`, `pthread_kill`, `pthread_sigqueue`",
        why: Why::Internal("`getpid`, `gettid`, `tgkill` (or rt_tgsigqueueinfo)"),
        effect: "fine: kernel ids, a signal to the caller's own process or thread",
    },
    Unseen {
        calls: "`sigqueue`",
        why: Why::Internal("`getpid` (the `si_pid` it sends)"),
        effect: "`sigqueue` is hooked (the target is translated), but the receiver's `si_pid` is the sender's kernel pid",
    },
    Unseen {
        calls: "`syslog` with `LOG_PID`",
        why: Why::Internal("`getpid`"),
        effect: "logs the kernel pid",
    },
    Unseen {
        calls: "`nice`",
        why: Why::Internal("`getpriority`, `setpriority` (`PRIO_PROCESS`, 0)"),
        effect: "fine: 0 is the caller",
    },
    Unseen {
        calls: "`getrlimit`, `setrlimit`, `ulimit`",
        why: Why::Internal("`prlimit64(0, ...)`"),
        effect: "fine: 0 is the caller",
    },
    Unseen {
        calls: "`lockf(fd, F_TEST, n)`",
        why: Why::Internal("`fcntl(F_GETLK)`"),
        effect: "fine: glibc compares `l_pid` with its internal `getpid`, both kernel pids",
    },
    Unseen {
        calls: "`tcsetpgrp`, `tcgetpgrp`, `tcgetsid`",
        why: Why::Internal("`ioctl(TIOCSPGRP/TIOCGPGRP/TIOCGSID)`"),
        effect: "hooked at both levels: the functions and those `ioctl` requests",
    },
    Unseen {
        calls: "`posix_spawn` with `POSIX_SPAWN_SETSCHEDPARAM` or `SETSCHEDULER`",
        why: Why::Internal("`sched_setparam(0, ...)` (in the child)"),
        effect: "fine: 0 is the caller",
    },
    Unseen {
        calls: "`pthread_getaffinity_np`, `pthread_setaffinity_np`, `pthread_getschedparam`, `pthread_setschedparam`",
        why: Why::Internal("`sched_getaffinity(tid)`, `sched_setscheduler(tid)`..."),
        effect: "fine: kernel thread ids",
    },
    Unseen {
        calls: "`pthread_create`, the `malloc` family",
        why: Why::Internal("clone3, `mmap`, `munmap`, brk"),
        effect: "fine: threads have no pid of their own here, and anonymous memory is no cluster-wide object",
    },
    Unseen {
        calls: "`fopen`, `opendir`, `realpath`, `shm_open`, `sem_open`",
        why: Why::Internal("`openat`, `readlink`, `mmap`"),
        effect: "these functions are hooked themselves: a path is translated before glibc uses it",
    },
    Unseen {
        calls: "`ftw`/`nftw`, `fts_open`, `scandir`, `glob`, `truncate`, `chmod`... on a `/proc/<gpid>` path",
        why: Why::Internal("`openat`, `newfstatat`"),
        effect: "the kernel sees `/proc/<gpid>`: `ENOENT`",
    },
    Unseen {
        calls: "`getaddrinfo`",
        why: Why::Internal(
            "`socket`, `connect`, `bind`, `getsockname`, `sendto`, `recvmsg` (DNS and address sorting, in libc since 2.34)",
        ),
        effect: "the cluster-wide loopback does not apply: a resolver on `127.0.0.x` is this node's",
    },
    Unseen {
        calls: "`fclose`, `closefrom`",
        why: Why::Internal("`close`, close_range"),
        effect: "a descriptor from `shm_open` closed this way stays known to the library: a later descriptor with its number is taken for the object by `ftruncate` and `mmap`",
    },
    Unseen {
        calls: "`get_nprocs`, `sysconf(_SC_NPROCESSORS_ONLN)`",
        why: Why::Internal("`openat` of `/sys`"),
        effect: "this node's CPUs, not the cluster's",
    },
    Unseen {
        calls: "`pthread_rwlock_*`, `pthread_mutex_clocklock`, `pthread_cond_clockwait`, `sem_clockwait`",
        why: Why::NotHooked,
        effect: "an object in a cluster-wide segment that only these wait on is never registered with the agent: a waiter is not woken by a change made on another node",
    },
    Unseen {
        calls: "`clock_getcpuclockid(pid)`",
        why: Why::NotHooked,
        effect: "a gpid is `ESRCH`, the caller's own included",
    },
    Unseen {
        calls: "`getrusage(RUSAGE_CHILDREN)`, `times`",
        why: Why::NotHooked,
        effect: "a child placed on another node counts its shadow's usage, not its program's",
    },
    Unseen {
        calls: "`clone()` without `CLONE_VM`",
        why: Why::NotHooked,
        effect: "the child keeps its parent's gpid in `getpid` until it execs (no atfork handler runs)",
    },
    Unseen {
        calls: "`__xstat`, `__lxstat`, `__fxstatat` (binaries built against glibc < 2.33)",
        why: Why::NotHooked,
        effect: "`/proc/<gpid>` is `ENOENT`",
    },
    Unseen {
        calls: "`pidfd_send_signal`, `pidfd_getfd`, `process_madvise`, `process_mrelease`",
        why: Why::NotHooked,
        effect: "fine: they take a pidfd (one from `pidfd_open(gpid)` names the kernel process); `pidfd_send_signal`'s `info->si_pid` is what the caller wrote",
    },
    Unseen {
        calls: "`gettid`",
        why: Why::NotHooked,
        effect: "kernel thread ids are not translated (a thread has no pid of its own here)",
    },
    Unseen {
        calls: "`ioprio_set`, `ioprio_get`, `sched_setattr`, `sched_getattr`, `kcmp`, `rt_sigqueueinfo`, `rt_tgsigqueueinfo`, `tkill`",
        why: Why::NoWrapper,
        effect: "kernel pids only: a gpid is `ESRCH`",
    },
    Unseen {
        calls: "any `syscall(SYS_...)` (Python's `os.pidfd_open`, `syscall(SYS_openat)`), inline `syscall` instructions, programs without libc (Go)",
        why: Why::NoWrapper,
        effect: "kernel pids (a gpid is `ESRCH`), `/proc/<gpid>` is `ENOENT`, raw `fork`/`clone3` children keep the parent's gpid until they exec",
    },
];

/// A table cell: one line, no column separator.
fn cell(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// The region between the markers.
fn render(hooks: &[HookInfo]) -> String {
    let mut all: Vec<&HookInfo> = hooks.iter().collect();
    for (after, h) in outside() {
        let at = all
            .iter()
            .position(|x| x.name == after)
            .map_or(all.len(), |i| i + 1);
        all.insert(at, h);
    }
    let partial = all
        .iter()
        .filter(|h| matches!(h.status, Status::Partial(_)))
        .count();
    let mut s = String::new();
    s.push_str(&format!(
        "{} hooked calls: {} full, {} partial. **full**: behaves on the cluster as on one machine; **partial**: works, except for what the last column says. From each hook's `status` and doc comment in `krg-preload/src/lib.rs`.\n\n",
        all.len(),
        all.len() - partial,
        partial
    ));
    s.push_str("| call | status | what the hook does | what differs from one machine |\n");
    s.push_str("| --- | --- | --- | --- |\n");
    for h in all {
        let (status, why) = match h.status {
            Status::Full => ("full", ""),
            Status::Partial(why) => ("partial", why),
        };
        s.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            h.name,
            status,
            cell(&h.doc.join(" ")),
            cell(why)
        ));
    }
    s.push_str(&format!(
        "\nCalls no hook sees (checked on {GLIBC}: glibc reaches none of the hooked functions through its PLT, so a use inside glibc goes straight to the kernel; the list is `UNSEEN` in `krg-preload/src/compat.rs`):\n\n"
    ));
    s.push_str("| call | why no hook sees it | what happens under krg |\n");
    s.push_str("| --- | --- | --- |\n");
    for u in UNSEEN {
        let why = match u.why {
            Why::Internal(what) => format!("internal: {what}"),
            Why::NotHooked => "not hooked".to_string(),
            Why::NoWrapper => "no glibc function: the system call itself".to_string(),
        };
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            cell(u.calls),
            cell(&why),
            cell(u.effect)
        ));
    }
    s
}

/// The byte range of the generated region in `doc` (after the begin
/// marker's line, up to the end marker).
fn region(doc: &str) -> Option<std::ops::Range<usize>> {
    let b = doc.find(BEGIN)? + BEGIN.len();
    let b = b + doc[b..].find('\n')? + 1;
    let e = b + doc[b..].find(END)?;
    Some(b..e)
}

#[test]
fn the_compatibility_table_in_the_docs_is_current() {
    let doc = std::fs::read_to_string(DOC).expect("read docs/architecture/preload.md");
    let r = region(&doc).unwrap_or_else(|| {
        panic!("docs/architecture/preload.md has no region between\n{BEGIN}\nand\n{END}")
    });
    let want = format!("\n{}\n", render(crate::HOOKS));
    if doc[r.clone()] == want {
        return;
    }
    if std::env::var_os("KRG_BLESS").is_some_and(|v| v != "0") {
        let mut new = doc.clone();
        new.replace_range(r, &want);
        std::fs::write(DOC, new).expect("write docs/architecture/preload.md");
        return;
    }
    panic!(
        "the compatibility table in docs/architecture/preload.md is stale (a hook's status or doc \
         comment, or UNSEEN, changed); regenerate it with\n  \
         KRG_BLESS=1 cargo test -p krg-preload --lib compat\nand commit the docs"
    );
}

#[test]
fn every_hook_says_what_it_does_and_what_differs() {
    let mut names: Vec<&str> = crate::HOOKS.iter().map(|h| h.name).collect();
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "a hook is declared twice");
    for h in crate::HOOKS.iter().chain(outside().map(|(_, h)| h)) {
        assert!(
            h.doc.iter().any(|l| !l.trim().is_empty()),
            "{} has no doc comment",
            h.name
        );
        if let Status::Partial(why) = h.status {
            assert!(
                !why.trim().is_empty(),
                "{} is partial without a reason",
                h.name
            );
        }
    }
}

#[test]
fn what_no_hook_sees_is_not_hooked() {
    // A row that says "not hooked" (or "no glibc function") must not name
    // a hook: the list would lie once someone hooks it.
    for u in UNSEEN {
        if matches!(u.why, Why::Internal(_)) {
            continue;
        }
        for name in u.calls.split('`').skip(1).step_by(2) {
            let bare = name.split('(').next().unwrap_or(name);
            assert!(
                !crate::HOOKS.iter().any(|h| h.name == bare)
                    && !outside().iter().any(|(_, h)| h.name == bare),
                "`{bare}` is in UNSEEN as not hooked, but it is a hook"
            );
        }
    }
}
