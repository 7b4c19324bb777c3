//! Cluster-wide System V shared memory (issue 6): segments named by the
//! same key on every node, kept coherent page by page by the agents.
//! Every test runs processes on different nodes of a local cluster: the
//! nodes share no /dev/shm and no IPC namespace, so the only way a byte
//! written on one node is read on another is through krg.

mod common;

use common::*;
use std::process::Child;

fn shmtool() -> String {
    example("shm/shmtool.c", "shmtool")
}

/// A 3-node cluster with the segment `key` (shmtool's default size)
/// created from node 1; and shmtool.
fn with_segment(key: &str) -> (Cluster, String) {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    c.run_ok(1, &[&t, "create", key], "create");
    (c, t)
}

/// One `shmtool add KEY 100000 HOW 3` on each of three nodes, on a new
/// segment `key`: then `show` on node `show_on` must say `want`.
fn three_nodes_add(key: &str, how: &str, show_on: u32, want: &str) {
    let (c, t) = with_segment(key);
    // Each adder waits until all three have arrived, so they contend.
    let kids: Vec<Child> = (1..=3)
        .map(|n| c.piped(n, &[&t, "add", key, "100000", how, "3"]))
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        finish(k, &format!("adder on node {}", i + 1));
    }
    let show = c.run_ok(show_on, &[&t, "show", key], "show");
    assert!(show.contains(want), "{show}");
}

/// The two sides of a ping-pong, `ARGS 0` on node `n0` and `ARGS 1` on
/// node `n1` (started first: it waits for side 0), run to their ends;
/// their outputs.
fn both_sides(c: &Cluster, args: &[&str], n0: u32, n1: u32) -> (String, String) {
    let side = |k: &str, n: u32| c.piped(n, &[args, &[k]].concat());
    let b = side("1", n1);
    let a = side("0", n0);
    let prog = std::path::Path::new(args[0]).file_name().unwrap();
    let what = |k: u32, n: u32| format!("{prog:?} {} side {k} on node {n}", args[1]);
    (finish(a, &what(0, n0)), finish(b, &what(1, n1)))
}

/// Run `ARGS` (a tool's `create`) on node 1: it must say `says`.
fn create(c: &Cluster, args: &[&str], says: &str) {
    let made = c.run_ok(1, args, "create");
    assert!(made.contains(says), "{made}");
}

/// Wait until no segment or object is listed any more.
#[track_caller]
fn nothing_left(c: &Cluster) {
    assert!(
        wait_for(std::time::Duration::from_secs(5), || ipcs(c, 1).is_empty()),
        "still listed: {:?}",
        ipcs(c, 1)
    );
}

/// `krg ps --json` entries (seen from node 1) whose command contains `pat`.
fn procs_named(c: &Cluster, pat: &str) -> Vec<serde_json::Value> {
    c.ps(1)
        .into_iter()
        .filter(|p| p["command"].as_str().is_some_and(|s| s.contains(pat)))
        .collect()
}

/// The segments `krg ipcs --json` lists, seen from `node`.
fn ipcs(c: &Cluster, node: u32) -> Vec<serde_json::Value> {
    c.json_list(node, "ipcs")
}

#[test]
fn a_ring_buffer_of_c11_atomics_carries_a_million_items_between_two_nodes() {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    let id = c.run_ok(1, &[&t, "create", "0x5101"], "create");
    assert!(id.trim().parse::<i32>().is_ok(), "segment id: {id}");
    let n = "1000000";
    let cons = c.piped(2, &[&t, "ring-cons", "0x5101", n]);
    let prod = c.piped(1, &[&t, "ring-prod", "0x5101", n]);
    let p = finish(prod, "producer on node 1");
    let q = finish(cons, "consumer on node 2");
    // The consumer checks every item against the formula as it goes; the
    // checksums of both ends must agree too.
    let sum = |s: &str| s.split_whitespace().last().unwrap().to_string();
    assert!(p.starts_with("ring-prod 1000000 items"), "{p}");
    assert!(q.starts_with("ring-cons 1000000 items"), "{q}");
    assert_eq!(sum(&p), sum(&q), "producer {p} consumer {q}");
}

/// One test per way three nodes add to one counter: `name: key, how
/// (shmtool add's), the node that shows it, what it must show`.
macro_rules! three_nodes_add_tests {
    ($($name:ident: $key:literal, $how:literal, $on:literal, $want:literal;)*) => {$(
        #[test]
        fn $name() {
            three_nodes_add($key, $how, $on, $want);
        }
    )*};
}

three_nodes_add_tests! {
    three_nodes_add_to_one_counter_with_atomic_fetch_add_exactly: "0x5102", "atomic", 2, "atomic 300000";
    three_nodes_add_under_one_process_shared_mutex_exactly: "0x5105", "mutex", 3, "counter 300000";
}

