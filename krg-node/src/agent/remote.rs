//! Remote exec, agent side (the library side is `libkrg::distant`).
//!
//! On the shadow's node: `RemoteExec` from a registered SSI process is
//! turned into a [`SpawnSpec`] (credentials from the kernel, never from the
//! message) and sent to the target node. On the target node: connect back
//! to the shadow (control stream + one stream per relayed stdio fd), start
//! the program with the caller's identity, register it under its gpid, wait
//! for it in a thread and send its wait status to the shadow.

use super::common::{err, Caller, Handled};
use super::node::Node;
use super::peer::remote::SpawnSpec;
use super::procs::table::read_stat;
use super::sched::Scheduler;
use super::stay::Stay;
use super::streams::Streams;
use libkrg::caps::Caps;
use libkrg::proto::{ErrorReply, RemoteExec, Request, Response, StdioKind};
use std::ffi::OsStr;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Longest a remote spawn may take (connecting back to the shadow,
/// starting the program), besides waiting for the pipes it takes over.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(15);

/// A program's environment, built as `Command::env` would (a later value
/// of a name replaces the earlier one).
#[derive(Default)]
struct Env(Vec<Vec<u8>>);

impl Env {
    fn set(&mut self, name: &[u8], value: &[u8]) {
        self.0
            .retain(|e| !(e.starts_with(name) && e.get(name.len()) == Some(&b'=')));
        let mut e = name.to_vec();
        e.push(b'=');
        e.extend_from_slice(value);
        self.0.push(e);
    }
}

/// Effective uid, effective gid and supplementary groups of a local pid.
pub(super) fn creds(kpid: i32) -> Option<(u32, u32, Vec<u32>)> {
    let s = std::fs::read_to_string(format!("/proc/{kpid}/status")).ok()?;
    let field = |name: &str| -> Vec<u32> {
        s.lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let uid = *field("Uid:").get(1)?;
    let gid = *field("Gid:").get(1)?;
    Some((uid, gid, field("Groups:")))
}

/// A local request about remote exec (see `Agent::handle_local`).
pub(super) async fn handle(remote: &Arc<Remote>, req: Request, who: Caller) -> Handled {
    match req {
        Request::PlaceExec {
            exe,
            argv,
            caps_env,
            pinned,
        } => remote.place_exec(who, exe, argv, caps_env, pinned).await,
        Request::RemoteExec(spec) => Ok(Response::Pid(remote.remote_exec(who, spec).await?)),
        other => Err(super::common::misrouted(&other)),
    }
}

/// Remote exec, both sides: placing a program and starting it for a
/// shadow elsewhere (the caller), and starting one here for a shadow.
#[derive(Debug)]
pub struct Remote {
    node: Arc<Node>,
    sched: Arc<Scheduler>,
    stay: Arc<Stay>,
    streams: Arc<Streams>,
}

impl Remote {
    pub fn new(
        node: Arc<Node>,
        sched: Arc<Scheduler>,
        stay: Arc<Stay>,
        streams: Arc<Streams>,
    ) -> Remote {
        Remote {
            node,
            sched,
            stay,
            streams,
        }
    }

    /// `PlaceExec`: where the caller's next program runs, decided before
    /// its `execve`.
    async fn place_exec(
        &self,
        who: Caller,
        exe: Vec<u8>,
        argv: Vec<Vec<u8>>,
        caps_env: Option<String>,
        pinned: Option<u32>,
    ) -> Result<Response, ErrorReply> {
        let kpid = who.kpid()?;
        // The caps the new program will have (its KRG_CAPS).
        let (gpid, caps) = {
            let mut t = self.node.procs();
            let p = t.register(kpid, Some(caps_env))?;
            (p.gpid, p.caps_eff)
        };
        let place = if caps.contains(Caps::DISTANT_FORK) {
            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            self.sched
                .placement_of(kpid, pinned, s(&exe), argv.iter().map(|a| s(a)).collect())
        } else {
            0
        };
        let place = self.stay.place_or_stay(gpid, kpid, place).await;
        let remote = place != 0 && place != self.node.cfg.node_id;
        if let Some(p) = self.node.procs().get_mut(gpid) {
            // Here: its Hello is not placed again.
            p.skip_place = !remote;
        }
        Ok(Response::Hello {
            gpid,
            node: self.node.cfg.node_id,
            caps: caps.0,
            place: if remote { place } else { 0 },
            spread: !self.sched.is_local(),
        })
    }

    /// `RemoteExec` from a local process: start its program on `spec.node`.
    async fn remote_exec(&self, who: Caller, spec: RemoteExec) -> Result<i32, ErrorReply> {
        let r = self.remote_exec_inner(who, spec).await;
        // Started there (a shadow now) or running here: settled either way.
        let mut t = self.node.procs();
        if let Some(g) = t.translate(who.pid) {
            if let Some(p) = t.get_mut(g) {
                p.placing = false;
            }
        }
        r
    }

    async fn remote_exec_inner(&self, who: Caller, spec: RemoteExec) -> Result<i32, ErrorReply> {
        who.kpid()?;
        let node = spec.node;
        if node == self.node.node_id() {
            return Err(err(libc::EINVAL, format!("node {node} is this node")));
        }
        if !self.node.is_up(node) {
            return Err(err(libc::EHOSTDOWN, format!("node {node} is down")));
        }
        let (g, caps_eff, caps_inh, caps_env, vppid, vpgid) = {
            let t = self.node.procs();
            let g = t.translate(who.pid).ok_or_else(|| {
                err(
                    libc::EPERM,
                    format!("kernel pid {} is not an SSI process", who.pid),
                )
            })?;
            let p = t.get(g).expect("translated gpid is in the table");
            let st = read_stat(who.pid).ok_or_else(|| err(libc::ESRCH, "caller exited"))?;
            // A caller that is itself a program started here for a shadow
            // passes on the parent and group it shows.
            let vppid = p.vppid.unwrap_or_else(|| {
                if st.ppid > 0 {
                    t.translate(st.ppid).unwrap_or(0)
                } else {
                    0
                }
            });
            let vpgid = p.vpgid.unwrap_or_else(|| t.translate(st.pgrp).unwrap_or(g));
            (
                g,
                p.caps_eff.0,
                p.caps_inh.0,
                p.caps_env.clone(),
                vppid,
                vpgid,
            )
        };
        let (uid, gid, groups) = creds(who.pid)
            .ok_or_else(|| err(libc::ESRCH, format!("pid {g}: cannot read its credentials")))?;
        // A migrating parent: its children stay here, each to be stood for
        // by a child shadow there.
        let children = if spec.restore {
            // A child not known yet may be one still starting: the shadow
            // of a child that a restored parent starts for each child it
            // left on its old node registers a moment after the parent
            // runs (a shell moved twice in a row met its own child shadow
            // unregistered under load). Waited for a little.
            let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                let r = {
                    let t = self.node.procs();
                    super::children::children_gpids(who.pid, |k| t.translate(k))
                };
                match r {
                    Ok(c) => break c,
                    Err(_) if std::time::Instant::now() < until => {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await
                    }
                    Err(k) => {
                        return Err(err(
                            libc::EBUSY,
                            format!("pid {g}: its child (kernel pid {k} here) is not an SSI process: it could not be waited for from another node"),
                        ))
                    }
                }
            }
        } else {
            Vec::new()
        };
        let full = SpawnSpec {
            gpid: g,
            from: self.node.node_id(),
            uid,
            gid,
            groups,
            caps_eff,
            caps_inh,
            caps_env,
            vppid,
            vpgid,
            shadow: SocketAddr::new(self.node.cfg.advertise.ip(), spec.port),
            restore: None,
            children,
            exec: spec,
        };
        // A spawn that takes over pipes waits there for their other ends
        // (up to a hand-over's timeout): giving up sooner here would leave
        // the program started there with those pipes while this side
        // reconnects them ("already handed over"), or lose them.
        let takes_streams = full
            .exec
            .stdio
            .iter()
            .any(|k| matches!(k, StdioKind::Stream { .. }));
        let wait = if takes_streams {
            super::streams::HANDOVER_TIMEOUT + SPAWN_TIMEOUT
        } else {
            SPAWN_TIMEOUT
        };
        let c = self.node.client(node).await?;
        let mut cx = tarpc::context::current();
        cx.deadline = std::time::Instant::now() + wait;
        let (kpid, _) = c
            .spawn(cx, full)
            .await
            .map_err(|e| err(libc::EHOSTUNREACH, format!("node {node}: {e}")))??;
        self.node.procs().set_shadow(g, node);
        let origin = libkrg::gpid::node_of(g).unwrap_or(0);
        if origin == self.node.node_id() {
            self.node.procs().set_location(g, node);
        } else if let Ok(oc) = self.node.client(origin).await {
            let _ = oc.set_location(super::common::ctx(), g, node).await;
        }
        info!("pid {g} runs on node {node} (kernel pid {kpid} there); its shadow stays here");
        Ok(kpid)
    }

    /// Target side: start the program (or restore the image) for a shadow
    /// on `spec.from`. Answers its kernel pid here and its gpid.
    pub(super) async fn spawn_here(
        self: &Arc<Self>,
        mut spec: SpawnSpec,
    ) -> Result<(i32, i32), ErrorReply> {
        tracing::debug!("pid {}: spawn request from node {}", spec.gpid, spec.from);
        if spec.exec.token.len() != 16 {
            return Err(err(libc::EINVAL, "bad shadow token"));
        }
        // Connect back to the shadow: a control stream and one stream per
        // relayed fd, all at once (each costs a round trip).
        let relayed: Vec<u8> = spec
            .exec
            .stdio
            .iter()
            .take(3)
            .enumerate()
            .filter(|(_, k)| **k == StdioKind::Relay)
            .map(|(i, _)| 1 + i as u8)
            .collect();
        let (control, streams) = futures::future::join(
            connect_shadow(spec.shadow, &spec.exec.token, 0),
            futures::future::join_all(
                relayed
                    .iter()
                    .map(|ch| connect_shadow(spec.shadow, &spec.exec.token, *ch)),
            ),
        )
        .await;
        let mut control = control?;
        // A migration: the image arrives on one more connection, handed to
        // the restoring process as fd 3.
        let image_stream = if spec.exec.restore {
            Some(connect_shadow(spec.shadow, &spec.exec.token, libkrg::proto::IMAGE_CHANNEL).await?)
        } else {
            None
        };
        tracing::debug!("pid {}: shadow streams connected", spec.gpid);
        let mut streams = relayed
            .into_iter()
            .zip(streams)
            .map(|(ch, r)| r.map(|s| (ch, s)))
            .collect::<Result<std::collections::HashMap<u8, std::net::TcpStream>, ErrorReply>>()?;
        let mut fds: Vec<Option<OwnedFd>> = Vec::new();
        // A second handle on a file stdin's open file description: its
        // offset after the program ends is where the shadow continues.
        let mut stdin_file: Option<std::fs::File> = None;
        for (i, k) in spec.exec.stdio.iter().enumerate().take(3) {
            fds.push(match k {
                StdioKind::Relay => streams.remove(&(1 + i as u8)).map(OwnedFd::from),
                StdioKind::DevNull => Some(
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open("/dev/null")
                        .map_err(|e| err(libc::EIO, format!("/dev/null: {e}")))?
                        .into(),
                ),
                StdioKind::Closed => None,
                // Attached below, once nothing else can fail.
                StdioKind::Stream { .. } | StdioKind::Alias(_) => None,
                StdioKind::File(f) => {
                    let (fd, keep) = open_stdin_file(f, self.node.node_id())?;
                    stdin_file = Some(keep);
                    Some(fd)
                }
            });
        }
        let exe = OsStr::from_bytes(&spec.exec.exe).to_owned();
        let mut env = Env::default();
        for e in &spec.exec.env {
            if let Some(eq) = e.iter().position(|c| *c == b'=') {
                env.set(&e[..eq], &e[eq + 1..]);
            }
        }
        if let Some(image) = &spec.restore {
            env.set(libkrg::checkpoint::restore::RESTORE_ENV.as_bytes(), image);
        } else if image_stream.is_some() {
            env.set(libkrg::checkpoint::restore::RESTORE_ENV.as_bytes(), b"fd:3");
        }
        if spec.restore.is_some() || image_stream.is_some() {
            // Without libkrg the restorer would run the program afresh:
            // make sure it is preloaded (the image's environment may have
            // had it linked instead, or lost it).
            let current = spec
                .exec
                .env
                .iter()
                .find_map(|e| e.strip_prefix(b"LD_PRELOAD="))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            if !current.contains("libkrg.so") {
                let so = std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(|d| d.join("libkrg.so")))
                    .filter(|p| p.exists());
                match so {
                    Some(so) if current.is_empty() => {
                        env.set(b"LD_PRELOAD", so.as_os_str().as_bytes());
                    }
                    Some(so) => {
                        env.set(
                            b"LD_PRELOAD",
                            format!("{}:{current}", so.display()).as_bytes(),
                        );
                    }
                    None => {
                        return Err(err(
                            libc::ENOENT,
                            format!(
                                "node {}: libkrg.so is not next to krg-node: cannot restore",
                                self.node.node_id()
                            ),
                        ))
                    }
                }
            }
        }
        // Post-copy: /dev/userfaultfd is root's only; this agent opens it
        // and hands it to the restorer as fd 4 (`KRG_UFFD`), which makes
        // its own userfaultfd from it. Without it the source sends the
        // whole memory before the process resumes.
        let uffd_dev: Option<OwnedFd> = if image_stream.is_some() {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
            {
                Ok(f) => Some(f.into()),
                Err(e) => {
                    warn!(
                        "pid {}: /dev/userfaultfd: {e}: migration without post-copy",
                        spec.gpid
                    );
                    None
                }
            }
        } else {
            None
        };
        let postcopy = uffd_dev.is_some();
        if postcopy {
            env.set(libkrg::checkpoint::restore::UFFD_ENV.as_bytes(), b"4");
        }
        let cwd = OsStr::from_bytes(&spec.exec.cwd).to_owned();
        if !std::path::Path::new(&cwd).is_dir() {
            return Err(err(
                libc::ENOENT,
                format!(
                    "node {}: working directory {} does not exist here",
                    self.node.node_id(),
                    std::path::Path::new(&cwd).display()
                ),
            ));
        }
        if spec
            .exec
            .stdio
            .iter()
            .any(|k| matches!(k, StdioKind::Stream { .. }))
        {
            // Checked before taking the streams (spawn would say it too
            // late: the other ends' new connections would be lost).
            use std::os::unix::fs::PermissionsExt;
            let runnable = std::fs::metadata(&exe)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            if !runnable {
                return Err(err(
                    libc::ENOENT,
                    format!(
                        "node {}: {} is not an executable file here",
                        self.node.node_id(),
                        std::path::Path::new(&exe).display()
                    ),
                ));
            }
        }
        // Pipes handed over by the shadow: this node connects to the
        // process at their other end (no relay), refilled with what was in
        // the pipe for the program. Last: attaching takes the other end's
        // new connection, which a failure here would lose.
        let mut pipe_fds: Vec<String> = Vec::new();
        for i in 0..fds.len().min(3) {
            if let StdioKind::Stream {
                id,
                node,
                pending,
                wr_shut,
            } = &mut spec.exec.stdio[i]
            {
                let (_, mut v) = self
                    .streams
                    .stream_attach(*id, *node, std::mem::take(pending), *wr_shut, true)
                    .await?;
                fds[i] = v.pop();
                pipe_fds.push(i.to_string());
            }
        }
        for i in 0..fds.len().min(3) {
            if let StdioKind::Alias(j) = spec.exec.stdio[i] {
                // `2>&1`: the same stream (relayed or attached) on both.
                fds[i] = fds
                    .get(j as usize)
                    .and_then(|f| f.as_ref())
                    .and_then(|f| f.try_clone().ok());
                if matches!(
                    spec.exec.stdio.get(j as usize),
                    Some(StdioKind::Stream { .. })
                ) {
                    pipe_fds.push(i.to_string());
                }
            }
        }
        if !pipe_fds.is_empty() {
            env.set(
                libkrg::streams::placed::PIPE_FDS_ENV.as_bytes(),
                pipe_fds.join(",").as_bytes(),
            );
        }
        let cstr = |b: &[u8], what: &str| {
            std::ffi::CString::new(b).map_err(|_| {
                err(
                    libc::EINVAL,
                    format!("{what} {:?} holds a NUL byte", String::from_utf8_lossy(b)),
                )
            })
        };
        let mut prog_fds: [Option<OwnedFd>; 5] = Default::default();
        for (i, f) in fds.into_iter().enumerate().take(3) {
            prog_fds[i] = f;
        }
        prog_fds[3] = image_stream.map(OwnedFd::from);
        prog_fds[4] = uffd_dev;
        let program = super::sys::spawn::Program {
            exe: cstr(exe.as_bytes(), "executable")?,
            argv: spec
                .exec
                .argv
                .iter()
                .map(|a| cstr(a, "argument"))
                .collect::<Result<_, _>>()?,
            env: env
                .0
                .iter()
                .map(|e| cstr(e, "environment variable"))
                .collect::<Result<_, _>>()?,
            cwd: cstr(cwd.as_bytes(), "working directory")?,
            fds: prog_fds,
            umask: spec.exec.umask,
            rlimits: spec.exec.rlimits.clone(),
            uid: spec.uid,
            gid: spec.gid,
            groups: spec.groups.clone(),
            ignored: spec.exec.ignored,
        };
        let node = self.node.node_id();
        let mut g = spec.gpid;
        let restoring = spec.restore.is_some() || spec.exec.restore;
        // Spawn and register under the reaper's lock: the child can neither
        // be reaped by the pid-1 reaper nor say Hello before it is known.
        let kpid = {
            let mut reaper = crate::reaper::managed_lock();
            let kpid = super::sys::spawn::spawn(&program).map_err(|e| {
                err(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!(
                        "node {node}: cannot run {}: {e}",
                        std::path::Path::new(&exe).display()
                    ),
                )
            })?;
            drop(program);
            crate::reaper::manage_locked(&mut reaper, kpid);
            let r = {
                let mut t = self.node.procs();
                if g == 0 {
                    t.alloc_for(kpid).map(|n| g = n)
                } else {
                    Ok(())
                }
                .and_then(|()| {
                    t.register_remote(
                        kpid,
                        g,
                        Caps::from_bits(spec.caps_eff),
                        Caps::from_bits(spec.caps_inh),
                        spec.caps_env.clone(),
                        spec.vppid,
                        if spec.vpgid == 0 { g } else { spec.vpgid },
                    )
                })
                .map(|()| {
                    if restoring {
                        // It runs libkrg (the image did), and never says
                        // Hello: it asks Whoami.
                        if let Some(p) = t.get_mut(g) {
                            p.adopt = spec.children.clone();
                            p.adopt_from = spec.from;
                            p.greeted = true;
                            p.restoring = true;
                            p.postcopy = postcopy;
                            p.command = Some(
                                spec.exec
                                    .argv
                                    .iter()
                                    .map(|a| String::from_utf8_lossy(a).into_owned())
                                    .collect::<Vec<_>>()
                                    .join(" "),
                            );
                        }
                    }
                })
            };
            if let Err(e) = r {
                // The child we just started, not reaped yet.
                let _ = super::sys::kill(kpid, libc::SIGKILL);
                drop(reaper);
                let _ = super::sys::wait_status(kpid);
                crate::reaper::unmanage(kpid);
                return Err(e);
            }
            kpid
        };
        info!(
            "pid {g}: {} here (kernel pid {kpid}) for its shadow on node {}",
            if restoring { "restoring" } else { "started" },
            spec.from
        );
        let agent = self.clone();
        let origin = libkrg::gpid::node_of(g).unwrap_or(0);
        let handle = tokio::runtime::Handle::current();
        let _ = std::thread::Builder::new()
            .name(format!("krg-wait-{kpid}"))
            .spawn(move || {
                let status = match super::sys::wait_status(kpid) {
                    Ok(st) => st,
                    Err(e) => {
                        warn!("pid {g}: waiting for kernel pid {kpid}: {e}");
                        // Unknown end: report a kill.
                        libc::SIGKILL
                    }
                };
                crate::reaper::unmanage(kpid);
                let offset: i64 = match &mut stdin_file {
                    Some(f) => std::io::Seek::stream_position(f)
                        .map(|o| o as i64)
                        .unwrap_or(-1),
                    None => -1,
                };
                let mut msg = [0u8; 12];
                msg[..4].copy_from_slice(&status.to_le_bytes());
                msg[4..].copy_from_slice(&offset.to_le_bytes());
                let _ = control.set_nonblocking(false);
                let _ = control.write_all(&msg);
                drop(control);
                // The origin stops routing to this node.
                if origin != 0 && origin != agent.node.node_id() {
                    handle.spawn(async move {
                        if let Ok(c) = agent.node.client(origin).await {
                            let _ = c.set_location(super::common::ctx(), g, origin).await;
                        }
                    });
                } else {
                    agent.node.procs().set_location(g, origin);
                }
            });
        Ok((kpid, g))
    }
}

