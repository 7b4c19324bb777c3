//! `krg-bench` (what `krg bench` runs): benchmarks that print ratios
//! against a baseline measured in the same run (this machine is shared and
//! noisy: absolute numbers alone say little). It brings up its own 2-node
//! local cluster and tears it down. A binary of its own, so that the
//! measuring code does not ship inside `krg`; `krg-bench worker ...` is
//! one measurement, run inside a node.
//!
//! Measured today:
//! - spawn + wait of `/bin/true`: plain fork+exec (no library), an SSI
//!   program on the same node, and an SSI program placed on the other node
//!   (remote exec through a shadow);
//! - a pipe's throughput: plain and SSI on one node (in turns, medians),
//!   and with the writer
//!   placed on the other node (the pipe handed over: one TCP connection
//!   between the two nodes, no relay);
//! - the cost of hooked libc calls (getpid, getppid, a passed-through kill)
//!   with and without the library;
//! - live migration of a process holding 1 MiB to 2 GiB, post-copy and
//!   `--precopy`: its freeze-to-resume gap (from its own timestamps), the
//!   time until every page is in (post-copy), against a memcpy of the same
//!   size;
//! - checkpoint to disk and restart against writing the same bytes;
//! - shared memory: remote read and write faults against a TCP round trip
//!   between the same nodes, a sequential read, a bounced page
//!   (`dsm.rs`);
//! - a TCP stream between the nodes reached at 127.0.0.1 (the cluster-wide
//!   loopback) against the same opened to the node's address
//!   (`streams.rs`);
//! - a TCP connection and a pipe before and after migrating one end, and
//!   the time to migrate a process holding 100 connections
//!   (`moved.rs`);
//! - the load balancer's makespan for 8 CPU-bound jobs started on one of 4
//!   half-CPU nodes (a second local cluster), against the ideal.

#![deny(unsafe_code)]

mod dsm;
mod moved;
mod streams;
#[allow(unsafe_code)]
mod sys;

use anyhow::{bail, Context, Result};
use krg_node::cli::preload_path;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

fn main() {
    krg_node::logging::init_cli();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("worker") => worker(&args[1..]),
        None => bench(false),
        Some("--quick") if args.len() == 1 => bench(true),
        Some(_) => Err(anyhow::anyhow!(
            "usage: krg-bench [--quick]   (or: krg bench [--quick])"
        )),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("krg-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The `krg` command next to this binary (cluster exec, migrate, restart,
/// sched), as cargo builds them side by side.
fn krg() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating krg-bench")?;
    let krg = exe.with_file_name("krg");
    if !krg.exists() {
        bail!("{} not found (build it with cargo build)", krg.display());
    }
    Ok(krg)
}

/// What one worker run measured.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Sample {
    /// Per-operation times in microseconds (spawn) or one throughput in MB/s.
    pub values: Vec<f64>,
}

/// The CPU the calling thread runs on now.
pub(crate) fn this_cpu() -> usize {
    nix::sched::sched_getcpu().unwrap_or(0)
}

/// Pin the calling thread (and what it forks and execs afterwards) to
/// `cpu`. The stream benchmarks run both ends on one CPU: on this VM a
/// pipe between two CPUs runs at about a tenth of a pipe within one, and
/// where the kernel puts two processes changes from run to run, so
/// unpinned ratios measure the kernel's scheduler more than krg.
pub(crate) fn pin_to(cpu: usize) -> Result<()> {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    set.set(cpu)
        .and_then(|()| sched_setaffinity(nix::unistd::Pid::from_raw(0), &set))
        .map_err(|e| anyhow::anyhow!("pinning to CPU {cpu}: {}", std::io::Error::from(e)))
}

/// The environment variable that tells a benchmark peer its CPU.
pub(crate) const PIN_ENV: &str = "KRG_BENCH_CPU";

pub(crate) fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

