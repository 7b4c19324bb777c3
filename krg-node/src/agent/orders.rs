//! The orders waiting for local processes, taken by their checkpoint
//! handler (`CkptOrder`): captures and migrations (from `checkpoint`),
//! and the stream swaps a hand-over orders to the staying peer (from
//! `streams`). Under its lock an order and a placement at exec exclude
//! each other (`mark_placing`, `order_stream_swap`).

use super::common::{lock, Caller};
use super::node::Node;
use libkrg::proto::{CkptAction, CkptOrder, ErrorKind, ErrorReply};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Why a capture was refused when the other end of one of its streams is
/// being captured itself (or was frozen by it) at the same time.
const PEER_BUSY: &str = "the peer of a moving connection, is itself being captured";
const CAPTURE_BUSY: &str = "a capture is already under way";

/// Why a stream swap was not ordered: the peer is being placed at its
/// exec (its end is relayed by its shadow, then handed over).
pub(crate) const PEER_PLACED: &str =
    "the peer of a moving connection, is being placed on another node";

/// Orders waiting for (or being executed by) a process, by kernel pid:
/// captures, and the stream swaps the hand-overs order. Its lock also
/// decides between an order and a placement at exec (`mark_placing`).
pub struct Orders {
    node: Arc<Node>,
    pending: Mutex<HashMap<i32, Pending>>,
}

impl std::fmt::Debug for Orders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Orders({} pending)", self.lock().len())
    }
}

/// How a capture ended: bytes, and whether post-copy was used; or the
/// kind of failure and what failed.
pub(crate) type CaptureEnd = Result<(u64, bool), (ErrorKind, String)>;

struct Pending {
    order: CkptOrder,
    taken: bool,
    done: Option<oneshot::Sender<CaptureEnd>>,
}

impl Orders {
    pub fn new(node: Arc<Node>) -> Orders {
        Orders {
            node,
            pending: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Pending>> {
        lock(&self.pending)
    }

    /// Forget the stream swap ordered to local kernel pid `kpid`, which
    /// ended before it took it (its number may come back).
    pub(super) fn forget_swap(&self, kpid: i32) {
        let mut o = self.lock();
        if o.get(&kpid)
            .is_some_and(|p| p.order.action == CkptAction::StreamSwap)
        {
            o.remove(&kpid);
        }
    }

    /// Mark gpid `g` (local kernel pid `kpid`) as being placed, unless an
    /// order waits for its handler (the order's lock decides: see
    /// `order_stream_swap`).
    pub(super) fn mark_placing(&self, g: i32, kpid: i32) -> bool {
        let o = self.lock();
        if o.contains_key(&kpid) {
            return false;
        }
        if let Some(p) = self.node.procs().get_mut(g) {
            p.placing = true;
        }
        true
    }

    /// `CkptOrder` from a process in its handler.
    pub(crate) fn ckpt_order(&self, who: Caller) -> CkptOrder {
        let mut o = self.lock();
        match o.get_mut(&who.pid) {
            Some(p) if !p.taken => {
                p.taken = true;
                p.order.clone()
            }
            _ => CkptOrder {
                action: CkptAction::None,
                path: Vec::new(),
                kill: false,
                node: 0,
                streams: Vec::new(),
                precopy: false,
            },
        }
    }

    /// `CkptDone` from a process.
    pub(crate) fn ckpt_done(
        &self,
        who: Caller,
        ok: bool,
        kind: ErrorKind,
        msg: String,
        bytes: u64,
    ) {
        let mut o = self.lock();
        if let Some(p) = o.get_mut(&who.pid) {
            if let Some(tx) = p.done.take() {
                let _ = tx.send(if ok {
                    Ok((bytes, msg == libkrg::proto::POSTCOPY_DONE))
                } else {
                    Err((kind, msg))
                });
            }
            // Nobody waits for a stream swap: it ends here.
            if p.order.action == CkptAction::StreamSwap {
                o.remove(&who.pid);
            }
        }
    }

    /// Order a local process to hand its connections `streams` (fd, id) over
    /// to new ones (its peer moves). Not if a capture is under way.
    pub(super) fn order_stream_swap(
        &self,
        g: i32,
        kpid: i32,
        streams: Vec<(i32, u64)>,
    ) -> Result<(), ErrorReply> {
        {
            let mut o = self.lock();
            if o.contains_key(&kpid) {
                return Err(ErrorReply::new(
                    libc::EBUSY,
                    ErrorKind::PeerBusy,
                    format!("pid {g}, {PEER_BUSY}"),
                ));
            }
            // Decided under the same lock as `place_or_stay`: a process
            // placed at its exec blocks its signals and becomes a shadow,
            // which would never take the order (the mover waited a
            // minute for its peer to freeze).
            if self.node.procs().get(g).is_some_and(|p| p.placing) {
                return Err(ErrorReply::new(
                    libc::EAGAIN,
                    ErrorKind::PeerPlaced,
                    format!("pid {g}, {PEER_PLACED}"),
                ));
            }
            o.insert(
                kpid,
                Pending {
                    order: CkptOrder {
                        action: CkptAction::StreamSwap,
                        path: Vec::new(),
                        kill: false,
                        node: 0,
                        streams,
                        precopy: false,
                    },
                    taken: false,
                    done: None,
                },
            );
        }
        self.node
            .procs()
            .kill(g, libkrg::proto::CKPT_SIGNAL, 0)
            .inspect_err(|_| {
                self.lock().remove(&kpid);
            })
    }

    /// Record capture `order` for gpid `g` (local kernel pid `kpid`),
    /// unless an order waits for it already: the receiver gets the
    /// process's report.
    pub(crate) fn order_capture(
        &self,
        g: i32,
        kpid: i32,
        order: CkptOrder,
    ) -> Result<oneshot::Receiver<CaptureEnd>, ErrorReply> {
        let (tx, rx) = oneshot::channel();
        let mut o = self.lock();
        if o.contains_key(&kpid) {
            return Err(ErrorReply::new(
                libc::EBUSY,
                ErrorKind::CaptureBusy,
                format!("pid {g}: {CAPTURE_BUSY}"),
            ));
        }
        o.insert(
            kpid,
            Pending {
                order,
                taken: false,
                done: Some(tx),
            },
        );
        Ok(rx)
    }

    /// Forget the order of local kernel pid `kpid`: whether its process
    /// had taken it, if there was one.
    pub(crate) fn forget(&self, kpid: i32) -> Option<bool> {
        self.lock().remove(&kpid).map(|p| p.taken)
    }
}
