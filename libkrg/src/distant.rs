//! Remote exec: a new program that the scheduler placed on another node.
//!
//! The decision comes with the agent's answer to `Hello`, in the library's
//! constructor, before the program's `main`: every way of starting a program
//! (each `exec*`, `posix_spawn`, `system`, `popen`, fork then exec) goes
//! through it. The process then asks its agent to start the same program
//! (executable, argv, environment, cwd, umask, rlimits; credentials are taken
//! by the agent from the kernel) on the chosen node, and stays behind as the
//! program's *shadow*: it is what the parent created, so the parent's
//! `wait`, `SIGCHLD`, exit status and job control keep working unchanged. The
//! shadow
//! - relays its stdin, stdout and stderr over TCP straight to the node where
//!   the program runs (one hop; `/dev/null` and closed fds are recreated
//!   there instead of relayed);
//! - forwards the signals it receives (a terminal's Ctrl-C, a `kill` of its
//!   kernel pid) to the program, through the agents;
//! - exits with the program's exit status, or dies of the same signal.
//!
//! It runs inside the constructor, under the re-entrancy guard with every
//! signal blocked, so it reads signals from a signalfd and makes its own
//! system calls directly.

#![deny(unsafe_code)]

use crate::client;
use crate::error::Error;
use crate::proc_self::{read_file, read_link, rlimits, split_nul, umask};
use crate::proto::{FileRef, RemoteExec, Request, Response, StdioKind};
use crate::sys;
use crate::sys::signal::SigSet;
use crate::sys::user::CStrArray;
use std::ffi::CStr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Channel ids a connection to the shadow announces after the token.
const CH_CONTROL: u8 = 0;
const CH_FD0: u8 = 1;

/// Signals the shadow forwards to the program.
const FORWARDED: &[i32] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGALRM,
    libc::SIGCONT,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

/// Whether a read or write that failed is worth trying again:
/// interrupted, or nothing to do on a non-blocking descriptor.
fn again(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN))
}

/// A token for the agent's connections back.
fn random_token() -> Result<[u8; 16], Error> {
    let mut token = [0u8; 16];
    match sys::getrandom(&mut token) {
        Ok(16) => Ok(token),
        Ok(_) => Err(Error::other("getrandom: short read")),
        Err(e) => Err(Error::io("getrandom", &e)),
    }
}

/// Run this process's program on `node` as gpid `gpid`. Returns only if the
/// program could not be started there (nothing was changed: the caller runs
/// it here instead); otherwise this process becomes the shadow and exits
/// with the remote program's status.
pub fn run_on(node: u32, gpid: i32) -> Result<(), Error> {
    let env = std::env::vars_os()
        .map(|(k, v)| {
            let mut e = k.into_encoded_bytes();
            e.push(b'=');
            e.extend_from_slice(v.as_encoded_bytes());
            e
        })
        .collect();
    run_on_with(
        node,
        gpid,
        read_link("/proc/self/exe")?,
        split_nul(&read_file("/proc/self/cmdline")?),
        env,
        None,
    )
}

/// [`run_on`] for the program `exe` with `argv` and `env`; `exec` when it
/// is placed at its `execve` (this process is still the old image): what
/// that exec would have done besides loading the program.
fn run_on_with(
    node: u32,
    gpid: i32,
    exe: Vec<u8>,
    argv: Vec<Vec<u8>>,
    env: Vec<Vec<u8>>,
    exec: Option<&ExecEffects>,
) -> Result<(), Error> {
    let listener = Listener::new()?;
    let token = random_token()?;
    let mut stdio = stdio_kinds();
    if let Some(x) = exec {
        // A standard fd the exec would close is closed for the program.
        for (fd, k) in stdio.iter_mut().enumerate() {
            if x.closes(fd as RawFd) {
                *k = StdioKind::Closed;
            }
        }
        if stdio[2] == StdioKind::Alias(1) && stdio[1] == StdioKind::Closed {
            stdio[2] = StdioKind::Closed;
        }
    }
    // Pipes to other SSI processes: connected directly to the target
    // instead of relayed (the process at the other end is held until the
    // target attaches, or until `reattach` below does).
    crate::streams::placed::hand_over(&mut stdio);
    let req = RemoteExec {
        node,
        exe,
        argv,
        env,
        cwd: read_link("/proc/self/cwd")?,
        umask: umask(),
        rlimits: rlimits(),
        stdio: stdio.clone(),
        port: listener.port,
        token: token.to_vec(),
        restore: false,
        ignored: ignored_signals(),
    };
    let r = match client::call(&Request::RemoteExec(req)) {
        Ok(Response::Pid(_)) => Ok(()),
        Ok(other) => Err(Error::other(format!("unexpected answer {other:?}"))),
        Err(e) => Err(e.into()),
    };
    if let Err(e) = r {
        crate::streams::placed::reattach(&stdio);
        return Err(e);
    }
    crate::streams::placed::let_go(&stdio);
    // The program runs: what its exec would have ended ends now (a parent
    // waiting for EOF on a close-on-exec pipe learns that the exec is done).
    if let Some(x) = exec {
        x.apply();
    }
    // From here on the program runs on `node`: this process is its shadow
    // and never returns to the caller.
    let relayed = stdio.iter().filter(|k| **k == StdioKind::Relay).count();
    let conns = listener.accept_all(&token, 1 + relayed);
    shadow(gpid, node, &stdio, conns)
}

