//! Streams, the agent's side: FIFOs opened by path from several nodes (see
//! docs/architecture/streams.md, "FIFOs").
//!
//! A FIFO is a kernel object of one node: a reader on node 2 and a writer
//! on node 3 opening the same path (in a directory both see) would each
//! wait forever in their own kernel. So an SSI process's open of a FIFO
//! goes to the *key home* (the lowest node known, down ones included), which pairs each opener
//! with the first one waiting the other way for the same file. Two on one
//! node open the FIFO itself (the kernel does the rest, several writers
//! included); two on different nodes get the two ends of one TCP
//! connection between their nodes, standing for the FIFO like a pipe whose
//! ends parted (it moves with a migrated process, and becomes a pipe again
//! if the two ends meet on one node).
//!
//! A non-blocking reader does not wait: it opens the FIFO on its node and
//! *stands* there (the home keeps its node; its node's agent keeps its
//! kernel pid, to tell whether it still has the FIFO open). A writer on
//! another node that finds no reader waiting meets a standing one: the
//! reader's agent opens the FIFO for writing and feeds it what comes on a
//! new connection from the writer (`splice`), until the writer ends it; a
//! writer on the reader's node opens the FIFO itself. A non-blocking
//! writer that finds no reader gets `ENXIO`.

use super::common::{err, Answer, Answered, Caller};
use super::node::Node;
use super::peer::streams::{FifoKey, FifoMatch};
use super::streams::Streams;
use crate::agent::common::lock;
use libkrg::proto::{ErrorReply, Request, Response};
use nix::sys::socket::Shutdown;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

/// An opener waiting at the home.
#[derive(Debug)]
struct Waiting {
    node: u32,
    write: bool,
    tx: tokio::sync::oneshot::Sender<FifoMatch>,
}

/// The home's rendezvous, by FIFO: the openers waiting, and the nodes
/// where a non-blocking reader opened it (maybe closed since: checked when
/// a writer comes).
#[derive(Debug, Default)]
struct Rendezvous {
    waiting: HashMap<FifoKey, VecDeque<Waiting>>,
    standing: HashMap<FifoKey, Vec<u32>>,
    /// On every node: the kernel pids of this node's non-blocking readers
    /// of each FIFO (not the kernel's FIFO to tell: on the local cluster
    /// one kernel holds every node's).
    here: HashMap<FifoKey, Vec<i32>>,
}

/// FIFOs opened from several nodes: the rendezvous of their openers.
#[derive(Debug)]
pub struct Fifos {
    node: Arc<Node>,
    streams: Arc<Streams>,
    rendezvous: std::sync::Mutex<Rendezvous>,
}

/// Longest a rendezvous call to the home may wait (a FIFO's open blocks
/// until its partner comes).
const MEET_DEADLINE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// A local request about a FIFO (see `Agent::handle_local`); an open
/// answers with a descriptor when its partner is on another node.
pub(super) async fn handle(fifos: &Arc<Fifos>, req: Request, who: Caller) -> Answered {
    match req {
        Request::FifoOpen {
            path,
            dev,
            ino,
            write,
            nonblock,
        } => {
            fifos
                .fifo_open(FifoKey { path, dev, ino }, write, nonblock)
                .await
        }
        Request::FifoStand { path, dev, ino } => Ok((
            fifos
                .fifo_stand(who.pid, FifoKey { path, dev, ino })
                .await?,
            Vec::new(),
        )),
        other => Err(super::common::misrouted(&other)),
    }
}

