//! The local cluster: N krg agents on this one machine, each a separate host
//! (own network, pid, mount, IPC and UTS namespaces, own cgroup with a CPU
//! quota). `krg cluster up|down|list|exec`. Several such clusters
//! ("instances", named by `KRG_CLUSTER`) can run side by side. See
//! docs/architecture/local-cluster.md.
//!
//! Blocking and single-threaded, like the `krg` command that calls it.

mod cgroup;
mod exec;
mod instance;
mod net;
mod spawn;
mod state;
#[allow(unsafe_code)]
mod sys;

pub use instance::{subnet, valid_name, Instance, ENV as INSTANCE_ENV, MAX_NAME};
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

/// Start instance `inst` with `opts.nodes` nodes of `opts.cpus` CPUs each,
/// and wait until every agent answers and sees every node up.
pub fn up(inst: &Instance, opts: &UpOptions) -> Result<()> {
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

    let _lock = state::lock(inst)?;
    let a_cluster = match inst.name() {
        None => "a local cluster".to_string(),
        Some(_) => inst.title(),
    };
    if let Some(old) = read_state_lenient(inst) {
        if old.any_running() {
            bail!(
                "{a_cluster} is already up ({} nodes); run `{}` first",
                old.size,
                inst.command("down")
            );
        }
    }
    let stray = cgroup::all_tasks(inst);
    if !stray.is_empty() {
        bail!(
            "processes {stray:?} run in the cgroups of {a_cluster} that has no usable state file; run `{}` first",
            inst.command("down")
        );
    }
    // Leftovers of a cluster whose nodes are all dead: clean up silently.
    teardown(inst, None)
        .with_context(|| format!("cleaning up what is left of a previous {}", inst.title()))?;

    let mut st = ClusterState {
        version: 1,
        size: n,
        cpus: opts.cpus,
        // The default instance's; a named one's is allocated in `build`.
        subnet: instance::subnet(0),
        instance: inst.name().unwrap_or("").to_string(),
        subnet_octet: 0,
        bridge_netns: inst.bridge_netns(),
        key_file: inst.key_file(),
        agent: agent.clone(),
        started_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        ready: false,
        nodes: Vec::new(),
    };
    let res = build(inst, &mut st, &agent);
    if let Err(e) = res {
        let title = inst.title();
        return Err(match teardown(inst, Some(&st)) {
            Ok(()) => e.context(format!(
                "starting a {title} of {n} nodes failed (everything it made was removed)"
            )),
            Err(t) => e.context(format!(
                "starting a {title} of {n} nodes failed, and so did the clean-up ({t:#}); run `{}`",
                inst.command("down")
            )),
        });
    }
    let x = st.subnet_octet;
    let addresses = if n == 1 {
        net::address(x, 1).to_string()
    } else {
        format!("{}..{}", net::address(x, 1), net::address(x, n))
    };
    println!(
        "{} up: {n} node{} ({addresses}), {} CPU{} each; state in {}",
        inst.title(),
        if n == 1 { "" } else { "s" },
        opts.cpus,
        if opts.cpus == 1.0 { "" } else { "s" },
        inst.state_file().display()
    );
    Ok(())
}

/// The state file, or `None` if it is missing or unreadable (with a warning).
fn read_state_lenient(inst: &Instance) -> Option<ClusterState> {
    match state::read(inst) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "krg: warning: ignoring {}: {e:#}",
                inst.state_file().display()
            );
            None
        }
    }
}

/// The subnets (X of 10.77.X.0/24) held by the other live named instances:
/// those with a state file and a live node, or whose `up` or `down` is
/// under way (lock held). The state file of an instance whose nodes all
/// died holds no subnet: its leftovers sit behind a bridge of their own,
/// which no new instance shares, so reusing its X is harmless.
fn held_subnets(me: &Instance) -> Vec<u8> {
    let Ok(dir) = std::fs::read_dir("/run") else {
        return Vec::new();
    };
    let mut held = Vec::new();
    for e in dir.flatten() {
        let Some(other) = e.file_name().to_str().and_then(Instance::of_dir_name) else {
            continue;
        };
        if other.name().is_none() || &other == me {
            continue;
        }
        // Unreadable: being removed, or not ours to judge; a live instance
        // always has a readable one (written atomically).
        let Ok(Some(st)) = state::read(&other) else {
            continue;
        };
        if st.subnet_octet != 0 && (st.any_running() || state::is_locked(&other)) {
            held.push(st.subnet_octet);
        }
    }
    held
}

