//! Streams, the agent's side: FIFOs opened by path from several nodes (see
//! docs/architecture/streams.md, "FIFOs").
//!
//! A FIFO is a kernel object of one node: a reader on node 2 and a writer
//! on node 3 opening the same path (in a directory both see) would each
//! wait forever in their own kernel. So an SSI process's open of a FIFO
//! goes to the *key home* (the lowest node up), which pairs each opener
//! with the first one waiting the other way for the same file. Two on one
//! node open the FIFO itself (the kernel does the rest, several writers
//! included); two on different nodes get the two ends of one TCP
//! connection between their nodes, standing for the FIFO like a pipe whose
//! ends parted (it moves with a migrated process, and becomes a pipe again
//! if the two ends meet on one node).

use super::{err, Agent};
use libkrg::proto::{ErrorReply, Response};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// A FIFO as every node names it: its canonical path, and the device and
/// inode the opener's node sees (a path in a directory private to a node,
/// or another file under the same name, is another FIFO).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct FifoKey {
    pub path: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
}

/// What an opener does, from the home.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum FifoMatch {
    /// Its partner is on its node: open the FIFO itself.
    Local,
    /// The reader: take the connection for stream `id` (its node holds
    /// the place).
    Accept { id: u64 },
    /// The writer: connect to `node` for stream `id`.
    Connect { id: u64, node: u32 },
}

/// An opener waiting at the home.
#[derive(Debug)]
struct Waiting {
    node: u32,
    write: bool,
    tx: tokio::sync::oneshot::Sender<FifoMatch>,
}

/// The home's waiting openers, by FIFO.
#[derive(Debug, Default)]
pub struct Fifos(std::sync::Mutex<HashMap<FifoKey, VecDeque<Waiting>>>);

/// Longest a rendezvous call to the home may wait (a FIFO's open blocks
/// until its partner comes).
const MEET_DEADLINE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

impl Agent {
    /// `FifoOpen` from a local process.
    pub(crate) async fn fifo_open(
        self: &Arc<Self>,
        key: FifoKey,
        write: bool,
    ) -> Result<(Response, Vec<OwnedFd>), ErrorReply> {
        let home = self.key_home();
        let me = self.node_id();
        let m = if home == me {
            self.fifo_meet(key, me, write).await?
        } else {
            let c = self.client(home).await?;
            let mut cx = tarpc::context::current();
            cx.deadline = std::time::Instant::now() + MEET_DEADLINE;
            c.fifo_meet(cx, key, me, write).await.map_err(|e| {
                self.drop_client(home);
                err(libc::EIO, format!("key home node {home}: {e}"))
            })??
        };
        match m {
            FifoMatch::Local => Ok((Response::Local, Vec::new())),
            FifoMatch::Accept { id } => {
                let fd = self.take_expected(id).await?;
                Ok((Response::StreamFd, vec![fd]))
            }
            FifoMatch::Connect { id, node } => {
                self.stream_attach(id, node, Vec::new(), false, true).await
            }
        }
    }

    /// At the key home: pair an opener of `key` on `node` with the first
    /// one waiting the other way, or wait for one.
    pub(crate) async fn fifo_meet(
        self: &Arc<Self>,
        key: FifoKey,
        node: u32,
        write: bool,
    ) -> Result<FifoMatch, ErrorReply> {
        let (other, rx) = {
            let mut all = self.fifos.0.lock().unwrap_or_else(|e| e.into_inner());
            let q = all.entry(key.clone()).or_default();
            // Openers that gave up (their call was dropped) are gone.
            q.retain(|w| !w.tx.is_closed());
            match q.iter().position(|w| w.write != write) {
                Some(i) => (q.remove(i), None),
                None => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    q.push_back(Waiting { node, write, tx });
                    (None, Some(rx))
                }
            }
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
        let id = self.new_stream_id();
        // The reader's node holds the place before the writer's connects.
        let held = if reader == self.node_id() {
            self.expect_connection(id, true);
            Ok(())
        } else {
            match self.client(reader).await {
                Ok(c) => c
                    .fifo_expect(super::ctx(), id)
                    .await
                    .map_err(|e| err(libc::EHOSTUNREACH, format!("node {reader}: {e}"))),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = held {
            // The other opener waits on: it may meet someone else.
            let mut all = self.fifos.0.lock().unwrap_or_else(|e| e.into_inner());
            all.entry(key).or_default().push_front(other);
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
