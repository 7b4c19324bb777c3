//! The protocol between agents, as `libkrg::proto` is for the local one:
//! every message that travels from one agent to another is defined here
//! or in this module's files (one per subsystem), and this module uses no
//! subsystem (they use it).
//!
//! A connection starts with the key handshake ([`auth`]); the client
//! then sends one byte choosing the service:
//!
//! - [`CHANNEL_TARPC`]: the [`Peer`] service, tarpc over length-delimited
//!   bincode frames;
//! - [`CHANNEL_DSM`]: the shared-memory link, [`dsm::Req`] and
//!   [`dsm::Resp`] in frames of `u32` length, `u64` request id and a
//!   bincode body (`dsm/link.rs`);
//! - [`CHANNEL_STREAM`]: a stream hand-over: the stream id, its kind and
//!   the bytes that were in flight each way (`streams/attach.rs`); a
//!   seqpacket stream then carries tagged messages (`seqpacket.rs`);
//! - [`CHANNEL_DSM_FAULTS`]: a fault connection, the link's frames served
//!   by a thread outside tokio (`dsm/link.rs`).

pub mod auth;
pub mod dsm;
pub mod remote;
pub mod sched;
pub mod streams;
pub mod sync;

use libkrg::proto::{CapsInfo, CkptDoneInfo, CkptOrder, ErrorReply, NodeStatus, ProcInfo};
use libkrg::proto::{SchedInfo, StreamPeer};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use tarpc::serde_transport;
use tarpc::serde_transport::Transport;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio::net::TcpStream;

/// The byte a connecting agent sends after authenticating: which service.
pub const CHANNEL_TARPC: u8 = 0;
pub const CHANNEL_DSM: u8 = 1;
pub const CHANNEL_STREAM: u8 = 2;
pub const CHANNEL_DSM_FAULTS: u8 = 3;

/// Largest frame between agents (a spawn carries what was in its
/// program's pipes and relays when they are handed over: a few MiB).
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// What a heartbeat carries both ways: the sender's state and the members
/// it knows (so a node that joined through one seed learns everyone).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Heartbeat {
    pub from: NodeStatus,
    pub known: Vec<(u32, SocketAddr)>,
    /// Version of the sender's scheduling policy.
    pub sched: sched::SchedVersion,
}

/// Result of signalling a process group on one node.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct GroupKill {
    pub found: u32,
    pub sent: u32,
    pub error: Option<ErrorReply>,
}

