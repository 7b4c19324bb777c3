//! `krg sched`: show and hot-change the scheduling policy of the cluster.

use super::agent_call;
use crate::agent::sched::policy::Builtin;
use crate::agent::sched::script::Script;
use crate::agent::sched::{MAX_PLACE_COUNT, MAX_SCRIPT_BYTES};
use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use libkrg::proto::{self, Request, Response, SchedInfo};
use std::path::Path;

#[derive(Subcommand, Debug)]
pub enum SchedCmd {
    /// Switch every node that is up to POLICY, while programs run: a
    /// built-in (local, round-robin, least-loaded, two-choices, pack) or a
    /// user policy file (.rhai).
    Set {
        #[arg(value_name = "NAME|FILE")]
        policy: String,
    },
    /// Switch the load balancer of every node that is up: `off`, or
    /// `threshold` (running CPU-bound processes move from overloaded to
    /// underloaded nodes).
    Balance {
        #[arg(value_name = "off|threshold")]
        policy: String,
    },
    /// Debugging aid: where this node's scheduler would place COUNT new
    /// programs (each counts as a placement, as a real one would).
    #[command(hide = true)]
    Place {
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Pin them to node N (as KRG_NODE=N does).
        #[arg(long)]
        node: Option<u32>,
        /// The program, as the policy sees it (exe = its first word).
        #[arg(trailing_var_arg = true)]
        cmd: Vec<String>,
    },
}

