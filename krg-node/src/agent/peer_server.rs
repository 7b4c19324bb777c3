//! Connections from other agents: the key handshake, the channel the
//! caller chooses after it (see `peer`), and the answers to tarpc calls,
//! each given by the subsystem the call belongs to.

use super::peer::dsm::{HomeOp, HomeReply};
use super::peer::remote::SpawnSpec;
use super::peer::sched::SchedPolicy;
use super::peer::streams::{End, FifoKey, FifoMatch, PortOp};
use super::peer::sync::{SemHomeOp, SemReply};
use super::peer::{self, auth, GroupKill, Heartbeat, Peer};
use super::{dsm, Agent};
use futures::StreamExt;
use libkrg::proto::{
    CapsInfo, CkptDoneInfo, CkptOrder, ErrorReply, ProcInfo, SchedInfo, StreamPeer,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tarpc::context;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Accept connections from other agents forever.
pub(super) async fn accept(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        let (s, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("accept on {}: {e}", agent.node.cfg.listen);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(serve(agent.clone(), s, addr));
    }
}

/// One connection: authenticate the caller, then serve the channel it
/// chooses.
async fn serve(a: Arc<Agent>, mut s: TcpStream, addr: SocketAddr) {
    use tokio::io::AsyncReadExt;
    let _ = s.set_nodelay(true);
    let id = match auth::server(&mut s, &a.node.cfg.key, a.node.cfg.node_id).await {
        Ok(id) => id,
        Err(e) => return warn!("refused connection from {addr}: {e}"),
    };
    let mut ch = [0u8; 1];
    let got = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ch)).await;
    match (got, ch[0]) {
        (Ok(Ok(_)), peer::CHANNEL_TARPC) => {
            debug!("node {id} connected from {addr}");
            serve_tarpc(s, a).await;
        }
        (Ok(Ok(_)), peer::CHANNEL_DSM) => {
            debug!("node {id}: shared memory link from {addr}");
            dsm::link::serve(s, a.dsm.clone(), id).await;
        }
        (Ok(Ok(_)), peer::CHANNEL_DSM_FAULTS) => {
            debug!("node {id}: fault connection from {addr}");
            dsm::link::serve_faults(s, a.dsm.clone(), id);
        }
        (Ok(Ok(_)), peer::CHANNEL_STREAM) => {
            debug!("node {id}: stream hand-over from {addr}");
            a.streams.clone().stream_accept(s, id).await;
        }
        (Ok(Ok(_)), c) => warn!("node {id} at {addr}: unknown channel {c}"),
        _ => warn!("node {id} at {addr}: no channel chosen"),
    }
}

/// The [`Peer`] service on connection `s`, each call in a task of its own.
async fn serve_tarpc(s: TcpStream, a: Arc<Agent>) {
    use tarpc::server::{BaseChannel, Channel};
    BaseChannel::with_defaults(peer::transport(s))
        .execute(PeerServer(a).serve())
        .for_each(|fut| async {
            tokio::spawn(fut);
        })
        .await;
}

/// The tarpc face of the agent: each call is answered by the subsystem
/// it belongs to.
#[derive(Clone, Debug)]
pub struct PeerServer(pub Arc<Agent>);

impl Peer for PeerServer {
    async fn heartbeat(self, _: context::Context, hb: Heartbeat) -> Heartbeat {
        self.0.on_heartbeat(hb)
    }

    async fn procs(self, _: context::Context) -> Vec<ProcInfo> {
        self.0.node.procs().ps()
    }

    async fn kill(
        self,
        _: context::Context,
        g: i32,
        sig: i32,
        uid: u32,
        hops: u8,
    ) -> Result<(), ErrorReply> {
        self.0.procs.peer_kill(g, sig, uid, hops).await
    }

    async fn kill_group(self, _: context::Context, pgid: i32, sig: i32, uid: u32) -> GroupKill {
        self.0.procs.peer_kill_group(pgid, sig, uid)
    }

    async fn cap_get(self, _: context::Context, g: i32) -> Result<CapsInfo, ErrorReply> {
        self.0.procs.cap_get_local(g)
    }

