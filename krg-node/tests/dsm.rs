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

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn finish(ch: Child, what: &str) -> String {
    ok(&ch.wait_with_output().unwrap(), what)
}

/// `krg ps --json` entries (seen from node 1) whose command contains `pat`.
fn procs_named(c: &Cluster, pat: &str) -> Vec<serde_json::Value> {
    c.ps(1)
        .into_iter()
        .filter(|p| p["command"].as_str().is_some_and(|s| s.contains(pat)))
        .collect()
}

/// `krg migrate PID TO` from node `from`, which must succeed.
fn migrate(c: &Cluster, from: u32, pid: i64, to: u32) {
    let mig = c.krg(from, &["migrate", &pid.to_string(), &to.to_string()]);
    assert!(
        mig.status.success() && text(&mig.stdout).contains(&format!("migrated to node {to}")),
        "{}{}",
        text(&mig.stdout),
        text(&mig.stderr)
    );
}

/// The segments `krg ipcs --json` lists, seen from `node`.
fn ipcs(c: &Cluster, node: u32) -> Vec<serde_json::Value> {
    c.json_list(node, "ipcs")
}

#[test]
fn a_ring_buffer_of_c11_atomics_carries_a_million_items_between_two_nodes() {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    let id = ok(
        &c.cmd(1, &[&t, "create", "0x5101"]).output().unwrap(),
        "create",
    );
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

#[test]
fn three_nodes_add_to_one_counter_with_atomic_fetch_add_exactly() {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    ok(
        &c.cmd(1, &[&t, "create", "0x5102"]).output().unwrap(),
        "create",
    );
    // Each adder waits until all three have arrived, so they contend.
    let kids: Vec<Child> = (1..=3)
        .map(|n| c.piped(n, &[&t, "add", "0x5102", "100000", "atomic", "3"]))
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        finish(k, &format!("adder on node {}", i + 1));
    }
    let show = ok(&c.cmd(2, &[&t, "show", "0x5102"]).output().unwrap(), "show");
    assert!(show.contains("atomic 300000"), "{show}");
}

#[test]
fn a_read_into_a_segment_on_one_node_is_seen_on_another() {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    ok(
        &c.cmd(1, &[&t, "create", "0x5103"]).output().unwrap(),
        "create",
    );
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
    let dump = ok(&c.cmd(3, &[&t, "dump", "0x5103"]).output().unwrap(), "dump");
    assert_eq!(dump, want);
}

#[test]
fn ipc_rmid_and_permissions_behave_as_on_one_machine() {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    ok(
        &c.cmd(1, &[&t, "create", "0x5104", "0", "600"])
            .output()
            .unwrap(),
        "create 0600",
    );
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
    ok(
        &c.cmd(2, &[&t, "rm", "0x5104"]).output().unwrap(),
        "rm as root",
    );
    let after = ipcs(&c, 1);
    let dest: Vec<_> = after.iter().filter(|s| s["removed"] == true).collect();
    assert_eq!(dest.len(), 1, "{after:?}");
    assert_eq!(dest[0]["key"], 0, "a removed segment's key is IPC_PRIVATE");
    let gone = c.cmd(1, &[&t, "stat", "0x5104"]).output().unwrap();
    assert!(text(&gone.stderr).contains("No such file"), "{gone:?}");
    finish(hold, "holder on node 3");
    assert!(
        wait_for(std::time::Duration::from_secs(5), || ipcs(&c, 1).is_empty()),
        "segment still listed after its last detach: {:?}",
        ipcs(&c, 1)
    );
}

#[test]
fn three_nodes_add_under_one_process_shared_mutex_exactly() {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    ok(
        &c.cmd(1, &[&t, "create", "0x5105"]).output().unwrap(),
        "create",
    );
    let kids: Vec<Child> = (1..=3)
        .map(|n| c.piped(n, &[&t, "add", "0x5105", "100000", "mutex", "3"]))
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        finish(k, &format!("adder on node {}", i + 1));
    }
    let show = ok(&c.cmd(3, &[&t, "show", "0x5105"]).output().unwrap(), "show");
    assert!(show.contains("counter 300000"), "{show}");
}

