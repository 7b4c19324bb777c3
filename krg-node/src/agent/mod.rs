//! The krg agent, one per host: membership and heartbeats with the other
//! agents (tarpc over TCP, key-authenticated), and the routing of each
//! request of the local socket (application processes and `krg`) to the
//! subsystem that answers it; peers' calls are answered in `peer_server`.
//! See docs/architecture/agent.md.

pub mod checkpoint;
pub mod children;
pub mod common;
pub mod config;
pub mod dsm;
pub mod fifo;
pub mod local;
pub mod node;
pub mod orders;
pub mod parked;
pub mod peer;
mod peer_server;
pub mod probe;
pub mod procs;
pub mod remote;
pub mod sched;
pub mod stay;
pub mod streams;
pub mod sync;
#[allow(unsafe_code)]
mod sys;
pub mod unix;

use crate::agent::common::{bare, Answer, Caller};
use crate::agent::config::Config;
use crate::agent::node::Node;
use crate::agent::peer::Heartbeat;
use libkrg::proto::{CkptOrder, Request, Response};
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// How often heartbeats go out.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

/// The agent's shared state.
#[derive(Debug)]
pub struct Agent {
    /// This node, its membership and process table (see `node`).
    pub(crate) node: Arc<Node>,
    /// The scheduling policy in force, the recent placements and the load
    /// balancer.
    sched: Arc<sched::Scheduler>,
    /// Shared memory segments: those homed here and local copies.
    dsm: Arc<dsm::Dsm>,
    /// System V semaphore sets homed here.
    sems: Arc<sync::Sems>,
    /// The cluster-wide loopback's ports and the connections whose other
    /// end is moving (see `streams`).
    streams: Arc<streams::Streams>,
    /// Ends of children that run elsewhere, for their child shadows here
    /// (see `children`).
    children: Arc<children::Children>,
    /// The requests about processes (see `procs`).
    procs: Arc<procs::Processes>,
    /// Remote exec (see `remote`).
    remote: Arc<remote::Remote>,
    /// Checkpoint, migration and restart (see `checkpoint`).
    ckpt: Arc<checkpoint::Checkpoint>,
    /// FIFO openers waiting for a partner, at the key home (see `fifo`).
    fifos: Arc<fifo::Fifos>,
    /// Cluster-wide UNIX socket names (see `unix`).
    unix: Arc<unix::UnixNames>,
    /// Fds kept open for checkpointed processes, and listeners kept for
    /// processes that moved away (see `parked`).
    parked: Arc<parked::Parked>,
}

impl Agent {
    pub fn new(cfg: Config) -> Arc<Agent> {
        let node = Arc::new(Node::new(cfg));
        let orders = Arc::new(orders::Orders::new(node.clone()));
        let streams = Arc::new(streams::Streams::new(node.clone(), orders.clone()));
        let sched = Arc::new(sched::Scheduler::new(node.clone()));
        let dsm = Arc::new(dsm::Dsm::new(node.clone()));
        let stay = Arc::new(stay::Stay::new(node.clone(), orders.clone()));
        let procs = Arc::new(procs::Processes::new(
            node.clone(),
            sched.clone(),
            dsm.clone(),
            stay.clone(),
        ));
        let remote = Arc::new(remote::Remote::new(
            node.clone(),
            sched.clone(),
            stay,
            streams.clone(),
        ));
        Arc::new(Agent {
            sched: sched.clone(),
            dsm: dsm.clone(),
            sems: Arc::new(sync::Sems::new(node.clone())),
            streams: streams.clone(),
            children: Arc::new(children::Children::new(node.clone())),
            procs: procs.clone(),
            remote: remote.clone(),
            ckpt: Arc::new(checkpoint::Checkpoint::new(checkpoint::Uses {
                node: node.clone(),
                orders: orders.clone(),
                streams: streams.clone(),
                sched: sched.clone(),
                dsm: dsm.clone(),
                procs: procs.clone(),
                remote: remote.clone(),
            })),
            fifos: Arc::new(fifo::Fifos::new(node.clone(), streams.clone())),
            unix: Arc::new(unix::UnixNames::new(node.clone(), streams.clone())),
            parked: Arc::new(parked::Parked::new(node.clone(), streams.clone())),
            node,
        })
    }

    /// A heartbeat arrived from a peer: it is up, and its scheduling
    /// policy is fetched if newer.
    fn on_heartbeat(self: &Arc<Self>, hb: Heartbeat) -> Heartbeat {
        self.node.on_heartbeat(&hb);
        let reply = self.heartbeat();
        if hb.from.id != self.node.node_id() {
            self.sched.sched_sync(hb.from.id, hb.sched);
        }
        reply
    }