#[tarpc::service]
pub trait Peer {
    /// Liveness, load and membership, every half second.
    async fn heartbeat(hb: Heartbeat) -> Heartbeat;
    /// The SSI processes running on the callee.
    async fn procs() -> Vec<ProcInfo>;
    /// Signal one process whose gpid the callee owns; `caller_uid` was
    /// checked with SO_PEERCRED by the calling agent.
    async fn kill(gpid: i32, sig: i32, caller_uid: u32, hops: u8) -> Result<(), ErrorReply>;
    /// Signal the callee's members of a process group.
    async fn kill_group(pgid: i32, sig: i32, caller_uid: u32) -> GroupKill;
    async fn cap_get(gpid: i32) -> Result<CapsInfo, ErrorReply>;
    async fn cap_set(
        gpid: i32,
        spec: String,
        effective: bool,
        inheritable: bool,
        caller_uid: u32,
    ) -> Result<CapsInfo, ErrorReply>;
    // --- remote exec ---
    /// Start a program (or restore an image) here for a shadow on the
    /// caller's node; returns its kernel pid here and its gpid.
    async fn spawn(spec: remote::SpawnSpec) -> Result<(i32, i32), ErrorReply>;
    // --- checkpoint ---
    /// Checkpoint a process running on the callee (`caller_uid` checked
    /// with SO_PEERCRED by the calling agent).
    async fn checkpoint(
        gpid: i32,
        order: CkptOrder,
        caller_uid: u32,
        hops: u8,
    ) -> Result<CkptDoneInfo, ErrorReply>;
    /// The callee is the origin node of `gpid`: it now runs on `node`.
    async fn set_location(gpid: i32, node: u32);
    /// Child `gpid` of a process that moved to the callee ended with wait
    /// status `status` (its child shadow there ends likewise).
    async fn child_exited(gpid: i32, status: i32);
    /// At the key home: a process on `node` opens the FIFO `key` for
    /// reading or writing; answered once a partner has come.
    async fn fifo_meet(
        key: streams::FifoKey,
        node: u32,
        write: bool,
        nonblock: bool,
    ) -> Result<streams::FifoMatch, ErrorReply>;
    /// A FIFO's writer's node will connect for stream `id`: hold it.
    async fn fifo_expect(id: u64);
    /// At the key home: a non-blocking reader of FIFO `key` opened it on
    /// `node`.
    async fn fifo_stand(key: streams::FifoKey, node: u32);
    /// At a standing reader's node: if a reader has FIFO `key` open here,
    /// hold a place for stream `id` and write what comes on it into the
    /// FIFO; whether it does.
    async fn fifo_feed(key: streams::FifoKey, id: u64) -> bool;
    /// Whether a non-blocking reader of FIFO `key` on the callee's node
    /// still has it open.
    async fn fifo_reader_here(key: streams::FifoKey) -> bool;
    /// At the key home: the UNIX socket name `key` is listened on at `node`.
    async fn unix_name_set(key: streams::FifoKey, node: u32);
    /// At the key home: where the UNIX socket name `key` is listened on.
    async fn unix_name_owner(key: streams::FifoKey) -> Option<u32>;
    /// At the listener's node: queue a stand-in on the listener of `key`
    /// for a client with `uid` and groups `gids` (its primary first), and
    /// hold a place for its connection; answers the connection's id.
    /// `seqpacket`: the client's socket is one (the stand-in too).
    async fn unix_stand_in(
        key: streams::FifoKey,
        uid: u32,
        gids: Vec<u32>,
        seqpacket: bool,
    ) -> Result<u64, ErrorReply>;
    // --- scheduling ---
    /// The scheduling policy in force on the callee, with its text (a node
    /// whose heartbeat showed an older version fetches it).
    async fn sched_get() -> sched::SchedPolicy;
    /// `krg sched set` on the caller: apply `policy` if it is newer than
    /// the callee's; answers the policy in force on the callee afterwards.
    async fn sched_push(policy: sched::SchedPolicy) -> Result<SchedInfo, ErrorReply>;
    // --- System V semaphores ---
    /// A request to the home of a semaphore set.
    async fn sem_home(op: sync::SemHomeOp) -> Result<sync::SemReply, ErrorReply>;
    /// Read ahead: a request to a segment's home whose answer is large.
    async fn dsm_home(op: dsm::HomeOp) -> Result<dsm::HomeReply, ErrorReply>;
    // --- streams ---
    /// A request to the port home of the cluster-wide loopback.
    async fn port_home(op: streams::PortOp) -> Result<Option<u32>, ErrorReply>;
    /// Whether a TCP port is bound on the callee (it tries to bind it).
    async fn port_probe(port: u16, reuse: bool) -> bool;
    /// A client at `ip:from` (the caller's node) is about to connect to
    /// port `port` held on the callee, at the loopback (`::1` if `v6`).
    async fn loopback_peer(ip: [u8; 4], from: u16, port: u16, v6: bool);
    /// Freeze the SSI processes holding `ends` on the callee (their other
    /// ends are moving); what became of each. `commit` false only checks
    /// that it could.
    async fn stream_hold(
        ends: Vec<streams::End>,
        commit: bool,
    ) -> Result<Vec<StreamPeer>, ErrorReply>;
    /// A mover's capture failed: end the hand-overs `ids` held on the
    /// callee that it never took.
    async fn stream_call_off(ids: Vec<u64>);
}

/// tarpc's transport on an authenticated connection whose channel is
/// chosen: bincode in length-delimited frames.
pub type PeerTransport<Item, SinkItem> =
    Transport<TcpStream, Item, SinkItem, Bincode<Item, SinkItem>>;

/// The framing of the [`Peer`] service on connection `s`, for either side.
pub fn transport<Item, SinkItem>(s: TcpStream) -> PeerTransport<Item, SinkItem>
where
    Item: for<'de> Deserialize<'de>,
    SinkItem: Serialize,
{
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec();
    serde_transport::new(Framed::new(s, codec), Bincode::default())
}

/// Connect to a peer, authenticate, and return a client with its node id.
pub async fn connect(
    addr: SocketAddr,
    key: &[u8],
    my_id: u32,
) -> std::io::Result<(u32, PeerClient)> {
    let mut s = tokio::time::timeout(std::time::Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    let id = auth::client(&mut s, key, my_id).await?;
    {
        use tokio::io::AsyncWriteExt;
        s.write_all(&[CHANNEL_TARPC]).await?;
    }
    Ok((
        id,
        PeerClient::new(tarpc::client::Config::default(), transport(s)).spawn(),
    ))
}
