//! The local cluster: N krg agents on this one machine, each a separate host
//! (own network, pid, mount, IPC and UTS namespaces, own cgroup with a CPU
//! quota). `krg cluster up|down|list|exec`. See
//! docs/architecture/local-cluster.md.
//!
//! Blocking and single-threaded, like the `krg` command that calls it.

mod cgroup;
mod exec;
mod net;
mod spawn;
mod state;
mod sys;

pub use state::{read as state, ClusterState, NodeState, KEY_FILE, RUN_DIR, STATE_FILE};

use anyhow::{bail, Context, Result};
use libkrg::proto::{NodeStatus, Request, Response};
use rand::RngCore;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Most nodes a local cluster may have (one /24, one address per node).
pub const MAX_NODES: u32 = 200;
/// The port every agent listens on, at its node's address.
pub const AGENT_PORT: u16 = 7400;
/// The agent's socket, as seen inside each node.
pub const NODE_SOCK: &str = "/run/krg/krg-node.sock";
/// The agent's state directory, inside each node.
const NODE_STATE_DIR: &str = "/run/krg/state";
/// How long `up` waits for the agents at least (more for big clusters).
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Timeout of one status request.
const STATUS_TIMEOUT: Duration = Duration::from_millis(1000);

/// Options of `krg cluster up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: u32,
    /// CPU capacity of each node (cgroup v1 quota); fractions allowed.
    pub cpus: f64,
}

/// The directory of the running executable: the agent and libkrg.so are
/// built next to `krg` (target/debug or target/release).
fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running executable")?;
    exe.parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no parent directory", exe.display()))
}

fn agent_path() -> Result<PathBuf> {
    let agent = bin_dir()?.join("krg-node");
    if !spawn::is_file(&agent) {
        bail!(
            "the agent binary {} does not exist (build the workspace: cargo build)",
            agent.display()
        );
    }
    Ok(agent)
}

/// Start a local cluster of `opts.nodes` nodes with `opts.cpus` CPUs each,
/// and wait until every agent answers and sees every node up.
pub fn up(opts: &UpOptions) -> Result<()> {
    let n = opts.nodes;
    if n == 0 || n > MAX_NODES {
        bail!("--nodes {n}: a local cluster has 1 to {MAX_NODES} nodes");
    }
    if !cgroup::valid_cpus(opts.cpus) {
        bail!(
            "--cpus {}: must be a number of CPUs from 0.01 up (fractions allowed, e.g. 0.5)",
            opts.cpus
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("krg cluster up must run as root (it creates namespaces, veths and cgroups)");
    }
    cgroup::check()?;
    let agent = agent_path()?;

    let _lock = state::lock()?;
    if let Some(old) = read_state_lenient() {
        let live = old.nodes.iter().filter(|n| n.is_running()).count();
        if live > 0 {
            bail!(
                "a local cluster is already up ({} nodes); run `krg cluster down` first",
                old.size
            );
        }
    }
    let stray = cgroup::all_tasks();
    if !stray.is_empty() {
        bail!(
            "processes {stray:?} run in the cgroups of a local cluster that has no usable state file; run `krg cluster down` first"
        );
    }
    // Leftovers of a cluster whose nodes are all dead: clean up silently.
    teardown(None).context("cleaning up what is left of a previous local cluster")?;

    let mut st = ClusterState {
        version: 1,
        size: n,
        cpus: opts.cpus,
        subnet: net::SUBNET.to_string(),
        bridge_netns: net::BRIDGE_NETNS.to_string(),
        key_file: PathBuf::from(KEY_FILE),
        agent: agent.clone(),
        started_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        ready: false,
        nodes: Vec::new(),
    };
    let res = build(&mut st, &agent);
    if let Err(e) = res {
        return Err(match teardown(Some(&st)) {
            Ok(()) => e.context(format!(
                "starting a local cluster of {n} nodes failed (everything it made was removed)"
            )),
            Err(t) => e.context(format!(
                "starting a local cluster of {n} nodes failed, and so did the clean-up ({t:#}); run `krg cluster down`"
            )),
        });
    }
    let addresses = if n == 1 {
        net::address(1).to_string()
    } else {
        format!("{}..{}", net::address(1), net::address(n))
    };
    println!(
        "local cluster up: {n} node{} ({addresses}), {} CPU{} each; state in {STATE_FILE}",
        if n == 1 { "" } else { "s" },
        opts.cpus,
        if opts.cpus == 1.0 { "" } else { "s" },
    );
    Ok(())
}

/// The state file, or `None` if it is missing or unreadable (with a warning).
fn read_state_lenient() -> Option<ClusterState> {
    match state::read() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("krg: warning: ignoring {STATE_FILE}: {e:#}");
            None
        }
    }
}