/// Pick a named instance's subnet and record it in its state file, under
/// the machine-wide lock so that two `up`s never pick the same one.
fn allocate_subnet(inst: &Instance, st: &mut ClusterState) -> Result<()> {
    let _machine = state::machine_lock()?;
    let held = held_subnets(inst);
    let Some(x) = instance::free_subnet(&held) else {
        bail!(
            "every subnet 10.77.1.0/24..10.77.254.0/24 is held by a live local cluster instance (`krg cluster list --all`)"
        );
    };
    st.subnet_octet = x;
    st.subnet = instance::subnet(x);
    state::write(inst, st)
}

/// Everything `up` does after its checks; on error the caller tears down.
fn build(inst: &Instance, st: &mut ClusterState, agent: &Path) -> Result<()> {
    let n = st.size;
    state::remove_old_logs(inst);
    write_key(inst)?;
    if inst.name().is_some() {
        allocate_subnet(inst, st)?;
    } else {
        state::write(inst, st)?;
    }
    let x = st.subnet_octet;
    let key_file = inst.key_file().display().to_string();
    net::create(inst, x, n)?;
    let hosts = write_hosts(inst, x, n)?;
    for id in 1..=n {
        cgroup::create(inst, id, st.cpus)?;
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
            format!("{}:{AGENT_PORT}", net::address(x, id)),
            "--state-dir".into(),
            NODE_STATE_DIR.into(),
            "--key-file".into(),
            key_file.clone(),
            "--sock".into(),
            NODE_SOCK.into(),
            "--cpus".into(),
            st.cpus.to_string(),
        ];
        if id > 1 {
            argv.push("--seed".into());
            argv.push(format!("{}:{AGENT_PORT}", net::address(x, 1)));
        }
        let launch = spawn::Launch {
            id,
            netns: net::netns_path(inst, id),
            cgroup_procs: cgroup::procs_files(inst, id),
            log: inst.log_path(id),
            agent: agent.to_path_buf(),
            argv,
            env: env.clone(),
            hosts: hosts.clone(),
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
                address: net::address(x, id).to_string(),
                listen: format!("{}:{AGENT_PORT}", net::address(x, id)),
                netns: inst.netns_name(id),
                host_pid: started.host_pid,
                start_time: started.start_time,
                cpus: st.cpus,
                log: inst.log_path(id),
                cgroups: cgroup::node_dirs(inst, id),
                sock: PathBuf::from(NODE_SOCK),
            }),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    state::write(inst, st)?;
    if let Some(e) = failed {
        return Err(e);
    }
    match wait_ready(st)? {
        None => {
            st.ready = true;
            state::write(inst, st)
        }
        Some(warning) => {
            eprintln!("krg: warning: {warning}");
            Ok(())
        }
    }
}

/// The agents' environment: a clean one, with KRG_LOG (and RUST_BACKTRACE)
/// passed through when set. `KRG_AGENT_LOG`, when set, is the agents'
/// KRG_LOG instead: their log without the programs' (whose stderr a test
/// may compare byte for byte).
fn agent_env() -> Vec<String> {
    let mut env = vec![format!(
        "PATH={}",
        std::env::var("PATH").unwrap_or_else(|_| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        })
    )];
    for k in ["RUST_BACKTRACE", "HOME"] {
        if let Ok(v) = std::env::var(k) {
            env.push(format!("{k}={v}"));
        }
    }
    if let Ok(v) = std::env::var("KRG_AGENT_LOG").or_else(|_| std::env::var("KRG_LOG")) {
        env.push(format!("KRG_LOG={v}"));
    }
    env
}