/// Waiters sleep in the kernel on their own node; a post, signal or unlock
/// on another node must wake them.
#[test]
fn semaphores_and_condition_variables_wake_waiters_on_other_nodes() {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    ok(
        &c.cmd(1, &[&t, "create", "0x5106"]).output().unwrap(),
        "create",
    );
    let n = "1000";
    let b = c.piped(3, &[&t, "pingpong", "0x5106", n, "1"]);
    let a = c.piped(2, &[&t, "pingpong", "0x5106", n, "0"]);
    assert!(finish(a, "pingpong side 0").contains("1000 round trips"));
    assert!(finish(b, "pingpong side 1").contains("1000 round trips"));
    let b = c.piped(1, &[&t, "condvar", "0x5106", n, "1"]);
    let a = c.piped(3, &[&t, "condvar", "0x5106", n, "0"]);
    let (x, y) = (finish(a, "condvar side 0"), finish(b, "condvar side 1"));
    // 2000 hand-overs in all; the side that finishes last saw them all.
    assert!(
        x.contains("turn 2000") || y.contains("turn 2000"),
        "{x} / {y}"
    );
}

#[test]
fn a_named_posix_semaphore_ping_pongs_ten_thousand_times_between_two_nodes() {
    let c = Cluster::up(3, 1.0);
    let t = cc(&repo_root().join("examples/shm/semping.c"), "semping");
    let t = t.to_str().unwrap();
    let b = c.piped(3, &[t, "krgtest", "10000", "1"]);
    let a = c.piped(2, &[t, "krgtest", "10000", "0"]);
    let x = finish(a, "semping side 0 on node 2");
    let y = finish(b, "semping side 1 on node 3");
    assert!(x.contains("10000 round trips"), "{x}");
    assert!(y.contains("10000 round trips"), "{y}");
    // Side 0 unlinked both names and both sides closed them: nothing left.
    assert!(
        wait_for(std::time::Duration::from_secs(5), || ipcs(&c, 1).is_empty()),
        "{:?}",
        ipcs(&c, 1)
    );
}

#[test]
fn system_v_semaphores_are_one_set_for_the_whole_cluster() {
    let c = Cluster::up(3, 1.0);
    let t = cc(&repo_root().join("examples/shm/semtool.c"), "semtool");
    let t = t.to_str().unwrap();
    let made = ok(
        &c.cmd(1, &[t, "create", "0x5201", "4"]).output().unwrap(),
        "create",
    );
    assert!(made.contains("nsems 4"), "{made}");
    // Cross-node wake-ups, both ways.
    let b = c.piped(2, &[t, "pingpong", "0x5201", "1000", "1"]);
    let a = c.piped(3, &[t, "pingpong", "0x5201", "1000", "0"]);
    assert!(finish(a, "pingpong side 0").contains("1000 round trips"));
    assert!(finish(b, "pingpong side 1").contains("1000 round trips"));
    // SEM_UNDO: the +1 of a process on node 2 is undone when it exits.
    ok(
        &c.cmd(2, &[t, "up-undo", "0x5201", "2"]).output().unwrap(),
        "up-undo",
    );
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
    let nowait = ok(
        &c.cmd(3, &[t, "down", "0x5201", "3", "nowait"])
            .output()
            .unwrap(),
        "nowait",
    );
    assert_eq!(nowait.trim(), "Resource temporarily unavailable");
    let timed = ok(
        &c.cmd(1, &[t, "down", "0x5201", "3", "300"])
            .output()
            .unwrap(),
        "timed",
    );
    assert_eq!(timed.trim(), "Resource temporarily unavailable");
    // IPC_RMID from node 1 wakes a waiter on node 2 with EIDRM.
    let waiter = c.piped(2, &[t, "down", "0x5201", "3"]);
    std::thread::sleep(std::time::Duration::from_millis(800));
    ok(&c.cmd(1, &[t, "rm", "0x5201"]).output().unwrap(), "rm");
    assert_eq!(finish(waiter, "waiter").trim(), "Identifier removed");
}

