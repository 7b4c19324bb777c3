//! The `krg` user command. Blocking and single-threaded on purpose: `krg
//! cluster exec` must be able to enter namespaces (setns(CLONE_NEWNS) is
//! refused to multithreaded processes).

mod checkpoint;
mod ipcs;
mod kill;
mod ps;
pub mod sched;

use crate::cluster;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use libkrg::caps::Caps;
use libkrg::client::{self, CallError};
use libkrg::proto::{Request, Response};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

/// krg: a single system image over a cluster of Linux hosts.
#[derive(Parser, Debug)]
#[command(name = "krg", version, about, disable_help_subcommand = true)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// List the nodes of the cluster.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List every SSI process of the cluster.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// List the cluster's System V shared memory segments, with the
    /// processes attached to each and their nodes.
    Ipcs {
        #[arg(long)]
        json: bool,
    },
    /// Show the cluster's processes, refreshed like top.
    Top {
        /// Seconds between refreshes.
        #[arg(short = 'd', long, default_value_t = 2.0)]
        delay: f64,
        /// Stop after this many refreshes.
        #[arg(short = 'n', long)]
        iterations: Option<u64>,
        /// Batch mode: no screen clearing (default when not on a terminal).
        #[arg(short = 'b', long)]
        batch: bool,
    },
    /// Send a signal to SSI processes, wherever they run:
    /// krg kill [-SIG | -s SIG] PID...
    #[command(disable_help_flag = true)]
    Kill {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 1..)]
        args: Vec<String>,
    },
    /// Show or change the SSI capabilities of a process:
    /// krg capset PID [+cap|-cap|cap,...]
    Capset {
        /// Change only the effective set (what applies to the process itself).
        #[arg(short = 'e', long)]
        effective: bool,
        /// Change only the inheritable set (what its future children get).
        #[arg(short = 'i', long)]
        inheritable: bool,
        pid: i32,
        #[arg(allow_hyphen_values = true)]
        changes: Vec<String>,
    },
    /// Run a program as an SSI process (LD_PRELOAD=libkrg.so), placed by
    /// the scheduler or pinned to a node.
    Run {
        /// Run it on node N (sets KRG_NODE=N; if N is down, the
        /// scheduling policy places it).
        #[arg(long, value_name = "N")]
        node: Option<u32>,
        #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
        cmd: Vec<String>,
    },
    /// Save the state of a running process to a directory (it keeps
    /// running unless --kill).
    Checkpoint {
        pid: i32,
        /// Directory of the image (default ./ckpt-PID); must be visible on
        /// the node where the process runs.
        #[arg(short = 'o', long = "output", value_name = "DIR")]
        dir: Option<PathBuf>,
        /// End the process once the image is complete.
        #[arg(long)]
        kill: bool,
    },
    /// Move a running process to node NODE (its pid, parent, stdio and
    /// signals stay as they were). By default the process resumes on NODE
    /// at once and its big anonymous regions follow (post-copy).
    Migrate {
        pid: i32,
        node: u32,
        /// Copy all the memory while the process is frozen (no post-copy:
        /// longer freeze, but the process never depends on the old node).
        #[arg(long)]
        precopy: bool,
    },
    /// Restart a checkpointed process (on node N, or where the scheduler
    /// places it); this command stays as its stand-in (stdio, signals,
    /// exit status).
    Restart {
        dir: PathBuf,
        #[arg(long, value_name = "N")]
        node: Option<u32>,
        /// Do not print the restarted pid.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show the scheduling policy in force, or change it on every node:
    /// krg sched [--json] [set NAME|FILE]
    Sched {
        /// Machine-readable output.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        cmd: Option<sched::SchedCmd>,
    },
    /// Benchmarks with ratios against baselines measured in the same run
    /// (brings up its own 2-node local cluster).
    Bench {
        /// Fewer repetitions.
        #[arg(long)]
        quick: bool,
    },
    /// A whole cluster of N nodes on this one machine.
    Cluster {
        /// The instance to act on: several local clusters can run side by
        /// side, each named by 1 to 8 of a-z0-9 [default: $KRG_CLUSTER, else
        /// the default instance].
        #[arg(long, global = true, value_name = "NAME")]
        name: Option<String>,
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Start N agents, each in its own network, pid and mount namespaces and cgroup.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// CPU capacity of each node (cgroup CPU quota); fractions allowed.
        #[arg(long, default_value_t = 1.0)]
        cpus: f64,
    },
    /// Stop every node and remove everything `up` made.
    Down {
        /// Every instance of this machine, the default one included.
        #[arg(long)]
        all: bool,
    },
    /// List the nodes of the local cluster.
    List {
        /// List the instances of this machine instead.
        #[arg(long)]
        all: bool,
    },
    /// Run a command on node K as an SSI process (stdio, exit status and
    /// signals pass through).
    Exec {
        #[arg(long)]
        node: u32,
        /// Run it as a plain process, without the preload library.
        #[arg(long)]
        plain: bool,
        #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
        cmd: Vec<String>,
    },
}

/// Run the command; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("krg: {e:#}");
            1
        }
    }
}

pub(crate) fn agent_call(req: &Request) -> Result<Response> {
    client::call(req).map_err(|e| match e {
        CallError::Io { .. } => anyhow::anyhow!(
            "{e} at {} (is krg-node running on this node? In the local cluster, use `krg cluster exec --node N -- krg ...`)",
            client::sock_path().display()
        ),
        other => anyhow::anyhow!("{other}"),
    })
}

