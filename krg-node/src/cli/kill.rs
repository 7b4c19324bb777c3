//! `krg kill [-SIG | -s SIG] PID...`: like kill(1), cluster-wide.

use super::agent_call;
use anyhow::{bail, Result};
use libkrg::proto::Request;
use nix::sys::signal::Signal;
use std::str::FromStr;

/// A signal given by number, `TERM` or `SIGTERM`.
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (0..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal number {n}");
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    if let Some(rt) = name.strip_prefix("SIGRTMIN") {
        let base = libc::SIGRTMIN();
        let off: i32 = if rt.is_empty() {
            0
        } else {
            rt.trim_start_matches('+').parse()?
        };
        return Ok(base + off);
    }
    Signal::from_str(&name)
        .map(|s| s as i32)
        .map_err(|_| anyhow::anyhow!("unknown signal {s}"))
}

pub fn kill(args: &[String]) -> Result<i32> {
    let mut sig = libc::SIGTERM;
    let mut i = 0;
    let mut pids = Vec::new();
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            pids.extend(args[i + 1..].iter().cloned());
            break;
        } else if a == "-s" || a == "--signal" {
            let v = args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("-s needs a signal"))?;
            sig = parse_signal(v)?;
            i += 2;
            continue;
        } else if let Some(s) = a
            .strip_prefix('-')
            .filter(|s| !s.is_empty() && pids.is_empty())
        {
            sig = parse_signal(s)?;
        } else {
            pids.push(a.clone());
        }
        i += 1;
    }
    if pids.is_empty() {
        bail!("usage: krg kill [-SIG | -s SIG] PID...");
    }
    let mut code = 0;
    for p in pids {
        let pid: i32 = match p.parse() {
            Ok(v) => v,
            Err(_) => {
                eprintln!("krg kill: {p}: arguments must be process ids");
                code = 1;
                continue;
            }
        };
        if let Err(e) = agent_call(&Request::Kill { pid, sig }) {
            eprintln!("krg kill: ({pid}) - {e:#}");
            code = 1;
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("0").unwrap(), 0);
        assert!(parse_signal("BOGUS").is_err());
        assert!(parse_signal("99").is_err());
    }
}
