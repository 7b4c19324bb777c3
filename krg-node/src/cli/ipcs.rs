//! `krg ipcs`: the cluster's System V shared memory segments.

use super::agent_call;
use anyhow::{bail, Result};
use libkrg::proto::{Request, Response, ShmInfo};

fn attached(i: &ShmInfo) -> String {
    if i.attached.is_empty() {
        return "-".into();
    }
    i.attached
        .iter()
        .map(|(pid, node)| format!("{pid}@{node}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The table `krg ipcs` prints.
pub fn table(segs: &[ShmInfo]) -> String {
    let mut out = format!(
        "{:<10} {:>10} {:>4} {:<8} {:>5} {:>12} {:>6} {:<6} ATTACHED (PID@NODE)\n",
        "KEY/NAME", "SHMID", "HOME", "OWNER", "PERMS", "BYTES", "NATTCH", "STATUS"
    );
    for i in segs {
        out.push_str(&format!(
            "{:<10} {:>10} {:>4} {:<8} {:>5o} {:>12} {:>6} {:<6} {}\n",
            if i.name.is_empty() {
                format!("{:#010x}", i.key)
            } else {
                format!(
                    "/{}",
                    i.name.split_once('.').map_or(i.name.as_str(), |x| x.1)
                )
            },
            i.shmid,
            i.home,
            i.uid,
            i.mode & 0o777,
            i.size,
            i.attached.len(),
            if i.mode & 0o1000 != 0 { "dest" } else { "" },
            attached(i)
        ));
    }
    out
}

pub fn ipcs(json: bool) -> Result<i32> {
    let segs = match agent_call(&Request::Ipcs)? {
        Response::Ipcs(v) => v,
        other => bail!("unexpected answer: {other:?}"),
    };
    if json {
        let v: Vec<_> = segs
            .iter()
            .map(|i| {
                serde_json::json!({
                    "key": i.key, "name": i.name, "shmid": i.shmid, "home": i.home, "uid": i.uid,
                    "gid": i.gid, "cuid": i.cuid, "cgid": i.cgid, "mode": i.mode & 0o777,
                    "removed": i.mode & 0o1000 != 0, "bytes": i.size,
                    "nattch": i.attached.len(), "cpid": i.cpid, "lpid": i.lpid,
                    "attached": i.attached.iter().map(|(p, n)| serde_json::json!({"pid": p, "node": n})).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", table(&segs));
    }
    Ok(0)
}
