//! The cluster scheduler: which node a new program runs on.
//!
//! One policy is in force in the whole cluster at a time: a built-in one
//! ([`policy::Builtin`]) or a user-supplied rhai script ([`script::Script`]).
//! `krg sched set` gives it a version (unix milliseconds, node id; the
//! highest wins), applies it on the local agent and pushes it to every up
//! peer; heartbeats carry the version, so a node that was down or joined
//! later fetches the newer policy from whoever has it. Every agent decides
//! on its own, synchronously ([`Scheduler::place`]), from the probes its peers
//! sent in their heartbeats plus the placements it made itself in the last
//! [`RECENT`] (the probes, once a second, have not seen those yet).
//! See docs/architecture/scheduler.md.

pub mod balance;
pub mod policy;
pub mod script;

use super::common::{ctx, err, Caller, Handled};
use super::node::Node;
use super::peer::sched::{SchedPolicy, SchedVersion};
use crate::agent::common::lock;
use libkrg::proto::{ErrorReply, NodeStatus, Request, Response, SchedInfo, SchedPush};
use policy::{Builtin, Candidate};
use rand::Rng;
use script::Script;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, warn};

/// Placements this agent made to a node within this window count as extra
/// load on it (the load probes run once a second).
pub const RECENT: Duration = Duration::from_secs(2);
/// Largest user policy (it must fit in one local-socket request).
pub const MAX_SCRIPT_BYTES: usize = 48 * 1024;
/// Most placements one `SchedPlace` request may ask for.
pub const MAX_PLACE_COUNT: u32 = 1024;
/// The policy in force when an agent starts.
pub const DEFAULT_POLICY: Builtin = Builtin::Local;
/// Repeated warnings about a failing user policy: at most one per this.
const WARN_EVERY: Duration = Duration::from_secs(5);
/// A fetch of a newer policy from a peer is not retried sooner than this.
const FETCH_RETRY: Duration = Duration::from_secs(3);
/// Bound on the remembered recent placements.
const MAX_RECENT: usize = 65_536;

/// What the scheduler is asked: where should this new program run?
#[derive(Debug, Clone, PartialEq)]
pub struct PlaceRequest {
    /// The node where the program is being created.
    pub origin_node: u32,
    /// Its (real) uid.
    pub uid: u32,
    pub exe: String,
    pub argv: Vec<String>,
    /// `KRG_NODE` / `krg run --node`: this node if it is up.
    pub pinned: Option<u32>,
}

impl SchedPolicy {
    fn kind(&self) -> &'static str {
        if self.source.is_some() {
            "script"
        } else {
            "built-in"
        }
    }
}

/// The runnable form of a policy.
#[derive(Debug, Clone)]
enum Active {
    Builtin(Builtin),
    Script(Arc<Script>),
}

#[derive(Debug)]
struct State {
    policy: SchedPolicy,
    active: Active,
    /// SHA-256 prefix of a script's text.
    digest: String,
    /// Round-robin cursor: the node chosen last.
    rr_last: Option<u32>,
    /// Placements made by this agent, oldest first.
    recent: VecDeque<(Instant, u32)>,
    last_warn: Option<Instant>,
}

/// The scheduler's state on one agent.
#[derive(Debug)]
pub struct Sched {
    state: Mutex<State>,
    /// When a fetch of a newer policy from a peer started, if one runs.
    fetching: Mutex<Option<Instant>>,
}

/// The scheduler subsystem: the policy in force ([`Sched`]), the load
/// balancer's memory (`balance`), and the calls that place programs and
/// push or fetch policies.
#[derive(Debug)]
pub struct Scheduler {
    node: Arc<Node>,
    sched: Sched,
    balancer: Mutex<balance::State>,
}