    async fn cap_set(
        self,
        _: context::Context,
        g: i32,
        spec: String,
        eff: bool,
        inh: bool,
        uid: u32,
    ) -> Result<CapsInfo, ErrorReply> {
        self.0.procs.cap_set_local(g, &spec, eff, inh, uid)
    }

    async fn spawn(self, _: context::Context, spec: SpawnSpec) -> Result<(i32, i32), ErrorReply> {
        self.0.remote.spawn_here(spec).await
    }

    async fn checkpoint(
        self,
        _: context::Context,
        g: i32,
        order: CkptOrder,
        uid: u32,
        hops: u8,
    ) -> Result<CkptDoneInfo, ErrorReply> {
        self.0.ckpt.checkpoint(g, order, uid, hops).await
    }

    async fn set_location(self, _: context::Context, g: i32, node: u32) {
        self.0.node.procs().set_location(g, node);
    }

    async fn child_exited(self, _: context::Context, g: i32, status: i32) {
        self.0.children.child_ended(g, status);
    }

    async fn fifo_meet(
        self,
        _: context::Context,
        key: FifoKey,
        node: u32,
        write: bool,
        nonblock: bool,
    ) -> Result<FifoMatch, ErrorReply> {
        self.0.fifos.fifo_meet(key, node, write, nonblock).await
    }

    async fn fifo_expect(self, _: context::Context, id: u64) {
        self.0.streams.expect_connection(id, true);
    }

    async fn fifo_stand(self, _: context::Context, key: FifoKey, node: u32) {
        self.0.fifos.fifo_stand_at_home(key, node).await;
    }

    async fn fifo_feed(self, _: context::Context, key: FifoKey, id: u64) -> bool {
        self.0.fifos.fifo_feed(key, id).await
    }

    async fn fifo_reader_here(self, _: context::Context, key: FifoKey) -> bool {
        self.0.fifos.fifo_reader_here(&key)
    }

    async fn unix_name_set(self, _: context::Context, key: FifoKey, node: u32) {
        self.0.unix.unix_name_set(key, node);
    }

    async fn unix_name_owner(self, _: context::Context, key: FifoKey) -> Option<u32> {
        self.0.unix.unix_name_owner(&key)
    }

    async fn unix_stand_in(
        self,
        _: context::Context,
        key: FifoKey,
        uid: u32,
        gids: Vec<u32>,
        seqpacket: bool,
    ) -> Result<u64, ErrorReply> {
        self.0.unix.unix_stand_in(key, uid, gids, seqpacket).await
    }

    async fn sched_get(self, _: context::Context) -> SchedPolicy {
        self.0.sched.sched_policy()
    }

    async fn dsm_home(self, _: context::Context, op: HomeOp) -> Result<HomeReply, ErrorReply> {
        self.0.dsm.home_op(op).await
    }

    async fn sem_home(self, _: context::Context, op: SemHomeOp) -> Result<SemReply, ErrorReply> {
        self.0.sems.sem_home_op(op).await
    }

    async fn port_home(self, _: context::Context, op: PortOp) -> Result<Option<u32>, ErrorReply> {
        self.0.streams.port_home_op(op).await
    }

    async fn port_probe(self, _: context::Context, port: u16, reuse: bool) -> bool {
        self.0.streams.port_probe(port, reuse).await
    }

    async fn loopback_peer(self, _: context::Context, ip: [u8; 4], from: u16, port: u16, v6: bool) {
        self.0.streams.note_loopback_peer(ip, from, port, v6);
    }

    async fn stream_hold(
        self,
        _: context::Context,
        ends: Vec<End>,
        commit: bool,
    ) -> Result<Vec<StreamPeer>, ErrorReply> {
        self.0.streams.stream_hold(ends, commit).await
    }

    async fn stream_call_off(self, _: context::Context, ids: Vec<u64>) {
        self.0.streams.call_off(&ids)
    }

    async fn sched_push(
        self,
        _: context::Context,
        policy: SchedPolicy,
    ) -> Result<SchedInfo, ErrorReply> {
        self.0.sched.sched_receive(policy)
    }
}