/// The signals this process ignores, as [`RemoteExec::ignored`] has them.
/// Handlers do not count: an exec resets them to the default.
fn ignored_signals() -> u64 {
    let mut set = 0u64;
    for sig in 1..=64 {
        if sys::signal::handler(sig).is_ok_and(|h| h == libc::SIG_IGN) {
            set |= 1 << (sig - 1);
        }
    }
    set
}

/// The agent's policy may place programs on other nodes (from its Hello).
static SPREAD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_spread(on: bool) {
    SPREAD.store(on, std::sync::atomic::Ordering::Release);
}

pub use abi::exec_elsewhere;

/// The fence of this module's entry point that takes the application's
/// raw pointers (allowed `unsafe`: their contract is `execve`'s).
#[allow(unsafe_code)]
mod abi {
    use crate::sys::user::{CStrArray, CStrPtr};

    /// `execve(path, argv, envp)` of an SSI process: see
    /// [`super::place_exec`]. Returns to exec here; never returns when the
    /// program goes to another node.
    ///
    /// # Safety
    /// `path` is null or a NUL-terminated string; `argv` and `envp` are
    /// null or null-terminated arrays of them (the execve contract).
    pub unsafe fn exec_elsewhere(
        path: *const libc::c_char,
        argv: *const *const libc::c_char,
        envp: *const *const libc::c_char,
    ) {
        // SAFETY: the function's contract, for the duration of the call.
        let (path, argv, envp) = unsafe {
            (
                CStrPtr::new(path),
                CStrArray::new(argv),
                CStrArray::new(envp),
            )
        };
        if let Some(path) = path {
            super::place_exec(path.to_cstr(), argv, envp);
        }
    }
}