/// `krg-bench worker spawn COUNT [NODE]`: spawn and wait for /bin/true COUNT
/// times (placed on NODE if given); print the times as JSON.
/// `krg-bench worker pipe MIB [NODE]`: read MIB MiB from a `dd` writer (on
/// NODE if given); print MB/s as JSON.
fn worker(args: &[String]) -> Result<i32> {
    let what = args.first().map(String::as_str).unwrap_or("");
    if what == "tcp-serve" {
        let addr = args.get(1).context("worker tcp-serve: missing address")?;
        streams::tcp_serve(addr)?;
        return Ok(0);
    }
    if what == "stream-peer" {
        moved::stream_peer(args)?;
        return Ok(0);
    }
    let n: u64 = args
        .get(1)
        .context("worker: missing count")?
        .parse()
        .context("worker: count")?;
    let node = args.get(2).cloned();
    let mut s = Sample::default();
    match what {
        "spawn" => {
            for _ in 0..n {
                let mut c = Command::new("/bin/true");
                if let Some(k) = &node {
                    c.env("KRG_NODE", k);
                }
                let t = Instant::now();
                let st = c.status().context("spawning /bin/true")?;
                s.values.push(t.elapsed().as_secs_f64() * 1e6);
                if !st.success() {
                    bail!("/bin/true failed: {st}");
                }
            }
        }
        "forkexec" => s.values = fork_exec_sample(n, node.as_deref())?,
        "pipe" => {
            // Reader and dd on one CPU (see pin_to); dd inherits it.
            pin_to(this_cpu())?;
            let mut c = Command::new("dd");
            c.args(["if=/dev/zero", "bs=1M", &format!("count={n}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            if let Some(k) = &node {
                c.env("KRG_NODE", k);
            }
            let t = Instant::now();
            let mut child = c.spawn().context("spawning dd")?;
            let mut out = child.stdout.take().context("dd stdout")?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let r = out.read(&mut buf)?;
                if r == 0 {
                    break;
                }
                total += r as u64;
            }
            child.wait()?;
            let secs = t.elapsed().as_secs_f64();
            if total != n << 20 {
                bail!("pipe delivered {total} bytes, expected {}", n << 20);
            }
            s.values.push(total as f64 / secs / 1e6);
        }
        "hooks" => {
            // Nanoseconds per call of hooked libc functions: getpid (answered
            // from a cache under krg), getppid (cached translation), and
            // kill(own kernel pid, 0) (a kernel pid: passed through).
            let kself = nix::unistd::Pid::from_raw(sys::kernel_pid());
            let time = |f: &dyn Fn()| {
                let t = Instant::now();
                for _ in 0..n {
                    f();
                }
                t.elapsed().as_secs_f64() * 1e9 / n as f64
            };
            // libc's own functions (nix calls them), which krg's hooks see.
            s.values.push(time(&|| {
                std::hint::black_box(nix::unistd::getpid());
            }));
            s.values.push(time(&|| {
                std::hint::black_box(nix::unistd::getppid());
            }));
            // Signal 0 to ourselves only checks existence.
            s.values.push(time(&|| {
                let _ = std::hint::black_box(nix::sys::signal::kill(kself, None));
            }));
            // open + close of a regular file: under krg the open hook
            // checks whether the path is a FIFO (one fstatat).
            let path = c"/etc/hostname";
            s.values.push(time(&|| {
                use nix::fcntl::{open, OFlag};
                if let Ok(fd) = open(path, OFlag::O_RDONLY, nix::sys::stat::Mode::empty()) {
                    let _ = nix::unistd::close(fd);
                }
            }));
        }
        "hold" => hold(n)?,
        "migrate" => s.values = migrate_sample(n, node.as_deref().unwrap_or("2"), false)?,
        "migrate-precopy" => s.values = migrate_sample(n, node.as_deref().unwrap_or("2"), true)?,
        "ckpt" => s.values = ckpt_sample(n)?,
        "spin" => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for i in 0..n {
                h = (h ^ i).wrapping_mul(0x0100_0000_01b3);
            }
            s.values.push(std::hint::black_box(h) as f64);
        }
        "makespan" => s.values = makespan_sample(n)?,
        "dsm" => {
            let seq = node.as_deref().unwrap_or("64").parse()?;
            s.values = dsm::dsm_sample(n as usize, seq)?;
        }
        "dsm-echo" | "dsm-touch" | "dsm-seq" | "dsm-bounce" => {
            s = dsm::dsm_partner(what, args)?;
        }
        "tcp" => {
            let pings = node.as_deref().unwrap_or("2000").parse()?;
            s.values = streams::tcp_sample(n as usize, pings)?;
        }
        "moved" => {
            let pings = node.as_deref().unwrap_or("2000").parse()?;
            s.values = moved::moved_sample(n as usize, pings)?;
        }
        other => bail!("worker: unknown benchmark {other:?}"),
    }
    println!("{}", serde_json::to_string(&s)?);
    Ok(0)
}

