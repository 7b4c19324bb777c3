//! The shared-memory fast path between agents: one TCP connection per
//! (caller, callee) pair, authenticated with the cluster key like the tarpc
//! connections, carrying length-prefixed bincode frames with request ids.
//!
//! Why not tarpc for these: a page fault's round trip to its home took a
//! median 106 µs through tarpc and 93 µs here (agent-side timings over
//! ~8000 faults each, same machine; a bare TCP round trip between the nodes
//! is ~47 µs): tarpc hands every request and answer through dispatch tasks
//! and channels and opens tracing spans; here the caller writes its frame
//! itself and the connection's reader hands the answer straight to the
//! waiting call. Read-ahead windows (2 MiB answers) stay on tarpc, which
//! measured faster for them (516-623 MB/s against 352-462 MB/s through
//! this link).
//!
//! Page faults go one step further (`FaultLink`, `serve_faults`): a second
//! connection per pair, driven outside tokio by the faulting node's fault
//! thread on one side and a thread of the home on the other, both of which
//! poll without sleeping for a short while after each message. On this VM
//! waking an idle vCPU costs ~45 µs, and a fault through tokio woke four
//! sleeping threads (the fault's reader, the answer's reader on both
//! agents, the application); polling leaves the application's.

use super::super::common::err;
use super::super::peer::dsm::{Req, Resp};
use super::super::peer::{auth, CHANNEL_DSM, CHANNEL_DSM_FAULTS};
use super::Dsm;
use crate::agent::common::lock;
use bincode::Options;
use libkrg::proto::ErrorReply;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// How long a fault thread, or a home's fault server, keeps polling for
/// the next message after the last one before it sleeps: faults come in
/// runs (a loop over an array, a page bounced between nodes), and the
/// next one of a run then costs no wake-up.
pub const SPIN_IDLE: Duration = Duration::from_micros(300);

/// How long a fault inside a run polls for its answer before it sleeps
/// (a remote fault takes 20-80 µs here; an answer that takes longer is
/// waiting for something slow at the home, a read-ahead window or an
/// invalidation, and polling would only take the CPU from it).
const SPIN_ANSWER: Duration = Duration::from_micros(250);
/// How long the rest of a frame may take once its length has come.
const SPIN_FRAME: Duration = Duration::from_millis(1);
/// Largest frame (a read-ahead window of 2 MiB and its framing fit).
const MAX_FRAME: u64 = 16 * 1024 * 1024;
/// Deadline of one call between agents (the home recalling a page from
/// its holder, an invalidation, a read-ahead window). A node that does not
/// answer by then is taken for lost and so are the pages only it held:
/// every later access gets SIGBUS. At 2 s a node merely stalled by load
/// lost pages for good (a loaded test run: node 2's agent answered a
/// recall late, the semaphore page it held was marked lost, the process
/// on node 3 got SIGBUS and its partner waited for ever); a node is shown
/// down after 2 s of silence but requests about its processes are still
/// sent for 10 s (`agent::GIVE_UP_AFTER`), and so are these.
const CALL_TIMEOUT: Duration = Duration::from_secs(8);
/// Deadline of a fault's call to the home: beyond the home's own wait for
/// a holder ([`CALL_TIMEOUT`]), so the home's answer (the page, or that
/// it is lost) comes before the fault gives the home up.
const FAULT_TIMEOUT: Duration = Duration::from_secs(10);

fn codec() -> impl Options {
    bincode::options().with_limit(MAX_FRAME)
}

/// `u32` length (of id + body), `u64` id, bincode body.
fn encode<T: Serialize>(id: u64, v: &T) -> std::io::Result<Vec<u8>> {
    let body = codec().serialize(v).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len() + 8).map_err(std::io::Error::other)?;
    let mut f = Vec::with_capacity(12 + body.len());
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&body);
    Ok(f)
}