impl Fifos {
    pub fn new(node: Arc<Node>, streams: Arc<Streams>) -> Fifos {
        Fifos {
            node,
            streams,
            rendezvous: std::sync::Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rendezvous> {
        lock(&self.rendezvous)
    }

    /// `FifoOpen` from a local process.
    async fn fifo_open(
        self: &Arc<Self>,
        key: FifoKey,
        write: bool,
        nonblock: bool,
    ) -> Result<Answer, ErrorReply> {
        let home = self.node.key_home();
        let me = self.node.node_id();
        let m = if home == me {
            self.fifo_meet(key, me, write, nonblock).await?
        } else {
            let c = self.node.client(home).await?;
            let mut cx = tarpc::context::current();
            cx.deadline = std::time::Instant::now() + MEET_DEADLINE;
            c.fifo_meet(cx, key, me, write, nonblock)
                .await
                .map_err(|e| self.node.peer_lost(home, "key home", e))??
        };
        match m {
            FifoMatch::Local => Ok((Response::Local, Vec::new())),
            FifoMatch::Accept { id } => {
                let fd = self.streams.take_expected(id).await?;
                Ok((Response::StreamFd, vec![fd]))
            }
            FifoMatch::Connect { id, node } => {
                self.streams
                    .stream_attach(id, node, Vec::new(), false, true)
                    .await
            }
        }
    }

    /// `FifoStand` from a local process (kernel pid `kpid`): a
    /// non-blocking reader opened `key` here; the home learns it.
    async fn fifo_stand(self: &Arc<Self>, kpid: i32, key: FifoKey) -> Result<Response, ErrorReply> {
        {
            let mut r = self.lock();
            let pids = r.here.entry(key.clone()).or_default();
            if !pids.contains(&kpid) {
                pids.push(kpid);
            }
        }
        let home = self.node.key_home();
        let me = self.node.node_id();
        if home == me {
            self.fifo_stand_at_home(key, me).await;
        } else {
            let c = self.node.client(home).await?;
            c.fifo_stand(super::common::ctx(), key, me)
                .await
                .map_err(|e| self.node.peer_lost(home, "key home", e))?;
        }
        Ok(Response::Ok)
    }

    /// At the key home: a non-blocking reader of `key` stands on `node`.
    /// Writers waiting for a reader meet it now, as on one machine: one
    /// on its node opens the FIFO itself, others are fed through `node`'s
    /// agent.
    pub(crate) async fn fifo_stand_at_home(self: &Arc<Self>, key: FifoKey, node: u32) {
        let writers: Vec<Waiting> = {
            let mut guard = self.lock();
            let Rendezvous {
                waiting, standing, ..
            } = &mut *guard;
            let st = standing.entry(key.clone()).or_default();
            if !st.contains(&node) {
                st.push(node);
            }
            let q = waiting.entry(key.clone()).or_default();
            q.retain(|w| !w.tx.is_closed());
            let (w, rest): (VecDeque<Waiting>, VecDeque<Waiting>) =
                std::mem::take(q).into_iter().partition(|w| w.write);
            *q = rest;
            w.into()
        };
        for w in writers {
            if w.node == node {
                let _ = w.tx.send(FifoMatch::Local);
                continue;
            }
            match self.fifo_feed_from(&key, node).await {
                Some(id) => {
                    let _ = w.tx.send(FifoMatch::Connect { id, node });
                }
                // Closed already: the writer waits on.
                None => self
                    .lock()
                    .waiting
                    .entry(key.clone())
                    .or_default()
                    .push_front(w),
            }
        }
    }

    /// At the key home: have `node`'s agent feed a writer's stream into
    /// its reader of `key`; the stream's id, or `None` when no reader is
    /// open there any more (then forgotten).
    async fn fifo_feed_from(self: &Arc<Self>, key: &FifoKey, node: u32) -> Option<u64> {
        let id = self.streams.new_stream_id();
        let fed = if node == self.node.node_id() {
            self.fifo_feed(key.clone(), id).await
        } else {
            match self.node.client(node).await {
                Ok(c) => c
                    .fifo_feed(super::common::ctx(), key.clone(), id)
                    .await
                    .map_err(|e| self.node.peer_lost(node, "FIFO reader", e))
                    .unwrap_or(false),
                Err(_) => false,
            }
        };
        if !fed {
            self.forget_standing(key, node);
        }
        fed.then_some(id)
    }

    /// At a standing reader's node: open `key` for writing (only if a
    /// reader has it open here) and write the stream `id` that a writer's
    /// node will connect with into it, until that writer ends (or the
    /// readers do: the writer then sees the connection reset, its EPIPE).
    pub(crate) async fn fifo_feed(self: &Arc<Self>, key: FifoKey, id: u64) -> bool {
        if !self.fifo_reader_here(&key) {
            return false;
        }
        let fifo = match open_for_feeding(&key) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(
                    "FIFO {}: no reader to feed: {e}",
                    String::from_utf8_lossy(&key.path)
                );
                return false;
            }
        };
        self.streams.expect_connection(id, true);
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(sock) = me.streams.take_expected(id).await else {
                return;
            };
            let path = String::from_utf8_lossy(&key.path).into_owned();
            let r = tokio::task::spawn_blocking(move || feed(&sock, &fifo)).await;
            tracing::debug!("FIFO {path}: stream {id:#x} fed: {r:?}");
        });
        true
    }

    /// Whether one of this node's non-blocking readers of `key` still has
    /// it open for reading (the others are forgotten).
    pub(crate) fn fifo_reader_here(&self, key: &FifoKey) -> bool {
        let pids = self.lock().here.get(key).cloned().unwrap_or_default();
        let open: Vec<i32> = pids.into_iter().filter(|p| reads_fifo(*p, key)).collect();
        let mut r = self.lock();
        if open.is_empty() {
            r.here.remove(key);
            false
        } else {
            r.here.insert(key.clone(), open);
            true
        }
    }

    /// At the key home: whether a non-blocking reader of `key` on `node`
    /// (maybe this one) still has it open.
    async fn fifo_reader_on(self: &Arc<Self>, key: &FifoKey, node: u32) -> bool {
        let open = if node == self.node.node_id() {
            self.fifo_reader_here(key)
        } else {
            match self.node.client(node).await {
                Ok(c) => c
                    .fifo_reader_here(super::common::ctx(), key.clone())
                    .await
                    .map_err(|e| self.node.peer_lost(node, "FIFO reader", e))
                    .unwrap_or(false),
                Err(_) => false,
            }
        };
        if !open {
            self.forget_standing(key, node);
        }
        open
    }

    /// At the key home: no reader of `key` stands on `node` any more.
    fn forget_standing(&self, key: &FifoKey, node: u32) {
        if let Some(st) = self.lock().standing.get_mut(key) {
            st.retain(|n| *n != node);
        }
    }

    /// At the key home: pair an opener of `key` on `node` with the first
    /// one waiting the other way (a writer also with a non-blocking reader
    /// standing elsewhere), or wait for one; a non-blocking writer does not
    /// wait (`ENXIO`, as with no reader on one machine).
    pub(crate) async fn fifo_meet(
        self: &Arc<Self>,
        key: FifoKey,
        node: u32,
        write: bool,
        nonblock: bool,
    ) -> Result<FifoMatch, ErrorReply> {
        let (other, rx) = loop {
            let standing = {
                let mut guard = self.lock();
                let Rendezvous {
                    waiting, standing, ..
                } = &mut *guard;
                let q = waiting.entry(key.clone()).or_default();
                // Openers that gave up (their call was dropped) are gone.
                q.retain(|w| !w.tx.is_closed());
                if let Some(i) = q.iter().position(|w| w.write != write) {
                    break (q.remove(i), None);
                }
                // The writer's own node first: the FIFO itself then.
                let mut st: Vec<u32> = standing.get(&key).cloned().unwrap_or_default();
                st.sort_by_key(|n| *n != node);
                if !write || st.is_empty() {
                    if write && nonblock {
                        return Err(err(
                            libc::ENXIO,
                            format!(
                                "FIFO {}: no reader has it open on any node",
                                String::from_utf8_lossy(&key.path)
                            ),
                        ));
                    }
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    q.push_back(Waiting { node, write, tx });
                    break (None, Some(rx));
                }
                st
            };
            // A writer, with non-blocking readers standing: one on its node
            // is met in the kernel; elsewhere the first one still open
            // feeds it.
            for n in standing {
                if n == node {
                    if self.fifo_reader_on(&key, n).await {
                        return Ok(FifoMatch::Local);
                    }
                } else if let Some(id) = self.fifo_feed_from(&key, n).await {
                    return Ok(FifoMatch::Connect { id, node: n });
                }
            }
            // Each was closed (and is forgotten): look again.
        };
        if let Some(rx) = rx {
            return rx
                .await
                .map_err(|_| err(libc::ECANCELED, "the FIFO's rendezvous was dropped"));
        }
        let other = other.expect("a partner or a wait");
        if other.node == node {
            let _ = other.tx.send(FifoMatch::Local);
            return Ok(FifoMatch::Local);
        }
        let reader = if write { other.node } else { node };
        let id = self.streams.new_stream_id();
        // The reader's node holds the place before the writer's connects.
        let held = if reader == self.node.node_id() {
            self.streams.expect_connection(id, true);
            Ok(())
        } else {
            match self.node.client(reader).await {
                Ok(c) => c
                    .fifo_expect(super::common::ctx(), id)
                    .await
                    .map_err(|e| err(libc::EHOSTUNREACH, format!("node {reader}: {e}"))),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = held {
            // The other opener waits on: it may meet someone else.
            self.lock()
                .waiting
                .entry(key)
                .or_default()
                .push_front(other);
            return Err(e);
        }
        let (mine, theirs) = if write {
            (
                FifoMatch::Connect { id, node: reader },
                FifoMatch::Accept { id },
            )
        } else {
            (FifoMatch::Accept { id }, FifoMatch::Connect { id, node })
        };
        tracing::debug!(
            "FIFO {}: reader on node {reader}, writer on node {}: stream {id:#x}",
            String::from_utf8_lossy(&key.path),
            if write { node } else { other.node }
        );
        if other.tx.send(theirs).is_err() {
            // It gave up just now: no writer will connect for it.
            return Err(err(libc::ECONNRESET, "the FIFO's other opener went away"));
        }
        Ok(mine)
    }
}

/// `key`'s FIFO opened for writing, blocking, if a reader has it open on
/// this node (and it is the same file).
fn open_for_feeding(key: &FifoKey) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(std::ffi::OsStr::from_bytes(&key.path))?;
    let m = f.metadata()?;
    if m.dev() != key.dev || m.ino() != key.ino {
        return Err(std::io::Error::other("another file under that name here"));
    }
    // Blocking from now on: the feeding thread waits for the reader.
    libkrg::streams::moving::set_nonblock(f.as_raw_fd(), false)?;
    Ok(f)
}

/// Move what comes on `sock` into `fifo` until the writer's end (its
/// connection ends) or the readers' (`EPIPE`: the connection is then shut,
/// so the writer sees its pipe broken). Bytes moved.
fn feed(sock: &OwnedFd, fifo: &std::fs::File) -> std::io::Result<u64> {
    let mut total = 0u64;
    loop {
        match super::sys::splice(sock.as_fd(), fifo.as_fd(), 1 << 16) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = nix::sys::socket::shutdown(sock.as_raw_fd(), Shutdown::Both);
                return Err(e);
            }
        }
    }
}

/// Whether kernel pid `pid` of this node has FIFO `key` open for reading.
fn reads_fifo(pid: i32, key: &FifoKey) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten().any(|f| {
        let same =
            std::fs::metadata(f.path()).is_ok_and(|m| m.dev() == key.dev && m.ino() == key.ino);
        let fd = f.file_name().to_str().and_then(|n| n.parse().ok());
        same && fd
            .and_then(|fd| super::streams::accmode(pid, fd))
            .is_some_and(|m| m != libc::O_WRONLY)
    })
}
