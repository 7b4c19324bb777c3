//! The new connection of a moved stream: the mover's new node connects to
//! the peer's agent (channel `CHANNEL_STREAM`), the two agents swap what was
//! in flight and refill each end; kept connections are relayed.

use super::*;

impl Streams {
    /// Take over held stream `id` for its hand-over: where its peer's new
    /// end goes, and (once the peer has drained) the bytes that were in
    /// flight for the peer and whether it had shut down writing.
    pub(super) async fn handover(
        &self,
        id: u64,
        what: &str,
    ) -> Result<(FdSender, Drained), ErrorReply> {
        let (drx, ftx) = {
            let mut h = self.moving.held();
            let h = h
                .get_mut(&id)
                .ok_or_else(|| err(libc::ENOENT, format!("{what}: not held here")))?;
            (h.drained_rx.take(), h.fd_tx.take())
        };
        let (drx, ftx) = drx
            .zip(ftx)
            .ok_or_else(|| err(libc::EBUSY, format!("{what}: already handed over")))?;
        let drained = tokio::time::timeout(HANDOVER_TIMEOUT, drx)
            .await
            .map_err(|_| err(libc::ETIMEDOUT, format!("{what}: the peer never drained")))?
            .map_err(|_| err(libc::ECONNRESET, format!("{what}: the peer went away")))?;
        Ok((ftx, drained))
    }

    /// The agents' port, channel `CHANNEL_STREAM`: the moving side's new
    /// node connects for stream `id`.
    pub(crate) async fn stream_accept(self: Arc<Self>, s: tokio::net::TcpStream, from: u32) {
        if let Err(e) = self.stream_accept_inner(s, from).await {
            tracing::warn!("stream hand-over from node {from}: {}", e.msg);
        }
    }

    pub(super) async fn stream_accept_inner(
        self: &Arc<Self>,
        mut s: tokio::net::TcpStream,
        from: u32,
    ) -> Result<(), ErrorReply> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The hand-over is a few small messages each way: Nagle's wait for
        // a delayed ACK would add 40 ms to the move (the process's own
        // setting is put back when it takes its end).
        let _ = s.set_nodelay(true);
        let id = s
            .read_u64_le()
            .await
            .map_err(|e| sock_err("stream id", e))?;
        let messages = s.read_u8().await.map_err(|e| sock_err("stream kind", e))? == KIND_MESSAGES;
        let theirs = read_blob(&mut s).await?;
        let what = format!("stream {id:#x}");
        let (ftx, (mine, wr_shut, pair)) = self.handover(id, &what).await?;
        if !messages && pair.is_some() {
            return Err(err(
                libc::EPROTOTYPE,
                format!("{what}: a seqpacket socket at one end only"),
            ));
        }
        // Messages stay on this side: each agent refills its own process.
        let sent: &[u8] = if messages { &[] } else { &mine };
        s.write_u64_le(sent.len() as u64)
            .await
            .map_err(|e| sock_err("stream", e))?;
        s.write_all(sent).await.map_err(|e| sock_err("stream", e))?;
        let fd = match pair {
            Some(p) => self.relay_pair(s, id, from, p, &mine)?,
            // Messages for a connection expected here (a seqpacket
            // listener's stand-in): whoever takes it relays it.
            None if messages => s
                .into_std()
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| sock_err(&what, e))?,
            None => refill(s, &theirs, wr_shut).await?,
        };
        let _ = ftx.send(fd);
        Ok(())
    }

    /// `StreamAttach` from the moved process: connect stream `id` to its
    /// peer's node; this process's end.
    pub(crate) async fn stream_attach(
        self: &Arc<Self>,
        id: u64,
        node: u32,
        pending: Vec<u8>,
        wr_shut: bool,
        pipe: bool,
    ) -> Result<Answer, ErrorReply> {
        self.stream_attach_with(id, node, pending, wr_shut, pipe, None)
            .await
    }

    /// [`Streams::stream_attach`]; `pair`: a seqpacket socket's new
    /// socketpair, taken from the caller.
    pub(crate) async fn stream_attach_with(
        self: &Arc<Self>,
        id: u64,
        node: u32,
        pending: Vec<u8>,
        wr_shut: bool,
        pipe: bool,
        pair: Option<super::seqpacket::Pair>,
    ) -> Result<Answer, ErrorReply> {
        use tokio::io::AsyncWriteExt;
        if node == self.node.node_id() {
            return self
                .stream_attach_here(id, pending, wr_shut, pipe, pair)
                .await;
        }
        let addr = self.node.member_addr(node).ok_or_else(|| {
            err(
                libc::EHOSTDOWN,
                format!("stream {id:#x}: node {node} is unknown"),
            )
        })?;
        let what = format!("stream {id:#x} to node {node}");
        let mut s = tokio::time::timeout(HANDOVER_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| err(libc::ETIMEDOUT, format!("{what}: connect timed out")))?
            .map_err(|e| sock_err(&what, e))?;
        // As on the accepting side: no Nagle wait during the hand-over.
        let _ = s.set_nodelay(true);
        super::super::peer::auth::client(&mut s, &self.node.cfg.key, self.node.node_id())
            .await
            .map_err(|e| sock_err(&what, e))?;
        let kind = if pair.is_some() {
            KIND_MESSAGES
        } else {
            KIND_BYTES
        };
        let sent: &[u8] = if pair.is_some() { &[] } else { &pending };
        s.write_all(&[CHANNEL_STREAM])
            .await
            .map_err(|e| sock_err(&what, e))?;
        s.write_u64_le(id).await.map_err(|e| sock_err(&what, e))?;
        s.write_u8(kind).await.map_err(|e| sock_err(&what, e))?;
        s.write_u64_le(sent.len() as u64)
            .await
            .map_err(|e| sock_err(&what, e))?;
        s.write_all(sent).await.map_err(|e| sock_err(&what, e))?;
        let theirs = tokio::time::timeout(HANDOVER_TIMEOUT, read_blob(&mut s))
            .await
            .map_err(|_| err(libc::ETIMEDOUT, format!("{what}: no answer")))??;
        let fd = match pair {
            Some(p) => self.relay_pair(s, id, node, p, &pending)?,
            None => refill(s, &theirs, wr_shut).await?,
        };
        Ok((Response::StreamFd, vec![fd]))
    }

    /// The end of a seqpacket socket's hand-over over `s` (to `node`):
    /// its process's new `pair` refilled with the process's own `pending`
    /// messages, the other end relayed over `s`; the process's end.
    pub(super) fn relay_pair(
        self: &Arc<Self>,
        s: tokio::net::TcpStream,
        id: u64,
        node: u32,
        (end, relay): super::seqpacket::Pair,
        pending: &[u8],
    ) -> Result<std::os::fd::OwnedFd, ErrorReply> {
        let what = format!("stream {id:#x} to node {node}");
        super::seqpacket::refill(&relay, pending, &what)?;
        let tcp = s.into_std().map_err(|e| sock_err(&what, e))?;
        self.relay(id, node, relay, tcp);
        Ok(end)
    }
}

