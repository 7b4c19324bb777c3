//! Shared helpers of the cluster integration tests: a local cluster that is
//! always torn down (even when a test fails), and ways to run commands on
//! its nodes. Every cluster is an instance of its own (`KRG_CLUSTER`), so
//! tests run side by side, in one test process or several, and never touch
//! the default instance someone may be using.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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

/// `name` in the shared directory `dir` (see [`shared_dir`]), with nothing
/// there yet: what a previous run left (a file or a directory) is removed.
pub fn fresh_path(dir: &str, name: &str) -> PathBuf {
    let p = shared_dir(dir).join(name);
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// `v` in base 36, `width` digits (zero-padded; `v` must fit).
fn base36(mut v: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for d in out.iter_mut().rev() {
        *d = DIGITS[(v % 36) as usize];
        v /= 36;
    }
    assert_eq!(v, 0, "does not fit in {width} base-36 digits");
    String::from_utf8(out).unwrap()
}

/// Clusters this test process started so far.
static STARTED: AtomicU32 = AtomicU32::new(0);

/// A fresh instance name, 8 characters: `t`, this process's pid in 5
/// base-36 digits (pids go up to 2^22 < 36^5) and a counter in 2 (1296
/// clusters per test process): unique among the processes alive on the
/// machine, and within this one.
pub fn instance_name() -> String {
    let n = STARTED.fetch_add(1, Ordering::SeqCst);
    format!(
        "t{}{}",
        base36(std::process::id().into(), 5),
        base36(n.into(), 2)
    )
}

/// Where scripts/test wants the names of the instances a run makes (one a
/// line), to tear down those a killed test binary left behind.
pub const INSTANCES_FILE_ENV: &str = "KRG_TEST_INSTANCES";

fn record_instance(name: &str) {
    let Some(path) = std::env::var_os(INSTANCES_FILE_ENV) else {
        return;
    };
    // O_APPEND and one short write: lines from parallel tests never mix.
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{INSTANCES_FILE_ENV}={path:?}: {e}"));
    f.write_all(format!("{name}\n").as_bytes()).unwrap();
}

/// A local cluster (an instance of its own) that goes down when dropped.
pub struct Cluster {
    pub nodes: u32,
    /// The instance's name (`KRG_CLUSTER`).
    pub name: String,
    /// X of its subnet 10.77.X.0/24.
    pub net: u8,
}

impl Cluster {
    pub fn up(nodes: u32, cpus: f64) -> Cluster {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the cluster tests need root (namespaces, cgroups, veth)"
        );
        preload();
        let mut c = Cluster {
            nodes,
            name: instance_name(),
            net: 0,
        };
        record_instance(&c.name);
        // Only if a killed test process with our pid left it behind.
        if c.run_dir().exists() {
            let _ = c.krg_cluster().arg("down").output();
        }
        let out = c
            .krg_cluster()
            .args([
                "up",
                "--nodes",
                &nodes.to_string(),
                "--cpus",
                &cpus.to_string(),
            ])
            .output()
            .expect("run krg cluster up");
        // `c` exists from here on: its drop tears down what a failed `up`
        // may have left.
        assert!(
            out.status.success(),
            "krg cluster up (instance {}) failed: {}{}",
            c.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c.net = c.state()["subnet_octet"].as_u64().expect("subnet_octet") as u8;
        assert!(c.net >= 1, "a named instance has a subnet of its own");
        c
    }

    /// `krg cluster` acting on this instance (add the subcommand).
    pub fn krg_cluster(&self) -> Command {
        let mut c = Command::new(krg_bin());
        c.env("KRG_CLUSTER", &self.name).arg("cluster");
        c.stdin(Stdio::null());
        c
    }

    /// The instance's host directory: state, key, logs.
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/krg-cluster-{}", self.name))
    }

    /// Node K's address (10.77.X.K), or any host number of the subnet.
    pub fn addr(&self, k: u32) -> String {
        format!("10.77.{}.{k}", self.net)
    }

    /// 10.77.X.0/24
    pub fn subnet(&self) -> String {
        format!("10.77.{}.0/24", self.net)
    }

    /// Node K's named network namespace.
    pub fn netns(&self, k: u32) -> String {
        format!("krg-{}-n{k}", self.name)
    }

    /// The parent of the nodes' cgroups (in each hierarchy).
    pub fn cgroup_parent(&self) -> String {
        format!("krg-cluster-{}", self.name)
    }

    /// The state file written by `up`.
    pub fn state(&self) -> serde_json::Value {
        let s = std::fs::read_to_string(self.run_dir().join("state.json")).expect("state file");
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
        let mut c = self.krg_cluster();
        c.args(["exec", "--node", &node.to_string(), "--"]);
        c.args(args);
        c
    }

    /// The same without the library (a plain process on that node).
    pub fn plain(&self, node: u32, args: &[&str]) -> Command {
        let mut c = self.krg_cluster();
        c.args(["exec", "--plain", "--node", &node.to_string(), "--"]);
        c.args(args);
        c
    }

    /// `sh -c script` on node K as an SSI process.
    pub fn sh_cmd(&self, node: u32, script: &str) -> Command {
        self.cmd(node, &["sh", "-c", script])
    }

    /// Run `sh -c script` on node K as an SSI process; return its output.
    pub fn sh(&self, node: u32, script: &str) -> Output {
        self.sh_cmd(node, script).output().unwrap()
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

    /// The first SSI process (as node 1's `krg ps` lists them) whose
    /// command starts with `pat`: its gpid and node.
    pub fn find(&self, pat: &str) -> Option<(i64, u64)> {
        self.ps(1)
            .iter()
            .find(|p| p["command"].as_str().unwrap_or("").starts_with(pat))
            .map(|p| (p["pid"].as_i64().unwrap(), p["node"].as_u64().unwrap()))
    }

    /// `find`, waiting up to 10 s for such a process to be listed.
    #[track_caller]
    pub fn wait_find(&self, pat: &str) -> (i64, u64) {
        let mut found = None;
        let listed = wait_for(Duration::from_secs(10), || {
            found = self.find(pat);
            found.is_some()
        });
        assert!(listed, "no process {pat:?} in krg ps: {:?}", self.ps(1));
        found.unwrap()
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

/// Starting a command with the standard streams a test holds: what is not
/// piped is inherited (the test's own output shows it).
pub trait Spawn {
    /// Started, its stdout piped.
    fn spawn_stdout(&mut self) -> Child;
    /// Started, its stdout and stderr piped.
    fn spawn_outputs(&mut self) -> Child;
    /// Started, its stdin and stdout piped.
    fn spawn_in_out(&mut self) -> Child;
    /// Started, its stdin, stdout and stderr piped.
    fn spawn_stdio(&mut self) -> Child;
    /// Run with `input` on its stdin (closed after it); its output.
    fn output_with_input(&mut self, input: &[u8]) -> Output;
}

impl Spawn for Command {
    fn spawn_stdout(&mut self) -> Child {
        self.stdout(Stdio::piped()).spawn().unwrap()
    }

    fn spawn_outputs(&mut self) -> Child {
        self.stderr(Stdio::piped()).spawn_stdout()
    }

    fn spawn_in_out(&mut self) -> Child {
        self.stdin(Stdio::piped()).spawn_stdout()
    }

    fn spawn_stdio(&mut self) -> Child {
        self.stdin(Stdio::piped()).spawn_outputs()
    }

    fn output_with_input(&mut self, input: &[u8]) -> Output {
        let mut ch = self.spawn_stdio();
        ch.stdin.take().unwrap().write_all(input).unwrap();
        ch.wait_with_output().unwrap()
    }
}

impl Cluster {
    /// `ARGS` on node K as an SSI process, its stdout and stderr piped.
    pub fn piped(&self, node: u32, args: &[&str]) -> Child {
        self.cmd(node, args).spawn_outputs()
    }

    /// `ARGS` on node K as an SSI process, its stdout piped, and the first
    /// line it prints (a program that says its pid, or that it is ready).
    pub fn started(&self, node: u32, args: &[&str]) -> (Child, String) {
        let mut ch = self.cmd(node, args).spawn_stdout();
        let line = read_line(&mut ch);
        (ch, line)
    }

    /// `ARGS` on node K as an SSI process, run to its end: `ok` (its
    /// stdout; it must succeed, `what` says which step failed).
    #[track_caller]
    pub fn run_ok(&self, node: u32, args: &[&str], what: &str) -> String {
        ok(&self.cmd(node, args).output().unwrap(), what)
    }

    /// `krg migrate PID TO` from node `from`, which must succeed (with the
    /// processes `krg ps` lists if it does not).
    #[track_caller]
    pub fn migrate_ok(&self, from: u32, pid: impl std::fmt::Display, to: u32) {
        let out = self.krg(from, &["migrate", &pid.to_string(), &to.to_string()]);
        assert!(
            out.status.success(),
            "krg migrate {pid} {to} (on node {from}): {}\nps: {:?}",
            show(&out),
            self.ps(1)
                .iter()
                .map(|p| format!("{} {} {} {}", p["pid"], p["ppid"], p["node"], p["command"]))
                .collect::<Vec<_>>()
        );
        assert_contains(&text(&out.stdout), &format!("migrated to node {to}"));
    }

    /// `pgrep -f PAT` on node K (a plain process): the pids it lists.
    pub fn pgrep(&self, node: u32, pat: &str) -> String {
        text(
            &self
                .plain(node, &["pgrep", "-f", pat])
                .output()
                .unwrap()
                .stdout,
        )
    }

    /// `krg sched set POLICY` on node K, which must succeed; what it says.
    pub fn sched_set(&self, node: u32, policy: &str) -> String {
        let out = self.krg(node, &["sched", "set", policy]);
        assert!(
            out.status.success(),
            "krg sched set {policy} on node {node}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `krg kill ARGS` from node K, which must succeed.
    pub fn kill_ok(&self, node: u32, args: &[&str]) {
        let k = self.krg(node, &[&["kill"], args].concat());
        assert!(k.status.success(), "krg kill {args:?}: {}", text(&k.stderr));
    }

    /// `started` for a program whose first line is its gpid.
    pub fn started_gpid(&self, node: u32, args: &[&str]) -> (Child, i64) {
        let (ch, line) = self.started(node, args);
        let gpid = line
            .parse()
            .unwrap_or_else(|_| panic!("{args:?} on node {node} printed {line:?}, not its gpid"));
        (ch, gpid)
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
        let out = self.krg_cluster().arg("down").output();
        let down = match out {
            Ok(o) if o.status.success() => true,
            Ok(o) => {
                eprintln!(
                    "KRG_CLUSTER={} krg cluster down failed: {}",
                    self.name,
                    String::from_utf8_lossy(&o.stderr)
                );
                false
            }
            Err(e) => {
                eprintln!("running krg cluster down: {e}");
                false
            }
        };
        let keep = std::env::var_os("KRG_TEST_KEEP_LOGS").is_some_and(|v| v == "1");
        if down && !keep && !std::thread::panicking() {
            // Its logs: nobody reads them after a test that passed (unless
            // KRG_TEST_KEEP_LOGS=1: a difftest run does not panic).
            let _ = std::fs::remove_dir_all(self.run_dir());
        } else {
            eprintln!(
                "the agents' logs of local cluster {} are in {}",
                self.name,
                self.run_dir().display()
            );
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
    use std::io::Read;
    let out = child.stdout.as_mut().expect("piped stdout");
    // A byte at a time: a buffered reader, dropped on return, would swallow
    // whatever came after the first line (two lines written at once, as a
    // loaded machine delivers them), and the next call would never see it.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match out.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading a child's stdout: {e}"),
        }
    }
    String::from_utf8_lossy(&line).trim().to_string()
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

/// Assert that `haystack` contains `needle`, showing both if it does not.
#[track_caller]
pub fn assert_contains(haystack: &str, needle: &str) {
    assert!(
        haystack.contains(needle),
        "{needle:?} is not in:\n{haystack}"
    );
}

/// A finished program's status and output, for a failure message.
pub fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// The stdout of `what`, a finished program that must have succeeded.
#[track_caller]
pub fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", show(out));
    text(&out.stdout)
}

/// `ok` for a started program, once it ends.
#[track_caller]
pub fn finish(ch: Child, what: &str) -> String {
    ok(&ch.wait_with_output().unwrap(), what)
}

/// Assert that a finished program succeeded, showing its output if not.
#[track_caller]
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Assert that a finished program printed exactly the lines `want`
/// (its stderr shown if not).
#[track_caller]
pub fn assert_lines(out: &Output, want: &[&str]) {
    assert_eq!(
        text(&out.stdout).lines().collect::<Vec<_>>(),
        want,
        "{}",
        text(&out.stderr)
    );
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn write_file(p: &Path, s: &str) {
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(s.as_bytes()).unwrap();
}

/// Compile a C program from examples/ (or a given source) into the shared
/// test directory, as `bin/<hash of the source>/<name>`. Tests running side
/// by side compile the same programs, and a binary must never be replaced
/// while it runs: a migration starts the program again from its path, which
/// a replaced binary no longer has (`/proc/PID/exe` says "(deleted)"). So a
/// binary, once built, stays; another source gets another directory.
pub fn cc(src: &Path, name: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    static BUILDS: AtomicU32 = AtomicU32::new(0);
    const FLAGS: [&str; 3] = ["-O1", "-Wall", "-pthread"];
    let mut h = Sha256::new();
    h.update(FLAGS.join(" "));
    hash_source(&mut h, src);
    let dir = shared_dir("bin").join(&hex::encode(h.finalize())[..16]);
    let out = dir.join(name);
    if out.exists() {
        return out;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join(format!(
        ".{name}.{}.{}",
        std::process::id(),
        BUILDS.fetch_add(1, Ordering::SeqCst)
    ));
    let st = Command::new("gcc")
        .args(FLAGS)
        .arg("-o")
        .arg(&tmp)
        .arg(src)
        .status()
        .expect("gcc");
    assert!(st.success(), "gcc {} failed", src.display());
    // A link, unlike a rename, never replaces: if another test got there
    // first, its binary (the same program) stays.
    match std::fs::hard_link(&tmp, &out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("linking {} to {}: {e}", tmp.display(), out.display()),
    }
    let _ = std::fs::remove_file(&tmp);
    out
}

/// Hash `src` and the local headers it includes (`#include "..."`, found
/// next to the file that names them, as gcc does): a changed header is
/// another program.
fn hash_source(h: &mut sha2::Sha256, src: &Path) {
    use sha2::Digest;
    let code = std::fs::read_to_string(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    h.update(&code);
    for l in code.lines() {
        let header = l
            .trim_start()
            .strip_prefix("#include \"")
            .and_then(|r| r.split_once('"'));
        if let Some((name, _)) = header {
            hash_source(h, &src.parent().unwrap().join(name));
        }
    }
}

/// Write the C program `code` as `NAME.c` in the shared directory `dir`
/// and `cc` it as `name`; the directory and the binary.
pub fn cc_code(dir: &str, name: &str, code: &str) -> (PathBuf, PathBuf) {
    let d = shared_dir(dir);
    let src = d.join(format!("{name}.c"));
    write_file(&src, code);
    (d, cc(&src, name))
}

/// `cc` for a program of examples/ (`rel` below it), its path as a string
/// (to pass in a command line).
pub fn example(rel: &str, name: &str) -> String {
    let bin = cc(&repo_root().join("examples").join(rel), name);
    bin.to_str().unwrap().to_string()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A `krg migrate` (`m`) that had to be refused, saying `reason`, while
/// the program (`out`) printed exactly `want`: nothing lost to a move that
/// would have changed what it reads or writes.
pub fn assert_refused_and_intact(m: &Output, out: &Output, want: &str, reason: &str) {
    assert_eq!(
        text(&out.stdout),
        want,
        "migrate: {}{}\nstderr: {}",
        text(&m.stdout),
        text(&m.stderr),
        text(&out.stderr)
    );
    assert!(!m.status.success(), "{}", text(&m.stdout));
    assert_contains(&text(&m.stderr), reason);
}