    /// What this node tells its peers.
    fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            from: self.node.self_status(),
            known: self.node.known(),
            sched: self.sched.sched_version(),
        }
    }

    /// One round of heartbeats: a member that answers with a newer
    /// scheduling policy has it fetched.
    fn heartbeat_round(self: &Arc<Self>) {
        let me = self.clone();
        self.node
            .heartbeat_round(self.heartbeat(), move |id, reply| {
                me.sched.sched_sync(id, reply.sched)
            });
    }

    /// One round of the load balancer: the scheduler plans the moves,
    /// the checkpoint subsystem makes them.
    fn balance_round(self: &Arc<Self>) {
        let plan = self.sched.balance_plan();
        if plan.is_empty() {
            return;
        }
        let a = self.clone();
        tokio::spawn(async move {
            for (g, to) in plan {
                let order = CkptOrder::migrate(to, false);
                let done = a.ckpt.checkpoint_local(g, order, 0).await;
                a.sched.balance_moved(g, to, done.map(|d| d.ms));
            }
            a.sched.balance_done();
        });
    }

    /// Serve one request from the local socket: each subsystem answers
    /// its own requests (`handle` in its file). With the answer come the
    /// descriptors it announces, if any.
    pub async fn handle_local(self: &Arc<Self>, req: Request, who: Caller) -> Answer {
        use Request as R;
        let answer = match req {
            R::Hello { .. }
            | R::Whoami
            | R::Ensure { .. }
            | R::Translate { .. }
            | R::TranslateGroup { .. }
            | R::Resolve { .. }
            | R::ResolveRunning { .. }
            | R::Kill { .. }
            | R::Ps
            | R::CapGet { .. }
            | R::CapSet { .. } => procs::handle(&self.procs, req, who).await.map(bare),
            R::Status => Ok(bare(Response::Status(self.node.status()))),
            R::PlaceExec { .. } | R::RemoteExec(_) => {
                remote::handle(&self.remote, req, who).await.map(bare)
            }
            R::SchedGet | R::SchedSet { .. } | R::SchedPlace { .. } | R::SchedBalance { .. } => {
                sched::handle(&self.sched, req, who).await.map(bare)
            }
            R::MovedChildren | R::ChildShadow { .. } | R::ChildExited { .. } => {
                children::handle(&self.children, req, who).await.map(bare)
            }
            R::Checkpoint { .. }
            | R::Migrate { .. }
            | R::CkptOrder
            | R::CkptDone { .. }
            | R::Restart(_)
            | R::SharedWith { .. } => checkpoint::handle(&self.ckpt, req, who).await.map(bare),
            R::ShmGet { .. }
            | R::ShmAttach { .. }
            | R::ShmMapped { .. }
            | R::ShmFutex { .. }
            | R::ShmOpen { .. }
            | R::ShmUnlink { .. }
            | R::ShmResize { .. }
            | R::ShmFd { .. }
            | R::ShmDetach { .. }
            | R::ShmCtl { .. }
            | R::Ipcs => dsm::handle(&self.dsm, req, who).await,
            R::SemGet { .. } | R::SemOp { .. } | R::SemCtl { .. } => {
                sync::handle(&self.sems, req, who).await.map(bare)
            }
            R::PortBind { .. }
            | R::PortOwner { .. }
            | R::LoopbackPeer { .. }
            | R::NodeAddrs
            | R::StreamFreeze { .. }
            | R::StreamFrozen { .. }
            | R::StreamDrained { .. }
            | R::StreamAwait { .. }
            | R::StreamAttach { .. }
            | R::ShadowRelays(_) => streams::handle(&self.streams, req, who).await,
            R::Park { .. }
            | R::Unpark { .. }
            | R::ForwardParked { .. }
            | R::TakeForwarded { .. } => parked::handle(&self.parked, req, who).await,
            R::FifoOpen { .. } | R::FifoStand { .. } => fifo::handle(&self.fifos, req, who).await,
            R::UnixListen { .. } | R::UnixConnect { .. } | R::UnixTake { .. } => {
                unix::handle(&self.unix, req, who).await
            }
        };
        answer.unwrap_or_else(|e| bare(Response::Err(e)))
    }
}

/// Run the agent until it is killed.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state dir {}", cfg.state_dir.display()))?;
    let agent = Agent::new(cfg);
    let listener = tokio::net::TcpListener::bind(agent.node.cfg.listen)
        .await
        .with_context(|| format!("listening on {}", agent.node.cfg.listen))?;
    let local = local::bind(&agent.node.cfg.sock)?;
    std::fs::write(
        agent.node.cfg.state_dir.join("krg-node.pid"),
        format!("{}\n", std::process::id()),
    )
    .with_context(|| format!("writing pid file in {}", agent.node.cfg.state_dir.display()))?;
    info!(
        "node {} listening on {} (advertised {}), local socket {}, {} cpus",
        agent.node.cfg.node_id,
        agent.node.cfg.listen,
        agent.node.cfg.advertise,
        agent.node.cfg.sock.display(),
        agent.node.cpus()
    );

    // Other agents.
    tokio::spawn(peer_server::accept(agent.clone(), listener));

    // The load balancer.
    let a = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(sched::balance::EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            a.balance_round();
        }
    });

    // Heartbeats.
    let a = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            a.heartbeat_round();
        }
    });

    // Probes and the process-table sweep, off the async threads.
    let a = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1000));
        loop {
            tick.tick().await;
            let a2 = a.clone();
            let _ = tokio::task::spawn_blocking(move || a2.node.probe()).await;
        }
    });

    local::serve(agent, local).await
}