/// Everything `up` does after its checks; on error the caller tears down.
fn build(st: &mut ClusterState, agent: &Path) -> Result<()> {
    let n = st.size;
    state::remove_old_logs();
    write_key()?;
    state::write(st)?;
    net::create(n)?;
    for id in 1..=n {
        cgroup::create(id, st.cpus)?;
    }
    let env = agent_env();
    // Start every node, then collect them: they start in parallel.
    let mut pending = Vec::new();
    let mut failed = None;
    for id in 1..=n {
        let mut argv = vec![
            agent.display().to_string(),
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            format!("{}:{AGENT_PORT}", net::address(id)),
            "--state-dir".into(),
            NODE_STATE_DIR.into(),
            "--key-file".into(),
            KEY_FILE.into(),
            "--sock".into(),
            NODE_SOCK.into(),
            "--cpus".into(),
            st.cpus.to_string(),
        ];
        if id > 1 {
            argv.push("--seed".into());
            argv.push(format!("{}:{AGENT_PORT}", net::address(1)));
        }
        let launch = spawn::Launch {
            id,
            netns: net::netns_path(id),
            cgroup_procs: cgroup::procs_files(id),
            log: state::log_path(id),
            agent: agent.to_path_buf(),
            argv,
            env: env.clone(),
        };
        match spawn::begin(&launch) {
            Ok(p) => pending.push((id, p)),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10) + Duration::from_millis(50) * n;
    for (id, p) in pending {
        match p.finish(deadline) {
            Ok(started) => st.nodes.push(NodeState {
                id,
                address: net::address(id).to_string(),
                listen: format!("{}:{AGENT_PORT}", net::address(id)),
                netns: net::netns_name(id),
                host_pid: started.host_pid,
                start_time: started.start_time,
                cpus: st.cpus,
                log: state::log_path(id),
                cgroups: cgroup::node_dirs(id),
                sock: PathBuf::from(NODE_SOCK),
            }),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    state::write(st)?;
    if let Some(e) = failed {
        return Err(e);
    }
    match wait_ready(st)? {
        None => {
            st.ready = true;
            state::write(st)
        }
        Some(warning) => {
            eprintln!("krg: warning: {warning}");
            Ok(())
        }
    }
}

/// The agents' environment: a clean one, with KRG_LOG (and RUST_BACKTRACE)
/// passed through when set.
fn agent_env() -> Vec<String> {
    let mut env = vec![format!(
        "PATH={}",
        std::env::var("PATH").unwrap_or_else(|_| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        })
    )];
    for k in ["KRG_LOG", "RUST_BACKTRACE", "HOME"] {
        if let Ok(v) = std::env::var(k) {
            env.push(format!("{k}={v}"));
        }
    }
    env
}

/// A fresh cluster key: 32 random bytes, hex, mode 0600.
fn write_key() -> Result<()> {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let _ = std::fs::remove_file(KEY_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(KEY_FILE)
        .with_context(|| format!("creating {KEY_FILE}"))?;
    f.write_all(hex::encode(key).as_bytes())
        .with_context(|| format!("writing {KEY_FILE}"))
}

/// What the last status request to a node gave.
enum Seen {
    Nothing(String),
    Status(Vec<NodeStatus>),
}

/// Whether a node's status shows every node 1..=n up.
fn sees_all(status: &[NodeStatus], n: u32) -> bool {
    (1..=n).all(|id| status.iter().any(|s| s.id == id && s.up))
}

fn ask_status(node: &NodeState, timeout: Duration) -> Seen {
    let sock = node.host_sock();
    match libkrg::client::call_at(&sock, &Request::Status, Some(timeout)) {
        Ok(Response::Status(v)) => Seen::Status(v),
        Ok(other) => Seen::Nothing(format!("unexpected answer {other:?}")),
        Err(e) => Seen::Nothing(e.to_string()),
    }
}

/// Wait until every agent answers a status request and, ideally, sees all
/// nodes up. A node that dies or does not answer in time is an error; an
/// agent that answers but still misses some nodes at the deadline gives a
/// warning (returned), not an error: the cluster works, membership is
/// still converging.
fn wait_ready(st: &ClusterState) -> Result<Option<String>> {
    let n = st.size;
    let timeout = READY_TIMEOUT + Duration::from_millis(100) * n;
    let deadline = Instant::now() + timeout;
    let mut seen: Vec<Seen> = st
        .nodes
        .iter()
        .map(|_| Seen::Nothing("not asked yet".into()))
        .collect();
    loop {
        for (node, last) in st.nodes.iter().zip(seen.iter_mut()) {
            if matches!(last, Seen::Status(v) if sees_all(v, n)) {
                continue;
            }
            if !node.is_running() {
                bail!(
                    "node {}: the agent (host pid {}) exited\n{}",
                    node.id,
                    node.host_pid,
                    sys::log_tail(&node.log, 15)
                );
            }
            *last = ask_status(node, STATUS_TIMEOUT);
        }
        if seen
            .iter()
            .all(|s| matches!(s, Seen::Status(v) if sees_all(v, n)))
        {
            return Ok(None);
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut silent = String::new();
    let mut partial = Vec::new();
    for (node, last) in st.nodes.iter().zip(&seen) {
        match last {
            Seen::Status(v) if sees_all(v, n) => {}
            Seen::Status(v) => {
                let up = v.iter().filter(|s| s.up && s.id >= 1 && s.id <= n).count();
                partial.push(format!("node {} sees {up} of {n}", node.id));
            }
            Seen::Nothing(e) => silent.push_str(&format!(
                "\nnode {} ({}, host pid {}) does not answer: {e}\n{}",
                node.id,
                node.address,
                node.host_pid,
                sys::log_tail(&node.log, 10)
            )),
        }
    }
    if !silent.is_empty() {
        bail!(
            "the local cluster was not ready within {} s:{silent}",
            timeout.as_secs()
        );
    }
    let shown = partial.len().min(8);
    let more = if partial.len() > shown {
        format!(", and {} more", partial.len() - shown)
    } else {
        String::new()
    };
    Ok(Some(format!(
        "every agent answers, but after {} s not all of them see every node up yet ({}{more}); the agents may still be converging",
        timeout.as_secs(),
        partial[..shown].join(", ")
    )))
}

/// Remove everything of a local cluster: processes, network namespaces,
/// veths, the bridge, cgroups, the state and key files. Works from the state
/// file if there is one, and from what exists (by name) in any case.
fn teardown(st: Option<&ClusterState>) -> Result<()> {
    let mut victims: Vec<i32> = Vec::new();
    if let Some(st) = st {
        // Killing pid 1 of a pid namespace kills everything in it.
        victims.extend(
            st.nodes
                .iter()
                .filter(|n| n.is_running())
                .map(|n| n.host_pid),
        );
    }
    // Anything else still inside: in a node's cgroup (whatever node it
    // runs on) or network namespace (`ip netns exec`, `krg cluster exec`).
    victims.extend(cgroup::all_tasks());
    victims.extend(sys::pids_in_netns(&net::existing_inodes()));
    let mut killed = sys::identities(&victims);
    let mut left = sys::kill_and_wait(&victims, Duration::from_secs(10));
    // One more sweep, for anything forked while we were killing.
    let again: Vec<i32> = cgroup::all_tasks()
        .into_iter()
        .chain(sys::pids_in_netns(&net::existing_inodes()))
        .collect();
    if !again.is_empty() {
        killed.extend(sys::identities(&again));
        left.extend(sys::kill_and_wait(&again, Duration::from_secs(5)));
    }
    left.sort_unstable();
    left.dedup();

    let mut errors = Vec::new();
    if !left.is_empty() {
        errors.push(format!("processes still alive after SIGKILL: {left:?}"));
    }
    if let Err(e) = net::destroy() {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = cgroup::destroy(Duration::from_secs(10)) {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = state::remove() {
        errors.push(format!("{e:#}"));
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    // Dead, but shown by `ps` and `pgrep` until reaped (by the host's init,
    // which adopted them when the intermediate processes exited).
    sys::wait_reaped(&killed, Duration::from_secs(5));
    Ok(())
}

/// Stop the local cluster and remove everything it made. Not an error when
/// nothing is up.
pub fn down() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("krg cluster down must run as root");
    }
    let _lock = state::lock()?;
    let st = read_state_lenient();
    let anything = st.is_some() || !net::existing().is_empty() || !cgroup::any_left().is_empty();
    if !anything {
        println!("no local cluster is up");
        return Ok(());
    }
    teardown(st.as_ref()).context("krg cluster down")?;
    match st {
        Some(st) => println!(
            "local cluster down ({} node{} stopped, namespaces, veths, bridge and cgroups removed)",
            st.nodes.len(),
            if st.nodes.len() == 1 { "" } else { "s" }
        ),
        None => println!("removed the leftovers of a local cluster"),
    }
    Ok(())
}

/// Print the nodes of the local cluster: id, address, host pid of the
/// agent, whether it answers, CPUs.
pub fn list() -> Result<()> {
    let Some(st) = state::read()? else {
        let netns = net::existing();
        if netns.is_empty() && cgroup::any_left().is_empty() {
            println!("no local cluster is up");
        } else {
            println!(
                "no local cluster is up, but a previous one left things behind ({}); `krg cluster down` removes them",
                if netns.is_empty() {
                    "cgroups".to_string()
                } else {
                    format!("network namespaces {}", netns.join(" "))
                }
            );
        }
        return Ok(());
    };
    println!(
        "{:<5} {:<15} {:>8}  {:<12} {:>6}",
        "NODE", "ADDRESS", "PID", "STATE", "CPUS"
    );
    for node in &st.nodes {
        let state = if !node.is_running() {
            "dead".to_string()
        } else {
            match ask_status(node, Duration::from_millis(500)) {
                Seen::Status(_) => "up".to_string(),
                Seen::Nothing(_) => "no answer".to_string(),
            }
        };
        println!(
            "{:<5} {:<15} {:>8}  {:<12} {:>6}",
            node.id, node.address, node.host_pid, state, node.cpus
        );
    }
    if (st.nodes.len() as u32) < st.size {
        println!(
            "({} of {} nodes were started: `krg cluster up` did not finish)",
            st.nodes.len(),
            st.size
        );
    }
    Ok(())
}

/// Run `cmd` on node `node` as an SSI process (under libkrg.so); returns
/// the exit code to use: the command's, or 128 + the signal that killed it.
pub fn exec(node: u32, cmd: &[String]) -> Result<i32> {
    exec::run(node, cmd, true)
}

/// Like [`exec`], without the preload library: a plain, non-SSI process on
/// that node (kernel pids, /tmp and everything node-local are the node's own).
pub fn exec_plain(node: u32, cmd: &[String]) -> Result<i32> {
    exec::run(node, cmd, false)
}