/// `execve(path, argv, envp)` of an SSI process: when the program may be
/// placed elsewhere (a `KRG_NODE` in its environment, or a policy that
/// spreads), ask where before the exec. If it goes to another node, this
/// process becomes its shadow at once (the program is never loaded here)
/// and this never returns. Returns to exec here: placed here, or the
/// placement could not be asked or carried out (the program then says
/// Hello as usual).
fn place_exec(file: &CStr, argv: CStrArray<'_>, envp: CStrArray<'_>) {
    if !crate::caps::Caps::from_bits(crate::processes::hello_caps())
        .contains(crate::caps::Caps::DISTANT_FORK)
    {
        return;
    }
    let list =
        |a: CStrArray<'_>| -> Vec<Vec<u8>> { a.iter().map(|s| s.to_bytes().to_vec()).collect() };
    let env = list(envp);
    let var = |name: &[u8]| {
        env.iter().find_map(|e| {
            e.strip_prefix(name)
                .and_then(|r| r.strip_prefix(b"="))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
    };
    let pinned = var(b"KRG_NODE").and_then(|v| v.trim().parse::<u32>().ok());
    if pinned.is_none() && !SPREAD.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    // Another thread would go on running in the shadow (an exec would
    // have ended it): only a single-threaded process takes this path.
    if std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count()) != 1 {
        return;
    }
    if !sys::fd::access(file, libc::X_OK) {
        return;
    }
    let mut exe = file.to_bytes().to_vec();
    if !exe.starts_with(b"/") {
        let Ok(mut cwd) = read_link("/proc/self/cwd") else {
            return;
        };
        cwd.push(b'/');
        cwd.extend_from_slice(&exe);
        exe = cwd;
    }
    let argv = list(argv);
    let req = Request::PlaceExec {
        exe: exe.clone(),
        argv: argv.clone(),
        caps_env: var(b"KRG_CAPS"),
        pinned,
    };
    let (gpid, place) = match client::call(&req) {
        Ok(Response::Hello { gpid, place, .. }) if place != 0 => (gpid, place),
        Ok(_) => return,
        Err(e) => {
            crate::krg_log!(crate::log::Level::Debug, "exec: no placement ({e})");
            return;
        }
    };
    // The program's environment without its pin (its children are placed
    // by the scheduler again).
    let env: Vec<Vec<u8>> = env
        .into_iter()
        .filter(|e| !e.starts_with(b"KRG_NODE="))
        .collect();
    // The shadow reads its signals from a signalfd: all blocked, as in a
    // constructor (this thread is the only one).
    let old = sys::signal::set_thread_mask(libc::SIG_BLOCK, &SigSet::full());
    // What `ps` shows here for the shadow: the program's name.
    if let Ok(name) = std::ffi::CString::new(
        exe.rsplit(|c| *c == b'/')
            .next()
            .unwrap_or_default()
            .to_vec(),
    ) {
        sys::process::set_name(&name);
    }
    let effects = ExecEffects::now();
    if let Err(e) = run_on_with(place, gpid, exe, argv, env, Some(&effects)) {
        crate::krg_log!(
            crate::log::Level::Warn,
            "could not run on node {place} ({e}); running here"
        );
        sys::signal::set_thread_mask(libc::SIG_SETMASK, &old);
    }
}

/// What an `execve` does to the calling process besides loading the new
/// program, for a process that becomes the shadow of a program placed at
/// its `execve` (it never execs): its close-on-exec fds are closed (a
/// parent reading EOF on a close-on-exec pipe learns the exec happened:
/// git, Python's subprocess and posix_spawn emulations wait for that) and
/// its POSIX timers deleted (the shadow would forward their signals to the
/// program). Signal handlers need nothing: the shadow blocks every signal
/// and reads the ones it forwards from a signalfd; interval timers survive
/// an exec, and the shadow forwards their `SIGALRM`.
pub(crate) struct ExecEffects {
    /// The close-on-exec fds, with the file each held (the numbers of those
    /// that go may be reused by the shadow's own before [`Self::apply`]).
    cloexec: Vec<(RawFd, u64, u64)>,
}

impl ExecEffects {
    /// Read them now, before the shadow opens anything of its own.
    pub(crate) fn now() -> ExecEffects {
        let mut cloexec = Vec::new();
        let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        for fd in fds {
            // An fd that is gone by now (the directory's own) fails.
            if !sys::fd::fd_flags(fd).is_ok_and(|fl| fl & libc::FD_CLOEXEC != 0) {
                continue;
            }
            if let Some((dev, ino)) = file_id(fd) {
                cloexec.push((fd, dev, ino));
            }
        }
        ExecEffects { cloexec }
    }

    /// Whether the exec would close `fd`.
    fn closes(&self, fd: RawFd) -> bool {
        self.cloexec.iter().any(|(f, ..)| *f == fd)
    }

    /// Close what the exec would have closed (standard fds get `/dev/null`,
    /// so that nothing the shadow opens lands on them), delete the timers.
    fn apply(&self) {
        for (fd, dev, ino) in &self.cloexec {
            if file_id(*fd) != Some((*dev, *ino)) {
                continue;
            }
            if *fd <= 2 {
                crate::streams::placed::park(*fd);
            } else {
                // An fd of the old image that the exec would have closed;
                // nothing of the shadow uses it (same file as when the
                // exec was asked for).
                let _ = sys::fd::close(*fd);
            }
        }
        for id in posix_timers() {
            let _ = sys::process::timer_delete(id);
        }
    }
}

/// Device and inode of the file open at `fd`.
fn file_id(fd: RawFd) -> Option<(u64, u64)> {
    sys::fd::fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

/// The ids of this process's POSIX timers (`/proc/self/timers`: `ID: N`).
fn posix_timers() -> Vec<i64> {
    std::fs::read_to_string("/proc/self/timers")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("ID:")?.trim().parse().ok())
        .collect()
}

/// Have the agent start something elsewhere (the request is built from
/// the port this process listens on, its token and how its stdio travels)
/// and become its shadow. Used by `krg restart`: the command stands in
/// for the restored process as a shadow does for a placed program. Returns
/// only if the start failed.
pub fn shadow_for(
    make: impl FnOnce(u16, Vec<u8>, Vec<StdioKind>) -> Request,
    announce: impl FnOnce(i32, u32),
) -> Result<std::convert::Infallible, Error> {
    let listener = Listener::new()?;
    let token = random_token()?;
    let stdio = stdio_kinds();
    let (gpid, node) = match client::call(&make(listener.port, token.to_vec(), stdio.clone())) {
        Ok(Response::Ckpt(i)) => (i.pid, i.node),
        Ok(other) => return Err(Error::other(format!("unexpected answer {other:?}"))),
        Err(e) => return Err(e.into()),
    };
    announce(gpid, node);
    let relayed = stdio.iter().filter(|k| **k == StdioKind::Relay).count();
    let conns = listener.accept_all(&token, 1 + relayed);
    shadow(gpid, node, &stdio, conns)
}

/// `KRG_SHADOW=gpid:node:control:fd0:fd1:fd2` (fd numbers of the
/// connections, -1 for a stdio fd that is not relayed): a migrated
/// process exec'd itself to shed its memory and be its own shadow.
pub const SHADOW_ENV: &str = "KRG_SHADOW";

/// Become the shadow described by `KRG_SHADOW`. Returns only if the value
/// is not valid.
pub fn shadow_from_env(spec: &str) -> Result<std::convert::Infallible, Error> {
    let v: Vec<i64> = spec
        .split(':')
        .map(|x| x.parse::<i64>())
        .collect::<Result<_, _>>()
        .map_err(|_| Error::other(format!("{SHADOW_ENV}={spec}: not numbers")))?;
    if v.len() != 6 {
        return Err(Error::other(format!(
            "{SHADOW_ENV}={spec}: 6 fields expected"
        )));
    }
    let (gpid, node) = (v[0] as i32, v[1] as u32);
    let mut conns = Vec::new();
    let mut stdio = Vec::new();
    for (i, fd) in v[2..].iter().enumerate() {
        let fd = *fd as RawFd;
        if fd < 0 {
            if i > 0 {
                stdio.push(StdioKind::Closed);
            }
            continue;
        }
        // The exec'ing process left these fds open for us and nothing
        // else in this image refers to them.
        let owned = sys::fd::adopt(fd);
        let _ = sys::fd::set_fd_flags(fd, libc::FD_CLOEXEC);
        if i == 0 {
            conns.push((CH_CONTROL, owned));
        } else {
            conns.push((CH_FD0 + (i - 1) as u8, owned));
            stdio.push(StdioKind::Relay);
        }
    }
    shadow(gpid, node, &stdio, conns)
}

/// How fds 0-2 travel. A stderr that is the same open file as stdout
/// (`2>&1`) shares its stream: one relay keeps the two in the order they
/// were written.
pub(crate) fn stdio_kinds() -> Vec<StdioKind> {
    let mut v: Vec<StdioKind> = (0..3).map(stdio_kind).collect();
    if v[1] == StdioKind::Relay && v[2] == StdioKind::Relay && same_file(1, 2) {
        v[2] = StdioKind::Alias(1);
    }
    v
}

/// Whether fds `a` and `b` are one open file description (`dup`).
fn same_file(a: RawFd, b: RawFd) -> bool {
    if let Ok(same) = sys::process::same_file(a, b) {
        return same;
    }
    // No kcmp: the same pipe, socket or terminal is taken as one.
    let st = |f| {
        sys::fd::fstat(f)
            .ok()
            .map(|st| (st.st_dev, st.st_ino, st.st_mode))
    };
    matches!((st(a), st(b)), (Some(x), Some(y)) if x == y && x.2 & libc::S_IFMT != libc::S_IFREG)
}

pub(crate) fn stdio_kind(fd: RawFd) -> StdioKind {
    let Ok(st) = sys::fd::fstat(fd) else {
        return StdioKind::Closed;
    };
    if st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3) {
        return StdioKind::DevNull;
    }
    if fd == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG {
        if let Some(f) = stdin_file(&st) {
            return StdioKind::File(f);
        }
    }
    StdioKind::Relay
}