/// `krg-bench worker forkexec COUNT [NODE]`: what a shell does: fork, then
/// execve /bin/true in the child (with `KRG_NODE=NODE` in its environment
/// if given), then waitpid; microseconds per program. Under krg with a pin
/// the placement is decided at the execve (the forked child becomes the
/// program's shadow without loading it here).
fn fork_exec_sample(n: u64, node: Option<&str>) -> Result<Vec<f64>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let path = CString::new("/bin/true")?;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != "KRG_NODE")
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            CString::new(e)
        })
        .collect::<Result<_, _>>()?;
    if let Some(k) = node {
        env.push(CString::new(format!("KRG_NODE={k}"))?);
    }
    let argv = sys::CArray::new(vec![path.clone()]);
    let envp = sys::CArray::new(env);
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        let pid = sys::fork_exec(&path, &argv, &envp).map_err(|e| anyhow::anyhow!("fork: {e}"))?;
        let st = sys::wait(pid).map_err(|e| anyhow::anyhow!("waitpid {pid}: {e}"))?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
        if !libc::WIFEXITED(st) || libc::WEXITSTATUS(st) != 0 {
            bail!("/bin/true (fork+execve) failed: status {st:#x}");
        }
    }
    Ok(v)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `krg-bench worker hold MIB`: touch MIB MiB, say `ready`, then print a