/// `krg sched [--json] [set NAME|FILE | place ...]`.
pub fn sched(cmd: Option<SchedCmd>, json: bool) -> Result<i32> {
    match cmd {
        None => {
            let info = match agent_call(&Request::SchedGet)? {
                Response::Sched(i) => i,
                other => bail!("unexpected answer: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&info_json(&info))?);
            } else {
                print!("{}", show(&info));
            }
            Ok(0)
        }
        Some(SchedCmd::Set { policy }) => set(&policy, json),
        Some(SchedCmd::Balance { policy }) => balance(&policy, json),
        Some(SchedCmd::Place { count, node, cmd }) => place(count, node, cmd, json),
    }
}

/// A built-in name, or a policy file read and checked here.
fn resolve(arg: &str) -> Result<(String, Option<String>)> {
    if Builtin::from_name(arg).is_some() {
        return Ok((arg.to_string(), None));
    }
    let path = Path::new(arg);
    if !(arg.contains('/') || arg.ends_with(".rhai") || path.exists()) {
        bail!(
            "unknown policy `{arg}`: the built-in policies are {}; a user policy is a .rhai file",
            Builtin::names()
        );
    }
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read policy file {arg}"))?;
    if !meta.is_file() {
        bail!("policy file {arg}: not a regular file");
    }
    if meta.len() > MAX_SCRIPT_BYTES as u64 {
        bail!(
            "policy file {arg}: {} bytes, more than the {MAX_SCRIPT_BYTES} a policy may have",
            meta.len()
        );
    }
    let src =
        std::fs::read_to_string(path).with_context(|| format!("cannot read policy file {arg}"))?;
    // The agent checks it again; checking here first gives the error
    // before anything changes, even with no agent to ask.
    Script::compile(&src).map_err(|e| anyhow!("{arg} does not compile: {e}"))?;
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok((abs.display().to_string(), Some(src)))
}

fn balance(policy: &str, json: bool) -> Result<i32> {
    let info = match agent_call(&Request::SchedBalance {
        name: policy.to_string(),
    })? {
        Response::Sched(i) => i,
        other => bail!("unexpected answer: {other:?}"),
    };
    report(&info, json, "load balancing")
}

fn set(policy: &str, json: bool) -> Result<i32> {
    let (name, source) = resolve(policy)?;
    let info = match agent_call(&Request::SchedSet { name, source })? {
        Response::Sched(i) => i,
        other => bail!("unexpected answer: {other:?}"),
    };
    report(&info, json, "scheduling policy")
}

fn report(info: &SchedInfo, json: bool, what: &str) -> Result<i32> {
    let info = info.clone();
    if json {
        println!("{}", serde_json::to_string_pretty(&info_json(&info))?);
        return Ok(0);
    }
    let now = if what == "load balancing" {
        info.balance.clone()
    } else {
        describe(&info)
    };
    println!(
        "{what} set to {now}, version {}.{}",
        info.version_ms, info.version_node
    );
    println!("  node {}: applied (this node)", info.version_node);
    for p in &info.pushed {
        if p.ok {
            println!("  node {}: applied", p.node);
        } else {
            println!(
                "  node {}: not yet: {} (it catches up through heartbeats)",
                p.node, p.error
            );
        }
    }
    Ok(0)
}

fn place(count: u32, node: Option<u32>, cmd: Vec<String>, json: bool) -> Result<i32> {
    if count == 0 || count > MAX_PLACE_COUNT {
        bail!("--count {count}: between 1 and {MAX_PLACE_COUNT}");
    }
    let pinned =
        match node {
            Some(n) => Some(proto::parse_node_pin(&n.to_string()).ok_or_else(|| {
                anyhow!("--node {n}: node ids are 1..={}", libkrg::gpid::MAX_NODE)
            })?),
            None => match std::env::var(proto::NODE_PIN_ENV) {
                Ok(v) => Some(proto::parse_node_pin(&v).ok_or_else(|| {
                    anyhow!(
                        "{}={v}: not a node id (1..={})",
                        proto::NODE_PIN_ENV,
                        libkrg::gpid::MAX_NODE
                    )
                })?),
                Err(_) => None,
            },
        };
    let exe = cmd.first().cloned().unwrap_or_default();
    let nodes = match agent_call(&Request::SchedPlace {
        count,
        exe,
        argv: cmd,
        pinned,
    })? {
        Response::Placed(v) => v,
        other => bail!("unexpected answer: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string(&nodes)?);
    } else {
        let list: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        println!("{}", list.join(" "));
    }
    Ok(0)
}

fn describe(i: &SchedInfo) -> String {
    if i.kind == "script" {
        format!("{} (user policy {}, sha256 {})", i.name, i.origin, i.digest)
    } else {
        format!("{} ({})", i.name, i.kind)
    }
}

fn show(i: &SchedInfo) -> String {
    let when = if i.version_ms == 0 {
        "the default at start".to_string()
    } else {
        format!("set {} by node {}", utc(i.version_ms), i.version_node)
    };
    format!(
        "policy   {}\nbalance  {}\nversion  {}.{} ({when})\nbuilt-in {}\n",
        describe(i),
        i.balance,
        i.version_ms,
        i.version_node,
        Builtin::names()
    )
}

fn info_json(i: &SchedInfo) -> serde_json::Value {
    serde_json::json!({
        "name": i.name,
        "kind": i.kind,
        "origin": i.origin,
        "version": format!("{}.{}", i.version_ms, i.version_node),
        "version_ms": i.version_ms,
        "version_node": i.version_node,
        "digest": i.digest,
        "balance": i.balance,
        "pushed": i.pushed.iter().map(|p| serde_json::json!({
            "node": p.node,
            "ok": p.ok,
            "error": p.error,
        })).collect::<Vec<_>>(),
    })
}

/// `YYYY-MM-DD HH:MM:SS UTC` of unix milliseconds.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_764_022_356_123), "2025-11-24 22:12:36 UTC");
    }

    #[test]
    fn names_and_files() {
        assert_eq!(resolve("pack").unwrap(), ("pack".into(), None));
        let e = resolve("fastest").unwrap_err().to_string();
        assert!(e.contains("unknown policy `fastest`"), "{e}");
        let e = format!("{:#}", resolve("/nonexistent/p.rhai").unwrap_err());
        assert!(
            e.contains("cannot read policy file /nonexistent/p.rhai"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("krg-sched-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.rhai");
        std::fs::write(&bad, "fn place(nodes, req) {\n  nodes[0].id +\n}\n").unwrap();
        let e = resolve(bad.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("does not compile") && e.contains("line"), "{e}");
        let good = dir.join("good.rhai");
        std::fs::write(&good, "fn place(nodes, req) { req.origin }").unwrap();
        let (name, src) = resolve(good.to_str().unwrap()).unwrap();
        assert!(name.ends_with("/good.rhai") && src.is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
