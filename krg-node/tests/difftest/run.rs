//! Running one case once: capture its stdout, stderr and exit status under
//! a time limit, kill what is left of it on a timeout, and inject
//! migrations while it runs.
#![allow(dead_code)]

use crate::common::Cluster;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one run gave.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Exit status (128+N for death by signal N); `None`: it timed out.
    pub status: Option<i32>,
    /// It exited, but something kept its stdout or stderr open after.
    pub held_open: bool,
    pub secs: f64,
}

/// A pipe read to its end by a thread of its own, into a buffer that can
/// be taken before the end if the end never comes.
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
}

impl Drain {
    fn new(mut r: impl Read + Send + 'static) -> Drain {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (b, d) = (buf.clone(), done.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 65536];
            loop {
                match r.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => b.lock().unwrap().extend_from_slice(&chunk[..n]),
                }
            }
            d.store(true, Ordering::SeqCst);
        });
        Drain { buf, done }
    }
    fn finished(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.buf.lock().unwrap())
    }
}

fn status_of(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// How long a finished run's stdout may stay open (a process of it still
/// writing, or a relay flushing) before the run counts as held open.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Run `cmd` for at most `limit`. On a timeout `kill_rest` is called
/// first (to end the case's processes wherever they are), then `cmd`'s
/// own process is killed.
pub fn capture(mut cmd: Command, limit: Duration, kill_rest: &dyn Fn()) -> Outcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child: Child = cmd.spawn().expect("spawn a case");
    let out = Drain::new(child.stdout.take().unwrap());
    let err = Drain::new(child.stderr.take().unwrap());
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for a case") {
            break Some(status_of(st));
        }
        if t0.elapsed() >= limit {
            kill_rest();
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    while !(out.finished() && err.finished()) && t1.elapsed() < DRAIN_GRACE {
        std::thread::sleep(Duration::from_millis(10));
    }
    let held_open = status.is_some() && !(out.finished() && err.finished());
    if held_open {
        kill_rest();
    }
    Outcome {
        stdout: out.take(),
        stderr: err.take(),
        status,
        held_open,
        secs,
    }
}

/// Run `cmd` to its end or for at most `limit` (then killed); its output.
pub fn output_within(cmd: Command, limit: Duration) -> Outcome {
    capture(cmd, limit, &|| {})
}

/// Every SSI process of the cluster, from `krg ps --json` on node 1
/// (`None` if that failed).
pub fn ps(c: &Cluster) -> Option<Vec<serde_json::Value>> {
    let mut k = c.plain(
        1,
        &[crate::common::krg_bin().to_str().unwrap(), "ps", "--json"],
    );
    k.stdin(Stdio::null());
    let o = output_within(k, Duration::from_secs(30));
    if o.status != Some(0) {
        return None;
    }
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .ok()?
        .as_array()
        .cloned()
}