/// Open a file stdin here: the very file the shadow has (same device and
/// inode), at its offset. Returns the fd for the program and a handle on the
/// same open file description for the agent.
fn open_stdin_file(
    f: &libkrg::proto::FileRef,
    node: u32,
) -> Result<(OwnedFd, std::fs::File), ErrorReply> {
    use std::io::Seek;
    use std::os::unix::fs::MetadataExt;
    let path = std::path::Path::new(OsStr::from_bytes(&f.path));
    let mut file = std::fs::File::open(path).map_err(|e| {
        err(
            libc::EXDEV,
            format!(
                "node {node}: stdin file {} is not here: {e}",
                path.display()
            ),
        )
    })?;
    let md = file
        .metadata()
        .map_err(|e| err(libc::EIO, format!("{}: {e}", path.display())))?;
    if md.dev() != f.dev || md.ino() != f.ino {
        return Err(err(
            libc::EXDEV,
            format!(
                "node {node}: {} is another file here than on the parent's node",
                path.display()
            ),
        ));
    }
    file.seek(std::io::SeekFrom::Start(f.offset))
        .map_err(|e| err(libc::EIO, format!("{}: {e}", path.display())))?;
    let keep = file
        .try_clone()
        .map_err(|e| err(libc::EIO, format!("{}: {e}", path.display())))?;
    Ok((file.into(), keep))
}

async fn connect_shadow(
    addr: SocketAddr,
    token: &[u8],
    ch: u8,
) -> Result<std::net::TcpStream, ErrorReply> {
    let s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| {
            err(
                libc::ETIMEDOUT,
                format!("connecting back to the shadow at {addr}: timed out"),
            )
        })?
        .map_err(|e| {
            err(
                libc::EHOSTUNREACH,
                format!("connecting back to the shadow at {addr}: {e}"),
            )
        })?;
    let _ = s.set_nodelay(true);
    let mut hello = token.to_vec();
    hello.push(ch);
    let mut s = s
        .into_std()
        .map_err(|e| err(libc::EIO, format!("shadow stream: {e}")))?;
    s.set_nonblocking(false)
        .map_err(|e| err(libc::EIO, format!("shadow stream: {e}")))?;
    s.write_all(&hello)
        .map_err(|e| err(libc::EIO, format!("shadow stream to {addr}: {e}")))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_credentials() {
        let (uid, gid, _) = creds(std::process::id() as i32).unwrap();
        assert_eq!(uid, nix::unistd::geteuid().as_raw());
        assert_eq!(gid, nix::unistd::getegid().as_raw());
    }
}