impl Streams {
    /// Both ends on this node: a loopback TCP connection, each end
    /// refilled with the other process's pending bytes, one end to the
    /// held peer, the other to the caller; a pipe again for a stream that
    /// stands for one.
    pub(super) async fn stream_attach_here(
        &self,
        id: u64,
        pending: Vec<u8>,
        wr_shut: bool,
        pipe: bool,
        pair: Option<super::seqpacket::Pair>,
    ) -> Result<Answer, ErrorReply> {
        let what = format!("stream {id:#x} on this node");
        let (ftx, (theirs, their_wr, their_pair)) = self.handover(id, &what).await?;
        match (pair, their_pair) {
            // Seqpacket ends that meet: one socketpair (the caller's), each
            // end refilled with its own process's messages from the other.
            (Some((mine, other)), Some(_)) => {
                super::seqpacket::refill(&other, &pending, &what)?;
                super::seqpacket::refill(&mine, &theirs, &what)?;
                let _ = ftx.send(other);
                return Ok((Response::StreamFd, vec![mine]));
            }
            (None, None) => {}
            _ => {
                return Err(err(
                    libc::EPROTOTYPE,
                    format!("{what}: a seqpacket socket at one end only"),
                ))
            }
        }
        // The reader shut its side for writing (it never writes), and
        // nothing can be in flight for the writer (whose end may have been
        // a shadow's relay, which says nothing of shutting).
        if pipe && !(wr_shut && their_wr) {
            let (reads, writes) = if wr_shut {
                (&pending, &theirs)
            } else {
                (&theirs, &pending)
            };
            if writes.is_empty() {
                match libkrg::streams::moving::pipe_holding(reads, 0) {
                    Ok((r, w)) => {
                        let (mine, peer) = if wr_shut { (r, w) } else { (w, r) };
                        let _ = ftx.send(peer);
                        return Ok((Response::StreamFd, vec![mine]));
                    }
                    Err(e) => {
                        // More in flight than a pipe holds (a relay's
                        // socket buffers): the reader gets its end at
                        // once, the bytes are fed in as it reads, and the
                        // writer gets its end after the last of them.
                        tracing::debug!("{what}: {e}: fed in while read");
                        let (r, w) = libkrg::streams::moving::pipe_holding(&[], 0)
                            .map_err(|e| err(libc::EMFILE, format!("{what}: {e}")))?;
                        let bytes = reads.clone();
                        let feed = move || {
                            let mut f = std::fs::File::from(w);
                            // A reader gone is the writer's EPIPE later,
                            // as on one machine.
                            let _ = std::io::Write::write_all(&mut f, &bytes);
                            std::os::fd::OwnedFd::from(f)
                        };
                        if wr_shut {
                            tokio::task::spawn_blocking(move || {
                                let _ = ftx.send(feed());
                            });
                            return Ok((Response::StreamFd, vec![r]));
                        }
                        let _ = ftx.send(r);
                        let w = tokio::task::spawn_blocking(feed)
                            .await
                            .map_err(|e| err(libc::EIO, format!("{what}: feeding: {e}")))?;
                        return Ok((Response::StreamFd, vec![w]));
                    }
                }
            }
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| sock_err(&what, e))?;
        let at = l.local_addr().map_err(|e| sock_err(&what, e))?;
        let (mine, accepted) = tokio::join!(tokio::net::TcpStream::connect(at), l.accept());
        let mine = mine.map_err(|e| sock_err(&what, e))?;
        let (theirs_end, _) = accepted.map_err(|e| sock_err(&what, e))?;
        // Our process's pending bytes go in from the peer's end, and the
        // other way round.
        let peer_fd = refill(theirs_end, &pending, their_wr).await?;
        let my_fd = refill(mine, &theirs, wr_shut).await?;
        let _ = ftx.send(peer_fd);
        Ok((Response::StreamFd, vec![my_fd]))
    }
}