/// wall-clock timestamp and its kernel pid every 200 us until stdin closes
/// or 30 s pass. The gap between the last timestamp of the old kernel pid
/// and the first of the new one (a migrated process is a new kernel
/// process on the target) is the freeze-to-resume time.
fn hold(mib: u64) -> Result<()> {
    use std::io::Write;
    let mut mem = vec![0u8; (mib << 20) as usize];
    for (i, b) in mem.iter_mut().enumerate().step_by(4096) {
        *b = i as u8 | 1;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let end = Instant::now() + std::time::Duration::from_secs(30);
    while Instant::now() < end {
        // The kernel's pid, not the gpid libkrg's getpid answers.
        let kpid = sys::kernel_pid();
        if writeln!(out, "{} {kpid}", now_ns())
            .and_then(|_| out.flush())
            .is_err()
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    std::hint::black_box(&mem);
    Ok(())
}

/// Start `krg-bench worker hold MIB` and wait for its `ready`: the child,
/// and the rest of its output.
fn start_holder(
    exe: &std::path::Path,
    mib: u64,
) -> Result<(
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
)> {
    use std::io::BufRead;
    let mut child = Command::new(exe)
        .args(["worker", "hold", &mib.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the holder")?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    match lines.next() {
        Some(Ok(l)) if l == "ready" => {}
        other => bail!("holder did not start: {other:?}"),
    }
    Ok((child, lines))
}

/// `krg-bench worker migrate MIB NODE` (`migrate-precopy`: without post-copy):
/// start a holder of MIB MiB here, migrate it to NODE, and measure: the
/// freeze-to-resume gap in its timestamps, the `krg migrate` call (with
/// post-copy it returns once every page is on the target), and a plain
/// memory copy of the same size (the floor).
fn migrate_sample(mib: u64, node: &str, precopy: bool) -> Result<Vec<f64>> {
    let exe = std::env::current_exe()?;
    let (mut child, lines) = start_holder(&exe, mib)?;
    let pid = child.id() as i32;
    // Let it tick a while, reading as it goes (in a thread).
    let reader = std::thread::spawn(move || {
        let mut v: Vec<(u64, i64)> = Vec::new();
        for l in lines.map_while(|l| l.ok()) {
            let mut f = l.split_whitespace();
            if let (Some(Ok(t)), Some(Ok(k))) = (f.next().map(str::parse), f.next().map(str::parse))
            {
                v.push((t, k));
            }
        }
        v
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let node: u32 = node.parse().context("node")?;
    let t0 = Instant::now();
    let r = libkrg::client::call(&libkrg::proto::Request::Migrate { pid, node, precopy })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let call_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let libkrg::proto::Response::Err(e) = r {
        bail!("migrate: {}", e.msg);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _ = libkrg::client::call(&libkrg::proto::Request::Kill {
        pid,
        sig: libc::SIGKILL,
    });
    let _ = child.wait();
    let ticks = reader.join().map_err(|_| anyhow::anyhow!("reader"))?;
    // The freeze: from the old kernel process's last tick to the new
    // one's first.
    let Some(switch) = ticks.windows(2).position(|w| w[1].1 != w[0].1) else {
        bail!("the holder never showed another kernel pid (not migrated?)");
    };
    let gap_ms = ticks[switch + 1].0.saturating_sub(ticks[switch].0) as f64 / 1e6;
    // After it: the longest stall of the resumed process (page faults
    // waiting for pages, the post-copy thread's share of the node's CPU).
    let after_ms = ticks[switch + 1..]
        .windows(2)
        .map(|w| w[1].0.saturating_sub(w[0].0))
        .max()
        .unwrap_or(0) as f64
        / 1e6;
    // The floor: copying the same bytes once in memory.
    let src = vec![1u8; (mib << 20) as usize];
    let mut dst = vec![0u8; (mib << 20) as usize];
    let t = Instant::now();
    dst.copy_from_slice(&src);
    std::hint::black_box(&dst);
    let copy_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(vec![gap_ms, call_ms, copy_ms, after_ms])
}

/// `krg-bench worker ckpt MIB`: checkpoint a holder of MIB MiB to this node's
/// /tmp (killing it), restart it here, and measure: the checkpoint's time
/// and size, the restart until the restored holder's first timestamp, and
/// writing the same bytes to a file in the same directory (the floor).
fn ckpt_sample(mib: u64) -> Result<Vec<f64>> {
    use std::io::{BufRead, Write};
    let exe = std::env::current_exe()?;
    let dir = std::path::PathBuf::from(format!("/tmp/krg-bench-ckpt-{mib}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (mut child, lines) = start_holder(&exe, mib)?;
    let pid = child.id() as i32;
    std::thread::spawn(move || for _ in lines.map_while(|l| l.ok()) {});
    std::thread::sleep(std::time::Duration::from_millis(200));
    let t = Instant::now();
    let r = libkrg::client::call(&libkrg::proto::Request::Checkpoint {
        pid,
        dir: dir.to_string_lossy().as_bytes().to_vec(),
        kill: true,
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ckpt_ms = t.elapsed().as_secs_f64() * 1e3;
    let bytes = match r {
        libkrg::proto::Response::Ckpt(i) => i.bytes as f64,
        libkrg::proto::Response::Err(e) => bail!("checkpoint: {}", e.msg),
        other => bail!("checkpoint: {other:?}"),
    };
    let _ = child.wait();
    // Restart here; the first timestamp it prints ends the measure.
    let t = Instant::now();
    let mut r = Command::new(krg()?)
        .args(["restart", "-q"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .context("krg restart")?;
    let mut out = std::io::BufReader::new(r.stdout.take().context("stdout")?).lines();
    let first = out.next();
    let restart_ms = t.elapsed().as_secs_f64() * 1e3;
    let stamp = |l: &str| l.split_whitespace().next().map(str::parse::<u64>);
    if !matches!(first, Some(Ok(ref l)) if matches!(stamp(l), Some(Ok(_)))) {
        bail!("restarted holder said {first:?}");
    }
    let _ = r.kill();
    let _ = r.wait();
    // The floor: the same number of bytes written to a file there.
    let buf = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(dir.join("floor"))?;
    let mut left = bytes as u64;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    drop(f);
    let floor_ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(vec![ckpt_ms, bytes, restart_ms, floor_ms])
}

/// `krg-bench worker makespan N`: one `spin N` alone (its time on this node),
/// then 8 at once started here; seconds of each.
fn makespan_sample(n: u64) -> Result<Vec<f64>> {
    let exe = std::env::current_exe()?;
    let spin = || {
        Command::new(&exe)
            .args(["worker", "spin", &n.to_string()])
            .stdout(Stdio::null())
            .spawn()
    };
    let t = Instant::now();
    spin()?.wait()?;
    let single = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut kids = Vec::new();
    for _ in 0..8 {
        kids.push(spin()?);
    }
    for mut k in kids {
        let st = k.wait()?;
        if !st.success() {
            bail!("a job failed: {st}");
        }
    }
    Ok(vec![single, t.elapsed().as_secs_f64()])
}

fn run_worker(plain: bool, args: &[&str]) -> Result<Sample> {
    let mut c = Command::new(krg()?);
    c.args(["cluster", "exec"]);
    if plain {
        c.arg("--plain");
    }
    c.args(["--node", "1", "--"])
        .arg(std::env::current_exe()?)
        .arg("worker")
        .args(args);
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .context("running the bench worker")?;
    if !out.status.success() {
        bail!("bench worker {args:?} failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("bench worker output {text:?}"))
}

/// `krg bench [--quick]`.
fn bench(quick: bool) -> Result<i32> {
    preload_path()?;
    // The instance KRG_CLUSTER names: the workers' `krg cluster exec` find
    // it the same way.
    let inst = krg_node::cluster::Instance::from_env()?;
    if krg_node::cluster::state(&inst)?.is_some_and(|s| s.any_running()) {
        bail!(
            "the {} is up: krg bench brings up its own (run `{}` first, or set {} to another instance name)",
            inst.title(),
            inst.command("down"),
            krg_node::cluster::INSTANCE_ENV
        );
    }
    krg_node::cluster::up(
        &inst,
        &krg_node::cluster::UpOptions {
            nodes: 2,
            cpus: 1.0,
        },
    )?;
    let r = measure(quick);
    let down = krg_node::cluster::down(&inst);
    let r = r?;
    down?;
    // The load balancer needs more, smaller nodes.
    krg_node::cluster::up(
        &inst,
        &krg_node::cluster::UpOptions {
            nodes: 4,
            cpus: 0.5,
        },
    )?;
    let m = makespan(quick);
    let down = krg_node::cluster::down(&inst);
    m?;
    down?;
    Ok(r)
}

fn makespan(quick: bool) -> Result<()> {
    let krg = krg()?;
    let st = Command::new(&krg)
        .args(["cluster", "exec", "--plain", "--node", "1", "--"])
        .arg(&krg)
        .args(["sched", "balance", "threshold"])
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("krg sched balance threshold failed");
    }
    let n = if quick { "1000000000" } else { "3000000000" };
    let v = run_worker(false, &["makespan", n])?.values;
    // Ideal: the work of 8 jobs spread evenly over 4 equal nodes, each
    // job's time measured alone on one of them.
    let ideal = v[0] * 8.0 / 4.0;
    println!("load balancing: 8 CPU-bound jobs started on node 1 of 4 nodes x 0.5 CPU (krg sched balance threshold)");
    println!(
        "  one job alone {:6.2} s   makespan {:6.2} s   ideal {:6.2} s   {:.2}x ideal [goal <= 1.25x]",
        v[0],
        v[1],
        ideal,
        v[1] / ideal
    );
    Ok(())
}

fn measure(quick: bool) -> Result<i32> {
    let count = if quick { "60" } else { "300" };
    let mib = if quick { "256" } else { "2048" };
    println!("krg bench: 2-node local cluster, 1 CPU each; medians (p90)");
    // Warm the page cache and both agents.
    run_worker(true, &["spawn", "10"])?;
    run_worker(false, &["spawn", "10", "2"])?;

    let mut plain = run_worker(true, &["spawn", count])?.values;
    let mut local = run_worker(false, &["spawn", count])?.values;
    let mut remote = run_worker(false, &["spawn", count, "2"])?.values;
    let (p50, p90) = (quantile(&mut plain, 0.5), quantile(&mut plain, 0.9));
    let (l50, l90) = (quantile(&mut local, 0.5), quantile(&mut local, 0.9));
    let (r50, r90) = (quantile(&mut remote, 0.5), quantile(&mut remote, 0.9));
    println!("spawn+wait /bin/true ({count} each)");
    println!(
        "  plain fork+exec, no krg      {:8.3} ms ({:.3})",
        p50 / 1e3,
        p90 / 1e3
    );
    println!(
        "  SSI, same node               {:8.3} ms ({:.3})   {:.2}x plain",
        l50 / 1e3,
        l90 / 1e3,
        l50 / p50
    );
    println!(
        "  SSI, placed on other node    {:8.3} ms ({:.3})   {:.2}x plain   [goal <= 3 ms and <= 5x]",
        r50 / 1e3,
        r90 / 1e3,
        r50 / p50
    );

    // What shells do: fork, then execve in the child (the exec-time
    // placement path), against the same without krg.
    run_worker(false, &["forkexec", "10", "2"])?;
    let mut fplain = run_worker(true, &["forkexec", count])?.values;
    let mut fremote = run_worker(false, &["forkexec", count, "2"])?.values;
    let (f50, f90) = (quantile(&mut fplain, 0.5), quantile(&mut fplain, 0.9));
    let (g50, g90) = (quantile(&mut fremote, 0.5), quantile(&mut fremote, 0.9));
    println!("fork + execve /bin/true + waitpid, as a shell does ({count} each)");
    println!(
        "  plain, no krg                {:8.3} ms ({:.3})",
        f50 / 1e3,
        f90 / 1e3
    );
    println!(
        "  SSI, placed on other node    {:8.3} ms ({:.3})   {:.2}x plain   [goal <= 3 ms and <= 5x]",
        g50 / 1e3,
        g90 / 1e3,
        g50 / f50
    );

    let calls = if quick { "200000" } else { "2000000" };
    let hp = run_worker(true, &["hooks", calls])?.values;
    let hk = run_worker(false, &["hooks", calls])?.values;
    println!("libc calls under the library ({calls} each; ns per call)");
    for (i, name) in [
        "getpid (cached gpid)",
        "getppid (cached)",
        "kill(kernel pid, 0) (pass-through)",
        "open+close /etc/hostname",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "  {name:<36} {:7.1} ns   plain {:7.1} ns   {:.2}x",
            hk[i],
            hp[i],
            hk[i] / hp[i]
        );
    }

    // Plain and SSI on one node in turns (which goes first alternates):
    // one run of each, minutes apart, differs by up to 2x on a shared VM.
    let rounds = if quick { 3 } else { 7 };
    let (mut plain, mut ssi) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for first in [r % 2 == 0, r % 2 != 0] {
            let v = run_worker(first, &["pipe", mib])?.values[0];
            if first {
                plain.push(v);
            } else {
                ssi.push(v);
            }
        }
    }
    let (pp, pl) = (quantile(&mut plain, 0.5), quantile(&mut ssi, 0.5));
    let pr = run_worker(false, &["pipe", mib, "2"])?.values[0];
    println!("pipe throughput ({mib} MiB through dd | reader; one node: medians of {rounds} runs each, in turns)");
    println!(
        "  plain, one node              {pp:8.0} MB/s   ({:.0}-{:.0})",
        plain[0],
        plain[plain.len() - 1]
    );
    println!(
        "  SSI, one node                {pl:8.0} MB/s   ({:.0}-{:.0})   {:.2}x plain   [goal >= 0.98]",
        ssi[0],
        ssi[ssi.len() - 1],
        pl / pp
    );
    println!(
        "  SSI, writer on other node    {pr:8.0} MB/s   {:.2}x same-node SSI (a connection between the nodes)",
        pr / pl
    );

    let (pages, seq) = if quick { (2000, 64) } else { (10000, 256) };
    let v = run_worker(false, &["dsm", &pages.to_string(), &seq.to_string()])?.values;
    dsm::report(&v, pages, seq);

    let (tmib, pings) = if quick { (256, 2000) } else { (1024, 10000) };
    let v = run_worker(false, &["tcp", &tmib.to_string(), &pings.to_string()])?.values;
    streams::report(&v, tmib, pings);
    let v = run_worker(
        false,
        &["moved", &(tmib / 4).to_string(), &pings.to_string()],
    )?
    .values;
    moved::report(&v, tmib / 4, pings);

    let sizes: &[(&str, &str)] = if quick {
        &[("1", "[goal <= 30 ms]"), ("64", ""), ("256", "")]
    } else {
        &[
            ("1", "[goal <= 30 ms]"),
            ("64", ""),
            ("512", "[goal <= 350 ms]"),
            ("2048", "[post-copy goal <= 20 ms]"),
        ]
    };
    println!("live migration to the other node; freeze = last tick of the old kernel process to");
    println!("  the first of the new one (the holder's own timestamps, every 200 us)");
    println!(
        "  post-copy (default): freeze; all in = the krg migrate call (returns once every page"
    );
    println!("  is in); stall = longest pause of the resumed holder while pages still came");
    println!(
        "  --precopy: freeze with every page copied while frozen; floor: memcpy of the same size"
    );
    for (mib, goal) in sizes {
        let post = run_worker(false, &["migrate", mib, "2"])?.values;
        let pre = run_worker(false, &["migrate-precopy", mib, "2"])?.values;
        let floor = post[2].min(pre[2]);
        let mb = mib.parse::<f64>().unwrap_or(0.0) * 1.048_576;
        println!(
            "  {mib:>5} MiB   post-copy freeze {:6.1} ms, all in {:7.1} ms ({:5.0} MB/s), stall {:5.1} ms   pre-copy freeze {:7.1} ms   floor {:7.1} ms {goal}",
            post[0],
            post[1],
            mb / (post[1] / 1e3),
            post[3],
            pre[0],
            floor,
        );
    }
    let sizes: &[&str] = if quick { &["64"] } else { &["64", "512"] };
    println!("checkpoint to the node's /tmp (--kill) and restart there (floor: writing as many bytes to a file)");
    for mib in sizes {
        let v = run_worker(false, &["ckpt", mib])?.values;
        println!(
            "  {mib:>5} MiB   checkpoint {:8.1} ms ({:5.2} GB/s)   restart {:8.1} ms   floor {:7.1} ms ({:5.2} GB/s) [goal >= 1.4 GB/s]",
            v[0],
            v[1] / v[0] / 1e6,
            v[2],
            v[3],
            v[1] / v[3] / 1e6
        );
    }
    Ok(0)
}
