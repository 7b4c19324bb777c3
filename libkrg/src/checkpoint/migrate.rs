//! Live migration, in the leader of a capture: the image goes straight
//! down a TCP connection to the target node (no disk), where the agent
//! feeds it to a restoring instance of the program; this process then
//! stays behind as the program's *shadow* (the parent's child: it relays
//! the stdio that cannot move, forwards signals and ends like the program;
//! see `crate::distant`). To give its memory back at once it re-executes
//! itself in shadow mode (`KRG_SHADOW`), which also ends its other threads.

#![deny(unsafe_code)]

use super::capture::MapLine;
use super::fds::{self, HandOver, Purpose, Stream};
use super::image::{self, FdState, Meta, Region};
use super::{capture, postcopy, report, Order, ANCHOR};
use crate::distant::{self, Listener, SHADOW_ENV};
use crate::error::{Error, ResultExt};
use crate::proto::{ErrorKind, RemoteExec, Request, Response, StdioKind, IMAGE_CHANNEL};
use crate::sys::{fd as sysfd, mem, poll, process, sock};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicI32;

/// Take the image and send it to `order.node`. Never returns once the
/// image is sent; an error means nothing changed (the process goes on).
pub(super) fn out(order: &Order) -> Result<u64, Error> {
    // Connections waiting to be accepted move as connections owed to
    // their listener (queued again once it listens on the new node).
    crate::streams::accepted::take_queued();
    let r = out_taken(order);
    if r.is_err() {
        // Still here: the listeners never closed; queue them again.
        crate::streams::accepted::requeue();
    }
    r
}