#[test]
fn a_read_into_a_segment_on_one_node_is_seen_on_another() {
    let (c, t) = with_segment("0x5103");
    // The file exists only in node 2's private /tmp.
    let read = c.sh(
        2,
        &format!("seq 1 5000 > /tmp/numbers && {t} read-into 0x5103 /tmp/numbers"),
    );
    let said = ok(&read, "read-into on node 2");
    let want: String = (1..=5000).map(|i| format!("{i}\n")).collect();
    assert!(
        said.contains(&format!("read {} bytes", want.len())),
        "{said}"
    );
    let no_file = c.sh(3, "test -e /tmp/numbers && echo shared || echo private");
    assert_eq!(text(&no_file.stdout).trim(), "private");
    let dump = c.run_ok(3, &[&t, "dump", "0x5103"], "dump");
    assert_eq!(dump, want);
}

#[test]
fn ipc_rmid_and_permissions_behave_as_on_one_machine() {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    c.run_ok(1, &[&t, "create", "0x5104", "0", "600"], "create 0600");
    // Another user: no read permission, so no IPC_STAT and no attach; not
    // the owner, so no IPC_RMID.
    let stat = c.as_nobody(2, &[&t, "stat", "0x5104"]);
    assert!(!stat.status.success());
    assert!(text(&stat.stderr).contains("Permission denied"), "{stat:?}");
    let show = c.as_nobody(3, &[&t, "show", "0x5104"]);
    assert!(
        text(&show.stderr).contains("shmat: Permission denied"),
        "{show:?}"
    );
    let rm = c.as_nobody(2, &[&t, "rm", "0x5104"]);
    assert!(
        text(&rm.stderr).contains("Operation not permitted"),
        "{rm:?}"
    );

    // IPC_RMID while a process on node 3 is attached: the segment stays
    // (marked for destruction, its key free) until that process detaches.
    let mut hold = c.piped(3, &[&t, "hold", "0x5104", "3"]);
    assert_eq!(read_line(&mut hold), "attached");
    let seg = ipcs(&c, 2)
        .into_iter()
        .find(|s| s["key"] == 0x5104)
        .expect("segment listed");
    let attached = seg["attached"].as_array().unwrap();
    assert_eq!(attached.len(), 1, "{seg}");
    assert_eq!(attached[0]["node"], 3, "{seg}");
    c.run_ok(2, &[&t, "rm", "0x5104"], "rm as root");
    let after = ipcs(&c, 1);
    let dest: Vec<_> = after.iter().filter(|s| s["removed"] == true).collect();
    assert_eq!(dest.len(), 1, "{after:?}");
    assert_eq!(dest[0]["key"], 0, "a removed segment's key is IPC_PRIVATE");
    let gone = c.cmd(1, &[&t, "stat", "0x5104"]).output().unwrap();
    assert!(text(&gone.stderr).contains("No such file"), "{gone:?}");
    finish(hold, "holder on node 3");
    // The segment goes with its last detach.
    nothing_left(&c);
}

/// Waiters sleep in the kernel on their own node; a post, signal or unlock
/// on another node must wake them.
#[test]
fn semaphores_and_condition_variables_wake_waiters_on_other_nodes() {
    let (c, t) = with_segment("0x5106");
    let n = "1000";
    let (x, y) = both_sides(&c, &[&t, "pingpong", "0x5106", n], 2, 3);
    assert!(x.contains("1000 round trips"));
    assert!(y.contains("1000 round trips"));
    let (x, y) = both_sides(&c, &[&t, "condvar", "0x5106", n], 3, 1);
    // 2000 hand-overs in all; the side that finishes last saw them all.
    assert!(
        x.contains("turn 2000") || y.contains("turn 2000"),
        "{x} / {y}"
    );
}

#[test]
fn a_named_posix_semaphore_ping_pongs_ten_thousand_times_between_two_nodes() {
    let c = Cluster::up(3, 1.0);
    let t = &example("shm/semping.c", "semping");
    let (x, y) = both_sides(&c, &[t, "krgtest", "10000"], 2, 3);
    assert!(x.contains("10000 round trips"), "{x}");
    assert!(y.contains("10000 round trips"), "{y}");
    // Side 0 unlinked both names and both sides closed them: nothing left.
    nothing_left(&c);
}