/// The nodes' /etc/hosts: the machine's, then `ADDRESS krg-nK` for every
/// node. None if the machine has no /etc/hosts to bind it over.
fn write_hosts(inst: &Instance, x: u8, n: u32) -> Result<Option<std::path::PathBuf>> {
    let Ok(mut text) = std::fs::read_to_string("/etc/hosts") else {
        return Ok(None);
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# the nodes of this krg local cluster\n");
    for id in 1..=n {
        text.push_str(&format!("{}\tkrg-n{id}\n", net::address(x, id)));
    }
    let path = inst.hosts_file();
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path))
}

/// A fresh cluster key: 32 random bytes, hex, mode 0600. Each instance has
/// its own, so an agent of one never accepts a peer of another.
fn write_key(inst: &Instance) -> Result<()> {
    let path = inst.key_file();
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(hex::encode(key).as_bytes())
        .with_context(|| format!("writing {}", path.display()))
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
            "the {} was not ready within {} s:{silent}",
            st_title(st),
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

/// "local cluster" or "local cluster foo", from a state file.
fn st_title(st: &ClusterState) -> String {
    Instance::named(&st.instance)
        .unwrap_or_else(|_| Instance::default_instance())
        .title()
}

/// Remove everything of one instance: processes, network namespaces, veths,
/// the bridge, cgroups, the state and key files. Works from the state file
/// if there is one, and from what exists (by the instance's names) in any
/// case. Never touches another instance's: every name, cgroup and
/// namespace inode looked at is the instance's own.
fn teardown(inst: &Instance, st: Option<&ClusterState>) -> Result<()> {
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
    victims.extend(cgroup::all_tasks(inst));
    victims.extend(sys::pids_in_netns(&net::existing_inodes(inst)));
    let mut killed = sys::identities(&victims);
    let mut left = sys::kill_and_wait(&victims, Duration::from_secs(10));
    // One more sweep, for anything forked while we were killing.
    let again: Vec<i32> = cgroup::all_tasks(inst)
        .into_iter()
        .chain(sys::pids_in_netns(&net::existing_inodes(inst)))
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
    if let Err(e) = net::destroy(inst) {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = cgroup::destroy(inst, Duration::from_secs(10)) {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = state::remove(inst) {
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

/// Whether anything of an instance exists: its state file, a network
/// namespace or a cgroup.
fn anything_of(inst: &Instance) -> bool {
    inst.state_file().exists()
        || !net::existing(inst).is_empty()
        || !cgroup::any_left(inst).is_empty()
}

/// Stop instance `inst` and remove everything it made (its logs stay).
/// Not an error when nothing is up.
pub fn down(inst: &Instance) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("krg cluster down must run as root");
    }
    // A named instance that never existed: say so without making its
    // directory (for the lock) only to leave it behind.
    if inst.name().is_some() && !inst.run_dir().exists() && !anything_of(inst) {
        println!("no {} is up", inst.title());
        return Ok(());
    }
    let _lock = state::lock(inst)?;
    let st = read_state_lenient(inst);
    let anything = st.is_some() || anything_of(inst);
    if !anything {
        println!("no {} is up", inst.title());
        return Ok(());
    }
    teardown(inst, st.as_ref()).with_context(|| inst.command("down"))?;
    match st {
        Some(st) => println!(
            "{} down ({} node{} stopped, namespaces, veths, bridge and cgroups removed)",
            inst.title(),
            st.nodes.len(),
            if st.nodes.len() == 1 { "" } else { "s" }
        ),
        None => println!("removed the leftovers of a {}", inst.title()),
    }
    Ok(())
}

/// Every instance something is left of on this machine, the default first.
pub fn instances() -> Vec<Instance> {
    instance::present(&cgroup::roots())
}

/// Stop every instance of this machine, the default one included (`krg
/// cluster down --all`, for CI clean-up). Goes on after a failure and
/// reports them all.
pub fn down_all() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("krg cluster down must run as root");
    }
    let all = instances();
    if all.is_empty() {
        println!("no local cluster is up");
        return Ok(());
    }
    let mut failed = Vec::new();
    for inst in &all {
        if let Err(e) = down(inst) {
            eprintln!("krg: {e:#}");
            failed.push(inst.to_string());
        }
    }
    if !failed.is_empty() {
        bail!(
            "krg cluster down --all: {} of {} instances could not be torn down: {}",
            failed.len(),
            all.len(),
            failed.join(" ")
        );
    }
    Ok(())
}

/// Print the nodes of instance `inst`: id, address, host pid of the agent,
/// whether it answers, CPUs; after a line naming the instance.
pub fn list(inst: &Instance) -> Result<()> {
    let Some(st) = state::read(inst)? else {
        let netns = net::existing(inst);
        if netns.is_empty() && cgroup::any_left(inst).is_empty() {
            // Others may be: say so rather than let "none" mislead.
            let others: Vec<String> = instances()
                .iter()
                .filter(|i| i.name() != inst.name())
                .map(|i| i.name().unwrap_or("(default)").to_string())
                .collect();
            if others.is_empty() {
                println!("no {} is up", inst.title());
            } else {
                println!(
                    "no {} is up; other instances are: {} (`krg cluster list --all`)",
                    inst.title(),
                    others.join(" ")
                );
            }
        } else {
            println!(
                "no {} is up, but a previous one left things behind ({}); `{}` removes them",
                inst.title(),
                if netns.is_empty() {
                    "cgroups".to_string()
                } else {
                    format!("network namespaces {}", netns.join(" "))
                },
                inst.command("down")
            );
        }
        return Ok(());
    };
    println!(
        "{}{}: {} node{}, {}, {}",
        inst.title(),
        if inst.name().is_none() {
            " (default instance)"
        } else {
            ""
        },
        st.size,
        if st.size == 1 { "" } else { "s" },
        st.subnet,
        inst.run_dir().display()
    );
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
            "({} of {} nodes were started: `{}` did not finish)",
            st.nodes.len(),
            st.size,
            inst.command("up")
        );
    }
    Ok(())
}

