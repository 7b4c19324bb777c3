//! `krg ps`, `krg top`, `krg status`.

use super::agent_call;
use anyhow::{bail, Result};
use libkrg::proto::{NodeStatus, ProcInfo, Request, Response};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};

fn fetch_ps() -> Result<Vec<ProcInfo>> {
    match agent_call(&Request::Ps)? {
        Response::Ps(v) => Ok(v),
        other => bail!("unexpected answer: {other:?}"),
    }
}

fn fetch_status() -> Result<Vec<NodeStatus>> {
    match agent_call(&Request::Status)? {
        Response::Status(v) => Ok(v),
        other => bail!("unexpected answer: {other:?}"),
    }
}

fn cputime(ms: u64) -> String {
    let s = ms / 1000;
    format!("{}:{:02}", s / 60, s % 60)
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).collect()
    }
}

fn proc_json(p: &ProcInfo, cpu: f32) -> serde_json::Value {
    serde_json::json!({
        "pid": p.pid,
        "node": p.node,
        "ppid": p.ppid,
        "pgid": p.pgid,
        "uid": p.uid,
        "user": p.user,
        "state": p.state,
        "cpu": (cpu * 10.0).round() / 10.0,
        "rss_kb": p.rss_kb,
        "time_ms": p.cpu_time_ms,
        "command": p.command,
        "caps": libkrg::caps::Caps::from_bits(p.caps).to_string(),
    })
}

fn table(rows: &[ProcInfo], cpu: &dyn Fn(&ProcInfo) -> f32, width: usize) -> String {
    let mut out = format!(
        "{:>10} {:>4} {:>10} {:<8} {:<4} {:>5} {:>8} {:>8} COMMAND\n",
        "PID", "NODE", "PPID", "USER", "STAT", "%CPU", "RSS", "TIME"
    );
    for p in rows {
        let line = format!(
            "{:>10} {:>4} {:>10} {:<8} {:<4} {:>5.1} {:>8} {:>8} {}",
            p.pid,
            p.node,
            p.ppid,
            trunc(&p.user, 8),
            p.state,
            cpu(p),
            p.rss_kb,
            cputime(p.cpu_time_ms),
            // One process, one line: a multi-line `-c` script stays on it.
            p.command.replace(|c: char| c.is_control(), " ")
        );
        out.push_str(&trunc(&line, width));
        out.push('\n');
    }
    out
}

pub fn ps(json: bool) -> Result<i32> {
    let rows = fetch_ps()?;
    if json {
        let v: Vec<_> = rows.iter().map(|p| proc_json(p, p.cpu)).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", table(&rows, &|p| p.cpu, usize::MAX));
    }
    Ok(0)
}

fn status_json(s: &NodeStatus) -> serde_json::Value {
    serde_json::json!({
        "id": s.id,
        "address": s.address,
        "state": if s.up { "up" } else { "down" },
        "cpus": s.cpus,
        "load": (s.load * 100.0).round() / 100.0,
        "mem_total_kb": s.mem_total_kb,
        "mem_free_kb": s.mem_free_kb,
        "processes": s.processes,
    })
}

fn status_table(nodes: &[NodeStatus]) -> String {
    let mut out = format!(
        "{:>4} {:<21} {:<5} {:>5} {:>6} {:>12} {:>12} {:>6}\n",
        "NODE", "ADDRESS", "STATE", "CPUS", "LOAD", "MEM_TOTAL_KB", "MEM_FREE_KB", "PROCS"
    );
    for s in nodes {
        out.push_str(&format!(
            "{:>4} {:<21} {:<5} {:>5.2} {:>6.2} {:>12} {:>12} {:>6}\n",
            s.id,
            s.address,
            if s.up { "up" } else { "down" },
            s.cpus,
            s.load,
            s.mem_total_kb,
            s.mem_free_kb,
            s.processes
        ));
    }
    out
}

pub fn status(json: bool) -> Result<i32> {
    let nodes = fetch_status()?;
    if json {
        let v: Vec<_> = nodes.iter().map(status_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", status_table(&nodes));
    }
    Ok(0)
}

fn term_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(120)
}

/// Like top: %CPU over the last interval, busiest first.
pub fn top(delay: f64, iterations: Option<u64>, batch: bool) -> Result<i32> {
    if !(delay > 0.0 && delay.is_finite()) {
        bail!("-d {delay}: must be a positive number of seconds");
    }
    let batch = batch || !std::io::stdout().is_terminal();
    let mut prev: HashMap<(u32, i32), (u64, std::time::Instant)> = HashMap::new();
    let mut n = 0u64;
    loop {
        let nodes = fetch_status()?;
        let rows = fetch_ps()?;
        let now = std::time::Instant::now();
        let mut cpu: HashMap<(u32, i32), f32> = HashMap::new();
        for p in &rows {
            let key = (p.node, p.pid);
            let c = match prev.get(&key) {
                Some((ms, t)) => {
                    let dt = now.duration_since(*t).as_secs_f64() * 1000.0;
                    if dt > 0.0 {
                        (p.cpu_time_ms.saturating_sub(*ms) as f64 / dt * 100.0) as f32
                    } else {
                        0.0
                    }
                }
                None => p.cpu,
            };
            cpu.insert(key, c);
        }
        prev = rows
            .iter()
            .map(|p| ((p.node, p.pid), (p.cpu_time_ms, now)))
            .collect();
        let mut sorted = rows.clone();
        sorted.sort_by(|a, b| {
            let ca = cpu.get(&(a.node, a.pid)).copied().unwrap_or(0.0);
            let cb = cpu.get(&(b.node, b.pid)).copied().unwrap_or(0.0);
            cb.partial_cmp(&ca).unwrap_or(std::cmp::Ordering::Equal)
        });
        let up = nodes.iter().filter(|s| s.up).count();
        let mut screen = String::new();
        if !batch {
            screen.push_str("\x1b[H\x1b[2J");
        }
        screen.push_str(&format!(
            "krg top - {} nodes ({} up), {} processes\n",
            nodes.len(),
            up,
            rows.len()
        ));
        screen.push_str(&status_table(&nodes));
        screen.push('\n');
        let f = |p: &ProcInfo| cpu.get(&(p.node, p.pid)).copied().unwrap_or(0.0);
        screen.push_str(&table(&sorted, &f, term_width()));
        let mut out = std::io::stdout().lock();
        out.write_all(screen.as_bytes())?;
        out.flush()?;
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(0);
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(delay));
    }
}
