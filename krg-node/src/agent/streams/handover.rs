//! The hand-over of a moving stream: the mover's freeze, its peers' holds
//! and swaps (all or none), what the staying peer says as it parks and
//! drains, and how a failed or raced hand-over ends.

use super::*;
use crate::agent::common::lock;

impl Streams {
    /// The node whose address is `ip`.
    pub(crate) fn node_at(&self, ip: IpAddr) -> Option<u32> {
        // Both ends on this node (a connection made over the loopback).
        if ip.is_loopback() || ip.to_canonical().is_loopback() {
            return Some(self.node.node_id());
        }
        let v4 = match ip {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => a.to_ipv4_mapped()?,
        };
        match self.node_addrs() {
            Response::NodeAddrs(v) => v
                .into_iter()
                .find(|(_, a)| *a == v4.octets())
                .map(|(n, _)| n),
            _ => None,
        }
    }

    /// `StreamFreeze` from a process being captured (`mover`): find the
    /// SSI process at the other end of each connection (on any node) and
    /// of each pipe (on this node), and have it drain and wait. Every peer
    /// node is checked before any peer is frozen.
    pub(super) async fn stream_freeze(
        self: &Arc<Self>,
        mover: Caller,
        conns: Vec<(String, String)>,
        pipes: Vec<String>,
        unix: Vec<u64>,
        optional: Vec<bool>,
    ) -> Result<Response, ErrorReply> {
        let (n_conns, n_pipes) = (conns.len(), pipes.len());
        let n = n_conns + n_pipes + unix.len();
        if optional.len() != n {
            return Err(err(
                libc::EINVAL,
                "StreamFreeze: one optional flag per stream",
            ));
        }
        let mut out = vec![StreamPeer::Nobody; n];
        // By peer node: (index, the end as the peer sees it).
        let mut by_node: HashMap<u32, Vec<(usize, End)>> = HashMap::new();
        for (i, (local, peer)) in conns.iter().enumerate() {
            let p: SocketAddr = peer
                .parse()
                .map_err(|_| err(libc::EINVAL, format!("bad socket address {peer:?}")))?;
            match self.node_at(p.ip()) {
                Some(node) => by_node
                    .entry(node)
                    .or_default()
                    .push((i, End::Tcp(peer.clone(), local.clone()))),
                None => out[i] = foreign(format!("TCP connection {local} -> {peer}: the peer is not a node of the cluster (connections leaving the cluster do not move)")),
            }
        }
        // A pipe (or FIFO) read by the mover and by other processes too
        // cannot be relayed (a shadow's relay reads ahead of its program:
        // what it takes and the program never reads is lost to the other
        // readers, as in `( head -c 30; read l )`), nor made a connection:
        // the move is refused. Placement is not a move: a program being
        // placed keeps the relay (remote-exec.md, "Pipes between nodes").
        if optional.iter().any(|o| *o) && !self.is_placing(mover.pid) {
            let mut want: Vec<String> = pipes
                .iter()
                .enumerate()
                .filter(|(j, l)| optional[n_conns + j] && is_pipe_link(l))
                .map(|(_, l)| l.clone())
                .collect();
            // A stdin that is a socket (a pipe that became a connection
            // in an earlier move, a relay) is relayed just the same when
            // another process holds it too: `sh -c 'read x; tr ...'`
            // moved twice lost every other line to its shadow's relay.
            if let Some(l) = std::fs::read_link(format!("/proc/{}/fd/0", mover.pid))
                .ok()
                .and_then(|l| l.to_str().map(str::to_string))
                .filter(|l| l.starts_with("socket:["))
            {
                want.push(l);
            }
            if !want.is_empty() {
                let all = holders(&want);
                if let Some(why) = want.iter().find_map(|l| shared_read(l, mover.pid, &all)) {
                    return Err(err(libc::EOPNOTSUPP, why));
                }
            }
        }
        for (j, link) in pipes.into_iter().enumerate() {
            // Only matched against the fd links of this node's processes,
            // the mover's among them (`holder_of`).
            if !is_pipe_link(&link) {
                return Err(err(
                    libc::EINVAL,
                    format!("StreamFreeze: {link:?} is neither a pipe nor a FIFO's path"),
                ));
            }
            by_node.entry(self.node.node_id()).or_default().push((
                conns.len() + j,
                End::Pipe {
                    link,
                    mover: mover.pid,
                },
            ));
        }
        // A seqpacket socket whose peer is one of this agent's relays: its
        // other end is the process at the relay's other node.
        let relayed: Vec<Option<(u64, u32)>> = if unix.is_empty() || self.moving.relays.count() == 0
        {
            vec![None; unix.len()]
        } else {
            let peers = tokio::task::spawn_blocking(libkrg::streams::unix::peers)
                .await
                .map_err(|e| err(libc::EIO, format!("UNIX socket peers: {e}")))?
                .map_err(|e| sock_err("UNIX socket peers", e))?;
            unix.iter()
                .map(|ino| peers.get(ino).and_then(|p| self.moving.relays.by_inode(*p)))
                .collect()
        };
        for (j, ino) in unix.iter().enumerate() {
            let (node, end) = match relayed[j] {
                Some((id, node)) => (node, End::Relay { id }),
                None => (
                    self.node.node_id(),
                    End::Unix {
                        ino: *ino,
                        mover: mover.pid,
                    },
                ),
            };
            by_node
                .entry(node)
                .or_default()
                .push((n_conns + n_pipes + j, end));
        }
        // Check everywhere; then freeze the ends that can be.
        let mut take: HashMap<u32, Vec<(usize, End)>> = HashMap::new();
        // TCP connections this agent keeps and relays (their other end
        // cannot take part): index, the mover's socket.
        let mut keep: Vec<(usize, std::os::fd::OwnedFd)> = Vec::new();
        for commit in [false, true] {
            let asked = if commit { &take } else { &by_node };
            let mut found: Vec<(u32, usize, StreamPeer)> = Vec::new();
            for (node, list) in asked {
                let ends: Vec<End> = list.iter().map(|(_, e)| e.clone()).collect();
                let r = if *node == self.node.node_id() {
                    self.stream_hold(ends, commit).await?
                } else {
                    let c = self.node.client(*node).await?;
                    c.stream_hold(super::super::common::ctx(), ends, commit)
                        .await
                        .map_err(|e| self.node.peer_lost(*node, "peer", e))??
                };
                found.extend(list.iter().zip(r).map(|((i, _), h)| (*node, *i, h)));
            }
            for (node, i, h) in found {
                if !commit && matches!(h, StreamPeer::Held { .. }) {
                    // It could be held: it is asked again to commit.
                    if let Some(e) = by_node[&node].iter().find(|(k, _)| *k == i) {
                        take.entry(node).or_default().push(e.clone());
                    }
                    continue;
                }
                out[i] = h;
            }
            if !commit {
                // A connection whose other end cannot take part (outside
                // krg or the cluster, shared, or closed) moves all the
                // same: this agent keeps its socket and relays it to the
                // mover's new end. Standard fds stay the shadow's to relay.
                for (i, (local, peer)) in conns.iter().enumerate() {
                    if optional[i] || !matches!(out[i], StreamPeer::Foreign(_)) {
                        continue;
                    }
                    match mover_socket(mover.pid, local, peer) {
                        Ok(fd) => {
                            keep.push((i, fd));
                            out[i] = StreamPeer::Nobody;
                        }
                        Err(e) => tracing::debug!("{local} -> {peer}: not kept: {e}"),
                    }
                }
                // Nothing frozen yet: a stream that must move and cannot
                // fails the whole move here.
                if let Some(why) = out.iter().zip(&optional).find_map(|(o, opt)| match o {
                    StreamPeer::Foreign(w) if !opt => Some(w.clone()),
                    _ => None,
                }) {
                    return Err(why);
                }
            }
        }
        for (i, fd) in keep {
            let id = self.new_stream_id();
            self.expect_connection(id, false);
            let agent = self.clone();
            let what = format!("TCP connection {} -> {}", conns[i].0, conns[i].1);
            tokio::spawn(async move {
                match agent.take_expected(id).await {
                    Ok(new) => relay_kept(fd, new, &what).await,
                    Err(e) => tracing::warn!("{what}: kept, never taken: {}", e.msg),
                }
            });
            out[i] = StreamPeer::Kept {
                id,
                node: self.node.node_id(),
            };
        }
        tracing::debug!("streams of kernel pid {}: {out:?}", mover.pid);
        let held: Vec<(u32, u64)> = out
            .iter()
            .filter_map(|p| match p {
                StreamPeer::Held { id, node } | StreamPeer::Kept { id, node } => Some((*node, *id)),
                _ => None,
            })
            .collect();
        if !held.is_empty() {
            lock(&self.moving.frozen_for)
                .entry(mover.pid)
                .or_default()
                .extend(held);
        }
        Ok(Response::Streams(out))
    }

