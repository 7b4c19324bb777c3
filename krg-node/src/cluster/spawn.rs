//! Starting one node: an intermediate child joins the node's cgroups and
//! network namespace and unshares mount, pid, IPC and UTS namespaces; its
//! child becomes pid 1 of the new pid namespace, sets up the node's private
//! mounts and execs the agent. The intermediate reports the host pid of that
//! pid-1 process over a pipe and exits.
//!
//! Everything the children need (paths as C strings, argv, envp, open files)
//! is prepared before `fork`: after it the children only make system calls,
//! so nothing depends on the state of locks or the allocator at fork time.

use super::instance::NETNS_DIR;
use super::sys::{self, CStrVec};
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{chdir, dup2, mkdir, pipe2, sethostname, setsid, ForkResult, Pid};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The node's run directory (a private tmpfs): the agent's socket and state.
pub(super) const NODE_RUN_DIR: &str = "/run/krg";

/// What to start on a node.
#[derive(Debug)]
pub(super) struct Launch {
    pub id: u32,
    /// The node's named network namespace.
    pub netns: PathBuf,
    /// The node's `cgroup.procs` files.
    pub cgroup_procs: Vec<PathBuf>,
    /// Host log file for the agent's stdout and stderr.
    pub log: PathBuf,
    /// The agent binary.
    pub agent: PathBuf,
    /// Its full argv (argv[0] included).
    pub argv: Vec<String>,
    /// Its whole environment, `NAME=value`.
    pub env: Vec<String>,
    /// The file bound over the node's /etc/hosts, if any.
    pub hosts: Option<PathBuf>,
}

/// What the children report on the pipe: 12-byte records `tag, a, b` (one
/// `write` each, well under PIPE_BUF, so records never interleave).
const TAG_PID: i32 = 1;
const TAG_ERR: i32 = 2;

// The steps a child can fail at (`a` of a TAG_ERR record; `b` is the errno).
const ST_CGROUP: i32 = 1;
const ST_NETNS: i32 = 2;
const ST_UNSHARE: i32 = 3;
const ST_FORK: i32 = 4;
const ST_PRIVATE: i32 = 5;
const ST_PROC: i32 = 6;
const ST_TMP: i32 = 7;
const ST_SHM: i32 = 8;
const ST_RUN: i32 = 9;
const ST_STATEDIR: i32 = 10;
const ST_HOSTNAME: i32 = 11;
const ST_SETSID: i32 = 12;
const ST_STDIO: i32 = 13;
const ST_EXEC: i32 = 14;
const ST_CHDIR: i32 = 15;
const ST_KEEPTMP: i32 = 16;
const ST_HOSTS: i32 = 17;

fn step_name(step: i32) -> &'static str {
    match step {
        ST_CGROUP => "joining the node's cgroups (writing to cgroup.procs)",
        ST_NETNS => "entering the node's network namespace (setns)",
        ST_UNSHARE => "creating mount, pid, IPC and UTS namespaces (unshare)",
        ST_FORK => "forking the node's pid-1 process",
        ST_PRIVATE => "making / recursively private",
        ST_PROC => "mounting proc on /proc",
        ST_TMP => "mounting a tmpfs on /tmp",
        ST_SHM => "mounting a tmpfs on /dev/shm",
        ST_RUN => "mounting a tmpfs on /run/krg",
        ST_KEEPTMP => "keeping the krg checkout visible under the private /tmp",
        ST_STATEDIR => "creating /run/krg/state",
        ST_HOSTNAME => "setting the hostname",
        ST_SETSID => "setsid",
        ST_STDIO => "redirecting stdin/stdout/stderr",
        ST_EXEC => "executing the agent",
        ST_CHDIR => "changing directory to /",
        ST_HOSTS => "binding the cluster's hosts file over /etc/hosts",
        _ => "an unknown step",
    }
}

/// Everything the children use, ready before fork.
struct Prepared {
    netns: File,
    cgroups: Vec<File>,
    log: File,
    devnull: File,
    hostname: String,
    agent: CString,
    argv: CStrVec,
    envp: CStrVec,
    /// The directory right under /tmp that holds the krg binaries, if they
    /// live under /tmp (a checkout in /tmp): part of the shared image, so it
    /// stays visible through the node's private /tmp.
    keep_tmp: Option<PathBuf>,
    hosts: Option<PathBuf>,
}

/// Where `keep_tmp` waits while the node's /tmp is replaced.
const TMP_STAGE: &str = "/run/krg/.shared-tmp";

/// The top-level directory under /tmp containing `path`, if any.
pub(super) fn tmp_top(path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix("/tmp").ok()?;
    let first = rel.components().next()?;
    Some(Path::new("/tmp").join(first))
}

/// A started node: the host pid of its pid-1 process and its start time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Started {
    pub host_pid: i32,
    pub start_time: u64,
}

/// A node being started: its intermediate process is running.
#[derive(Debug)]
pub(super) struct Pending {
    id: u32,
    child: Pid,
    rd: OwnedFd,
    log: PathBuf,
}