#[test]
fn system_v_semaphores_are_one_set_for_the_whole_cluster() {
    let c = Cluster::up(3, 1.0);
    let t = &example("shm/semtool.c", "semtool");
    create(&c, &[t, "create", "0x5201", "4"], "nsems 4");
    // Cross-node wake-ups, both ways.
    let (x, y) = both_sides(&c, &[t, "pingpong", "0x5201", "1000"], 3, 2);
    assert!(x.contains("1000 round trips"));
    assert!(y.contains("1000 round trips"));
    // SEM_UNDO: the +1 of a process on node 2 is undone when it exits.
    c.run_ok(2, &[t, "up-undo", "0x5201", "2"], "up-undo");
    assert!(wait_for(std::time::Duration::from_secs(5), || {
        text(
            &c.cmd(3, &[t, "get", "0x5201", "2"])
                .output()
                .unwrap()
                .stdout,
        )
        .trim()
            == "0"
    }));
    // IPC_NOWAIT and a timeout give EAGAIN.
    let nowait = c.run_ok(3, &[t, "down", "0x5201", "3", "nowait"], "nowait");
    assert_eq!(nowait.trim(), "Resource temporarily unavailable");
    let timed = c.run_ok(1, &[t, "down", "0x5201", "3", "300"], "timed");
    assert_eq!(timed.trim(), "Resource temporarily unavailable");
    // IPC_RMID from node 1 wakes a waiter on node 2 with EIDRM.
    let waiter = c.piped(2, &[t, "down", "0x5201", "3"]);
    std::thread::sleep(std::time::Duration::from_millis(800));
    c.run_ok(1, &[t, "rm", "0x5201"], "rm");
    assert_eq!(finish(waiter, "waiter").trim(), "Identifier removed");
}

/// A page whose only up-to-date copy was on a node that died: a process
/// touching it gets SIGBUS, never the old contents.
#[test]
fn a_page_lost_with_its_node_gives_sigbus_not_stale_data() {
    let (c, t) = with_segment("0x5107");
    // Node 1 reads the atomic counter's page (a read copy here), then
    // node 2 writes it: node 2 now holds the only up-to-date copy.
    assert!(c
        .run_ok(1, &[&t, "show", "0x5107"], "show")
        .contains("atomic 0"));
    c.run_ok(2, &[&t, "add", "0x5107", "5", "atomic"], "add on node 2");
    // The whole node 2 goes (its agent is the pid namespace's init).
    signal(c.agent_pid(2), nix::sys::signal::Signal::SIGKILL);
    let out = c.sh(3, &format!("{t} show 0x5107; echo status $?"));
    let said = text(&out.stdout);
    assert!(
        said.contains("status 135"),
        "expected death by SIGBUS (135): {said} {}",
        text(&out.stderr)
    );
    assert!(!said.contains("atomic 0"), "stale contents read: {said}");
    // A checkpoint of a process with a segment attached is refused (an
    // image would not hold the segment's contents).
    let mut hold = c.piped(1, &[&t, "hold", "0x5107", "5"]);
    assert_eq!(read_line(&mut hold), "attached");
    let pid = procs_named(&c, "hold")
        .first()
        .map(|p| p["pid"].as_i64().unwrap().to_string())
        .expect("holder in krg ps");
    let ck = c.krg(1, &["checkpoint", &pid, "-o", "/tmp/krg-shm-refused"]);
    assert!(!ck.status.success());
    assert_contains(&text(&ck.stderr), "shared memory segment");
    finish(hold, "holder");
}