    /// The capture of a mover failed after its peers were frozen for it
    /// and it did not connect back (it died mid-move, or its reconnection
    /// failed): each of `ids` held here and not handed over ends as if the
    /// mover had died, at once rather than after [`HANDOVER_TIMEOUT`]. A
    /// peer that drained gets a stream with the bytes it had in flight,
    /// then its end (a write there fails with EPIPE, as to a dead reader);
    /// one that had not gets an error and keeps its old end.
    pub(crate) fn call_off(&self, ids: &[u64]) {
        let mut held = self.moving.held();
        for id in ids {
            let Some(h) = held.get_mut(id) else { continue };
            // Taken: the hand-over went on (the mover reconnected).
            let Some(ftx) = h.fd_tx.take() else { continue };
            let drained = h.drained_rx.as_mut().and_then(|r| r.try_recv().ok());
            let ended = match drained {
                Some((pending, _, None)) => {
                    libkrg::streams::unix::pair_holding(false, &pending, &[]).map(|(end, _)| end)
                }
                _ => Err("not drained".into()),
            };
            match ended {
                Ok(end) => {
                    let _ = ftx.send(end);
                    tracing::debug!("stream {id:#x}: called off, its peer sees the end");
                }
                Err(why) => {
                    held.remove(id);
                    tracing::debug!("stream {id:#x}: called off ({why})");
                }
            }
        }
    }
}