pub(super) async fn read_blob(s: &mut tokio::net::TcpStream) -> Result<Vec<u8>, ErrorReply> {
    use tokio::io::AsyncReadExt;
    let n = s.read_u64_le().await.map_err(|e| sock_err("stream", e))?;
    if n > MAX_PENDING {
        return Err(err(
            libc::EMSGSIZE,
            format!("stream: {n} pending bytes announced"),
        ));
    }
    let mut b = vec![0u8; n as usize];
    s.read_exact(&mut b)
        .await
        .map_err(|e| sock_err("stream", e))?;
    Ok(b)
}

/// Write the other side's pending bytes into our end (they arrive first on
/// the other side), shut writing if our process had, and give our end
/// back as a plain blocking socket.
pub(super) async fn refill(
    mut s: tokio::net::TcpStream,
    theirs: &[u8],
    wr_shut: bool,
) -> Result<std::os::fd::OwnedFd, ErrorReply> {
    use tokio::io::AsyncWriteExt;
    if !theirs.is_empty() {
        // Room for all of it in our send buffer, so that neither side
        // waits for a process that is not reading yet (root may exceed
        // wmem_max).
        let want = theirs
            .len()
            .saturating_add(4 << 20)
            .min(i32::MAX as usize / 2);
        let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::SndBufForce, &want);
        s.write_all(theirs)
            .await
            .map_err(|e| sock_err("stream refill", e))?;
        // Queued: back to what autotuning would reach at most (the
        // process writes on this socket next; see `shrink_sndbuf`).
        libkrg::streams::moving::shrink_sndbuf(s.as_raw_fd(), tcp_wmem_max());
    }
    s.flush().await.map_err(|e| sock_err("stream refill", e))?;
    let std = s.into_std().map_err(|e| sock_err("stream", e))?;
    std.set_nonblocking(false)
        .map_err(|e| sock_err("stream", e))?;
    if wr_shut {
        let _ = std.shutdown(std::net::Shutdown::Write);
    }
    Ok(std::os::fd::OwnedFd::from(std))
}

/// The largest send buffer TCP autotuning gives a socket in this node's
/// network namespace (`tcp_wmem`'s third field; 4 MiB if unreadable).
pub(super) fn tcp_wmem_max() -> i32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(4 << 20)
}

/// Relay kept connection `old` (the moved process's old socket, with the
/// other end's process or kernel on it) and `new` (the moved process's new
/// end) until both directions end: an end of stream one way shuts the
/// other's writing, as the ends themselves would.
pub(super) async fn relay_kept(old: std::os::fd::OwnedFd, new: std::os::fd::OwnedFd, what: &str) {
    let tcp = |fd: std::os::fd::OwnedFd| {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(s)
    };
    let (mut a, mut b) = match (tcp(old), tcp(new)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("{what}: relaying it: {e}");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut a, &mut b).await {
        Ok((up, down)) => tracing::debug!("{what}: relayed {up} bytes in, {down} out; ended"),
        Err(e) => tracing::debug!("{what}: relay ended: {e}"),
    }
}