/// A process attached to a segment migrates and goes on sharing it: its
/// new node's agent attaches the segment again at the same address, and
/// the pages it had come from the cluster. Two processes on two nodes add
/// to one counter while one of them moves: no add is lost.
#[test]
fn a_process_attached_to_a_segment_migrates_and_keeps_sharing_it() {
    let (c, t) = with_segment("0x5110");
    let mover = c.piped(1, &[&t, "add-paced", "0x5110", "3000", "1000"]);
    let other = c.piped(3, &[&t, "add-paced", "0x5110", "3000", "1000"]);
    let find = || {
        procs_named(&c, "add-paced")
            .iter()
            .map(|p| (p["pid"].as_i64().unwrap(), p["node"].as_u64().unwrap()))
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let pid = loop {
        if let Some((pid, _)) = find().into_iter().find(|p| p.1 == 1) {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "adder not seen on node 1"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Let it add for a while on node 1 first.
    std::thread::sleep(std::time::Duration::from_millis(700));
    c.migrate_ok(1, pid, 2);
    assert!(
        find().contains(&(pid, 2)),
        "the adder runs on node 2: {:?}",
        find()
    );
    // The home sees the moved process attached from node 2.
    let seg = ipcs(&c, 3)
        .into_iter()
        .find(|s| s["key"] == 0x5110)
        .expect("segment listed");
    let nodes: Vec<u64> = seg["attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["node"].as_u64().unwrap())
        .collect();
    assert!(nodes.contains(&2), "attached from node 2: {seg}");
    let a = finish(mover, "the adder that moved");
    let b = finish(other, "the adder on node 3");
    assert!(
        a.contains("added 3000") && b.contains("added 3000"),
        "{a}{b}"
    );
    let show = c.run_ok(2, &[&t, "show", "0x5110"], "show");
    assert!(show.contains("atomic 6000"), "{show}");
}

/// A forked child shares its parent's attachment, coherently: the kernel
/// gives the child's mapping no userfaultfd, libkrg registers a new one.
#[test]
fn a_forked_child_shares_the_attachment_coherently() {
    let (c, t) = with_segment("0x5108");
    // The counter's page is node 2's when node 3's processes start.
    c.run_ok(2, &[&t, "add", "0x5108", "1000", "atomic"], "add");
    let f = c.run_ok(3, &[&t, "fork-add", "0x5108", "1000"], "fork-add");
    assert!(f.contains("added 1000 each"), "{f}");
    let show = c.run_ok(1, &[&t, "show", "0x5108"], "show");
    assert!(show.contains("atomic 3000"), "{show}");
}

/// POSIX shared memory objects: shm_open + ftruncate + mmap on one node,
/// the same object by name on the others; shm_unlink removes the name.
#[test]
fn a_posix_shared_memory_object_is_the_same_on_every_node() {
    let c = Cluster::up(3, 1.0);
    let t = &example("shm/posixshm.c", "posixshm");
    create(
        &c,
        &[t, "create", "/krgobj", "3000000"],
        "created 3000000 bytes",
    );
    // Node 2 sees the size (fstat) and every byte node 1 wrote.
    let seen = c.run_ok(2, &[t, "check", "/krgobj"], "check on node 2");
    assert_eq!(seen.trim(), "size 3000000 ok");
    // O_EXCL on an existing name fails on any node.
    let again = c
        .cmd(3, &[t, "create", "/krgobj", "4096"])
        .output()
        .unwrap();
    assert!(text(&again.stderr).contains("File exists"), "{again:?}");
    let kids: Vec<Child> = (1..=3)
        .map(|n| c.piped(n, &[t, "add", "/krgobj", "20000", "3"]))
        .collect();
    for k in kids {
        finish(k, "adder");
    }
    let show = c.run_ok(3, &[t, "show", "/krgobj"], "show");
    assert_eq!(show.trim(), "counter 60000");
    let listed = ipcs(&c, 2);
    assert!(
        listed.iter().any(|s| s["name"] == "shm.krgobj"),
        "{listed:?}"
    );
    c.run_ok(2, &[t, "unlink", "/krgobj"], "unlink");
    let gone = c.cmd(1, &[t, "show", "/krgobj"]).output().unwrap();
    assert!(text(&gone.stderr).contains("No such file"), "{gone:?}");
    nothing_left(&c);
}

/// `MAP_SHARED|MAP_ANONYMOUS` memory, with the `dsm-anon` capability, is a
/// cluster segment: a parent and the child it forked go on sharing it when
/// the child moves to another node, and again to a third. No add is lost.
#[test]
fn shared_anonymous_memory_stays_shared_with_a_child_that_moves() {
    let c = Cluster::up(3, 1.0);
    let prog = cc(&repo_root().join("examples/shm/anonshare.c"), "anonshare");
    let prog = prog.to_str().unwrap();
    let run = c
        .cmd(1, &[prog, "2500", "1000"])
        .env("KRG_CAPS", "+dsm-anon")
        .spawn_outputs();
    // The child: the process of the program whose parent is the other.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let child = loop {
        let ps: Vec<(i64, i64)> = procs_named(&c, "anonshare")
            .iter()
            .map(|p| (p["pid"].as_i64().unwrap(), p["ppid"].as_i64().unwrap()))
            .collect();
        if let Some((pid, _)) = ps.iter().find(|(_, pp)| ps.iter().any(|(p, _)| p == pp)) {
            break *pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "parent and child not seen: {ps:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let seg = |node: u32| {
        ipcs(&c, node)
            .into_iter()
            .find(|s| s["removed"] == true)
            .unwrap_or_else(|| panic!("no removed (anonymous) segment: {:?}", ipcs(&c, node)))
    };
    let first = seg(2);
    assert_eq!(first["key"], 0, "{first}");
    for to in [2u32, 3] {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let from = if to == 2 { 1 } else { 2 };
        c.migrate_ok(from, child, to);
        // The restored child attaches again on its new node as it starts
        // running there, a moment after `krg migrate` returns.
        let from_to = || {
            seg(1)["attached"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["node"] == to)
        };
        assert!(
            wait_for(std::time::Duration::from_secs(10), from_to),
            "attached from node {to}: {}",
            seg(1)
        );
    }
    let out = finish(run, "anonshare");
    assert!(out.contains("total 5000"), "{out}");
}