impl Streams {
    /// Have shadow `g` (kernel pid `kpid`) hand over its relay of fd `fd`
    /// to its program on `node`: the program's end of the relay is held
    /// there like the peer of a moving connection, and the shadow sends on
    /// what it still has, then closes its end. `Relayed` (the program's
    /// end, held) or why not (the relay goes on).
    pub(super) async fn release_relay(
        self: &Arc<Self>,
        g: i32,
        kpid: i32,
        fds: &[i32],
        node: u32,
    ) -> StreamPeer {
        let what = format!("fds {fds:?} of pid {g}'s shadow");
        let (relays_tx, relays_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel();
        {
            let mut r = self.moving.releases();
            if r.contains_key(&kpid) {
                return foreign(format!("{what}: already being handed over"));
            }
            r.insert(kpid, Release { relays_tx, go_rx });
        }
        // The shadow reads it from its signalfd.
        if super::super::sys::kill(kpid, libkrg::proto::CKPT_SIGNAL).is_err() {
            self.moving.releases().remove(&kpid);
            return foreign(format!("{what}: the shadow is gone"));
        }
        let relays = match tokio::time::timeout(SETTLE_TIMEOUT, relays_rx).await {
            Ok(Ok(r)) => r,
            _ => {
                self.moving.releases().remove(&kpid);
                return foreign(format!("{what}: the shadow did not answer"));
            }
        };
        let refuse = |go_tx: tokio::sync::oneshot::Sender<Result<i32, String>>, why: String| {
            let _ = go_tx.send(Err(why.clone()));
            foreign(why)
        };
        // One relay for all of them (`2>&1` shares stdout's): two streams
        // could not become one connection.
        let mut mine = relays.into_iter().filter(|(f, _, _)| fds.contains(f));
        let (fd, local, peer) = match (mine.next(), mine.next()) {
            (Some(r), None) => r,
            (None, _) => return refuse(go_tx, format!("{what}: not relayed (any more)")),
            (Some(_), Some(_)) => {
                return refuse(
                    go_tx,
                    format!(
                        "{what}: relayed as separate streams (they cannot become one connection)"
                    ),
                )
            }
        };
        // The program's end, as it sees it.
        let end = End::Tcp(peer, local);
        let held = match self.node.client(node).await {
            Ok(c) => c
                .stream_hold(super::super::common::ctx(), vec![end], true)
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.msg)),
            Err(e) => Err(e.msg),
        };
        match held.as_deref() {
            Ok([StreamPeer::Held { id, node }]) => {
                let _ = go_tx.send(Ok(fd));
                StreamPeer::Relayed {
                    id: *id,
                    node: *node,
                }
            }
            Ok([StreamPeer::Foreign(why)]) => refuse(go_tx, format!("{what}: {}", why.msg)),
            Ok(other) => refuse(go_tx, format!("{what}: its program's end: {other:?}")),
            Err(e) => refuse(go_tx, format!("{what}: node {node}: {e}")),
        }
    }

    /// `ShadowRelays` from a shadow told to hand a relay over: its relays
    /// go to the waiting [`Streams::release_relay`], and it gets the fd to
    /// let go of once its program's end is held.
    pub(super) async fn shadow_relays(
        &self,
        who: Caller,
        relays: Relays,
    ) -> Result<Response, ErrorReply> {
        let r = self.moving.releases().remove(&who.pid).ok_or_else(|| {
            err(
                libc::ENOENT,
                "no relay of this process is being handed over",
            )
        })?;
        r.relays_tx
            .send(relays)
            .map_err(|_| err(libc::ECANCELED, "the hand-over was given up"))?;
        match tokio::time::timeout(HANDOVER_TIMEOUT, r.go_rx).await {
            Ok(Ok(Ok(fd))) => Ok(Response::Release(fd)),
            Ok(Ok(Err(why))) => Err(err(libc::EAGAIN, why)),
            _ => Err(err(libc::ECANCELED, "the hand-over was given up")),
        }
    }

    /// At the staying peers' node: freeze the SSI processes holding the
    /// `ends` (one `StreamSwap` order per process); what became of each.
    /// `commit` false: only check that it could (`Held` with id 0).
    pub(crate) async fn stream_hold(
        self: &Arc<Self>,
        ends: Vec<End>,
        commit: bool,
    ) -> Result<Vec<StreamPeer>, ErrorReply> {
        let ends_are_local = !ends.iter().any(|e| matches!(e, End::Tcp(..)));
        let relays = self.moving.relays.inodes();
        // One read of the TCP table and one walk of /proc for every end.
        let find = move || {
            let links = links_of(&ends, &relays);
            let want: Vec<String> = links
                .iter()
                .filter_map(|l| l.as_ref().ok().map(|(_, l, _)| l.clone()))
                .collect();
            let all = holders(&want);
            (links, all)
        };
        let (links, mut all) = if ends_are_local {
            // A walk of this node's few processes (~0.1 ms): cheaper here
            // than a wake-up of the blocking pool (a placed program's
            // stdio pipes are looked up on every remote exec).
            find()
        } else {
            tokio::task::spawn_blocking(find)
                .await
                .map_err(|e| err(libc::EIO, format!("looking for the streams' ends: {e}")))?
        };
        // A shell that has just forked a mover being placed (at its exec)
        // still holds its copy of the mover's pipe end for a moment: wait
        // for it to close it (at most 0.1 s).
        for _ in 0..50 {
            if !links
                .iter()
                .flatten()
                .any(|(_, l, m)| self.is_placing(*m) && parent_shares(l, *m, &all))
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            let want: Vec<String> = links
                .iter()
                .filter_map(|l| l.as_ref().ok().map(|(_, l, _)| l.clone()))
                .collect();
            all = holders(&want);
        }
        // (Instant the second time, after a check.)
        self.settle(&links, &all).await;
        let found: Vec<Found> = links
            .iter()
            .map(|l| match l {
                Ok((what, link, mover)) => self.holder_of(what, link, *mover, &all),
                Err(why) => Err(foreign(format!("{why} (node {})", self.node.node_id()))),
            })
            .collect();
        let node = self.node.node_id();
        if !commit {
            return Ok(found
                .into_iter()
                .map(|f| f.map_or_else(|h| h, |_| StreamPeer::Held { id: 0, node }))
                .collect());
        }
        let mut ids = Vec::new();
        // Each id's peer: kernel pid, gpid, and whether its end is a pipe's.
        let mut peers: Vec<(u64, i32, i32, bool)> = Vec::new();
        let mut out = Vec::new();
        let mut orders: HashMap<i32, (i32, Vec<(i32, u64)>)> = HashMap::new();
        for (f, l) in found.iter().zip(&links) {
            let (g, kpid, fds) = match f {
                Ok((g, kpid, fds, Some(node))) => {
                    out.push(self.release_relay(*g, *kpid, fds, *node).await);
                    continue;
                }
                Ok((g, kpid, fds, None)) => (g, kpid, fds),
                Err(h) => {
                    out.push(h.clone());
                    continue;
                }
            };
            let id = self.new_stream_id();
            let mut h = Held::open();
            if let Ok((_, link, mover)) = l {
                h.sole = Some((link.clone(), vec![*kpid, *mover]));
            }
            h.peer_fds = Some((*kpid, fds.clone()));
            self.moving.held().insert(id, h);
            let e = orders.entry(*kpid).or_insert((*g, Vec::new()));
            e.1.extend(fds.iter().map(|fd| (*fd, id)));
            ids.push((out.len(), id));
            peers.push((
                id,
                *kpid,
                *g,
                l.as_ref().is_ok_and(|(_, link, _)| is_pipe_link(link)),
            ));
            out.push(StreamPeer::Held { id, node });
            tracing::debug!("stream {id:#x}: holding pid {g} fds {fds:?}");
        }
        for (kpid, (g, order)) in orders {
            let r = self.orders.order_stream_swap(g, kpid, order.clone());
            if r.as_ref().is_err_and(|e| e.kind == ErrorKind::PeerPlaced) {
                // Placed since it was found (the mover waited for a
                // shadow's relay meanwhile): its ends are relayed by its
                // shadow, handed over when it is asked then.
                let why = ErrorReply::new(
                    libc::EAGAIN,
                    ErrorKind::PeerPlaced,
                    format!("pid {g}: {PEER_PLACED}"),
                );
                let mut held = self.moving.held();
                for (_, id) in order {
                    held.remove(&id);
                    if let Some((i, _)) = ids.iter().find(|(_, x)| *x == id) {
                        out[*i] = StreamPeer::Foreign(why.clone());
                    }
                }
                continue;
            }
            if let Err(e) = r {
                // Every swap or none (the mover relays its ends, or tries
                // its move again). Peers ordered already (the orders go
                // out in no set order) find their ids gone at
                // `StreamFrozen` and keep their ends. Before, only the
                // refused order was called off: in `sort | uniq -c | sort
                // -rn | head` with uniq and head placed at once, the last
                // sort was busy with head's swap, uniq's other peer (the
                // first sort) froze and waited a minute for a connection
                // nobody would make.
                let mut held = self.moving.held();
                for (_, id) in &ids {
                    held.remove(id);
                }
                return Err(e);
            }
        }
        // The mover shuts its side down only once every peer thread is
        // parked: a thread still running could read that end of stream.
        let waits: Vec<_> = ids
            .iter()
            .filter_map(|(i, id)| {
                self.moving
                    .held()
                    .get_mut(id)
                    .and_then(|h| h.frozen_rx.take())
                    .map(|w| (*i, *id, w))
            })
            .collect();
        for (i, id, w) in waits {
            let Some(&(_, kpid, g, pipe)) = peers.iter().find(|p| p.0 == id) else {
                continue;
            };
            match self.await_frozen(kpid, w).await {
                Frozen::Yes => {}
                // Shared since it was found (see `stream_frozen`): the peer
                // goes on with its end as it was; the mover relays it.
                Frozen::Refused(why) => {
                    self.moving.held().remove(&id);
                    out[i] = foreign(why);
                }
                // Ended since it was found (`awk ... | grep` with grep
                // placed: awk had written all and exited): its end is
                // closed. Before, the mover waited a minute for it.
                Frozen::Ended => {
                    self.moving.held().remove(&id);
                    self.orders.forget_swap(kpid);
                    out[i] = if pipe {
                        StreamPeer::Nobody
                    } else {
                        foreign(format!(
                            "its other end's process (pid {g}) ended during the hand-over"
                        ))
                    };
                }
                Frozen::TimedOut => {
                    return Err(err(
                        libc::ETIMEDOUT,
                        "the peer of a moving connection did not stop (is its signal 62 blocked?)",
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Wait for the peer (local kernel pid `kpid`) to say it is parked
    /// (`w`), or to end first.
    pub(super) async fn await_frozen(
        &self,
        kpid: i32,
        mut w: tokio::sync::oneshot::Receiver<Result<(), String>>,
    ) -> Frozen {
        let until = tokio::time::Instant::now() + HANDOVER_TIMEOUT;
        loop {
            tokio::select! {
                r = &mut w => return match r {
                    Ok(Ok(())) => Frozen::Yes,
                    Ok(Err(why)) => Frozen::Refused(why),
                    Err(_) => Frozen::TimedOut,
                },
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                    if !super::super::procs::table::alive(kpid) {
                        // A word sent just before the end wins.
                        return match w.try_recv() {
                            Ok(Ok(())) => Frozen::Yes,
                            Ok(Err(why)) => Frozen::Refused(why),
                            Err(_) => Frozen::Ended,
                        };
                    }
                    if tokio::time::Instant::now() >= until {
                        return Frozen::TimedOut;
                    }
                }
            }
        }
    }

    /// A connection for stream `id` will come from another node for a
    /// process of this node that is not moving and has nothing pending
    /// (the reader of a FIFO, a UNIX listener): hold the place
    /// ([`Streams::take_expected`]). `reads_only`: its end is shut for
    /// writing (a FIFO's reader).
    pub(crate) fn expect_connection(&self, id: u64, reads_only: bool) {
        let mut h = Held::open();
        // Nothing in flight for it; nothing to freeze.
        if let Some(tx) = h.drained_tx.take() {
            let _ = tx.send((Vec::new(), reads_only, None));
        }
        self.moving.held().insert(id, h);
    }

    /// The connection expected for stream `id`, once it came.
    pub(crate) async fn take_expected(&self, id: u64) -> Result<std::os::fd::OwnedFd, ErrorReply> {
        self.await_fd(id, "not expected here", "the other node never connected")
            .await
    }

    /// The new end of held stream `id` once it comes (then forgotten);
    /// `missing`, `lost`: what to say when it is not held, or never came.
    async fn await_fd(
        &self,
        id: u64,
        missing: &str,
        lost: &str,
    ) -> Result<std::os::fd::OwnedFd, ErrorReply> {
        let rx = self
            .moving
            .held()
            .get_mut(&id)
            .and_then(|h| h.fd_rx.take())
            .ok_or_else(|| err(libc::ENOENT, format!("stream {id:#x}: {missing}")))?;
        let r = tokio::time::timeout(HANDOVER_TIMEOUT, rx).await;
        self.moving.held().remove(&id);
        match r {
            Ok(Ok(fd)) => Ok(fd),
            _ => Err(err(libc::ECONNRESET, format!("stream {id:#x}: {lost}"))),
        }
    }

    /// Give up the place held for stream `id` (nobody will take it).
    pub(crate) fn forget_expected(&self, id: u64) {
        self.moving.held().remove(&id);
    }

    /// A new stream id of this node.
    pub(crate) fn new_stream_id(&self) -> u64 {
        (u64::from(self.node.node_id()) << 40)
            | self
                .moving
                .next
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// `StreamFrozen` from the staying peer: its threads are parked.
    ///
    /// Its ends were found held by it alone, but it ran on until the swap
    /// order reached it: a child it forked meanwhile holds the old end too
    /// (a subshell starting `/bin/echo` just as the next stage of its
    /// pipeline is placed). Swapped, that child would be left with a pipe
    /// whose other end is gone: its output lost, or its input cut short.
    /// Parked, it can fork no more: so the holders are checked again here,
    /// and the swap refused (every end of this order, each relayed) if
    /// anyone else holds one now.
    pub(super) fn stream_frozen(&self, ids: &[u64]) -> Result<Response, ErrorReply> {
        let sole: Vec<(String, Vec<i32>)> = {
            let h = self.moving.held();
            ids.iter()
                .filter_map(|id| h.get(id).and_then(|x| x.sole.clone()))
                .collect()
        };
        // (link, (peer's kernel pid, its fds then)) of each end.
        let peer_fds: Vec<(String, (i32, Vec<i32>))> = {
            let h = self.moving.held();
            ids.iter()
                .filter_map(|id| h.get(id))
                .filter_map(|x| Some((x.sole.clone()?.0, x.peer_fds.clone()?)))
                .collect()
        };
        let want: Vec<String> = sole.iter().map(|(l, _)| l.clone()).collect();
        let all = if want.is_empty() {
            HashMap::new()
        } else {
            holders(&want)
        };
        let shared = sole.iter().find_map(|(link, ok)| {
            let others: Vec<(i32, i32)> = all
                .get(link)
                .into_iter()
                .flatten()
                .filter(|(p, _)| !ok.contains(p))
                .copied()
                .collect();
            (!others.is_empty()).then(|| {
                format!(
                    "{link}: held by other processes too since it was found (kernel pid, fd: {others:?}): not movable yet"
                )
            })
        });
        // The peer's fds moved since it was found: a shell's child found
        // with the pipe at fd 4 took the order only after its dup2 to 0,
        // close and exec (signals stay pending across them), so fd 4 was
        // gone when it drained it ("reading to its end: Bad file
        // descriptor"), while the mover had let its end go: the next stage
        // saw its input end early and the remote program waited a minute
        // (difftest seed 3 case 3). Refused, the peer keeps its end and the
        // mover relays it.
        let shared = shared.or_else(|| {
            peer_fds.iter().find_map(|(link, (kpid, fds))| {
                let mut now: Vec<i32> = all
                    .get(link)
                    .into_iter()
                    .flatten()
                    .filter(|(p, _)| p == kpid)
                    .map(|(_, fd)| *fd)
                    .collect();
                now.sort_unstable();
                let mut then = fds.clone();
                then.sort_unstable();
                (now != then).then(|| {
                    format!(
                        "{link}: kernel pid {kpid} holds it at fds {now:?} now, not {then:?} as when it was found: not movable yet"
                    )
                })
            })
        });
        let mut h = self.moving.held();
        // A swap called off after the order went out (another peer of the
        // same mover refused its own): the peer goes on as it was.
        let shared = match ids.iter().find(|id| !h.contains_key(id)) {
            Some(id) => Some(format!("stream {id:#x}: its hand-over was called off")),
            None => shared,
        };
        for id in ids {
            if let Some(tx) = h.get_mut(id).and_then(|x| x.frozen_tx.take()) {
                let _ = tx.send(match &shared {
                    None => Ok(()),
                    Some(why) => Err(why.clone()),
                });
            }
        }
        match shared {
            None => Ok(Response::Ok),
            Some(why) => {
                tracing::debug!("stream swap refused: {why}");
                Err(err(libc::EAGAIN, why))
            }
        }
    }

    /// `StreamDrained` from the staying peer.
    pub(super) fn stream_drained(
        &self,
        who: Caller,
        id: u64,
        pending: Vec<u8>,
        wr_shut: bool,
        pair: Option<(i32, i32)>,
    ) -> Result<Response, ErrorReply> {
        let pair = pair
            .map(|p| super::seqpacket::take_pair(who.pid, p))
            .transpose()?;
        let tx = self
            .moving
            .held()
            .get_mut(&id)
            .and_then(|h| h.drained_tx.take())
            .ok_or_else(|| err(libc::ENOENT, format!("stream {id:#x}: not held here")))?;
        let _ = tx.send((pending, wr_shut, pair));
        Ok(Response::Ok)
    }

    /// `StreamAwait` from the staying peer: its end of the new connection.
    pub(super) async fn stream_await(&self, id: u64) -> Result<Answer, ErrorReply> {
        let fd = self
            .await_fd(id, "not held here", "the moving peer never reconnected")
            .await?;
        Ok((Response::StreamFd, vec![fd]))
    }
}
