//! Pids in the calls beside fork, kill and wait (`libkrg::pidcalls`) on a
//! real local cluster: examples/pidcalls.c passes on every node, and the
//! calls on a process whose program runs on another node fail with ESRCH
//! from here, as they would for a process that does not exist, while
//! `kill` reaches it. That holds also for a program placed on another node
//! whose shadow stays here: the shadow is not the program, and a priority,
//! an affinity, limits or memory of the shadow are not the program's.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn pid_calls_act_on_this_nodes_processes_and_refuse_others() {
    let c = Cluster::up(2, 1.0);
    let prog = cc(&repo_root().join("examples/pidcalls.c"), "pidcalls");
    let prog = prog.to_str().unwrap();

    // A process of node 2.
    let (mut far, far_pid) = c.started(2, &["sh", "-c", "echo $$; exec sleep 300"]);
    // A program placed on node 2 by its parent on node 1, where its
    // shadow stays.
    let (mut placed, placed_pid) =
        c.started(1, &["sh", "-c", "KRG_NODE=2 sleep 300 & echo $!; wait"]);
    let placed_gpid: i64 = placed_pid.parse().unwrap();
    let running = wait_for(Duration::from_secs(10), || {
        c.ps(1)
            .iter()
            .any(|r| r["pid"].as_i64() == Some(placed_gpid) && r["node"] == 2)
    });
    assert!(
        running,
        "{placed_pid} does not run on node 2: {:?}",
        c.ps(1)
    );

    let mut on_1 = String::new();
    for node in 1..=2 {
        let args: &[&str] = if node == 1 {
            &[prog, &far_pid, &placed_pid]
        } else {
            &[prog]
        };
        let out = c.cmd(node, args).output().unwrap();
        let s = text(&out.stdout);
        eprintln!("--- node {node}\n{s}{}", text(&out.stderr));
        assert!(out.status.success(), "node {node}: {s}");
        assert!(s.contains("ok: 0 failure(s)"), "node {node}: {s}");
        let me: i64 = s
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {s}"));
        assert_eq!(me >> 22, i64::from(node), "{s}");
        if node == 1 {
            on_1 = s;
        }
    }
    // Both were checked from node 1: reached by kill, refused by the rest.
    for p in [&far_pid, &placed_pid] {
        for line in [
            format!("ok   kill({p}, 0) reaches it"),
            format!("ok   getpriority({p}): ESRCH"),
            format!("ok   process_vm_readv({p}): ESRCH"),
        ] {
            assert!(on_1.contains(&line), "{line} in {on_1}");
        }
    }

    for p in [&far_pid, &placed_pid] {
        c.kill_ok(1, &["-KILL", p]);
    }
    let _ = far.wait();
    let _ = placed.wait();
}