/// Start node `l.id`: fork its intermediate process and return at once, so
/// that nodes start in parallel (moving a process into a cgroup v1 waits for
/// an RCU grace period; concurrent moves share one). On error the node's
/// processes may be left behind (the caller tears the whole cluster down).
pub(super) fn begin(l: &Launch) -> Result<Pending> {
    let id = l.id;
    let p = Prepared {
        netns: File::open(&l.netns)
            .with_context(|| format!("node {id}: opening {}", l.netns.display()))?,
        cgroups: l
            .cgroup_procs
            .iter()
            .map(|c| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(c)
                    .with_context(|| format!("node {id}: opening {}", c.display()))
            })
            .collect::<Result<_>>()?,
        // Opened here, in the machine's mount namespace: the node's own
        // mounts come later and never hide it.
        log: std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o644)
            .open(&l.log)
            .with_context(|| format!("node {id}: creating log file {}", l.log.display()))?,
        devnull: File::open("/dev/null").context("opening /dev/null")?,
        hostname: format!("krg-n{id}"),
        agent: sys::cstring(&l.agent)?,
        argv: CStrVec::new(&l.argv)?,
        envp: CStrVec::new(&l.env)?,
        keep_tmp: tmp_top(&l.agent),
        hosts: l.hosts.clone(),
    };
    // The mount point of the node's run directory, on the shared root
    // file system (an empty directory; the tmpfs is mounted inside the node).
    std::fs::create_dir_all(NODE_RUN_DIR).with_context(|| format!("creating {NODE_RUN_DIR}"))?;

    let (rd, wr) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    // The child only makes system calls on data prepared above and ends
    // in `_exit` or `execve`.
    let child = match sys::fork().with_context(|| format!("node {id}: fork"))? {
        ForkResult::Child => intermediate(&p, &wr),
        ForkResult::Parent { child } => child,
    };
    drop(wr);
    drop(p);
    Ok(Pending {
        id,
        child,
        rd,
        log: l.log.clone(),
    })
}

impl Pending {
    /// Wait for the node's report: its pid-1 process exec'd the agent.
    pub(super) fn finish(self, deadline: Instant) -> Result<Started> {
        let Pending { id, child, rd, log } = self;
        let reports = read_reports(&rd, deadline);
        if reports.is_err() {
            let _ = signal::kill(child, Signal::SIGKILL);
        }
        let _ = waitpid(child, None);
        let reports = reports.with_context(|| format!("node {id}: starting its pid-1 process"))?;
        decode(id, &reports, &log)
    }
}

fn decode(id: u32, reports: &[(i32, i32, i32)], log: &Path) -> Result<Started> {
    let mut pid = None;
    for (tag, a, b) in reports {
        match *tag {
            TAG_PID => pid = Some(*a),
            TAG_ERR => bail!(
                "node {id}: {} failed: {}\n{}",
                step_name(*a),
                sys::errno_str(*b),
                sys::log_tail(log, 10)
            ),
            _ => {}
        }
    }
    let Some(host_pid) = pid else {
        bail!("node {id}: the intermediate process ended without reporting the node's pid");
    };
    let Some((_, start_time)) = sys::proc_stat(host_pid) else {
        bail!(
            "node {id}: the agent (host pid {host_pid}) exited at once\n{}",
            sys::log_tail(log, 10)
        );
    };
    Ok(Started {
        host_pid,
        start_time,
    })
}

/// Read the children's records until every copy of the pipe's write end is
/// closed (the intermediate exited and pid 1 exec'd or died).
fn read_reports(rd: &OwnedFd, deadline: Instant) -> Result<Vec<(i32, i32, i32)>> {
    let mut buf = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no report from the node's processes in time");
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut pfd = [PollFd::new(rd.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut pfd,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).context("poll"),
        }
        let mut chunk = [0u8; 256];
        match nix::unistd::read(rd.as_raw_fd(), &mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).context("reading from the node's processes"),
        }
    }
    let word = |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    Ok(buf
        .chunks_exact(12)
        .map(|r| (word(&r[0..4]), word(&r[4..8]), word(&r[8..12])))
        .collect())
}

fn report(fd: &OwnedFd, tag: i32, a: i32, b: i32) {
    let mut rec = [0u8; 12];
    rec[0..4].copy_from_slice(&tag.to_le_bytes());
    rec[4..8].copy_from_slice(&a.to_le_bytes());
    rec[8..12].copy_from_slice(&b.to_le_bytes());
    let _ = nix::unistd::write(fd, &rec);
}

/// Report a failed step and end the process.
fn check<T>(fd: &OwnedFd, step: i32, r: nix::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            report(fd, TAG_ERR, step, e as i32);
            sys::exit_now(1)
        }
    }
}