/// Stdin is a regular file opened read-only: the target reads it itself
/// (relaying would read ahead of the program and take input that belongs
/// to the parent, as in `while read l; do prog; done < file`).
fn stdin_file(st: &libc::stat) -> Option<FileRef> {
    if !sys::fd::status_flags(0).is_ok_and(|fl| fl & libc::O_ACCMODE == libc::O_RDONLY) {
        return None;
    }
    let path = std::fs::read_link("/proc/self/fd/0").ok()?;
    let path = path.into_os_string().into_encoded_bytes();
    if path.ends_with(b" (deleted)") || !path.starts_with(b"/") {
        return None;
    }
    let off = sys::fd::lseek(0, 0, libc::SEEK_CUR).ok()?;
    Some(FileRef {
        path,
        dev: st.st_dev,
        ino: st.st_ino,
        offset: off as u64,
    })
}

pub(crate) struct Listener {
    fd: OwnedFd,
    pub(crate) port: u16,
}

impl Listener {
    pub(crate) fn new() -> Result<Listener, Error> {
        let err = |what: &'static str| move |e| format!("{what}: {e}");
        let fd = sys::sock::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
            .map_err(err("socket"))?;
        // INADDR_ANY, port 0.
        let mut sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        sys::sock::bind(fd.as_raw_fd(), &sa, len).map_err(err("bind"))?;
        sys::sock::listen(fd.as_raw_fd(), 8).map_err(err("listen"))?;
        sys::sock::getsockname(fd.as_raw_fd(), &mut sa).map_err(err("getsockname"))?;
        Ok(Listener {
            fd,
            port: u16::from_be(sa.sin_port),
        })
    }