fn out_taken(order: &Order) -> Result<u64, Error> {
    crate::dsm::capturable()?;
    super::children::refuse_unnamed_children()?;
    let threads = super::capture_threads()?;
    let maps_text = crate::proc_self::read_file("/proc/self/maps")?;
    // The capture arena is left out of the image.
    let maps = capture::without(
        capture::parse_maps(&String::from_utf8_lossy(&maps_text)),
        super::alloc::range(),
    );
    // The big private anonymous regions go by post-copy: their pages are
    // not even looked up before the process runs on the target.
    let lazy = if order.precopy {
        Vec::new()
    } else {
        lazy_regions(&maps)
    };
    let (regions, runs) = capture::regions_deferring(&maps, &lazy)?;
    // The fds, before this side's own sockets exist.
    let fds = fds::capture(&[])?;
    fds::refuse_shared(&maps, &fds, true)?;
    let mut meta = capture::meta(&maps, regions.clone(), &runs, threads, fds)?;
    meta.lazy = lazy;
    // Stdin, stdout and stderr stay with the shadow (a file here may not
    // exist there; a file shared with the parent keeps its one offset): the
    // target gets relayed streams. Devices that mean the same everywhere
    // are simply reopened there; pipes and TCP connections to other SSI
    // processes move (below), others are relayed too.
    fds::relay_stdio(&mut meta.fds, Purpose::Migration);
    // Pipes and TCP connections to other SSI processes: freeze their peers
    // and drain both sides; from here on, a failure must hand them back
    // here.
    move_streams(&mut meta.fds)?;
    let pipes: Vec<i32> = meta
        .fds
        .iter()
        .filter(|f| fds::is_moved_pipe(&f.kind))
        .map(|f| f.fd)
        .collect();
    crate::streams::moving::mark_for_restore(&pipes);
    match send(order, &meta, &regions, &runs) {
        Ok((bytes, how, conns)) => {
            // The old ends of moved sockets and pipes stay out of the
            // shadow.
            for f in meta.fds.iter().filter(|f| fds::of(&f.kind).moved_away()) {
                // Our own fd; nothing uses it any more.
                let _ = sysfd::close(f.fd);
            }
            report(Ok(()), how, bytes);
            fds::moved_to(order.node);
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

/// Freeze the peer of each TCP connection, pipe and UNIX stream socket and
/// drain it (the bytes in flight for this process go in the image). Fds
/// that are copies of one stream (`dup`) move once. A pipe whose other end
/// is this process's too or no process's is made again on the target; a
/// standard fd whose peer cannot take part is relayed by the shadow
/// instead. On a failure the streams already taken are reconnected here.
fn move_streams(fds: &mut [FdState]) -> Result<(), Error> {
    use crate::proto::StreamPeer;
    use crate::streams::moving;
    // Each stream once, with all its fds (the first is the one drained):
    // then one freeze for all, so that a peer with several streams to this
    // process gets one order.
    let mut conns: Vec<(Vec<usize>, (String, String))> = Vec::new();
    // Pipes and FIFOs by fd link (`pipe:[N]`, a FIFO's path).
    let mut pipes: Vec<(Vec<usize>, String)> = Vec::new();
    let mut unixes: Vec<(Vec<usize>, u64)> = Vec::new();
    fn add<K: PartialEq>(groups: &mut Vec<(Vec<usize>, K)>, key: K, i: usize) {
        match groups.iter_mut().find(|(_, k)| *k == key) {
            Some((v, _)) => v.push(i),
            None => groups.push((vec![i], key)),
        }
    }
    fds::settle(fds, Purpose::Migration)?;
    // TCP connections by socket inode (copies of one share it).
    let mut seen: Vec<(u64, usize)> = Vec::new();
    for i in 0..fds.len() {
        let Some(stream) = fds::of(&fds[i].kind).stream(&fds[i], fds) else {
            continue;
        };
        match stream? {
            Stream::Tcp(ends, ino) => {
                if let Some(&(_, k)) = seen.iter().find(|(n, _)| Some(*n) == ino) {
                    conns[k].0.push(i);
                    continue;
                }
                if let Some(n) = ino {
                    seen.push((n, conns.len()));
                }
                conns.push((vec![i], ends));
            }
            Stream::Pipe(link) => add(&mut pipes, link, i),
            Stream::Unix(ino) => add(&mut unixes, ino, i),
        }
    }
    if conns.is_empty() && pipes.is_empty() && unixes.is_empty() {
        return vacate(fds);
    }
    // In the order of the freeze's answer.
    let groups: Vec<&Vec<usize>> = conns
        .iter()
        .map(|(v, _)| v)
        .chain(pipes.iter().map(|(v, _)| v))
        .chain(unixes.iter().map(|(v, _)| v))
        .collect();
    // Standard fds only: relayed if their peer cannot take part.
    let stdio_only = |idx: &[usize]| idx.iter().all(|i| fds[*i].fd <= 2);
    let optional: Vec<bool> = groups.iter().map(|g| stdio_only(g)).collect();
    let peers = moving::freeze(
        conns.iter().map(|(_, e)| e.clone()).collect(),
        pipes.iter().map(|(_, l)| l.clone()).collect(),
        unixes.iter().map(|(_, n)| *n).collect(),
        optional.clone(),
    )?;
    // What each stream became; the first error is kept (every stream
    // frozen must still be handed over).
    let mut failed: Option<Error> = None;
    // Streams whose other end was a shadow's relay.
    let mut relayed: Vec<u64> = Vec::new();
    // Connections this node's agent keeps and relays: taken as they are.
    let mut kept: Vec<u64> = Vec::new();
    for ((idx, p), opt) in groups.iter().zip(&peers).zip(optional) {
        let first = idx[0];
        match p {
            StreamPeer::Held { id, node } => as_connection(fds, idx, *id, *node),
            StreamPeer::Relayed { id, node } => {
                relayed.push(*id);
                as_connection(fds, idx, *id, *node)
            }
            StreamPeer::Kept { id, node } => {
                kept.push(*id);
                as_connection(fds, idx, *id, *node)
            }
            _ if opt => {
                for i in idx.iter() {
                    fds[*i].kind = image::FdKind::Relay;
                }
            }
            StreamPeer::Foreign(why) => {
                failed.get_or_insert_with(|| why.clone().into());
            }
            StreamPeer::Nobody => match fds::of(&fds[first].kind).no_peer(&mut fds[first]) {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    failed.get_or_insert(e);
                }
                None => {
                    failed.get_or_insert_with(|| {
                        Error::other(
                            "its other end is closed or is this process's own: not movable yet",
                        )
                        .fd(fds[first].fd)
                    });
                }
            },
        }
    }
    // Every peer held is frozen: from now on each stream is handed over,
    // here or there, whatever happens (drained first, even on a failure:
    // a reconnection here is refilled with what was in flight).
    let h = HandOver {
        kept: &kept,
        relayed: &relayed,
    };
    for f in fds.iter_mut() {
        if let Err(e) = fds::of(&f.kind).hand_over(f, &h) {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        reattach_streams(fds);
        return Err(e);
    }
    vacate(fds)
}

/// The fds `idx` of one stream become its new connection `id` (held at
/// `node`): the first one, the others copies of it.
fn as_connection(fds: &mut [FdState], idx: &[usize], id: u64, node: u32) {
    let first = fds[idx[0]].fd;
    for (k, i) in idx.iter().enumerate() {
        let Some(o) = fds::of(&fds[*i].kind).conn_opts(&fds[*i].kind) else {
            continue;
        };
        let alias_of = if k == 0 { -1 } else { first };
        fds[*i].kind = fds::connection(id, node, alias_of, o);
    }
}

/// What must be free on the target (listening ports) is closed here, its
/// numbers kept taken; a failure puts everything back.
fn vacate(fds: &mut [FdState]) -> Result<(), Error> {
    for f in fds.iter() {
        if let Err(e) = fds::of(&f.kind).vacate(f) {
            reattach_streams(fds);
            return Err(e);
        }
    }
    Ok(())
}

/// The migration failed after its streams were taken: each fd is put back
/// as it was (connections connected again from here, refilled, under
/// their numbers; listeners taken back or made again).
fn reattach_streams(fds: &[FdState]) {
    for f in fds {
        fds::of(&f.kind).take_back(f);
    }
}

/// What was sent: the byte count, what to tell the agent (post-copy or
/// not), this side's connections to the restored program (stdio relays).
type Sent = (u64, String, Vec<(u8, OwnedFd)>);

/// Send the image to `order.node` (post-copy when it has lazy regions).
fn send(
    order: &Order,
    meta: &super::image::Meta,
    regions: &[super::image::Region],
    runs: &[(u64, u64)],
) -> Result<Sent, Error> {
    let listener = Listener::new()?;
    let mut token = [0u8; 16];
    if crate::sys::getrandom(&mut token).ok() != Some(16) {
        return Err("getrandom failed".into());
    }
    // Stdio that is a terminal, pipe or socket stays here and is relayed;
    // files and devices are reopened there from the image.
    let stdio: Vec<StdioKind> = (0..3)
        .map(
            |i| match meta.fds.iter().find(|f| f.fd == i).map(|f| &f.kind) {
                Some(k) if fds::is_relay(k) => StdioKind::Relay,
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
        // The image puts back every disposition.
        ignored: 0,
    };
    match crate::client::call(&Request::RemoteExec(req)) {
        Ok(Response::Pid(_)) => {}
        Ok(other) => return Err(Error::other(format!("unexpected answer {other:?}"))),
        Err(e) => return Err(Error::from(e).node(order.node)),
    }
    let relayed = stdio.iter().filter(|k| **k == StdioKind::Relay).count();
    let mut conns = listener.accept_all(&token, 2 + relayed);
    let Some(i) = conns.iter().position(|(ch, _)| *ch == IMAGE_CHANNEL) else {
        return Err(Error::other(format!(
            "node {} did not connect back for the image",
            order.node
        )));
    };
    let (_, image) = conns.remove(i);
    // Blocking mode on our own socket.
    let _ = sysfd::set_status_flags(image.as_raw_fd(), 0);
    if !meta.lazy.is_empty() {
        return post_copy(order, meta, regions, runs, image, conns);
    }
    let bytes = match capture::write_image(image.as_raw_fd(), meta, regions, runs) {
        Ok(b) => b,
        // The restorer says why it gave up on the same connection.
        Err(e) => return Err(why_refused(&image).unwrap_or(e)),
    };
    await_running(&image, order.node)?;
    Ok((bytes, String::new(), conns))
}

/// After the whole image went (no post-copy): end the stream and wait until
/// the target says the process runs there. Until then it may still fail
/// there, and then the process goes on here.
fn await_running(image: &OwnedFd, node: u32) -> Result<(), Error> {
    let fd = image.as_raw_fd();
    // Half-closed: the target sees the end of the image.
    let _ = sock::shutdown(fd, libc::SHUT_WR);
    let mut answer = [0u8; 8];
    if read_full(fd, &mut answer, 30_000) && &answer == image::RUNNING {
        return Ok(());
    }
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&answer).trim_end_matches('\0'),
        last_words(image)
    );
    // A late answer must find the stream closed: the target dies then.
    let _ = sock::shutdown(fd, libc::SHUT_RDWR);
    Err(refusal(&said)
        .unwrap_or_else(|| Error::other("the restored process never started").node(node)))
}

/// The regions that go by post-copy: private anonymous (not the main
/// stack), readable, at least `LAZY_MIN` bytes long, and not libkrg's own
/// data (the restorer writes there before the post-copy thread runs).
fn lazy_regions(maps: &[MapLine]) -> Vec<(u64, u64)> {
    let own = [
        &ANCHOR as *const AtomicI32 as u64,
        &super::RESUMED as *const _ as u64,
        &super::RESTORE_AREA as *const _ as u64,
        &postcopy::THREAD_TID as *const _ as u64,
    ];
    maps.iter()
        .filter(|m| {
            m.inode == 0
                && !m.shared
                && m.read
                && !m.is_special()
                && m.path != "[stack]"
                && m.end - m.start >= postcopy::LAZY_MIN
                && !own.iter().any(|a| m.start <= *a && *a < m.end)
        })
        .take(postcopy::MAX_RANGES)
        .map(|m| (m.start, m.end))
        .collect()
}

/// How a post-copy migration failed.
enum Broke {
    /// Before the process resumed on the target: it goes on here.
    Before(Error),
    /// After: it exists nowhere any more.
    After(Error),
}

/// The post-copy migration, once the target connected for the image:
/// metadata, handshake, the memory outside the lazy regions, then (the
/// process runs on the target) the lazy regions, pages the target faults
/// on first. The process stays frozen here until the target has every
/// page, then this becomes its shadow.
fn post_copy(
    order: &Order,
    meta: &Meta,
    regions: &[Region],
    runs: &[(u64, u64)],
    image: OwnedFd,
    conns: Vec<(u8, OwnedFd)>,
) -> Result<Sent, Error> {
    let fd = image.as_raw_fd();
    let head = image::encode_meta(meta).map_err(|e| Error::other(e.to_string()))?;
    capture::write_all(fd, &head).map_err(|e| why_refused(&image).unwrap_or(e))?;
    let mut answer = [0u8; 8];
    if !read_full(fd, &mut answer, 30_000) {
        return Err(why_refused(&image)
            .unwrap_or_else(|| Error::other("no answer from the restorer").node(order.node)));
    }
    let lazy = if &answer == image::LAZY_OK {
        true
    } else if &answer == image::LAZY_NO {
        false
    } else {
        let all = format!("{}{}", String::from_utf8_lossy(&answer), last_words(&image));
        return Err(refusal(&all)
            .unwrap_or_else(|| Error::other("bad answer from the restorer").node(order.node)));
    };
    // The lazy regions' pages: looked up now (no post-copy there) or once
    // the process runs there (`serve`).
    let mut now: Vec<(u64, u64)> = runs.to_vec();
    if !lazy {
        for (a, b) in &meta.lazy {
            now.extend(capture::present_runs(*a, *b)?);
        }
    }
    let mut bytes = head.len() as u64;
    let sent = capture::write_runs(fd, regions, &now).and_then(|n| {
        capture::write_end(fd)?;
        Ok(n + 24)
    });
    bytes += sent.map_err(|e| why_refused(&image).unwrap_or(e))?;
    if lazy {
        // The program's output on the target is relayed from now on (the
        // shadow, once this is done, goes on with the same streams).
        let outs: Vec<(i32, i32)> = conns
            .iter()
            .filter(|(ch, _)| *ch == 2 || *ch == 3)
            .map(|(ch, f)| (f.as_raw_fd(), i32::from(*ch) - 1))
            .collect();
        match serve(fd, &meta.lazy, &outs) {
            Ok(n) => bytes += n,
            Err(Broke::Before(e)) => return Err(e),
            Err(Broke::After(e)) => {
                let msg = format!(
                    "post-copy to node {} broke after the process resumed there ({e}): \
                     the process is lost, killed on both nodes",
                    order.node
                );
                crate::krg_log!(crate::log::Level::Error, "{msg}");
                report(Err(ErrorKind::Other), msg, 0);
                // Ends this (frozen) copy: the other one is dead or dying,
                // and the process must never run twice.
                let _ = process::kill(process::getpid(), libc::SIGKILL);
                return Err("killed".into());
            }
        }
    } else {
        await_running(&image, order.node)?;
    }
    drop(image);
    let how = if lazy {
        crate::proto::POSTCOPY_DONE.to_string()
    } else {
        String::new()
    };
    Ok((bytes, how, conns))
}

/// Read exactly `buf.len()` bytes, waiting at most `ms` for each part.
fn read_full(fd: i32, buf: &mut [u8], ms: i32) -> bool {
    let mut got = 0;
    while got < buf.len() {
        if !poll::ready(fd, libc::POLLIN, ms) {
            return false;
        }
        match sysfd::read(fd, &mut buf[got..]) {
            Ok(n) if n > 0 => got += n,
            _ => return false,
        }
    }
    true
}

/// Send one record (header and bytes, or a zero record) with `sendmsg`.
fn send_record(fd: i32, addr: u64, len: u64, zero: bool) -> Result<(), Error> {
    let head = image::record(addr, if zero { len | postcopy::ZERO } else { len });
    let body = if zero { 0 } else { len as usize };
    // Bytes of the header and of the run sent so far.
    let (mut h, mut m) = (0usize, 0usize);
    loop {
        // A run of this process's own memory (every other thread is
        // parked: nothing changes it), read by the kernel.
        let run = (addr as usize + m, body - m);
        let n = match mem::send_mem(fd, &head[h..], run.0, run.1, libc::MSG_NOSIGNAL) {
            Ok(n) => n,
            Err(_) if crate::rt::errno() == libc::EINTR => continue,
            Err(_) => {
                return Err(Error::other(format!(
                    "sending memory: {}",
                    crate::rt::Errno(crate::rt::errno())
                )))
            }
        };
        let of_head = n.min(head.len() - h);
        h += of_head;
        m += n - of_head;
        if h == head.len() && m == body {
            return Ok(());
        }
    }
}

/// What the target sends back during post-copy: its "resumed" marker,
/// then the page addresses it faults on.
struct Back {
    buf: [u8; 4096],
    have: usize,
    running: bool,
}

impl Back {
    /// Take what arrived, without waiting. Pages asked for go to `asks`.
    /// `Ok(false)`: the target closed.
    fn take(&mut self, fd: i32, asks: &mut Vec<u64>) -> Result<bool, Broke> {
        loop {
            let n = match sock::recv(fd, &mut self.buf[self.have..], libc::MSG_DONTWAIT) {
                Ok(0) => return Ok(false),
                Ok(n) => n,
                Err(_) => {
                    let e = crate::rt::errno();
                    if e == libc::EAGAIN || e == libc::EINTR {
                        return Ok(true);
                    }
                    return Err(self.broke(Error::errno(e, crate::rt::Errno(e).to_string())));
                }
            };
            self.have += n;
            let mut at = 0;
            while self.have - at >= 8 {
                let w: [u8; 8] = self.buf[at..at + 8].try_into().expect("8 bytes");
                at += 8;
                if !self.running {
                    if &w != image::RUNNING {
                        return Err(Broke::Before(Error::other(format!(
                            "the restorer said {:?}",
                            String::from_utf8_lossy(&self.buf[at - 8..self.have])
                        ))));
                    }
                    self.running = true;
                } else {
                    asks.push(u64::from_le_bytes(w));
                }
            }
            self.buf.copy_within(at..self.have, 0);
            self.have -= at;
        }
    }

    fn broke(&self, why: Error) -> Broke {
        if self.running {
            Broke::After(why)
        } else {
            Broke::Before(why)
        }
    }
}

/// Relay what the program wrote to its stdout and stderr on the target
/// (`(stream, local fd)`), without waiting for more.
fn relay(outs: &[(i32, i32)]) {
    let mut buf = [0u8; 16 * 1024];
    for (stream, local) in outs {
        loop {
            let n = match sock::recv(*stream, &mut buf, libc::MSG_DONTWAIT) {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            let mut at = 0usize;
            while at < n {
                match sysfd::write(*local, &buf[at..n]) {
                    Ok(w) if w > 0 => {
                        at += w;
                        continue;
                    }
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                        let _ = poll::ready(*local, libc::POLLOUT, 100);
                        continue;
                    }
                    // The reader is gone: as the shadow would, drop the
                    // output.
                    _ => break,
                }
            }
        }
    }
}

/// Which pages of `[start, end)` are present or swapped, as runs.
fn present(pagemap: &std::fs::File, start: u64, end: u64) -> Result<Vec<(u64, u64)>, Error> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = postcopy::PAGE;
    let n = ((end - start) / PAGE) as usize;
    let mut buf = vec![0u8; n * 8];
    let got = pagemap
        .read_at(&mut buf, start / PAGE * 8)
        .during("/proc/self/pagemap")?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in 0..got / 8 {
        let e = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        if e & (3 << 62) == 0 {
            continue;
        }
        let a = start + i as u64 * PAGE;
        match runs.last_mut() {
            Some(r) if r.0 + r.1 == a => r.1 += PAGE,
            _ => runs.push((a, PAGE)),
        }
    }
    Ok(runs)
}

/// The lazy regions being pushed: which blocks went already.
struct Lazy {
    start: u64,
    end: u64,
    /// One flag per BLOCK.
    sent: Vec<bool>,
}

/// Push the lazy regions, pages asked for first; then the end, and wait
/// for the target to close (it has every page then). Which pages exist is
/// read from the page map as the push goes (the process stays frozen
/// here: nothing changes), so that nothing of it delays the first answers.
/// Returns the bytes sent.
fn serve(fd: i32, lazy: &[(u64, u64)], outs: &[(i32, i32)]) -> Result<u64, Broke> {
    use postcopy::{BLOCK, CHUNK, PAGE};
    // A stuck target must not keep this frozen copy forever.
    let tv = libc::timeval {
        tv_sec: 60,
        tv_usec: 0,
    };
    let _ = sock::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv);
    // Small socket buffers: a page asked for waits behind less data.
    let sndbuf: libc::c_int = 512 * 1024;
    let _ = sock::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &sndbuf);
    let mut back = Back {
        buf: [0; 4096],
        have: 0,
        running: false,
    };
    let pagemap = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| back.broke(Error::io("/proc/self/pagemap", &e)))?;
    // The smaller regions first (stacks, malloc's heap and arenas: what a
    // process touches first when it resumes), then the big buffers.
    let mut regions: Vec<Lazy> = lazy
        .iter()
        .map(|(a, b)| Lazy {
            start: *a,
            end: *b,
            sent: vec![false; (b - a).div_ceil(BLOCK) as usize],
        })
        .collect();
    regions.sort_by_key(|r| (r.end - r.start, r.start));
    let mut asks: Vec<u64> = Vec::new();
    let mut bytes = 0u64;
    // Send the present pages of `[a, b)` as records of at most CHUNK.
    let send_present = |a: u64, b: u64, bytes: &mut u64| -> Result<(), Error> {
        for (s, l) in present(&pagemap, a, b)? {
            let mut p = s;
            while p < s + l {
                let n = (s + l - p).min(CHUNK as u64);
                send_record(fd, p, n, false)?;
                *bytes += 16 + n;
                p += n;
            }
        }
        Ok(())
    };
    let (mut ri, mut bi) = (0usize, 0usize);
    loop {
        relay(outs);
        if !back.take(fd, &mut asks)? {
            return Err(back.broke("the target closed the connection".into()));
        }
        for page in asks.drain(..) {
            let page = page & !(PAGE - 1);
            let Some(r) = regions.iter_mut().find(|r| r.start <= page && page < r.end) else {
                continue;
            };
            let b = ((page - r.start) / BLOCK) as usize;
            let (a, e) = (
                r.start + b as u64 * BLOCK,
                (r.start + (b as u64 + 1) * BLOCK).min(r.end),
            );
            let first = !r.sent[b];
            r.sent[b] = true;
            let have = present(&pagemap, page, page + PAGE).map_err(|e| back.broke(e))?;
            if have.is_empty() {
                // Never touched here: zero there too.
                send_record(fd, page, PAGE, true).map_err(|e| back.broke(e))?;
                bytes += 16;
            }
            if first {
                send_present(a, e, &mut bytes).map_err(|e| back.broke(e))?;
            }
        }
        // The next blocks of the push not sent yet, up to CHUNK bytes.
        while ri < regions.len() {
            let r = &regions[ri];
            if bi >= r.sent.len() {
                ri += 1;
                bi = 0;
                continue;
            }
            if r.sent[bi] {
                bi += 1;
                continue;
            }
            break;
        }
        if ri == regions.len() {
            break;
        }
        let r = &mut regions[ri];
        let a = r.start + bi as u64 * BLOCK;
        let mut e = a;
        while bi < r.sent.len() && !r.sent[bi] && e - a < CHUNK as u64 {
            r.sent[bi] = true;
            e = (e + BLOCK).min(r.end);
            bi += 1;
        }
        send_present(a, e, &mut bytes).map_err(|e| back.broke(e))?;
    }
    capture::write_end(fd).map_err(|e| back.broke(e))?;
    // Half-closed: the target sees the end.
    let _ = sock::shutdown(fd, libc::SHUT_WR);
    // The target closes once it has installed everything.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        relay(outs);
        if poll::ready(fd, libc::POLLIN, 20) && !back.take(fd, &mut asks)? {
            break;
        }
        asks.clear();
        if std::time::Instant::now() > deadline {
            return Err(back.broke("the target went silent".into()));
        }
    }
    if !back.running {
        return Err(Broke::Before("the target never resumed the process".into()));
    }
    Ok(bytes + 24)
}

/// The restorer's last words on the image connection, if any.
fn why_refused(image: &OwnedFd) -> Option<Error> {
    refusal(&last_words(image))
}

/// The reason in a restorer's refusal `said`.
fn refusal(said: &str) -> Option<Error> {
    said.strip_prefix(super::restore::REFUSAL)
        .map(|m| Error::other(m.trim()))
}

/// What is left to read on the image connection (a restorer that gives up
/// writes why, then exits).
fn last_words(image: &OwnedFd) -> String {
    let mut buf = [0u8; 1024];
    let mut got = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while got < buf.len() && std::time::Instant::now() < deadline {
        if !poll::ready(image.as_raw_fd(), libc::POLLIN, 200) {
            continue;
        }
        match sysfd::read(image.as_raw_fd(), &mut buf[got..]) {
            Ok(n) if n > 0 => got += n,
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf[..got]).into_owned()
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
        // The shadow image inherits these fds.
        let _ = sysfd::set_fd_flags(f.as_raw_fd(), 0);
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
        // On success the image is replaced (other threads end), on failure
        // we go on below.
        let _ = process::execve(&exe, &args, &envs);
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