/// Read one frame; the body is validated by deserialising it into `T`.
async fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut OwnedReadHalf,
) -> std::io::Result<(u64, T)> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let mut buf = vec![0u8; frame_len(len)?];
    r.read_exact(&mut buf).await?;
    decode_frame(&buf)
}

/// The length of a frame's id and body, checked.
fn frame_len(len: [u8; 4]) -> std::io::Result<usize> {
    let n = u32::from_le_bytes(len) as u64;
    if !(8..=MAX_FRAME).contains(&n) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {n} bytes"),
        ));
    }
    Ok(n as usize)
}

/// A frame's id and body (validated by deserialising it into `T`).
fn decode_frame<T: for<'de> Deserialize<'de>>(buf: &[u8]) -> std::io::Result<(u64, T)> {
    let id = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    let v = codec()
        .deserialize(&buf[8..])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok((id, v))
}

/// Socket buffers that hold a read-ahead window: a 2 MiB answer then
/// goes out in one write and comes in with few wake-ups.
fn big_buffers(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::SndBuf, &(4 << 20));
    let _ = setsockopt(s, sockopt::RcvBuf, &(4 << 20));
}

/// Connect to node `want` at `addr`, authenticate, choose `channel`
/// (`big`: socket buffers that hold a read-ahead window).
async fn open_channel(
    addr: SocketAddr,
    key: &[u8],
    my_id: u32,
    want: u32,
    channel: u8,
    big: bool,
) -> std::io::Result<TcpStream> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    if big {
        big_buffers(&s);
    }
    let id = auth::client(&mut s, key, my_id).await?;
    if id != want {
        return Err(std::io::Error::other(format!(
            "{addr} answered as node {id}, expected node {want}"
        )));
    }
    s.write_all(&[channel]).await?;
    Ok(s)
}

/// The calling side of a link to one peer.
#[derive(Debug)]
pub struct Link {
    w: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Resp>>>,
    next: AtomicU64,
    dead: AtomicBool,
}

impl Link {
    pub async fn connect(
        addr: SocketAddr,
        key: &[u8],
        my_id: u32,
        want: u32,
    ) -> std::io::Result<Arc<Link>> {
        let s = open_channel(addr, key, my_id, want, CHANNEL_DSM, true).await?;
        let (mut r, w) = s.into_split();
        let link = Arc::new(Link {
            w: tokio::sync::Mutex::new(w),
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            dead: AtomicBool::new(false),
        });
        let l = link.clone();
        tokio::spawn(async move {
            loop {
                match read_frame::<Resp>(&mut r).await {
                    Ok((id, resp)) => {
                        let tx = lock(&l.pending).remove(&id);
                        if let Some(tx) = tx {
                            let _ = tx.send(resp);
                        }
                    }
                    Err(e) => {
                        debug!("shared memory link to node {want}: {e}");
                        break;
                    }
                }
            }
            // Every waiting call fails now (its sender is dropped).
            l.dead.store(true, Ordering::Release);
            lock(&l.pending).clear();
        });
        Ok(link)
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub async fn call(&self, node: u32, req: Req) -> Result<Resp, ErrorReply> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let frame = encode(id, &req).map_err(|e| err(libc::EIO, format!("node {node}: {e}")))?;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let sent = self.w.lock().await.write_all(&frame).await;
        if let Err(e) = sent {
            self.dead.store(true, Ordering::Release);
            lock(&self.pending).remove(&id);
            return Err(err(libc::EIO, format!("node {node}: {e}")));
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(err(libc::EIO, format!("node {node}: connection lost"))),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(err(
                    libc::EIO,
                    format!("node {node}: no answer in {CALL_TIMEOUT:?}"),
                ))
            }
        }
    }
}