    /// Accept the agent's `n` connections (each presents the token and its
    /// channel); strangers are dropped. Gives up after 10 s.
    pub(crate) fn accept_all(&self, token: &[u8; 16], n: usize) -> Vec<(u8, OwnedFd)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            if !sys::poll::ready(self.fd.as_raw_fd(), libc::POLLIN, 200) {
                continue;
            }
            let Ok(c) = sys::sock::accept(self.fd.as_raw_fd(), libc::SOCK_CLOEXEC) else {
                continue;
            };
            let mut hello = [0u8; 17];
            if read_exact_timeout(c.as_raw_fd(), &mut hello, 2000) && hello[..16] == token[..] {
                out.push((hello[16], c));
            }
        }
        out
    }
}

fn read_exact_timeout(fd: RawFd, buf: &mut [u8], ms: i32) -> bool {
    let mut got = 0;
    while got < buf.len() {
        if !sys::poll::ready(fd, libc::POLLIN, ms) {
            return false;
        }
        match sys::fd::read(fd, &mut buf[got..]) {
            Ok(n) if n > 0 => got += n,
            _ => return false,
        }
    }
    true
}

/// One direction of a relayed stream.
struct Pipe {
    from: RawFd,
    to: RawFd,
    buf: Vec<u8>,
    start: usize,
    /// The source reached EOF (or failed).
    eof: bool,
    /// The destination refused more data: the stream is over.
    broken: bool,
    /// Shut the write side of `to` (a socket) at EOF.
    shutdown_to: bool,
    /// Close `from` (a socket) when `to` breaks, so the writer sees EPIPE
    /// as it would on a closed pipe.
    close_from: bool,
    /// `to` broke and `from` is to be closed (by the owner of the fd).
    hang_up: bool,
}

impl Pipe {
    fn new(from: RawFd, to: RawFd, to_is_socket: bool) -> Pipe {
        Pipe {
            from,
            to,
            buf: Vec::with_capacity(64 * 1024),
            start: 0,
            eof: false,
            broken: false,
            shutdown_to: to_is_socket,
            close_from: !to_is_socket,
            hang_up: false,
        }
    }

    fn done(&self) -> bool {
        self.broken || (self.eof && self.start >= self.buf.len())
    }

    fn want_read(&self) -> bool {
        !self.eof && !self.broken && self.start >= self.buf.len()
    }

    fn want_write(&self) -> bool {
        !self.broken && self.start < self.buf.len()
    }

    fn on_readable(&mut self) {
        self.buf.resize(64 * 1024, 0);
        match sys::fd::read(self.from, &mut self.buf) {
            Ok(n) if n > 0 => {
                self.buf.truncate(n);
                self.start = 0;
            }
            r => {
                self.buf.clear();
                self.start = 0;
                if !matches!(&r, Err(e) if again(e)) {
                    self.eof = true;
                    self.finish();
                }
            }
        }
    }

