//! Shared helpers of the cluster integration tests: a local cluster that is
//! always torn down (even when a test fails), and ways to run commands on
//! its nodes.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One local cluster per machine: tests that need one take this lock.
static CLUSTER_LOCK: Mutex<()> = Mutex::new(());

pub fn krg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_krg"))
}

pub fn bin_dir() -> PathBuf {
    krg_bin().parent().unwrap().to_path_buf()
}

pub fn preload() -> PathBuf {
    let so = bin_dir().join("libkrg.so");
    assert!(
        so.exists(),
        "{} is missing: run `cargo build --workspace` before the tests (scripts/test does)",
        so.display()
    );
    so
}

/// A directory every node sees (the repository's target dir: the OS image
/// and the repository are shared, /tmp is not).
pub fn shared_dir(name: &str) -> PathBuf {
    let d = bin_dir().join("krg-test").join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A local cluster that goes down when dropped.
pub struct Cluster {
    pub nodes: u32,
    _lock: MutexGuard<'static, ()>,
    /// Held for the cluster's life: other test processes on this machine
    /// (another `cargo test`) wait instead of colliding.
    _flock: Option<nix::fcntl::Flock<std::fs::File>>,
}

const LOCK: &str = "/run/krg-cluster-tests.lock";

/// Take the machine-wide local-cluster test lock; `None` when one of our
/// ancestors holds it already (`flock LOCK cargo test`), which would
/// otherwise wait for us forever.
pub fn machine_lock() -> Option<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .expect("open the test lock");
    let ino = f.metadata().expect("stat the test lock").ino();
    let f = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => return Some(l),
        Err((f, _)) => f,
    };
    if held_by_ancestor(ino) {
        return None;
    }
    Some(
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("lock the test lock"),
    )
}