/// A page whose only up-to-date copy was on a node that died: a process
/// touching it gets SIGBUS, never the old contents.
#[test]
fn a_page_lost_with_its_node_gives_sigbus_not_stale_data() {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    ok(
        &c.cmd(1, &[&t, "create", "0x5107"]).output().unwrap(),
        "create",
    );
    // Node 1 reads the atomic counter's page (a read copy here), then
    // node 2 writes it: node 2 now holds the only up-to-date copy.
    assert!(ok(&c.cmd(1, &[&t, "show", "0x5107"]).output().unwrap(), "show").contains("atomic 0"));
    ok(
        &c.cmd(2, &[&t, "add", "0x5107", "5", "atomic"])
            .output()
            .unwrap(),
        "add on node 2",
    );
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
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    ok(
        &c.cmd(1, &[&t, "create", "0x5110"]).output().unwrap(),
        "create",
    );
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
    migrate(&c, 1, pid, 2);
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
    let show = ok(&c.cmd(2, &[&t, "show", "0x5110"]).output().unwrap(), "show");
    assert!(show.contains("atomic 6000"), "{show}");
}

/// A forked child shares its parent's attachment, coherently: the kernel
/// gives the child's mapping no userfaultfd, libkrg registers a new one.
#[test]
fn a_forked_child_shares_the_attachment_coherently() {
    let c = Cluster::up(3, 1.0);
    let t = shmtool();
    ok(
        &c.cmd(1, &[&t, "create", "0x5108"]).output().unwrap(),
        "create",
    );
    // The counter's page is node 2's when node 3's processes start.
    ok(
        &c.cmd(2, &[&t, "add", "0x5108", "1000", "atomic"])
            .output()
            .unwrap(),
        "add",
    );
    let f = ok(
        &c.cmd(3, &[&t, "fork-add", "0x5108", "1000"])
            .output()
            .unwrap(),
        "fork-add",
    );
    assert!(f.contains("added 1000 each"), "{f}");
    let show = ok(&c.cmd(1, &[&t, "show", "0x5108"]).output().unwrap(), "show");
    assert!(show.contains("atomic 3000"), "{show}");
}

/// POSIX shared memory objects: shm_open + ftruncate + mmap on one node,
/// the same object by name on the others; shm_unlink removes the name.
#[test]
fn a_posix_shared_memory_object_is_the_same_on_every_node() {
    let c = Cluster::up(3, 1.0);
    let t = cc(&repo_root().join("examples/shm/posixshm.c"), "posixshm");
    let t = t.to_str().unwrap();
    let made = ok(
        &c.cmd(1, &[t, "create", "/krgobj", "3000000"])
            .output()
            .unwrap(),
        "create",
    );
    assert!(made.contains("created 3000000 bytes"), "{made}");
    // Node 2 sees the size (fstat) and every byte node 1 wrote.
    let seen = ok(
        &c.cmd(2, &[t, "check", "/krgobj"]).output().unwrap(),
        "check on node 2",
    );
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
    let show = ok(&c.cmd(3, &[t, "show", "/krgobj"]).output().unwrap(), "show");
    assert_eq!(show.trim(), "counter 60000");
    let listed = ipcs(&c, 2);
    assert!(
        listed.iter().any(|s| s["name"] == "shm.krgobj"),
        "{listed:?}"
    );
    ok(
        &c.cmd(2, &[t, "unlink", "/krgobj"]).output().unwrap(),
        "unlink",
    );
    let gone = c.cmd(1, &[t, "show", "/krgobj"]).output().unwrap();
    assert!(text(&gone.stderr).contains("No such file"), "{gone:?}");
    assert!(wait_for(std::time::Duration::from_secs(5), || ipcs(&c, 1).is_empty()));
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
        migrate(&c, from, child, to);
        let s = seg(1);
        assert!(
            s["attached"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["node"] == to),
            "attached from node {to}: {s}"
        );
    }
    let out = finish(run, "anonshare");
    assert!(out.contains("total 5000"), "{out}");
}