    fn on_writable(&mut self) {
        // Pipes take PIPE_BUF bytes without blocking once poll says so.
        let chunk = (self.buf.len() - self.start).min(4096);
        let r = sys::fd::write(self.to, &self.buf[self.start..self.start + chunk]);
        if let Ok(n @ 1..) = r {
            self.start += n;
            if self.eof && self.start >= self.buf.len() {
                self.finish();
            }
        } else if !matches!(&r, Err(e) if again(e)) {
            self.broken = true;
            if self.close_from {
                // The writer must see EPIPE. A shutdown alone leaves a
                // full receive window closed (nothing is read any more):
                // no byte comes to be answered with a reset and the writer
                // waits forever. So the socket is closed too (in the loop,
                // which owns it), resetting the connection; the end of
                // stream sent first makes the writer's socket take that
                // reset as EPIPE (and SIGPIPE), not ECONNRESET.
                // Errors are harmless.
                let _ = sys::sock::shutdown(self.from, libc::SHUT_RDWR);
                self.hang_up = true;
            }
        }
    }

    /// The local fd this relays and its connection to the program.
    fn ends(&self) -> (RawFd, RawFd) {
        if self.from == 0 {
            (0, self.to)
        } else {
            (self.to, self.from)
        }
    }

    /// Hand the stream over (the program's end is held, the process at the
    /// other end of the local pipe frozen): all that this relay still has
    /// goes on its way, then the relay ends and the local end is let go.
    fn release(self) -> Result<(), Error> {
        let (local, sock) = self.ends();
        if self.from == 0 {
            // Towards the program: what we hold, then what is in the pipe
            // (its writer is frozen), then end of stream.
            let mut out = self.buf[self.start.min(self.buf.len())..].to_vec();
            if !self.eof {
                out.extend(crate::streams::moving::drain_pipe(0)?.0);
            }
            write_all(sock, &out)?;
            let _ = sys::sock::shutdown(sock, libc::SHUT_WR);
        } else {
            // From the program (its threads parked; it drains to the end of
            // stream we send): everything still coming, into the pipe,
            // whose reader reads it to its end.
            let _ = sys::sock::shutdown(sock, libc::SHUT_WR);
            write_all(local, &self.buf[self.start.min(self.buf.len())..])?;
            let mut buf = vec![0u8; 64 * 1024];
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut ended = self.eof;
            while !ended {
                if Instant::now() > deadline {
                    return Err(Error::errno(
                        libc::ETIMEDOUT,
                        "the program never ended its stream",
                    )
                    .fd(local));
                }
                if !sys::poll::ready(sock, libc::POLLIN, 1000) {
                    continue;
                }
                let n = match sys::fd::read(sock, &mut buf) {
                    Ok(n) => n,
                    Err(e) if again(&e) => continue,
                    Err(e) => return Err(Error::io("reading the relay", &e)),
                };
                ended = n == 0;
                if ended {
                    continue;
                }
                write_all(local, &buf[..n])?;
            }
        }
        crate::streams::placed::park(local);
        Ok(())
    }

    fn finish(&mut self) {
        if self.eof && self.start >= self.buf.len() && self.shutdown_to {
            // Half-closed: the program sees EOF on stdin.
            let _ = sys::sock::shutdown(self.to, libc::SHUT_WR);
            self.shutdown_to = false;
        }
    }
}

/// Write all of `b` to `fd` (blocking or not), within 30 s.
fn write_all(fd: RawFd, mut b: &[u8]) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b.is_empty() {
        match sys::fd::write(fd, b) {
            Ok(n @ 1..) => {
                b = &b[n..];
                continue;
            }
            Ok(_) => {}
            Err(e) if again(&e) => {}
            Err(e) => return Err(Error::io("handing the relay over", &e).fd(fd)),
        }
        if Instant::now() > deadline {
            return Err(
                Error::errno(libc::ETIMEDOUT, "nobody read what the relay still had").fd(fd),
            );
        }
        sys::poll::ready(fd, libc::POLLOUT, 1000);
    }
    Ok(())
}

/// Signal 62 to a shadow: the agent wants one of its relays handed over
/// (the process at the other end of a pipe it relays is moving, or being
/// placed). Tell it what each relay connects; do what it answers.
fn release_asked(pipes: &mut Vec<Pipe>, stdio: &[StdioKind]) {
    let relays: Vec<(i32, String, String)> = pipes
        .iter()
        .filter(|p| !p.done())
        .filter_map(|p| {
            let (local, sock) = p.ends();
            crate::streams::moving::tcp_ends(sock).map(|(l, r)| (local, l, r))
        })
        .collect();
    match client::call(&Request::ShadowRelays(relays)) {
        Ok(Response::Release(fd)) => {
            let Some(i) = pipes.iter().position(|p| p.ends().0 == fd) else {
                return;
            };
            if let Err(e) = pipes.remove(i).release() {
                crate::krg_log!(crate::log::Level::Warn, "handing fd {fd} over: {e}");
            }
            // `2>&1`: the copy goes with it.
            for (a, k) in stdio.iter().enumerate() {
                if *k == StdioKind::Alias(fd as u8) {
                    crate::streams::placed::park(a as RawFd);
                }
            }
        }
        Ok(other) => crate::krg_log!(
            crate::log::Level::Debug,
            "relay hand-over: unexpected answer {other:?}"
        ),
        Err(e) => crate::krg_log!(crate::log::Level::Debug, "relay hand-over not done: {e}"),
    }
}