/// Serve one authenticated link: each request in its own task (a request
/// may wait on a page lock, others must not wait behind it).
pub async fn serve(s: TcpStream, dsm: Arc<Dsm>, from: u32) {
    big_buffers(&s);
    let (mut r, w) = s.into_split();
    let w = Arc::new(tokio::sync::Mutex::new(w));
    loop {
        let (id, req) = match read_frame::<Req>(&mut r).await {
            Ok(x) => x,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    warn!("shared memory link from node {from}: {e}");
                }
                return;
            }
        };
        let (a, w) = (dsm.clone(), w.clone());
        tokio::spawn(async move {
            let resp = match req {
                Req::Home(op) => Resp::Home(a.home_op(op).await),
                Req::Node(op) => Resp::Node(a.node_op(op).await),
                Req::ReadMany(shmid, items) => Resp::Many(a.read_many(shmid, items).await),
            };
            match encode(id, &resp) {
                Ok(f) => {
                    let _ = w.lock().await.write_all(&f).await;
                }
                Err(e) => warn!("shared memory link to node {from}: {e}"),
            }
        });
    }
}

// -- the fault path: plain sockets, threads that poll ------------------------

/// When to poll for the next message rather than sleep: only inside a run
/// (the last two messages came within `SPIN_IDLE` of each other), and for
/// `SPIN_IDLE` after the last. A sequential read, whose faults come a
/// read-ahead window apart, then polls for nothing and leaves the CPU to
/// the windows.
#[derive(Debug, Default)]
pub struct Pace {
    last: Option<Instant>,
    run: bool,
}

impl Pace {
    /// A message was served now.
    pub fn note(&mut self) {
        let now = Instant::now();
        self.run = self.last.is_some_and(|l| now - l < SPIN_IDLE);
        self.last = Some(now);
    }

    /// Until when to poll (a time past: sleep at once).
    pub fn spin_until(&self) -> Instant {
        match self.last {
            Some(l) if self.run => l + SPIN_IDLE,
            _ => Instant::now(),
        }
    }

    pub fn spinning(&self) -> bool {
        self.run && self.last.is_some_and(|l| l.elapsed() < SPIN_IDLE)
    }
}

/// Wait for `fd` to be ready (`POLLIN` or `POLLOUT`): until `spin_until`
/// only yield the CPU (to a process of this node that may need it) and
/// let the caller try again; after that sleep in poll(2) until `deadline`
/// (`None`: for ever).
pub fn wait_ready(
    fd: BorrowedFd<'_>,
    out: bool,
    spin_until: Instant,
    deadline: Option<Instant>,
) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let now = Instant::now();
    if now < spin_until {
        std::thread::yield_now();
        return Ok(());
    }
    let timeout = match deadline {
        None => PollTimeout::NONE,
        Some(d) if d <= now => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer in {FAULT_TIMEOUT:?}"),
            ))
        }
        // Rounded up to a millisecond (0 would make this a busy loop).
        Some(d) => {
            PollTimeout::try_from((d - now).as_millis() as u64 + 1).unwrap_or(PollTimeout::MAX)
        }
    };
    let ev = if out {
        PollFlags::POLLOUT
    } else {
        PollFlags::POLLIN
    };
    match poll(&mut [PollFd::new(fd, ev)], timeout) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `read_exact` on a non-blocking socket, waiting as `wait_ready` does.