/// The intermediate child: cgroups, network namespace, new namespaces, then
/// fork pid 1 and report its host pid.
fn intermediate(p: &Prepared, wr: &OwnedFd) -> ! {
    for f in &p.cgroups {
        // "0" is the writing process itself (its pid in our pid namespace
        // would do as well); its children inherit the cgroup.
        check(wr, ST_CGROUP, nix::unistd::write(f, b"0"));
    }
    check(wr, ST_NETNS, setns(&p.netns, CloneFlags::CLONE_NEWNET));
    check(
        wr,
        ST_UNSHARE,
        unshare(
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS,
        ),
    );
    // As for the first fork: only system calls on prepared data follow in
    // the child.
    match sys::fork() {
        Ok(ForkResult::Child) => node_init(p, wr),
        Ok(ForkResult::Parent { child }) => {
            // `child` is the host pid: this process is still in the
            // machine's pid namespace (unshare moves only its children).
            report(wr, TAG_PID, child.as_raw(), 0);
            sys::exit_now(0)
        }
        Err(e) => {
            report(
                wr,
                TAG_ERR,
                ST_FORK,
                crate::sys::errno(&e).unwrap_or(libc::EIO),
            );
            sys::exit_now(1)
        }
    }
}

/// Pid 1 of the node: private mounts, its own session, then the agent.
fn node_init(p: &Prepared, wr: &OwnedFd) -> ! {
    let none = None::<&str>;
    let tmpfs_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // First of all: nothing done below may propagate to the machine.
    check(
        wr,
        ST_PRIVATE,
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none),
    );
    // The named namespaces (all nodes' and the bridge's) are not the
    // node's business; ignore the error if there is no such mount.
    let _ = umount2(NETNS_DIR, MntFlags::MNT_DETACH);
    check(
        wr,
        ST_PROC,
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            none,
        ),
    );
    check(
        wr,
        ST_RUN,
        mount(
            Some("tmpfs"),
            NODE_RUN_DIR,
            Some("tmpfs"),
            tmpfs_flags,
            Some("mode=0755"),
        ),
    );
    // The krg checkout, if it lives under /tmp, is part of the shared
    // image: park a bind mount of it in the (new, private) run directory,
    // then move it into the node's own /tmp.
    if let Some(keep) = &p.keep_tmp {
        check(
            wr,
            ST_KEEPTMP,
            mkdir(TMP_STAGE, Mode::from_bits_truncate(0o755)),
        );
        check(
            wr,
            ST_KEEPTMP,
            mount(
                Some(keep.as_path()),
                TMP_STAGE,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            ),
        );
    }
    check(
        wr,
        ST_TMP,
        mount(
            Some("tmpfs"),
            "/tmp",
            Some("tmpfs"),
            tmpfs_flags,
            Some("mode=1777"),
        ),
    );
    if let Some(keep) = &p.keep_tmp {
        check(
            wr,
            ST_KEEPTMP,
            mkdir(keep.as_path(), Mode::from_bits_truncate(0o755)),
        );
        check(
            wr,
            ST_KEEPTMP,
            mount(
                Some(TMP_STAGE),
                keep.as_path(),
                none,
                MsFlags::MS_MOVE,
                none,
            ),
        );
        let r = std::fs::remove_dir(TMP_STAGE)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)));
        check(wr, ST_KEEPTMP, r);
    }
    check(
        wr,
        ST_SHM,
        mount(
            Some("tmpfs"),
            "/dev/shm",
            Some("tmpfs"),
            tmpfs_flags,
            Some("mode=1777"),
        ),
    );
    check(
        wr,
        ST_STATEDIR,
        mkdir("/run/krg/state", Mode::from_bits_truncate(0o755)),
    );
    // Every node's name resolves on every node, its own included, as a
    // cluster's DNS would have it (Java's InetAddress.getLocalHost failed:
    // "UnknownHostException: krg-n2"). Read-only: the file is the
    // instance's, and a node must not write what the others read.
    if let Some(hosts) = &p.hosts {
        check(
            wr,
            ST_HOSTS,
            mount(
                Some(hosts.as_path()),
                "/etc/hosts",
                none,
                MsFlags::MS_BIND,
                none,
            ),
        );
        check(
            wr,
            ST_HOSTS,
            mount(
                none,
                "/etc/hosts",
                none,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                none,
            ),
        );
    }
    check(wr, ST_HOSTNAME, sethostname(&p.hostname));
    // Do not pin the caller's current directory.
    check(wr, ST_CHDIR, chdir("/"));
    check(wr, ST_SETSID, setsid());
    check(wr, ST_STDIO, dup2(p.devnull.as_raw_fd(), 0));
    check(wr, ST_STDIO, dup2(p.log.as_raw_fd(), 1));
    check(wr, ST_STDIO, dup2(p.log.as_raw_fd(), 2));
    // Whatever the caller left open (without close-on-exec) is not the
    // agent's: mark every fd from 3 on close-on-exec. Failure (a kernel
    // without close_range) only leaks descriptors.
    let _ = sys::cloexec_from(3);
    // A clean signal state for the agent: nothing blocked, SIGPIPE back to
    // its default (Rust programs ignore it, and ignoring survives exec).
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let _ = crate::sys::default_signal(Signal::SIGPIPE);
    let e = sys::execve(&p.agent, &p.argv, &p.envp);
    report(
        wr,
        TAG_ERR,
        ST_EXEC,
        crate::sys::errno(&e).unwrap_or(libc::EIO),
    );
    sys::exit_now(127)
}

/// Whether `path` exists and is a regular file.
pub(super) fn is_file(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file())
}