fn signalfd_forwarded() -> Option<OwnedFd> {
    let set = FORWARDED
        .iter()
        .chain(&[crate::proto::CKPT_SIGNAL, libc::SIGCHLD])
        .fold(SigSet::empty(), |set, s| set.with(*s));
    // They are already blocked (the guard blocks all signals); make sure.
    sys::signal::set_thread_mask(libc::SIG_BLOCK, &set);
    sys::signal::signalfd(&set, libc::SFD_CLOEXEC).ok()
}

fn forward(gpid: i32, sig: i32) {
    if let Err(e) = client::call(&Request::Kill { pid: gpid, sig }) {
        crate::krg_log!(
            crate::log::Level::Warn,
            "forwarding signal {sig} to {gpid}: {e}"
        );
    }
}

/// Relay until the program ends, then end like it. Never returns.
pub(crate) fn shadow(gpid: i32, node: u32, stdio: &[StdioKind], conns: Vec<(u8, OwnedFd)>) -> ! {
    let mut control = None;
    let mut pipes: Vec<Pipe> = Vec::new();
    let mut keep = Vec::new();
    for (ch, fd) in conns {
        let raw = fd.as_raw_fd();
        match ch {
            CH_CONTROL => control = Some(fd),
            c if (CH_FD0..CH_FD0 + 3).contains(&c) => {
                let local = (c - CH_FD0) as RawFd;
                if stdio.get(local as usize) != Some(&StdioKind::Relay) {
                    continue;
                }
                // O_NONBLOCK on our own socket (never on the shared local
                // fds: their file descriptions belong to others too).
                let _ = sys::fd::set_status_flags(raw, libc::O_NONBLOCK);
                if local == 0 {
                    pipes.push(Pipe::new(0, raw, true));
                } else {
                    pipes.push(Pipe::new(raw, local, false));
                }
                keep.push(fd);
            }
            _ => {}
        }
    }
    let Some(control) = control else {
        crate::log::emit(format_args!(
            "krg: pid {gpid}: node {node} never connected back; the program's fate is unknown"
        ));
        exit_like(libc::SIGKILL)
    };
    let sfd = signalfd_forwarded();
    // Children of the program before it moved stay here, this process's:
    // their ends go to the program (SIGCHLD must not be ignored, or they
    // would vanish unseen). Some may have ended already.
    // The default disposition for SIGCHLD (it is blocked and read from the
    // signalfd).
    sys::signal::set_default(libc::SIGCHLD);
    reap_and_report();
    let mut status: Option<i32> = None;
    // The wait status, then where the program left a file stdin (-1: none).
    let mut ctl_buf = [0u8; 12];
    let mut ctl_got = 0;
    let mut lost = false;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let outputs_done = pipes.iter().filter(|p| p.from != 0).all(Pipe::done);
        if let Some(_s) = status {
            if outputs_done || drain_deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        if lost && (outputs_done || drain_deadline.is_some_and(|d| Instant::now() >= d)) {
            break;
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(8);
        let mut map: Vec<(usize, bool)> = Vec::new();
        for (i, p) in pipes.iter().enumerate() {
            if p.want_read() {
                fds.push(libc::pollfd {
                    fd: p.from,
                    events: libc::POLLIN,
                    revents: 0,
                });
                map.push((i, false));
            } else if p.want_write() {
                fds.push(libc::pollfd {
                    fd: p.to,
                    events: libc::POLLOUT,
                    revents: 0,
                });
                map.push((i, true));
            }
        }
        let ctl_idx = fds.len();
        if status.is_none() && !lost {
            fds.push(libc::pollfd {
                fd: control.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let sig_idx = fds.len();
        if let Some(s) = &sfd {
            fds.push(libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if sys::poll::poll(&mut fds, 500).is_err() {
            continue;
        }
        for (k, (i, w)) in map.iter().enumerate() {
            if fds[k].revents == 0 {
                continue;
            }
            if *w {
                pipes[*i].on_writable();
            } else {
                pipes[*i].on_readable();
            }
        }
        for p in pipes.iter_mut().filter(|p| p.hang_up) {
            // Closing it with bytes unread resets the connection now;
            // without, the next bytes to come are answered with a reset.
            keep.retain(|f| f.as_raw_fd() != p.from);
            p.hang_up = false;
            p.from = -1;
        }
        if status.is_none() && !lost && fds[ctl_idx].revents != 0 {
            let r = sys::fd::read(control.as_raw_fd(), &mut ctl_buf[ctl_got..]);
            if let Ok(n @ 1..) = r {
                ctl_got += n;
                if ctl_got == 12 {
                    status = Some(i32::from_le_bytes(
                        ctl_buf[..4].try_into().expect("4 bytes"),
                    ));
                    let off = i64::from_le_bytes(ctl_buf[4..].try_into().expect("8 bytes"));
                    if off >= 0 && matches!(stdio.first(), Some(StdioKind::File(_))) {
                        // The shared offset of our stdin (a regular file)
                        // goes where the program stopped reading.
                        let _ = sys::fd::lseek(0, off, libc::SEEK_SET);
                    }
                    // Output still in flight is relayed; a grandchild that
                    // keeps the stream open does not hold the parent's wait.
                    drain_deadline = Some(Instant::now() + Duration::from_secs(2));
                }
            } else if !matches!(&r, Err(e) if again(e)) {
                lost = true;
                drain_deadline = Some(Instant::now() + Duration::from_secs(1));
            }
        }
        if let Some(s) = &sfd {
            if fds[sig_idx].revents != 0 {
                match sys::signal::read_signalfd(s.as_raw_fd()).map(|si| si.ssi_signo as i32) {
                    Some(crate::proto::CKPT_SIGNAL) => release_asked(&mut pipes, stdio),
                    Some(libc::SIGCHLD) => reap_and_report(),
                    Some(sig) => {
                        forward(gpid, sig);
                        if matches!(sig, libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU) {
                            // Job control: the shell must see its child
                            // stop (SIGCONT resumes it).
                            let _ = sys::process::kill(std::process::id() as i32, libc::SIGSTOP);
                        }
                    }
                    None => {}
                }
            }
        }
    }
    drop(keep);
    match status {
        Some(st) if libc::WIFEXITED(st) => sys::process::exit_now(libc::WEXITSTATUS(st)),
        Some(st) if libc::WIFSIGNALED(st) => exit_like(libc::WTERMSIG(st)),
        _ => {
            crate::log::emit(format_args!(
                "krg: pid {gpid}: lost contact with node {node}, where it ran"
            ));
            exit_like(libc::SIGKILL)
        }
    }
}

/// In a shadow: report and reap every kernel child that has ended (the
/// report first, while the agent still knows the child's gpid).
pub(crate) fn reap_and_report() {
    loop {
        // WNOWAIT leaves the child as it is.
        let options = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        let Ok(crate::sys::process::ChildState {
            pid,
            code,
            status: val,
        }) = crate::sys::process::waitid(libc::P_ALL, 0, options)
        else {
            return;
        };
        if pid <= 0 {
            return;
        }
        let status = match code {
            libc::CLD_EXITED => (val & 0xff) << 8,
            libc::CLD_DUMPED => (val & 0x7f) | 0x80,
            _ => val & 0x7f,
        };
        if let Err(e) =
            crate::client::call(&crate::proto::Request::ChildExited { kpid: pid, status })
        {
            crate::krg_log!(
                crate::log::Level::Warn,
                "reporting the end of child {pid}: {e}"
            );
        }
        // Reaps that one child.
        let _ = crate::sys::process::waitpid(pid, libc::WNOHANG);
    }
}

/// Die of `sig` so the parent's wait sees the same end as the program's.
pub(crate) fn exit_like(sig: i32) -> ! {
    // Default disposition, unblocked, raised: the process dies of sig.
    sys::signal::set_default(sig);
    sys::signal::set_thread_mask(libc::SIG_UNBLOCK, &SigSet::empty().with(sig));
    sys::signal::raise(sig);
    sys::process::exit_now(128 + sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_kinds() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(stdio_kind(null.as_raw_fd()), StdioKind::DevNull);
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(stdio_kind(f.as_raw_fd()), StdioKind::Relay);
        let (r, _w) = std::io::pipe().unwrap();
        assert_eq!(stdio_kind(r.as_raw_fd()), StdioKind::Relay);
        assert_eq!(stdio_kind(987), StdioKind::Closed);
    }
}
