//! Unix semantics kept exactly while programs are placed on other nodes:
//! each script runs natively on node 1 (a plain process, no library) and
//! under krg with the round-robin policy on 4 nodes, and both must print
//! the same bytes and end with the same status (issue 25).

mod common;

use common::*;

fn round_robin(nodes: u32) -> Cluster {
    let c = Cluster::up(nodes, 1.0);
    let o = c.krg(1, &["sched", "set", "round-robin"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    c
}

/// `krg cluster exec --node N -- bash script` pins bash, not what bash
/// starts: before, bash kept `KRG_NODE` from the environment it started
/// with (it has its own unsetenv) and passed it to every child.
#[test]
fn a_pin_applies_to_one_program_not_to_what_a_shell_starts() {
    let c = round_robin(4);
    let o = c.sh(
        1,
        "bash -c 'declare -p KRG_NODE 2>/dev/null || echo unpinned; for i in 1 2 3 4 5 6 7 8; do hostname; done'",
    );
    let t = text(&o.stdout);
    let mut lines = t.lines();
    assert_eq!(lines.next(), Some("unpinned"), "{t}");
    let mut nodes: Vec<&str> = lines.collect();
    nodes.sort();
    nodes.dedup();
    assert!(nodes.len() >= 3, "round robin spreads them: {t}");
    let o = c
        .cmd(
            2,
            &[
                "bash",
                "-c",
                "echo $KRG_NODE; read h </proc/sys/kernel/hostname; echo $h",
            ],
        )
        .output()
        .unwrap();
    let t = text(&o.stdout);
    let l: Vec<&str> = t.lines().collect();
    assert_eq!(l[0], "", "bash does not see the pin: {t}");
    assert_eq!(l[1], "krg-n2", "the pinned program runs there: {t}");
}