fn read_exact_polling(
    s: &mut std::net::TcpStream,
    buf: &mut [u8],
    spin_until: Instant,
    deadline: Option<Instant>,
) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_ready(s.as_fd(), false, spin_until, deadline)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` on a non-blocking socket (a frame rarely fills the buffer).
fn write_all_polling(
    s: &mut std::net::TcpStream,
    mut buf: &[u8],
    deadline: Option<Instant>,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_ready(s.as_fd(), true, Instant::now(), deadline)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One frame, as `read_frame`, from a non-blocking socket.
fn read_frame_polling<T: for<'de> Deserialize<'de>>(
    s: &mut std::net::TcpStream,
    spin_until: Instant,
    deadline: Option<Instant>,
) -> std::io::Result<(u64, T)> {
    let mut len = [0u8; 4];
    read_exact_polling(s, &mut len, spin_until, deadline)?;
    let mut buf = vec![0u8; frame_len(len)?];
    // The rest of a frame follows its length at once.
    read_exact_polling(s, &mut buf, Instant::now() + SPIN_FRAME, deadline)?;
    decode_frame(&buf)
}

/// The faulting side of a fault connection, owned by the node's fault
/// thread: one call at a time, the answer awaited by polling.
#[derive(Debug)]
pub struct FaultLink {
    s: std::net::TcpStream,
    next: u64,
}

impl FaultLink {
    pub async fn connect(
        addr: SocketAddr,
        key: &[u8],
        my_id: u32,
        want: u32,
    ) -> std::io::Result<FaultLink> {
        let s = open_channel(addr, key, my_id, want, CHANNEL_DSM_FAULTS, false).await?;
        // Still non-blocking, as tokio left it: this side polls.
        let s = s.into_std()?;
        Ok(FaultLink { s, next: 1 })
    }

    /// Send `req`, wait for its answer (an error: drop the link), polling
    /// for it first if `poll` (inside a run of faults, see `Pace`).
    pub fn call(&mut self, node: u32, req: &Req, poll: bool) -> Result<Resp, ErrorReply> {
        let id = self.next;
        self.next += 1;
        let fail = |e: std::io::Error| err(libc::EIO, format!("node {node}: {e}"));
        let frame = encode(id, req).map_err(fail)?;
        let start = Instant::now();
        let deadline = Some(start + FAULT_TIMEOUT);
        write_all_polling(&mut self.s, &frame, deadline).map_err(fail)?;
        loop {
            let (got, resp) = read_frame_polling::<Resp>(
                &mut self.s,
                if poll { start + SPIN_ANSWER } else { start },
                deadline,
            )
            .map_err(fail)?;
            if got == id {
                return Ok(resp);
            }
        }
    }
}

/// Serve one fault connection from node `from` in a thread of its own:
/// each request in turn (the caller sends one at a time), polling for
/// the next for `SPIN_IDLE` after each answer.
pub fn serve_faults(s: TcpStream, dsm: Arc<Dsm>, from: u32) {
    let rt = tokio::runtime::Handle::current();
    let mut s = match s.into_std() {
        Ok(s) => s,
        Err(e) => return warn!("fault connection from node {from}: {e}"),
    };
    let spawned = std::thread::Builder::new()
        .name(format!("krg-dsm-from-{from}"))
        .spawn(move || {
            let _rt = rt.enter();
            let mut pace = Pace::default();
            loop {
                let (id, req) = match read_frame_polling::<Req>(&mut s, pace.spin_until(), None) {
                    Ok(x) => x,
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            warn!("fault connection from node {from}: {e}");
                        }
                        return;
                    }
                };
                let resp = match req {
                    Req::Home(op) => Resp::Home(rt.block_on(dsm.home_op(op))),
                    Req::Node(op) => Resp::Node(rt.block_on(dsm.node_op(op))),
                    Req::ReadMany(shmid, items) => {
                        Resp::Many(rt.block_on(dsm.read_many(shmid, items)))
                    }
                };
                let sent = encode(id, &resp).and_then(|f| write_all_polling(&mut s, &f, None));
                if let Err(e) = sent {
                    debug!("fault connection from node {from}: {e}");
                    return;
                }
                pace.note();
            }
        });
    if let Err(e) = spawned {
        warn!("fault connection from node {from}: no thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polling starts only inside a run: never for a first message nor
    /// for one that came long after the last (a sequential read's faults,
    /// a window apart); the opposite case is timing-bound and measured by
    /// `krg bench` (fault latency).
    #[test]
    fn pace_polls_only_inside_a_run() {
        let mut p = Pace::default();
        assert!(!p.spinning());
        assert!(p.spin_until() <= Instant::now());
        p.note();
        assert!(!p.spinning(), "one message is not a run");
        std::thread::sleep(SPIN_IDLE * 4);
        p.note();
        assert!(!p.spinning(), "a gap longer than SPIN_IDLE ends the run");
        assert!(p.spin_until() <= Instant::now());
    }
}