/// `libkrg.so`, next to this executable.
pub fn preload_path() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the krg executable")?;
    let dir = exe.parent().context("krg executable has no directory")?;
    let so = dir.join("libkrg.so");
    if !so.exists() {
        bail!(
            "{} not found (build it with cargo build --release)",
            so.display()
        );
    }
    Ok(so)
}

/// `krg bench`: runs `krg-bench`, built next to `krg` (the benchmarks are
/// a binary of their own, not shipped inside this one).
fn bench(quick: bool) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("locating the krg executable")?;
    let b = exe.with_file_name("krg-bench");
    if !b.exists() {
        bail!(
            "{} not found: the benchmarks are their own binary (build it with cargo build --release)",
            b.display()
        );
    }
    let mut c = std::process::Command::new(&b);
    if quick {
        c.arg("--quick");
    }
    Err(c.exec()).with_context(|| format!("running {}", b.display()))
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Status { json } => ps::status(json),
        Cmd::Ps { json } => ps::ps(json),
        Cmd::Ipcs { json } => ipcs::ipcs(json),
        Cmd::Top {
            delay,
            iterations,
            batch,
        } => ps::top(delay, iterations, batch),
        Cmd::Kill { args } => kill::kill(&args),
        Cmd::Capset {
            effective,
            inheritable,
            pid,
            changes,
        } => capset(pid, &changes, effective, inheritable),
        Cmd::Run { node, cmd } => {
            let so = preload_path()?;
            let mut c = std::process::Command::new(&cmd[0]);
            if let Some(n) = node {
                let n = libkrg::proto::parse_node_pin(&n.to_string()).with_context(|| {
                    format!("--node {n}: node ids are 1..={}", libkrg::gpid::MAX_NODE)
                })?;
                c.env(libkrg::proto::NODE_PIN_ENV, n.to_string());
            }
            // SSI processes run without address randomisation (see
            // libkrg::checkpoint).
            crate::sys::exec_without_aslr(&mut c);
            let err = c
                .args(&cmd[1..])
                .env("LD_PRELOAD", so)
                // Marks a tree that found no agent; this one may have one.
                .env_remove("KRG_STANDALONE")
                .exec();
            bail!("cannot run {}: {err}", cmd[0])
        }
        Cmd::Checkpoint { pid, dir, kill } => checkpoint::checkpoint(pid, dir, kill),
        Cmd::Migrate { pid, node, precopy } => checkpoint::migrate(pid, node, precopy),
        Cmd::Restart { dir, node, quiet } => checkpoint::restart(&dir, node, quiet),
        Cmd::Sched { json, cmd } => sched::sched(cmd, json),
        Cmd::Bench { quick } => bench(quick),
        Cmd::Cluster { name, cmd } => {
            let all = matches!(
                cmd,
                ClusterCmd::Down { all: true } | ClusterCmd::List { all: true }
            );
            if all && name.is_some() {
                bail!("--all and --name: choose one");
            }
            // With --all, KRG_CLUSTER does not matter (nor need be valid).
            let inst = if all {
                cluster::Instance::default_instance()
            } else {
                cluster::Instance::select(name.as_deref())?
            };
            match cmd {
                ClusterCmd::Up { nodes, cpus } => {
                    if nodes == 0 || nodes > 200 {
                        bail!("--nodes {nodes}: between 1 and 200");
                    }
                    if !(cpus > 0.0 && cpus.is_finite()) {
                        bail!("--cpus {cpus}: must be a positive number");
                    }
                    cluster::up(&inst, &cluster::UpOptions { nodes, cpus }).map(|_| 0)
                }
                ClusterCmd::Down { all: true } => cluster::down_all().map(|_| 0),
                ClusterCmd::Down { all: false } => cluster::down(&inst).map(|_| 0),
                ClusterCmd::List { all: true } => cluster::list_all().map(|_| 0),
                ClusterCmd::List { all: false } => cluster::list(&inst).map(|_| 0),
                ClusterCmd::Exec { node, plain, cmd } => {
                    if plain {
                        cluster::exec_plain(&inst, node, &cmd)
                    } else {
                        cluster::exec(&inst, node, &cmd)
                    }
                }
            }
        }
    }
}

fn capset(pid: i32, changes: &[String], eff: bool, inh: bool) -> Result<i32> {
    let info = if changes.is_empty() {
        match agent_call(&Request::CapGet { gpid: pid })? {
            Response::Caps(c) => c,
            other => bail!("unexpected answer: {other:?}"),
        }
    } else {
        let spec = changes.join(",");
        Caps::apply(Caps::NONE, &spec)?;
        // Neither flag: both sets, as Kerrighed's krgcapset did by default.
        let (e, i) = if !eff && !inh {
            (true, true)
        } else {
            (eff, inh)
        };
        match agent_call(&Request::CapSet {
            gpid: pid,
            spec,
            effective: e,
            inheritable: i,
        })? {
            Response::Caps(c) => c,
            other => bail!("unexpected answer: {other:?}"),
        }
    };
    println!("pid {}", info.gpid);
    println!("  effective:   {}", Caps::from_bits(info.effective));
    println!("  inheritable: {}", Caps::from_bits(info.inheritable));
    Ok(0)
}