/// Whether a process among our ancestors holds a flock on inode `ino`
/// (from /proc/locks: `1: FLOCK ADVISORY WRITE PID MAJ:MIN:INO 0 EOF`).
fn held_by_ancestor(ino: u64) -> bool {
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let holders: Vec<i32> = locks
        .lines()
        .filter(|l| !l.contains("->"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let (pid, dev) = (w.get(4)?, w.get(5)?);
            (w.get(1) == Some(&"FLOCK") && dev.rsplit(':').next()?.parse::<u64>().ok()? == ino)
                .then(|| pid.parse().ok())
                .flatten()
        })
        .collect();
    let mut pid = std::process::id() as i32;
    while pid > 1 {
        if holders.contains(&pid) {
            return true;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The parent pid follows the command's closing parenthesis.
        pid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
    }
    false
}

impl Cluster {
    pub fn up(nodes: u32, cpus: f64) -> Cluster {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the cluster tests need root (namespaces, cgroups, veth)"
        );
        preload();
        let lock = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let flock = machine_lock();
        // A cluster left over by an earlier, killed run.
        let _ = Command::new(krg_bin()).args(["cluster", "down"]).output();
        let out = Command::new(krg_bin())
            .args([
                "cluster",
                "up",
                "--nodes",
                &nodes.to_string(),
                "--cpus",
                &cpus.to_string(),
            ])
            .output()
            .expect("run krg cluster up");
        let c = Cluster {
            nodes,
            _lock: lock,
            _flock: flock,
        };
        assert!(
            out.status.success(),
            "krg cluster up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    /// The state file written by `up`.
    pub fn state(&self) -> serde_json::Value {
        let s = std::fs::read_to_string("/run/krg-cluster/state.json").expect("state file");
        serde_json::from_str(&s).unwrap()
    }

    pub fn node_field(&self, node: u32, field: &str) -> serde_json::Value {
        self.state()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"].as_u64() == Some(node as u64))
            .unwrap_or_else(|| panic!("node {node} not in state"))[field]
            .clone()
    }

    /// Host pid of node K's agent (pid 1 of its pid namespace).
    pub fn agent_pid(&self, node: u32) -> i32 {
        self.node_field(node, "host_pid").as_i64().unwrap() as i32
    }

    pub fn log(&self, node: u32) -> String {
        let p = self.node_field(node, "log");
        std::fs::read_to_string(p.as_str().unwrap()).unwrap_or_default()
    }

    /// `krg cluster exec --node K -- args` with the library.
    pub fn cmd(&self, node: u32, args: &[&str]) -> Command {
        let mut c = Command::new(krg_bin());
        c.args(["cluster", "exec", "--node", &node.to_string(), "--"]);
        c.args(args);
        c.stdin(Stdio::null());
        c
    }

    /// The same without the library (a plain process on that node).
    pub fn plain(&self, node: u32, args: &[&str]) -> Command {
        let mut c = Command::new(krg_bin());
        c.args([
            "cluster",
            "exec",
            "--plain",
            "--node",
            &node.to_string(),
            "--",
        ]);
        c.args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Run `sh -c script` on node K as an SSI process; return its output.
    pub fn sh(&self, node: u32, script: &str) -> Output {
        self.cmd(node, &["sh", "-c", script]).output().unwrap()
    }

    /// Run `krg ARGS` on node K (the command talks to that node's agent).
    pub fn krg(&self, node: u32, args: &[&str]) -> Output {
        let k = krg_bin();
        let mut v = vec![k.to_str().unwrap()];
        v.extend_from_slice(args);
        self.plain(node, &v).output().unwrap()
    }

    /// `krg SUBCOMMAND --json` on node K, as a JSON array.
    pub fn json_list(&self, node: u32, sub: &str) -> Vec<serde_json::Value> {
        let out = self.krg(node, &[sub, "--json"]);
        assert!(
            out.status.success(),
            "krg {sub}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn ps(&self, node: u32) -> Vec<serde_json::Value> {
        self.json_list(node, "ps")
    }

    pub fn status(&self, node: u32) -> Vec<serde_json::Value> {
        self.json_list(node, "status")
    }

    /// Node `id`'s state as seen from node `from`.
    pub fn node_state(&self, from: u32, id: u32) -> String {
        self.status(from)
            .iter()
            .find(|n| n["id"].as_u64() == Some(id as u64))
            .map(|n| n["state"].as_str().unwrap().to_string())
            .unwrap_or_else(|| "absent".into())
    }
}

/// Run what follows as user nobody (uid and gid 65534, no groups).
pub const AS_NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

impl Cluster {
    /// `ARGS` on node K as user nobody, with the library (an SSI process of
    /// another user than the tests').
    pub fn as_nobody(&self, node: u32, args: &[&str]) -> Output {
        let so = format!("LD_PRELOAD={}", preload().display());
        let mut v: Vec<&str> = AS_NOBODY.to_vec();
        v.extend(["env", so.as_str(), "KRG_NODE_SOCK=/run/krg/krg-node.sock"]);
        v.extend_from_slice(args);
        self.plain(node, &v).output().unwrap()
    }

    /// `krg ARGS` on node K as user nobody.
    pub fn krg_as_nobody(&self, node: u32, args: &[&str]) -> Output {
        let k = krg_bin();
        let mut v: Vec<&str> = AS_NOBODY.to_vec();
        v.push(k.to_str().unwrap());
        v.extend_from_slice(args);
        self.plain(node, &v).output().unwrap()
    }
}

/// Send `sig` to a host process.
pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let out = Command::new(krg_bin()).args(["cluster", "down"]).output();
        if let Ok(o) = out {
            if !o.status.success() {
                eprintln!(
                    "krg cluster down failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
    }
}

/// Wait for `f` to hold, up to `limit`.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// Read one line from a child's stdout.
pub fn read_line(child: &mut Child) -> String {
    use std::io::BufRead;
    let out = child.stdout.as_mut().expect("piped stdout");
    let mut r = std::io::BufReader::new(out);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    line.trim().to_string()
}

/// Bytes received plus sent on `node`'s network interface so far.
pub fn eth0_bytes(c: &Cluster, node: u32) -> u64 {
    let out = c.plain(node, &["cat", "/proc/net/dev"]).output().unwrap();
    let t = text(&out.stdout);
    let l = t
        .lines()
        .find(|l| l.trim_start().starts_with("eth0:"))
        .unwrap_or_else(|| panic!("no eth0 on node {node}: {t}"));
    let w: Vec<u64> = l
        .split_once(':')
        .unwrap()
        .1
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    w[0] + w[8]
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn write_file(p: &Path, s: &str) {
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(s.as_bytes()).unwrap();
}

/// Compile a C program from examples/ (or a given source) into the shared
/// test directory.
pub fn cc(src: &Path, name: &str) -> PathBuf {
    let out = shared_dir("bin").join(name);
    let st = Command::new("gcc")
        .args(["-O1", "-Wall", "-pthread", "-o"])
        .arg(&out)
        .arg(src)
        .status()
        .expect("gcc");
    assert!(st.success(), "gcc {} failed", src.display());
    out
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}