impl Default for Sched {
    fn default() -> Self {
        Sched::new()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn digest(src: &str) -> String {
    let h = Sha256::digest(src.as_bytes());
    hex::encode(&h[..8])
}

/// Validate a policy and build its runnable form.
fn activate(p: &SchedPolicy) -> Result<(Active, String), String> {
    balance::check_name(&p.balance)?;
    match &p.source {
        None => Builtin::from_name(&p.name)
            .map(|b| (Active::Builtin(b), String::new()))
            .ok_or_else(|| {
                format!(
                    "unknown policy `{}`: the built-in policies are {}; a user policy is a .rhai file",
                    p.name,
                    Builtin::names()
                )
            }),
        Some(src) => {
            if src.len() > MAX_SCRIPT_BYTES {
                return Err(format!(
                    "{}: {} bytes, more than the {MAX_SCRIPT_BYTES} a policy may have",
                    p.name,
                    src.len()
                ));
            }
            let s = Script::compile(src).map_err(|e| format!("{} does not compile: {e}", p.name))?;
            Ok((Active::Script(Arc::new(s)), digest(src)))
        }
    }
}

impl Sched {
    pub fn new() -> Sched {
        Sched {
            state: Mutex::new(State {
                policy: SchedPolicy {
                    name: DEFAULT_POLICY.name().into(),
                    source: None,
                    origin: String::new(),
                    version: SchedVersion::default(),
                    balance: balance::DEFAULT.into(),
                },
                active: Active::Builtin(DEFAULT_POLICY),
                digest: String::new(),
                rr_last: None,
                recent: VecDeque::new(),
                last_warn: None,
            }),
            fetching: Mutex::new(None),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn version(&self) -> SchedVersion {
        self.state().policy.version
    }

    /// Whether the policy in force never moves a program (nothing about the
    /// program then needs to be read to place it).
    pub fn is_local(&self) -> bool {
        matches!(self.state().active, Active::Builtin(Builtin::Local))
    }

    /// The policy in force, with its text (what a peer fetches).
    pub fn policy(&self) -> SchedPolicy {
        self.state().policy.clone()
    }

    pub fn info(&self) -> SchedInfo {
        let st = self.state();
        SchedInfo {
            name: st.policy.name.clone(),
            kind: st.policy.kind().into(),
            origin: st.policy.origin.clone(),
            version_ms: st.policy.version.ms,
            version_node: st.policy.version.node,
            digest: st.digest.clone(),
            pushed: Vec::new(),
            balance: st.policy.balance.clone(),
        }
    }

    /// Apply `p` if it is newer than the policy in force. `Ok(false)`: it
    /// was not newer, nothing changed. `from` says where it came from.
    pub fn apply(&self, p: SchedPolicy, from: &str) -> Result<bool, String> {
        let (active, digest) = activate(&p)?;
        let mut st = self.state();
        if p.version <= st.policy.version {
            return Ok(false);
        }
        info!(
            "scheduling policy is now {} ({}{}), version {}, from {from}",
            p.name,
            p.kind(),
            if p.origin.is_empty() {
                String::new()
            } else {
                format!(" {}", p.origin)
            },
            p.version
        );
        st.policy = p;
        st.active = active;
        st.digest = digest;
        Ok(true)
    }

    /// Make a new policy the one in force, with a version above the
    /// current one (even if this node's clock is behind the node that set
    /// it); returns it with its version.
    pub fn set_new(
        &self,
        name: String,
        source: Option<String>,
        origin: String,
        me: u32,
    ) -> Result<SchedPolicy, String> {
        let mut p = SchedPolicy {
            name,
            source,
            origin,
            version: SchedVersion::default(),
            balance: self.state().policy.balance.clone(),
        };
        let (active, digest) = activate(&p)?;
        let mut st = self.state();
        p.version = SchedVersion {
            ms: now_ms().max(st.policy.version.ms.saturating_add(1)),
            node: me,
        };
        info!(
            "scheduling policy set to {} ({}), version {}",
            p.name,
            p.kind(),
            p.version
        );
        st.policy = p.clone();
        st.active = active;
        st.digest = digest;
        Ok(p)
    }

    /// Switch the load-balancing policy (the placement policy stays), with
    /// a new version; returns the whole policy to push.
    pub fn set_balance(&self, balance: String, me: u32) -> Result<SchedPolicy, String> {
        balance::check_name(&balance)?;
        let mut st = self.state();
        let mut p = st.policy.clone();
        p.balance = balance;
        p.version = SchedVersion {
            ms: now_ms().max(st.policy.version.ms.saturating_add(1)),
            node: me,
        };
        info!("load balancing set to {}, version {}", p.balance, p.version);
        st.policy = p.clone();
        Ok(p)
    }

    /// The load-balancing policy in force.
    pub fn balance(&self) -> String {
        self.state().policy.balance.clone()
    }

    /// Choose a node for `req` among the up nodes in `nodes` (this node
    /// must be among them), and remember the placement.
    pub fn decide(
        &self,
        nodes: Vec<NodeStatus>,
        req: &PlaceRequest,
        me: u32,
        now: Instant,
        rng: &mut impl Rng,
    ) -> u32 {
        let mut st = self.state();
        while st
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= RECENT)
        {
            st.recent.pop_front();
        }
        let cands: Vec<Candidate> = nodes
            .into_iter()
            .filter(|s| s.up)
            .map(|s| {
                let recent = st.recent.iter().filter(|(_, n)| *n == s.id).count() as u32;
                Candidate { status: s, recent }
            })
            .collect();
        let id = choose(&mut st, &cands, req, me, now, rng);
        st.recent.push_back((now, id));
        if st.recent.len() > MAX_RECENT {
            st.recent.pop_front();
        }
        debug!(
            "placed {} from node {}: node {id} ({})",
            req.exe, req.origin_node, st.policy.name
        );
        id
    }
}

/// The decision itself (the state's policy, pin, fallbacks).
fn choose(
    st: &mut State,
    cands: &[Candidate],
    req: &PlaceRequest,
    me: u32,
    now: Instant,
    rng: &mut impl Rng,
) -> u32 {
    let is_up = |id: u32| cands.iter().any(|c| c.id() == id);
    if let Some(p) = req.pinned {
        if is_up(p) {
            return p;
        }
        warn!(
            "{} is pinned to node {p}, which is not up: the {} policy places it",
            if req.exe.is_empty() {
                "a program"
            } else {
                &req.exe
            },
            st.policy.name
        );
    }
    let picked = match st.active.clone() {
        Active::Builtin(b) => {
            let id = policy::choose(b, cands, req.origin_node, st.rr_last, rng);
            if b == Builtin::RoundRobin {
                st.rr_last = id.or(st.rr_last);
            }
            id
        }
        Active::Script(s) => {
            let problem = match s.place(cands, req) {
                Ok(id) if is_up(id) => return id,
                Ok(id) => format!("chose node {id}, which is not up"),
                Err(e) => e,
            };
            if st
                .last_warn
                .is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY)
            {
                st.last_warn = Some(now);
                warn!(
                    "scheduling policy {}: {problem}; least-loaded places {} instead",
                    st.policy.name,
                    if req.exe.is_empty() {
                        "the program"
                    } else {
                        &req.exe
                    }
                );
            } else {
                debug!("scheduling policy {}: {problem}", st.policy.name);
            }
            policy::least_loaded(cands)
        }
    };
    picked.unwrap_or(me)
}

/// A local request about the scheduler (see `Agent::handle_local`).
pub(super) async fn handle(sched: &Arc<Scheduler>, req: Request, who: Caller) -> Handled {
    match req {
        Request::SchedGet => Ok(Response::Sched(sched.sched_info())),
        Request::SchedSet { name, source } => {
            Ok(Response::Sched(sched.sched_set(name, source, who).await?))
        }
        Request::SchedPlace {
            count,
            exe,
            argv,
            pinned,
        } => Ok(Response::Placed(
            sched.sched_place(count, exe, argv, pinned, who)?,
        )),
        Request::SchedBalance { name } => {
            Ok(Response::Sched(sched.sched_balance(name, who).await?))
        }
        other => Err(super::common::misrouted(&other)),
    }
}

impl Scheduler {
    pub fn new(node: Arc<Node>) -> Scheduler {
        Scheduler {
            node,
            sched: Sched::new(),
            balancer: Mutex::default(),
        }
    }

    /// Whether the policy in force never moves a program.
    pub(crate) fn is_local(&self) -> bool {
        self.sched.is_local()
    }

    /// Where a new program of local kernel pid `kpid` should run: the
    /// scheduler's choice (a pin first, if that node is up).
    pub(super) fn placement(&self, kpid: i32, pinned: Option<u32>) -> u32 {
        if pinned.is_none() && self.sched.is_local() {
            // The default policy: no need to read the program's /proc files
            // on every exec of every SSI process.
            return self.node.cfg.node_id;
        }
        let argv: Vec<String> = std::fs::read(format!("/proc/{kpid}/cmdline"))
            .map(|b| {
                b.split(|c| *c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let exe = std::fs::read_link(format!("/proc/{kpid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        self.placement_of(kpid, pinned, exe, argv)
    }

    /// [`Scheduler::placement`] of program `exe` with `argv` (not exec'd yet).
    pub(super) fn placement_of(
        &self,
        kpid: i32,
        pinned: Option<u32>,
        exe: String,
        argv: Vec<String>,
    ) -> u32 {
        if pinned.is_none() && self.sched.is_local() {
            return self.node.cfg.node_id;
        }
        let uid = super::procs::table::read_uids(kpid)
            .map(|u| u[0])
            .unwrap_or(u32::MAX);
        self.place(&PlaceRequest {
            origin_node: self.node.cfg.node_id,
            uid,
            exe,
            argv,
            pinned,
        })
    }

    /// Where a new program should run: a node that is up (this node
    /// always counts as up). Synchronous and quick: it uses the probes the
    /// peers already sent; a user policy is bounded in operations.
    pub fn place(&self, req: &PlaceRequest) -> u32 {
        let nodes = self.node.status();
        self.sched.decide(
            nodes,
            req,
            self.node.cfg.node_id,
            Instant::now(),
            &mut rand::thread_rng(),
        )
    }

    /// The policy in force here, as `krg sched` shows it.
    pub fn sched_info(&self) -> SchedInfo {
        self.sched.info()
    }

    pub(crate) fn sched_version(&self) -> SchedVersion {
        self.sched.version()
    }

    /// The policy in force here, with its text (for a peer).
    pub(crate) fn sched_policy(&self) -> SchedPolicy {
        self.sched.policy()
    }

    /// `krg sched set`: validate, apply here with a new version, push to
    /// every up peer. Nodes not reached catch up through heartbeats.
    pub(crate) async fn sched_set(
        &self,
        name: String,
        source: Option<String>,
        who: Caller,
    ) -> Result<SchedInfo, ErrorReply> {
        if who.uid != 0 {
            return Err(err(
                libc::EPERM,
                "only root may change the scheduling policy of the cluster",
            ));
        }
        let (name, origin) = match &source {
            None => (name, String::new()),
            Some(_) => {
                let file = std::path::Path::new(&name)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| name.clone());
                (file, name)
            }
        };
        let p = self
            .sched
            .set_new(name, source, origin, self.node.cfg.node_id)
            .map_err(|e| err(libc::EINVAL, e))?;
        self.sched_push_all(p).await
    }

    /// `krg sched balance`: switch the load balancer of every up node.
    pub(crate) async fn sched_balance(
        &self,
        name: String,
        who: Caller,
    ) -> Result<SchedInfo, ErrorReply> {
        if who.uid != 0 {
            return Err(err(
                libc::EPERM,
                "only root may change the load balancing of the cluster",
            ));
        }
        let p = self
            .sched
            .set_balance(name, self.node.cfg.node_id)
            .map_err(|e| err(libc::EINVAL, e))?;
        self.sched_push_all(p).await
    }

    /// Push a policy just set here to every up peer.
    async fn sched_push_all(&self, p: SchedPolicy) -> Result<SchedInfo, ErrorReply> {
        let calls = self.node.up_peers().into_iter().map(|id| {
            let p = p.clone();
            async move {
                let version = p.version;
                let res = match self.node.client(id).await {
                    Ok(c) => match c.sched_push(ctx(), p).await {
                        Ok(Ok(info)) => {
                            let theirs = SchedVersion {
                                ms: info.version_ms,
                                node: info.version_node,
                            };
                            if theirs == version {
                                Ok(())
                            } else {
                                Err(format!(
                                    "it has a newer policy ({}, version {theirs})",
                                    info.name
                                ))
                            }
                        }
                        Ok(Err(e)) => Err(e.msg),
                        Err(e) => {
                            self.node.drop_client(id);
                            Err(format!("not reached: {e}"))
                        }
                    },
                    Err(e) => Err(e.msg),
                };
                if let Err(e) = &res {
                    warn!("scheduling policy {version} not applied on node {id}: {e}");
                }
                SchedPush {
                    node: id,
                    ok: res.is_ok(),
                    error: res.err().unwrap_or_default(),
                }
            }
        });
        let mut pushed = futures::future::join_all(calls).await;
        pushed.sort_by_key(|p| p.node);
        let mut info = self.sched_info();
        // What this request set, even if a newer policy arrived meanwhile.
        info.version_ms = p.version.ms;
        info.version_node = p.version.node;
        info.pushed = pushed;
        Ok(info)
    }

    /// A peer pushed a policy (`krg sched set` on that node).
    pub(crate) fn sched_receive(&self, p: SchedPolicy) -> Result<SchedInfo, ErrorReply> {
        let from = p.version.node;
        self.sched
            .apply(p, &format!("node {from}"))
            .map_err(|e| err(libc::EINVAL, e))?;
        Ok(self.sched_info())
    }

    /// A peer's heartbeat showed its policy version: fetch the policy if it
    /// is newer than ours (a node that was down, or joined later,
    /// converges this way).
    pub(crate) fn sched_sync(self: &Arc<Self>, peer: u32, theirs: SchedVersion) {
        if theirs <= self.sched_version() {
            return;
        }
        {
            let mut f = lock(&self.sched.fetching);
            if f.is_some_and(|t| t.elapsed() < FETCH_RETRY) {
                return;
            }
            *f = Some(Instant::now());
        }
        let me = self.clone();
        tokio::spawn(async move {
            let res = match me.node.client(peer).await {
                Ok(c) => c.sched_get(ctx()).await.map_err(|e| {
                    me.node.drop_client(peer);
                    e.to_string()
                }),
                Err(e) => Err(e.msg),
            };
            match res {
                Ok(p) => {
                    if let Err(e) = me.sched.apply(p, &format!("node {peer}")) {
                        warn!("newer scheduling policy of node {peer} refused: {e}");
                    }
                }
                Err(e) => debug!("fetching the scheduling policy of node {peer}: {e}"),
            }
            *lock(&me.sched.fetching) = None;
        });
    }

    /// `krg sched place`: `count` placements as the library would ask.
    pub(crate) fn sched_place(
        &self,
        count: u32,
        exe: String,
        argv: Vec<String>,
        pinned: Option<u32>,
        who: Caller,
    ) -> Result<Vec<u32>, ErrorReply> {
        if count == 0 || count > MAX_PLACE_COUNT {
            return Err(err(
                libc::EINVAL,
                format!("count {count}: between 1 and {MAX_PLACE_COUNT}"),
            ));
        }
        if let Some(n) = pinned {
            if n == 0 || n > libkrg::gpid::MAX_NODE {
                return Err(err(
                    libc::EINVAL,
                    format!("node {n}: node ids are 1..={}", libkrg::gpid::MAX_NODE),
                ));
            }
        }
        let req = PlaceRequest {
            origin_node: self.node.cfg.node_id,
            uid: who.uid,
            exe,
            argv,
            pinned,
        };
        Ok((0..count).map(|_| self.place(&req)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn st(id: u32, up: bool, load: f64, procs: u32) -> NodeStatus {
        NodeStatus {
            id,
            address: format!("10.0.0.{id}:7400"),
            up,
            cpus: 1.0,
            load,
            mem_total_kb: 8 << 20,
            mem_free_kb: 4 << 20,
            processes: procs,
        }
    }

    fn four(down: &[u32]) -> Vec<NodeStatus> {
        (1..=4).map(|i| st(i, !down.contains(&i), 0.0, 0)).collect()
    }

    fn req(pinned: Option<u32>) -> PlaceRequest {
        PlaceRequest {
            origin_node: 1,
            uid: 0,
            exe: "/bin/true".into(),
            argv: vec!["true".into()],
            pinned,
        }
    }

    fn set(s: &Sched, name: &str) {
        s.set_new(name.into(), None, String::new(), 1).unwrap();
    }

    fn set_script(s: &Sched, src: &str) {
        s.set_new("t.rhai".into(), Some(src.into()), "/x/t.rhai".into(), 1)
            .unwrap();
    }

    fn run(s: &Sched, nodes: &[NodeStatus], n: usize, pinned: Option<u32>) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(3);
        let t = Instant::now();
        (0..n)
            .map(|_| s.decide(nodes.to_vec(), &req(pinned), 1, t, &mut rng))
            .collect()
    }

    fn per_node(v: &[u32]) -> [usize; 5] {
        let mut c = [0; 5];
        for &i in v {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn default_is_local() {
        let s = Sched::new();
        let i = s.info();
        assert_eq!((i.name.as_str(), i.kind.as_str()), ("local", "built-in"));
        assert_eq!(s.version(), SchedVersion::default());
        assert_eq!(run(&s, &four(&[]), 5, None), vec![1; 5]);
    }

    #[test]
    fn every_builtin_spreads_or_stays_as_it_should() {
        let s = Sched::new();
        set(&s, "round-robin");
        assert_eq!(run(&s, &four(&[]), 8, None), vec![1, 2, 3, 4, 1, 2, 3, 4]);
        // Recent placements count as load, so idle nodes fill evenly.
        let s = Sched::new();
        set(&s, "least-loaded");
        let got = run(&s, &four(&[]), 8, None);
        assert_eq!(per_node(&got), [0, 2, 2, 2, 2], "{got:?}");
        // Two random choices: nearly even (the gap stays small).
        let s = Sched::new();
        set(&s, "two-choices");
        let got = run(&s, &four(&[]), 400, None);
        let c = per_node(&got);
        let (lo, hi) = (c[1..].iter().min().unwrap(), c[1..].iter().max().unwrap());
        assert!(hi - lo <= 3, "{c:?}");
        let s = Sched::new();
        set(&s, "pack");
        let mut nodes = four(&[]);
        for n in &mut nodes {
            n.cpus = 2.0;
        }
        assert_eq!(run(&s, &nodes, 8, None), vec![1, 1, 2, 2, 3, 3, 4, 4]);
    }

    #[test]
    fn recent_placements_expire() {
        let s = Sched::new();
        set(&s, "least-loaded");
        let mut rng = StdRng::seed_from_u64(1);
        let t0 = Instant::now();
        let nodes = four(&[]);
        assert_eq!(s.decide(nodes.clone(), &req(None), 1, t0, &mut rng), 1);
        assert_eq!(s.decide(nodes.clone(), &req(None), 1, t0, &mut rng), 2);
        // After the window, node 1 is as good as new again.
        let later = t0 + RECENT + Duration::from_millis(1);
        assert_eq!(s.decide(nodes, &req(None), 1, later, &mut rng), 1);
    }

    #[test]
    fn down_nodes_are_never_chosen() {
        for name in Builtin::ALL.map(|b| b.name()) {
            let s = Sched::new();
            set(&s, name);
            let got = run(&s, &four(&[2, 4]), 20, None);
            assert!(
                got.iter().all(|&n| n == 1 || n == 3),
                "{name} chose a down node: {got:?}"
            );
        }
    }

    #[test]
    fn pinned_wins_when_up_else_the_policy_decides() {
        let s = Sched::new();
        set(&s, "round-robin");
        assert_eq!(run(&s, &four(&[]), 3, Some(3)), vec![3, 3, 3]);
        // The round-robin cursor did not move for pinned programs.
        assert_eq!(run(&s, &four(&[]), 1, None), vec![1]);
        // Pinned to a down or unknown node: the policy places it.
        assert_eq!(run(&s, &four(&[3]), 3, Some(3)), vec![2, 4, 1]);
        assert_eq!(run(&s, &four(&[]), 1, Some(9)), vec![2]);
    }

    #[test]
    fn a_user_policy_decides() {
        let s = Sched::new();
        // Even uids on even nodes, by origin otherwise.
        set_script(
            &s,
            r#"fn place(nodes, req) {
                   let best = req.origin;
                   for n in nodes { if n.id % 2 == 0 && n.recent == 0 { best = n.id; break; } }
                   best
               }"#,
        );
        assert_eq!(run(&s, &four(&[]), 3, None), vec![2, 4, 1]);
        let i = s.info();
        assert_eq!(
            (i.name.as_str(), i.kind.as_str(), i.origin.as_str()),
            ("t.rhai", "script", "/x/t.rhai")
        );
        assert_eq!(i.digest.len(), 16);
    }

    #[test]
    fn a_failing_user_policy_falls_back_to_least_loaded() {
        let mut nodes = four(&[3]);
        nodes[0].load = 2.0;
        nodes[1].load = 0.5;
        nodes[3].load = 0.1;
        for src in [
            // Error at run time.
            "fn place(nodes, req) { nodes[99].id }",
            // A node that is down, one that does not exist, not an id.
            "fn place(nodes, req) { 3 }",
            "fn place(nodes, req) { 77 }",
            "fn place(nodes, req) { \"one\" }",
            // Never ends: stopped by the operation limit.
            "fn place(nodes, req) { let i = 0; loop { i += 1; } }",
        ] {
            let s = Sched::new();
            set_script(&s, src);
            let t = Instant::now();
            let got = run(&s, &nodes, 2, None);
            assert!(t.elapsed() < Duration::from_secs(2), "{src}: too slow");
            assert_eq!(got, vec![4, 2], "{src}");
        }
    }

    #[test]
    fn bad_policies_are_refused_and_change_nothing() {
        let s = Sched::new();
        set(&s, "pack");
        let v = s.version();
        let e = s
            .set_new("fastest".into(), None, String::new(), 1)
            .unwrap_err();
        assert!(
            e.contains("unknown policy `fastest`") && e.contains("round-robin"),
            "{e}"
        );
        let e = s
            .set_new(
                "bad.rhai".into(),
                Some("fn place(nodes, req) { 1 +* 2 }".into()),
                "/x/bad.rhai".into(),
                1,
            )
            .unwrap_err();
        assert!(e.starts_with("bad.rhai does not compile: "), "{e}");
        let big = format!(
            "fn place(nodes, req) {{ 1 }}\n//{}",
            "x".repeat(MAX_SCRIPT_BYTES)
        );
        assert!(s
            .set_new("big.rhai".into(), Some(big), String::new(), 1)
            .is_err());
        assert_eq!(s.version(), v);
        assert_eq!(s.info().name, "pack");
    }

    #[test]
    fn versions_order_and_newest_wins() {
        let a = SchedVersion { ms: 5, node: 9 };
        let b = SchedVersion { ms: 6, node: 1 };
        let c = SchedVersion { ms: 6, node: 2 };
        assert!(SchedVersion::default() < a && a < b && b < c);
        assert_eq!(c.to_string(), "6.2");

        let s = Sched::new();
        let pol = |name: &str, v: SchedVersion| SchedPolicy {
            name: name.into(),
            source: None,
            origin: String::new(),
            version: v,
            balance: "off".into(),
        };
        assert_eq!(s.apply(pol("pack", b), "test"), Ok(true));
        // Older or equal: ignored.
        assert_eq!(s.apply(pol("round-robin", a), "test"), Ok(false));
        assert_eq!(s.apply(pol("round-robin", b), "test"), Ok(false));
        assert_eq!(s.info().name, "pack");
        // Same time, higher node id: newer.
        assert_eq!(s.apply(pol("two-choices", c), "test"), Ok(true));
        assert_eq!(s.info().name, "two-choices");
        // An invalid policy is an error even when newer, and changes nothing.
        let d = SchedVersion { ms: 7, node: 1 };
        assert!(s.apply(pol("nonsense", d), "test").is_err());
        assert_eq!(s.version(), c);

        // A node whose clock is behind still sets a newer version.
        let future = SchedVersion {
            ms: now_ms() + 3_600_000,
            node: 4,
        };
        assert_eq!(s.apply(pol("pack", future), "test"), Ok(true));
        let p = s
            .set_new("least-loaded".into(), None, String::new(), 2)
            .unwrap();
        assert!(p.version > future, "{} <= {future}", p.version);
        assert_eq!(p.version.node, 2);
        assert_eq!(s.version(), p.version);
    }
}