/// The processes of the case whose top process has `marker` in its
/// command line: those, and their descendants (ppid links) and group.
pub fn case_procs(all: &[serde_json::Value], marker: &str) -> Vec<(i64, u64, String)> {
    let pid = |p: &serde_json::Value| p["pid"].as_i64().unwrap_or(0);
    let mut mine: Vec<i64> = all
        .iter()
        .filter(|p| p["command"].as_str().unwrap_or("").contains(marker))
        .map(pid)
        .collect();
    let groups: Vec<i64> = all
        .iter()
        .filter(|p| mine.contains(&pid(p)))
        .filter_map(|p| p["pgid"].as_i64())
        .collect();
    loop {
        let more: Vec<i64> = all
            .iter()
            .filter(|p| !mine.contains(&pid(p)))
            .filter(|p| {
                p["ppid"].as_i64().is_some_and(|pp| mine.contains(&pp))
                    || p["pgid"].as_i64().is_some_and(|g| groups.contains(&g))
            })
            .map(pid)
            .collect();
        if more.is_empty() {
            break;
        }
        mine.extend(more);
    }
    all.iter()
        .filter(|p| mine.contains(&pid(p)))
        .map(|p| {
            (
                pid(p),
                p["node"].as_u64().unwrap_or(0),
                p["command"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// SIGKILL every SSI process of the cluster (it runs nothing but the
/// case); how many there were.
pub fn kill_all(c: &Cluster) -> usize {
    let mut seen = 0;
    for _ in 0..5 {
        let Some(all) = ps(c) else {
            std::thread::sleep(Duration::from_millis(300));
            continue;
        };
        if all.is_empty() {
            break;
        }
        seen = seen.max(all.len());
        let pids: Vec<String> = all
            .iter()
            .filter_map(|p| p["pid"].as_i64())
            .map(|p| p.to_string())
            .collect();
        let k = crate::common::krg_bin();
        let mut v = vec![k.to_str().unwrap(), "kill", "-KILL"];
        v.extend(pids.iter().map(|s| s.as_str()));
        let _ = output_within(c.plain(1, &v), Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(300));
    }
    seen
}

/// Migrations tried while cases ran, and what came of them.
#[derive(Debug, Default, Clone)]
pub struct MigStats {
    pub attempted: u64,
    pub succeeded: u64,
    /// The process was gone by the time the command reached it.
    pub gone: u64,
    /// Refusals and errors, by message (numbers blanked).
    pub other: BTreeMap<String, u64>,
    /// What was moved where, in order: for the failure report.
    pub log: Vec<String>,
}

/// Which processes the injector moves, and how many times.
#[derive(Debug, Default, Clone)]
pub struct Aim {
    /// Stop after this many attempts in a run.
    pub max: Option<u64>,
    /// Only processes whose command contains this.
    pub only: Option<String>,
}

impl MigStats {
    pub fn add(&mut self, o: &MigStats) {
        self.attempted += o.attempted;
        self.succeeded += o.succeeded;
        self.gone += o.gone;
        for (k, v) in &o.other {
            *self.other.entry(k.clone()).or_default() += v;
        }
    }
}

/// A message with its numbers blanked, so that refusals group by kind.
fn kind_of(msg: &str) -> String {
    let line = msg.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut s = String::new();
    let mut digit = false;
    for ch in line.chars().take(160) {
        if ch.is_ascii_digit() {
            if !digit {
                s.push('N');
            }
            digit = true;
        } else {
            s.push(ch);
            digit = false;
        }
    }
    s
}

/// While `done` is unset: at random moments, migrate a random process of
/// the case (marked `marker`) to a random other node of `nodes`.
pub fn inject(c: &Cluster, nodes: u32, marker: &str, aim: &Aim, done: &AtomicBool) -> MigStats {
    let mut st = MigStats::default();
    let mut rng = StdRng::from_entropy();
    let nap = |rng: &mut StdRng, lo: u64, hi: u64| {
        let until = Instant::now() + Duration::from_millis(rng.gen_range(lo..hi));
        while Instant::now() < until && !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // The first move soon: most cases are short.
    nap(&mut rng, 20, 200);
    while !done.load(Ordering::SeqCst) {
        if aim.max.is_some_and(|m| st.attempted >= m) {
            nap(&mut rng, 100, 101);
            continue;
        }
        let procs: Vec<(i64, u64, String)> = ps(c)
            .map(|all| case_procs(&all, marker))
            .unwrap_or_default()
            .into_iter()
            .filter(|p| {
                aim.only
                    .as_ref()
                    .is_none_or(|o| p.2.starts_with(o.as_str()))
            })
            .collect();
        if let Some((pid, node, cmd)) = procs.choose(&mut rng).cloned() {
            let others: Vec<u32> = (1..=nodes).filter(|&n| n as u64 != node).collect();
            let to = *others.choose(&mut rng).unwrap();
            let k = crate::common::krg_bin();
            let o = output_within(
                c.plain(
                    1,
                    &[
                        k.to_str().unwrap(),
                        "migrate",
                        &pid.to_string(),
                        &to.to_string(),
                    ],
                ),
                Duration::from_secs(60),
            );
            st.attempted += 1;
            let out = String::from_utf8_lossy(&o.stdout);
            let err = String::from_utf8_lossy(&o.stderr);
            let what = if o.status == Some(0) && out.contains("migrated to node") {
                st.succeeded += 1;
                "moved".to_string()
            } else if err.contains("No such process") || err.contains("no such process") {
                st.gone += 1;
                "gone".to_string()
            } else {
                let msg = if o.status.is_none() {
                    "krg migrate did not return within 60 s".to_string()
                } else {
                    kind_of(&format!("{err}{out}"))
                };
                *st.other.entry(msg.clone()).or_default() += 1;
                msg
            };
            let cmd: String = cmd.chars().take(50).collect();
            st.log.push(format!(
                "{pid} ({}) {node} -> {to}: {what}",
                cmd.escape_debug()
            ));
            nap(&mut rng, 50, 700);
        } else {
            nap(&mut rng, 20, 100);
        }
    }
    st
}