/// Print every instance of this machine: name, nodes, subnet, and whether
/// its nodes are alive (no agent is asked: quick even with many).
pub fn list_all() -> Result<()> {
    let all = instances();
    if all.is_empty() {
        println!("no local cluster is up");
        return Ok(());
    }
    println!("{:<10} {:>5}  {:<15} STATE", "INSTANCE", "NODES", "SUBNET");
    for inst in &all {
        let (nodes, subnet, what) = match read_state_lenient(inst) {
            Some(st) => {
                let live = st.nodes.iter().filter(|n| n.is_running()).count() as u32;
                let what = if live == st.size {
                    "up".to_string()
                } else if live == 0 && !state::is_locked(inst) {
                    format!("dead (`{}` cleans up)", inst.command("down"))
                } else {
                    format!("{live} of {} nodes alive", st.size)
                };
                (st.size.to_string(), st.subnet, what)
            }
            None => (
                "-".into(),
                "-".into(),
                format!("leftovers (`{}` removes them)", inst.command("down")),
            ),
        };
        println!("{:<10} {nodes:>5}  {subnet:<15} {what}", inst.to_string());
    }
    Ok(())
}

/// Run `cmd` on node `node` of instance `inst` as an SSI process (under
/// libkrg.so); returns the exit code to use: the command's, or 128 + the
/// signal that killed it.
pub fn exec(inst: &Instance, node: u32, cmd: &[String]) -> Result<i32> {
    exec::run(inst, node, cmd, true)
}

/// Like [`exec`], without the preload library: a plain, non-SSI process on
/// that node (kernel pids, /tmp and everything node-local are the node's own).
pub fn exec_plain(inst: &Instance, node: u32, cmd: &[String]) -> Result<i32> {
    exec::run(inst, node, cmd, false)
}
