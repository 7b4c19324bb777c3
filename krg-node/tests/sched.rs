//! The cluster scheduler on a real local cluster: `krg sched` shows the
//! policy in force, `krg sched set` switches every node (built-ins and a
//! user policy file), a node that missed the switch catches up through
//! heartbeats, and placements (asked with the debugging `krg sched place`)
//! follow the policy and never land on a node that is down.

mod common;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// SIGSTOP a node's agent; SIGCONT when dropped (even if the test fails).
struct Stopped(i32);

impl Stopped {
    fn new(c: &Cluster, node: u32) -> Stopped {
        let pid = c.agent_pid(node);
        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

fn sched(c: &Cluster, node: u32) -> serde_json::Value {
    let out = c.krg(node, &["sched", "--json"]);
    assert!(
        out.status.success(),
        "krg sched on node {node}: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn place(c: &Cluster, node: u32, extra: &[&str]) -> Vec<u32> {
    let mut args = vec!["sched", "place", "--json"];
    args.extend_from_slice(extra);
    let out = c.krg(node, &args);
    assert!(
        out.status.success(),
        "krg {args:?} on node {node}: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn per_node(v: &[u32]) -> BTreeMap<u32, usize> {
    let mut m = BTreeMap::new();
    for n in v {
        *m.entry(*n).or_default() += 1;
    }
    m
}

/// Every node in `nodes` shows the policy `name` with `version`.
fn wait_everywhere(c: &Cluster, nodes: &[u32], name: &str, version: &str, limit: Duration) {
    for &n in nodes {
        let ok = wait_for(limit, || {
            let s = sched(c, n);
            s["name"] == name && s["version"] == version
        });
        assert!(
            ok,
            "node {n} shows {} instead of {name} version {version}",
            sched(c, n)
        );
    }
}

fn all_up(c: &Cluster, from: u32) -> bool {
    (1..=c.nodes).all(|n| c.node_state(from, n) == "up")
}

fn example_policy() -> PathBuf {
    repo_root().join("examples/sched/prefer-idle.rhai")
}

#[test]
fn policy_switches_on_every_node_and_late_nodes_catch_up() {
    let c = Cluster::up(3, 1.0);
    for n in 1..=3 {
        assert!(wait_for(Duration::from_secs(5), || all_up(&c, n)));
    }
    // The default everywhere: local, version 0.
    for n in 1..=3 {
        let s = sched(&c, n);
        assert_eq!(s["name"], "local", "node {n}: {s}");
        assert_eq!(s["kind"], "built-in");
        assert_eq!(s["version"], "0.0");
    }
    let human = c.krg(2, &["sched"]);
    assert_contains(&text(&human.stdout), "policy   local (built-in)");

    // A built-in, set on node 1, is in force on every node at once.
    let out = c.sched_set(1, "round-robin");
    assert!(
        out.contains("scheduling policy set to round-robin (built-in)")
            && out.contains("node 2: applied")
            && out.contains("node 3: applied"),
        "{out}"
    );
    let v1 = sched(&c, 1)["version"].as_str().unwrap().to_string();
    assert!(v1.ends_with(".1"), "{v1}");
    wait_everywhere(&c, &[1, 2, 3], "round-robin", &v1, Duration::ZERO);

    // A user policy file, set on node 2: same text everywhere.
    let file = example_policy();
    let out = c.sched_set(2, file.to_str().unwrap());
    assert!(out.contains("prefer-idle.rhai (user policy"), "{out}");
    let s2 = sched(&c, 2);
    let v2 = s2["version"].as_str().unwrap().to_string();
    assert!(v2.ends_with(".2") && v2 > v1, "{v2} after {v1}");
    wait_everywhere(&c, &[1, 2, 3], "prefer-idle.rhai", &v2, Duration::ZERO);
    for n in 1..=3 {
        let s = sched(&c, n);
        assert_eq!(s["kind"], "script");
        assert_eq!(s["digest"], s2["digest"], "node {n}");
        assert_eq!(s["origin"], file.to_str().unwrap());
    }
    // The script decides: quick helpers stay on their origin (round-robin
    // would have sent the first one to node 1).
    assert_eq!(place(&c, 3, &["--", "/bin/true"]), vec![3]);

    // A file that does not compile: a clear error, nothing changes.
    let bad = shared_dir("sched").join("broken.rhai");
    write_file(&bad, "fn place(nodes, req) {\n    nodes[0].id +\n}\n");
    let out = c.krg(1, &["sched", "set", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("broken.rhai does not compile") && err.contains("line 3"),
        "{err}"
    );
    let out = c.krg(1, &["sched", "set", "fastest"]);
    assert!(!out.status.success());
    assert_contains(&text(&out.stderr), "unknown policy `fastest`");
    // Only root changes the cluster's policy.
    let k = krg_bin();
    let out = c
        .plain(
            1,
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                k.to_str().unwrap(),
                "sched",
                "set",
                "pack",
            ],
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_contains(&text(&out.stderr), "only root");
    wait_everywhere(&c, &[1, 2, 3], "prefer-idle.rhai", &v2, Duration::ZERO);

    // Node 3 misses a switch (its agent is stopped, then seen down) and
    // catches up through heartbeats once it runs again.
    let v3 = {
        let _stopped = Stopped::new(&c, 3);
        assert!(
            wait_for(Duration::from_secs(5), || c.node_state(1, 3) == "down"),
            "node 1 still sees node 3 up"
        );
        let out = c.sched_set(1, "pack");
        assert!(!out.contains("node 3"), "{out}");
        let v3 = sched(&c, 1)["version"].as_str().unwrap().to_string();
        wait_everywhere(&c, &[1, 2], "pack", &v3, Duration::ZERO);
        v3
    };
    wait_everywhere(&c, &[3], "pack", &v3, Duration::from_secs(5));

    // Node 3 stopped while it is still seen up: the push to it fails or
    // lands late; either way it converges.
    let v4 = {
        let _stopped = Stopped::new(&c, 3);
        let out = c.sched_set(2, "least-loaded");
        let v4 = sched(&c, 2)["version"].as_str().unwrap().to_string();
        wait_everywhere(&c, &[1, 2], "least-loaded", &v4, Duration::ZERO);
        assert!(out.contains("node 1: applied"), "{out}");
        v4
    };
    wait_everywhere(&c, &[3], "least-loaded", &v4, Duration::from_secs(5));
    assert!(
        !c.log(1).contains("panicked") && !c.log(3).contains("panicked"),
        "{}",
        c.log(3)
    );
}

#[test]
fn placements_follow_the_policy_and_avoid_down_nodes() {
    let c = Cluster::up(4, 2.0);
    assert!(wait_for(Duration::from_secs(5), || all_up(&c, 1)));
    // The probes still show in `krg status`.
    let st = c.status(1);
    assert_eq!(st.len(), 4);
    for s in &st {
        assert_eq!(s["cpus"].as_f64(), Some(2.0), "{s}");
        assert!(s["load"].is_number() && s["mem_free_kb"].as_u64() > Some(0));
    }

    // The default, local: nothing moves.
    assert_eq!(place(&c, 2, &["--count", "3"]), vec![2, 2, 2]);

    // pack: fill node 1 (2 CPUs) before node 2, and so on.
    c.sched_set(1, "pack");
    assert_eq!(place(&c, 1, &["--count", "4"]), vec![1, 1, 2, 2]);
    assert_eq!(place(&c, 1, &["--count", "4"]), vec![3, 3, 4, 4]);

    // round-robin: 8 placements, 2 per node, in id order, from any node.
    c.sched_set(3, "round-robin");
    assert_eq!(
        place(&c, 1, &["--count", "8"]),
        vec![1, 2, 3, 4, 1, 2, 3, 4]
    );
    assert_eq!(
        per_node(&place(&c, 4, &["--count", "8", "--", "sha256sum", "x"])),
        BTreeMap::from([(1, 2), (2, 2), (3, 2), (4, 2)])
    );

    // Pinning: --node and KRG_NODE.
    assert_eq!(
        place(&c, 1, &["--count", "3", "--node", "3"]),
        vec![3, 3, 3]
    );
    let k = krg_bin();
    let out = c
        .plain(
            2,
            &[
                "env",
                "KRG_NODE=4",
                k.to_str().unwrap(),
                "sched",
                "place",
                "--json",
                "--count",
                "2",
            ],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "[4,4]");

    // A user policy governs every node's placements.
    let f = shared_dir("sched").join("node-four.rhai");
    write_file(&f, "fn place(nodes, req) { 4 }\n");
    c.sched_set(2, f.to_str().unwrap());
    for n in 1..=4 {
        assert_eq!(place(&c, n, &["--count", "2"]), vec![4, 4], "from node {n}");
    }

    // Node 4 down: never chosen, whatever the policy (the script's choice
    // is replaced by least-loaded, a pin by the policy).
    let _stopped = Stopped::new(&c, 4);
    assert!(
        wait_for(Duration::from_secs(5), || c.node_state(1, 4) == "down"),
        "node 1 still sees node 4 up"
    );
    let got = place(&c, 1, &["--count", "6"]);
    assert!(got.iter().all(|n| (1..=3).contains(n)), "{got:?}");
    assert!(
        wait_for(Duration::from_secs(3), || c
            .log(1)
            .contains("chose node 4, which is not up")),
        "{}",
        c.log(1)
    );
    for policy in [
        "round-robin",
        "least-loaded",
        "two-choices",
        "pack",
        "local",
    ] {
        c.sched_set(1, policy);
        let got = place(&c, 1, &["--count", "8"]);
        assert!(got.iter().all(|n| (1..=3).contains(n)), "{policy}: {got:?}");
        let got = place(&c, 1, &["--count", "2", "--node", "4"]);
        assert!(
            got.iter().all(|n| (1..=3).contains(n)),
            "{policy} pinned: {got:?}"
        );
    }
    c.sched_set(1, "round-robin");
    let got = place(&c, 1, &["--count", "9"]);
    assert_eq!(
        per_node(&got),
        BTreeMap::from([(1, 3), (2, 3), (3, 3)]),
        "{got:?}"
    );
}
