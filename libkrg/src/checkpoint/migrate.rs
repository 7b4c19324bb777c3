//! Live migration, in the leader of a capture: the image goes straight
//! down a TCP connection to the target node (no disk), where the agent
//! feeds it to a restoring instance of the program; this process then
//! stays behind as the program's *shadow* (the parent's child: it relays
//! the stdio that cannot move, forwards signals and ends like the program;
//! see `crate::distant`). To give its memory back at once it re-executes
//! itself in shadow mode (`KRG_SHADOW`), which also ends its other threads.

use super::image::FdKind;
use super::{capture, report, Order, ANCHOR};
use crate::distant::{self, Listener, SHADOW_ENV};
use crate::proto::{RemoteExec, Request, Response, StdioKind, IMAGE_CHANNEL};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicI32;

/// Take the image and send it to `order.node`. Never returns once the
/// image is sent; an error means nothing changed (the process goes on).
pub(super) fn out(order: &Order) -> Result<u64, String> {
    let threads = super::capture_threads()?;
    let maps_text = capture::read_file("/proc/self/maps")?;
    let maps = capture::parse_maps(&String::from_utf8_lossy(&maps_text));
    let arena = super::alloc::range();
    let (regions, runs) = capture::regions(&maps, &[arena])?;
    // The fds, before this side's own sockets exist.
    let fds = capture::capture_fds(&[])?;
    let mem: u64 = runs.iter().map(|r| r.1).sum();
    let mut meta = capture::meta(
        &maps,
        regions.clone(),
        threads,
        fds,
        mem,
        &ANCHOR as *const AtomicI32 as u64,
    )?;
    // Stdin, stdout and stderr stay with the shadow, whatever they are
    // (a file here may not exist there; a file shared with the parent keeps
    // its one offset): the target gets relayed streams. Devices that mean
    // the same everywhere are simply reopened there.
    for f in meta.fds.iter_mut().filter(|f| f.fd <= 2) {
        if !matches!(f.kind, FdKind::Device { .. }) {
            f.kind = FdKind::Relay;
        }
    }
    // TCP connections to other SSI processes: freeze their peers and drain
    // both sides; from here on, a failure must hand them back here.
    move_streams(&mut meta.fds)?;
    match send(order, &meta, &regions, &runs) {
        Ok((bytes, conns)) => {
            // The old ends of moved sockets stay out of the shadow.
            for f in &meta.fds {
                if matches!(f.kind, FdKind::Tcp { .. } | FdKind::TcpListen { .. }) {
                    // SAFETY: closes our own fd; nothing uses it any more.
                    unsafe { libc::close(f.fd) };
                }
            }
            report(true, String::new(), bytes);
            become_shadow(
                meta.gpid, order.node, &meta.exe, &meta.argv, &meta.env, conns,
            )
        }
        Err(e) => {
            reattach_streams(&meta.fds);
            Err(e)
        }
    }
}

