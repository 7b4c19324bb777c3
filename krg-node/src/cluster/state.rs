//! `<run dir>/state.json` (`/run/krg-cluster/state.json` for the default
//! instance): what `krg cluster up` made, for `down`, `list` and `exec` (and
//! for tests that want a node's host pid or log). Also the locks.

use super::instance::{Instance, MACHINE_LOCK};
use super::sys;
use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The host directory of the default instance (state, key, logs).
pub const RUN_DIR: &str = "/run/krg-cluster";
/// The default instance's state file.
pub const STATE_FILE: &str = "/run/krg-cluster/state.json";
/// The default instance's cluster key (mode 0600).
pub const KEY_FILE: &str = "/run/krg-cluster/cluster.key";

/// The local cluster as `krg cluster up` made it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ClusterState {
    /// Format version of this file.
    pub version: u32,
    /// Number of nodes asked for.
    pub size: u32,
    /// CPU capacity of each node.
    pub cpus: f64,
    /// `10.77.X.0/24`.
    pub subnet: String,
    /// The instance's name; empty for the default instance (and in state
    /// files written before instances existed).
    #[serde(default)]
    pub instance: String,
    /// X of the subnet 10.77.X.0/24: 0 for the default instance, 1..=254
    /// for a named one (unique among live instances).
    #[serde(default)]
    pub subnet_octet: u8,
    /// Named network namespace of the bridge.
    pub bridge_netns: String,
    /// Cluster key file given to every agent.
    pub key_file: PathBuf,
    /// The agent binary the nodes run.
    pub agent: PathBuf,
    /// Seconds since the epoch when `up` started.
    pub started_unix: u64,
    /// `true` once every agent answered and saw every node up.
    pub ready: bool,
    /// The nodes started so far, by id.
    pub nodes: Vec<NodeState>,
}

/// One node of the local cluster.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeState {
    /// Node id K (1..=N).
    pub id: u32,
    /// 10.77.X.K
    pub address: String,
    /// The agent's `--listen` address (10.77.X.K:7400).
    pub listen: String,
    /// Named network namespace (`krg-nK`, `krg-<name>-nK`).
    pub netns: String,
    /// Host pid of the node's pid-1 process (the agent).
    pub host_pid: i32,
    /// Its start time in clock ticks since boot (field 22 of
    /// /proc/PID/stat), to tell it from a later process with the same pid.
    pub start_time: u64,
    /// CPU capacity (cgroup quota / period).
    pub cpus: f64,
    /// Host path of the agent's log (its stdout and stderr).
    pub log: PathBuf,
    /// The node's cgroup directories.
    pub cgroups: Vec<PathBuf>,
    /// The agent's socket as seen inside the node.
    pub sock: PathBuf,
}

impl NodeState {
    /// Whether the node's pid-1 process (and so the node) is alive.
    pub fn is_running(&self) -> bool {
        sys::is_running(self.host_pid, self.start_time)
    }

    /// The agent's socket reached from the host, through the node's root.
    pub fn host_sock(&self) -> PathBuf {
        let inner = self.sock.strip_prefix("/").unwrap_or(&self.sock);
        Path::new("/proc")
            .join(self.host_pid.to_string())
            .join("root")
            .join(inner)
    }
}

impl ClusterState {
    /// Whether any node's pid-1 process is alive.
    pub fn any_running(&self) -> bool {
        self.nodes.iter().any(|n| n.is_running())
    }
}

/// Read an instance's state file; `None` if there is none.
pub fn read(inst: &Instance) -> Result<Option<ClusterState>> {
    let path = inst.state_file();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let st = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(st))
}

/// Write the state file atomically (readers never see half of it).
pub(super) fn write(inst: &Instance, st: &ClusterState) -> Result<()> {
    let path = inst.state_file();
    let tmp = inst.run_dir().join("state.json.tmp");
    let text = serde_json::to_string_pretty(st).context("serialising the cluster state")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Remove the state and key files.
pub(super) fn remove(inst: &Instance) -> Result<()> {
    for p in [inst.state_file(), inst.key_file()] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
    Ok(())
}

fn open_lock(path: &Path, create: bool) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// Take the exclusive lock of an instance's `up` and `down` (released on
/// drop), so two of them never interleave.
pub(super) fn lock(inst: &Instance) -> Result<Flock<File>> {
    let dir = inst.run_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = inst.lock_file();
    let f = open_lock(&path, true).with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", path.display()))
}

/// Whether someone holds an instance's lock now (its `up` or `down` is
/// under way). Never waits.
pub(super) fn is_locked(inst: &Instance) -> bool {
    let Ok(f) = open_lock(&inst.lock_file(), false) else {
        return false;
    };
    // Taken and dropped at once: the holder, if any, never notices.
    Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err()
}

/// Take the machine-wide lock under which a named instance picks its
/// subnet and records it in its state file.
pub(super) fn machine_lock() -> Result<Flock<File>> {
    let f = open_lock(Path::new(MACHINE_LOCK), true)
        .with_context(|| format!("opening {MACHINE_LOCK}"))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {MACHINE_LOCK}"))
}

/// Remove the logs of a previous cluster of this instance (`nK.log`).
pub(super) fn remove_old_logs(inst: &Instance) {
    if let Ok(d) = std::fs::read_dir(inst.run_dir()) {
        for e in d.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('n') && name.ends_with(".log") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterState {
        ClusterState {
            version: 1,
            size: 1,
            cpus: 0.5,
            subnet: "10.77.0.0/24".into(),
            instance: String::new(),
            subnet_octet: 0,
            bridge_netns: "krg-br".into(),
            key_file: KEY_FILE.into(),
            agent: "/x/krg-node".into(),
            started_unix: 1,
            ready: true,
            nodes: vec![NodeState {
                id: 1,
                address: "10.77.0.1".into(),
                listen: "10.77.0.1:7400".into(),
                netns: "krg-n1".into(),
                host_pid: 1234,
                start_time: 99,
                cpus: 0.5,
                log: Instance::default_instance().log_path(1),
                cgroups: vec!["/sys/fs/cgroup/cpu/krg-cluster/n1".into()],
                sock: "/run/krg/krg-node.sock".into(),
            }],
        }
    }

    #[test]
    fn json_round_trip_and_field_names() {
        let st = sample();
        let text = serde_json::to_string(&st).unwrap();
        let back: ClusterState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, st);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let n = &v["nodes"][0];
        for k in ["id", "address", "host_pid", "cpus", "log"] {
            assert!(!n[k].is_null(), "node lacks {k}");
        }
        assert_eq!(n["log"], "/run/krg-cluster/n1.log");
    }

    #[test]
    fn state_files_from_before_instances_are_the_default_instance() {
        let mut v = serde_json::to_value(sample()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("instance");
        o.remove("subnet_octet");
        let back: ClusterState = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn agent_socket_through_the_node_root() {
        assert_eq!(
            sample().nodes[0].host_sock(),
            Path::new("/proc/1234/root/run/krg/krg-node.sock")
        );
    }
}