/// Freeze the peer of each TCP connection and drain it (the bytes in
/// flight for this process go in the image). Fds that are copies of one
/// connection (`dup`) move once. On a failure the streams already taken
/// are reconnected here.
fn move_streams(fds: &mut [super::image::FdState]) -> Result<(), String> {
    use crate::streams::moving;
    let mut seen: Vec<(u64, i32)> = Vec::new();
    for i in 0..fds.len() {
        let fd = fds[i].fd;
        if !matches!(fds[i].kind, FdKind::Tcp { .. }) {
            continue;
        }
        let ino = sock_ino(fd);
        if let Some(&(_, first)) = seen.iter().find(|(n, _)| Some(*n) == ino) {
            if let FdKind::Tcp { alias_of, .. } = &mut fds[i].kind {
                *alias_of = first;
            }
            continue;
        }
        let r = moving::tcp_ends(fd)
            .ok_or_else(|| format!("fd {fd}: the TCP connection is not connected"))
            .and_then(|(l, p)| moving::freeze(fd, l, p));
        let (sid, snode) = match r {
            Ok(x) => x,
            Err(e) => {
                reattach_streams(&fds[..i]);
                return Err(e);
            }
        };
        if let Some(n) = ino {
            seen.push((n, fd));
        }
        // Frozen peer: from now on this stream is handed over, here or
        // there, whatever happens.
        let drained = moving::drain(fd);
        if let FdKind::Tcp {
            id,
            node,
            pending,
            wr_shut,
            ..
        } = &mut fds[i].kind
        {
            *id = sid;
            *node = snode;
            if let Ok((p, w)) = &drained {
                *pending = p.clone();
                *wr_shut = *w;
            }
        }
        if let Err(e) = drained {
            reattach_streams(&fds[..=i]);
            return Err(e);
        }
    }
    // Listening sockets: closed here now (the port must be free for the new
    // node to bind it), made again there.
    for f in fds.iter() {
        if matches!(f.kind, FdKind::TcpListen { .. }) {
            if let Err(e) = park_fd(f.fd) {
                reattach_streams(fds);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The listening socket an image fd describes.
pub(crate) fn listening_of(k: &FdKind) -> Option<crate::streams::moving::Listening> {
    let FdKind::TcpListen {
        addr,
        v6only,
        reuseaddr,
        reuseport,
        backlog,
        flags,
    } = k
    else {
        return None;
    };
    Some(crate::streams::moving::Listening {
        addr: addr.parse().ok()?,
        v6only: *v6only,
        reuseaddr: *reuseaddr,
        reuseport: *reuseport,
        backlog: *backlog,
        flags: *flags,
    })
}

/// Close what `fd` holds but keep the number taken (by `/dev/null`), so
/// that nothing the capture opens lands there before a rollback.
fn park_fd(fd: i32) -> Result<(), String> {
    // SAFETY: opens /dev/null and puts it under our fd number.
    let ok = unsafe {
        let n = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        n >= 0 && libc::dup3(n, fd, libc::O_CLOEXEC) >= 0 && libc::close(n) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(format!("fd {fd}: {}", std::io::Error::last_os_error()))
    }
}

fn sock_ino(fd: i32) -> Option<u64> {
    // SAFETY: st is ours; fstat only reads the fd's state.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
}

/// The migration failed after its connections were drained: connect them
/// again from here, refilled, under their numbers.
fn reattach_streams(fds: &[super::image::FdState]) {
    use crate::streams::moving;
    for f in fds {
        if let Some(l) = listening_of(&f.kind) {
            // Closed by the move: make it again here, if it was.
            let parked = std::fs::read_link(format!("/proc/self/fd/{}", f.fd))
                .is_ok_and(|p| p.as_os_str() == "/dev/null");
            if parked {
                let r = crate::streams::moving::relisten(&l).and_then(|s| {
                    let fl = if f.cloexec { libc::O_CLOEXEC } else { 0 };
                    // SAFETY: puts our new socket under the old number.
                    if unsafe { libc::dup3(std::os::fd::AsRawFd::as_raw_fd(&s), f.fd, fl) } < 0 {
                        Err(format!("dup3: {}", std::io::Error::last_os_error()))
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = r {
                    crate::krg_log!(
                        crate::log::Level::Warn,
                        "fd {}: listening again after a failed migration: {e}",
                        f.fd
                    );
                }
            }
            continue;
        }
        let FdKind::Tcp {
            id,
            node,
            pending,
            wr_shut,
            flags,
            nodelay,
            keepalive,
            alias_of,
        } = &f.kind
        else {
            continue;
        };
        let r = if *alias_of >= 0 {
            // SAFETY: makes our fd a copy of another of ours.
            if unsafe { libc::dup3(*alias_of, f.fd, 0) } < 0 {
                Err(format!("dup3: {}", std::io::Error::last_os_error()))
            } else {
                Ok(())
            }
        } else if *id == 0 {
            continue;
        } else {
            moving::attach(*id, *node, pending.clone(), *wr_shut).and_then(|new| {
                moving::apply(
                    &new,
                    &moving::Opts {
                        flags: *flags,
                        nodelay: *nodelay,
                        keepalive: *keepalive,
                    },
                );
                moving::install(f.fd, new)
            })
        };
        if let Err(e) = r {
            crate::krg_log!(
                crate::log::Level::Warn,
                "fd {}: reconnecting after a failed migration: {e}",
                f.fd
            );
        }
    }
}

/// Send the image to `order.node`; the byte count and this side's
/// connections to the restored program (stdio relays).
fn send(
    order: &Order,
    meta: &super::image::Meta,
    regions: &[super::image::Region],
    runs: &[(u64, u64)],
) -> Result<(u64, Vec<(u8, OwnedFd)>), String> {
    let listener = Listener::new()?;
    let mut token = [0u8; 16];
    // SAFETY: getrandom writes at most token.len() bytes into token.
    if unsafe { libc::getrandom(token.as_mut_ptr().cast(), token.len(), 0) } != 16 {
        return Err("getrandom failed".into());
    }
    // Stdio that is a terminal, pipe or socket stays here and is relayed;
    // files and devices are reopened there from the image.
    let stdio: Vec<StdioKind> = (0..3)
        .map(
            |i| match meta.fds.iter().find(|f| f.fd == i).map(|f| &f.kind) {
                Some(FdKind::Relay) => StdioKind::Relay,
                _ => StdioKind::Closed,
            },
        )
        .collect();
    let req = RemoteExec {
        node: order.node,
        exe: meta.exe.clone(),
        argv: meta.argv.clone(),
        env: meta.env.clone(),
        cwd: meta.cwd.clone(),
        umask: meta.umask,
        rlimits: meta.rlimits.clone(),
        stdio: stdio.clone(),
        port: listener.port,
        token: token.to_vec(),
        restore: true,
    };
    match crate::client::call(&Request::RemoteExec(req)) {
        Ok(Response::Pid(_)) => {}
        Ok(other) => return Err(format!("unexpected answer {other:?}")),
        Err(e) => return Err(format!("node {}: {e}", order.node)),
    }
    let relayed = stdio.iter().filter(|k| **k == StdioKind::Relay).count();
    let mut conns = listener.accept_all(&token, 2 + relayed);
    let Some(i) = conns.iter().position(|(ch, _)| *ch == IMAGE_CHANNEL) else {
        return Err(format!(
            "node {} did not connect back for the image",
            order.node
        ));
    };
    let (_, image) = conns.remove(i);
    // SAFETY: blocking mode on our own socket.
    unsafe { libc::fcntl(image.as_raw_fd(), libc::F_SETFL, 0) };
    let bytes = match capture::write_image(image.as_raw_fd(), meta, regions, runs) {
        Ok(b) => b,
        // The restorer says why it gave up on the same connection.
        Err(e) => return Err(why_refused(&image).unwrap_or(e)),
    };
    // SAFETY: half-close our socket: the target sees the end of the image.
    unsafe { libc::shutdown(image.as_raw_fd(), libc::SHUT_WR) };
    drop(image);
    Ok((bytes, conns))
}

/// The restorer's last words on the image connection, if any.
fn why_refused(image: &OwnedFd) -> Option<String> {
    let mut buf = [0u8; 1024];
    let mut got = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while got < buf.len() && std::time::Instant::now() < deadline {
        let mut p = libc::pollfd {
            fd: image.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 200) } <= 0 {
            continue;
        }
        // SAFETY: reads into the rest of our buffer.
        let n = unsafe {
            libc::read(
                image.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    let s = String::from_utf8_lossy(&buf[..got]);
    s.strip_prefix(super::restore::REFUSAL)
        .map(|m| m.trim().to_string())
}

/// Re-execute as the shadow of the migrated program, keeping only the
/// connections to it. Falls back to being the shadow in place.
fn become_shadow(
    gpid: i32,
    node: u32,
    exe: &[u8],
    argv: &[Vec<u8>],
    env: &[Vec<u8>],
    conns: Vec<(u8, OwnedFd)>,
) -> ! {
    let fd_of = |ch: u8| -> i64 {
        conns
            .iter()
            .find(|(c, _)| *c == ch)
            .map(|(_, f)| i64::from(f.as_raw_fd()))
            .unwrap_or(-1)
    };
    let spec = format!(
        "{gpid}:{node}:{}:{}:{}:{}",
        fd_of(0),
        fd_of(1),
        fd_of(2),
        fd_of(3)
    );
    for (_, f) in &conns {
        // SAFETY: the shadow image inherits these fds.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0) };
    }
    let c = |b: &[u8]| std::ffi::CString::new(b.to_vec()).ok();
    let mut envs: Vec<std::ffi::CString> = env
        .iter()
        .filter(|e| {
            !e.starts_with(SHADOW_ENV.as_bytes())
                && !e.starts_with(super::restore::RESTORE_ENV.as_bytes())
        })
        .filter_map(|e| c(e))
        .collect();
    envs.extend(c(format!("{SHADOW_ENV}={spec}").as_bytes()));
    let args: Vec<std::ffi::CString> = argv.iter().filter_map(|a| c(a)).collect();
    if let Some(exe) = c(exe) {
        let mut av: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        av.push(std::ptr::null());
        let mut ev: Vec<*const libc::c_char> = envs.iter().map(|e| e.as_ptr()).collect();
        ev.push(std::ptr::null());
        // SAFETY: NUL-terminated arrays of valid C strings; on success the
        // image is replaced (other threads end), on failure we go on below.
        unsafe { libc::execve(exe.as_ptr(), av.as_ptr(), ev.as_ptr()) };
    }
    crate::krg_log!(
        crate::log::Level::Warn,
        "pid {gpid}: could not re-execute as a shadow; relaying from the old image"
    );
    let stdio: Vec<StdioKind> = (1..4)
        .map(|ch| {
            if fd_of(ch) >= 0 {
                StdioKind::Relay
            } else {
                StdioKind::Closed
            }
        })
        .collect();
    distant::shadow(gpid, node, &stdio, conns)
}
