//! Remote exec on a real local cluster: programs started by an SSI process
//! run on the node the scheduler (here: a `KRG_NODE` pin) chose, with their
//! stdio, exit status, signals and parent relation as on one machine.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

fn node_of(gpid: i64) -> i64 {
    gpid >> 22
}

#[test]
fn remote_program_keeps_stdio_status_and_parent() {
    let c = Cluster::up(3, 1.0);
    // The last program gets the script's stdin to itself (the shell execs
    // it): a stdin the shell still read would keep a program on its node.
    let script = r#"
        echo "parent $$ $(cat /proc/sys/kernel/hostname)"
        KRG_NODE=2 sh -c 'echo "child $$ $PPID $(cat /proc/sys/kernel/hostname)"; echo to-err >&2; exit 3' </dev/null
        echo "status $?"
        trap '' USR1
        KRG_NODE=2 sh -c 'echo "ignores $(grep SigIgn /proc/$$/status | cut -f2) $(cat /proc/sys/kernel/hostname)"' </dev/null
        exec env KRG_NODE=2 sh -c 'read l; echo "got $l $(cat /proc/sys/kernel/hostname)"'
    "#;
    let out = c.sh_cmd(1, script).output_with_input(b"hello there\n");
    let o = text(&out.stdout);
    let lines: Vec<Vec<&str>> = o.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), 5, "{o}\n{}", text(&out.stderr));
    assert_eq!(lines[0][2], "krg-n1", "{o}");
    assert_eq!(lines[1][3], "krg-n2", "the child runs on node 2: {o}");
    let child: i64 = lines[1][1].parse().unwrap();
    assert_eq!(node_of(child), 1, "its gpid was allocated on node 1: {o}");
    assert_eq!(lines[1][2], lines[0][1], "its parent is the shell: {o}");
    assert_eq!(lines[2], vec!["status", "3"], "exit status: {o}");
    // A signal ignored before the exec stays ignored there (as `nohup`
    // needs), whatever the agent's own dispositions.
    assert_eq!(lines[3][2], "krg-n2", "{o}");
    let ign = u64::from_str_radix(lines[3][1], 16).unwrap();
    assert_ne!(ign & (1 << (libc::SIGUSR1 - 1)), 0, "SIGUSR1 ignored: {o}");
    assert_eq!(
        lines[4],
        vec!["got", "hello", "there", "krg-n2"],
        "stdin reached it there: {o}"
    );
    assert_eq!(text(&out.stderr).trim(), "to-err");
    assert!(out.status.success());
}

#[test]
fn wait_reaps_remote_and_local_children_and_signals_reach_them() {
    let c = Cluster::up(3, 1.0);
    let script = r#"
        KRG_NODE=2 sh -c 'exit 2' & a=$!
        KRG_NODE=3 sh -c 'exit 3' & b=$!
        sh -c 'exit 4' & l=$!
        wait $a; echo "a $?"
        wait $b; echo "b $?"
        wait $l; echo "l $?"
        KRG_NODE=2 sh -c 'kill -KILL $$' ; echo "self-killed $?"
        KRG_NODE=3 sleep 60 & s=$!
        sleep 0.5
        kill -TERM $s; wait $s; echo "termed $?"
    "#;
    let o = c.sh(1, script);
    let t = text(&o.stdout);
    assert_eq!(
        t.lines().collect::<Vec<_>>(),
        vec!["a 2", "b 3", "l 4", "self-killed 137", "termed 143"],
        "{t}\n{}",
        text(&o.stderr)
    );
}

#[test]
fn remote_child_is_listed_where_it_runs_and_killed_from_anywhere() {
    let c = Cluster::up(3, 1.0);
    let (mut p, parent) = c.started_gpid(
        1,
        &[
            "sh",
            "-c",
            "echo $$; KRG_NODE=2 sleep 60 & echo $!; wait $!; echo \"status $?\"",
        ],
    );
    let child: i64 = read_line(&mut p).parse().unwrap();
    let listed = wait_for(Duration::from_secs(5), || {
        c.ps(3).iter().any(|r| {
            r["pid"].as_i64() == Some(child) && r["node"] == 2 && r["ppid"].as_i64() == Some(parent)
        })
    });
    assert!(listed, "{:?}", c.ps(3));
    // Listed once: the shadow on node 1 is not a process of its own.
    assert_eq!(
        c.ps(1)
            .iter()
            .filter(|r| r["pid"].as_i64() == Some(child))
            .count(),
        1
    );
    c.kill_ok(3, &["-KILL", &child.to_string()]);
    let rest = read_line(&mut p);
    assert_eq!(rest, format!("status {}", 128 + 9));
    let _ = p.wait();
}

#[test]
fn ctrl_c_reaches_the_remote_job() {
    let c = Cluster::up(2, 1.0);
    // A terminal's Ctrl-C signals the whole foreground process group: run
    // krg in a group of its own and signal that group the same way.
    use std::os::unix::process::CommandExt;
    let mut p = c.sh_cmd(1, "KRG_NODE=2 sleep 61; echo after");
    // A harness started in the background by a non-interactive shell
    // inherits SIGINT ignored (POSIX), and so would the job (its remote
    // program too): a terminal's foreground job has it at the default.
    // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        p.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let p = p.process_group(0).spawn_stdout();
    let running = wait_for(Duration::from_secs(5), || {
        c.ps(2)
            .iter()
            .any(|r| r["command"] == "sleep 61" && r["node"] == 2)
    });
    assert!(running, "{:?}", c.ps(2));
    let t = Instant::now();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(p.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    // The shell saw its child die of SIGINT and died of it too.
    assert_eq!(out.status.code(), Some(130), "{:?}", out.status);
    assert!(!text(&out.stdout).contains("after"));
    let gone = wait_for(Duration::from_secs(3), || {
        !c.ps(2).iter().any(|r| r["command"] == "sleep 61")
    });
    assert!(gone, "{:?}", c.ps(2));
}

/// `tr a-z A-Z` that says on stderr, once done, what its stdin is (one
/// process: a stage that forks shares its stdin, which then stays relayed).
const UPPER: &str = "import os, sys
b, o = sys.stdin.buffer, sys.stdout.buffer
t = bytes.maketrans(b\"abcdefghijklmnopqrstuvwxyz\", b\"ABCDEFGHIJKLMNOPQRSTUVWXYZ\")
while True:
    d = b.read1(1 << 16)
    if not d:
        break
    o.write(d.translate(t))
o.flush()
sys.stderr.write(os.readlink(\"/proc/self/fd/0\"))";

#[test]
fn pipeline_across_three_nodes_is_byte_identical() {
    let c = Cluster::up(4, 1.0);
    let dir = shared_dir("pipeline");
    let f = dir.join("data");
    {
        // 100 MB of varied, compressible-enough text.
        let mut w = std::io::BufWriter::new(std::fs::File::create(&f).unwrap());
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut written = 0usize;
        while written < 100_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let line = format!("{x:016x} the quick brown fox {written}\n");
            w.write_all(line.as_bytes()).unwrap();
            written += line.len();
        }
    }
    let f = f.to_str().unwrap();
    let local = c.sh(1, &format!("cat {f} | tr a-z A-Z | sha256sum"));
    // The shell stays on node 1; its stages' pipes become connections
    // between nodes 2, 3 and 4 (relayed through node 1 they would carry
    // 400 MB there).
    let before = eth0_bytes(&c, 1);
    let o = c.sh(
        1,
        &format!("KRG_NODE=2 cat {f} | KRG_NODE=3 tr a-z A-Z | KRG_NODE=4 sha256sum"),
    );
    let through_1 = eth0_bytes(&c, 1) - before;
    let sum = |o: &std::process::Output| {
        let t = text(&o.stdout);
        assert!(o.status.success(), "{t}\n{}", text(&o.stderr));
        t.split_whitespace().next().unwrap_or_default().to_string()
    };
    assert_eq!(sum(&o), sum(&local));
    // What was in flight before the pipes were handed over (a few socket
    // buffers) is all the shell's node may see.
    assert!(
        through_1 < 25_000_000,
        "node 1 carried {through_1} bytes of a 100 MB pipeline between nodes 2, 3, 4"
    );
    // Two stages placed on one node share a real pipe there.
    let o = c.sh(
        1,
        &format!("KRG_NODE=2 cat {f} | KRG_NODE=2 python3 -c '{UPPER}' | KRG_NODE=3 sha256sum"),
    );
    assert_eq!(sum(&o), sum(&local));
    assert!(text(&o.stderr).starts_with("pipe:["), "{}", text(&o.stderr));
    let _ = std::fs::remove_file(f);
    // `2>&1`: stdout and stderr are one stream, in the order written.
    let o = c.sh(
        1,
        "KRG_NODE=2 sh -c 'i=0; while [ $i -lt 500 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done' 2>&1 | KRG_NODE=3 cat",
    );
    let want: Vec<String> = (0..500)
        .flat_map(|i| [format!("out{i}"), format!("err{i}")])
        .collect();
    assert_eq!(text(&o.stdout).lines().collect::<Vec<_>>(), want);
}

#[test]
fn a_down_or_unusable_node_is_not_a_dead_end() {
    let c = Cluster::up(3, 1.0);
    // The pinned node is down: the program runs elsewhere, nothing hangs.
    let pid = c.agent_pid(3);
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let down = wait_for(Duration::from_secs(5), || c.node_state(1, 3) == "down");
    let t = Instant::now();
    let o = c.sh(1, "KRG_NODE=3 hostname");
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    assert!(down);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_ne!(text(&o.stdout).trim(), "krg-n3");
    // The program cannot start there (its working directory is node 1's
    // private /tmp): it runs here instead.
    let o = c.sh(
        1,
        "mkdir -p /tmp/only-here && cd /tmp/only-here && KRG_NODE=2 hostname",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "krg-n1");
}

/// Nodes (by hostname) where the SSI processes whose command starts with
/// `prefix` run, from `krg ps` on node 1.
fn nodes_running(c: &Cluster, prefix: &str) -> Vec<i64> {
    let mut v: Vec<i64> = c
        .ps(1)
        .iter()
        .filter(|p| p["command"].as_str().unwrap_or("").starts_with(prefix))
        .map(|p| p["node"].as_i64().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn round_robin_spreads_a_shell_batch_two_per_node() {
    // Half a CPU per node: each hash runs long enough to be seen.
    let c = Cluster::up(4, 0.5);
    c.sched_set(1, "round-robin");
    let dir = shared_dir("batch");
    let f = dir.join("50M");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&f).unwrap());
        let mut x: u32 = 12345;
        for _ in 0..(50_000_000 / 4) {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            w.write_all(&x.to_le_bytes()).unwrap();
        }
    }
    let want = {
        let o = std::process::Command::new("sha256sum")
            .arg(&f)
            .output()
            .unwrap();
        text(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let fs = f.to_str().unwrap();
    let script =
        format!("for i in 1 2 3 4 5 6 7 8; do sha256sum {fs} > {fs}.$i & done; wait; cat {fs}.*");
    let job = c.sh_cmd(1, &script).spawn_stdout();
    // While they run: 2 per node. Each one is noted when `krg ps` shows
    // it (by pid: one that ends before the last starts still counts).
    let mut seen = std::collections::BTreeMap::new();
    wait_for(Duration::from_secs(30), || {
        for p in c.ps(1) {
            if p["command"].as_str().unwrap_or("").starts_with("sha256sum") {
                seen.insert(p["pid"].as_i64().unwrap(), p["node"].as_i64().unwrap());
            }
        }
        seen.len() >= 8
    });
    let out = job.wait_with_output().unwrap();
    let mut nodes: Vec<i64> = seen.values().copied().collect();
    nodes.sort();
    assert_eq!(
        nodes,
        vec![1, 1, 2, 2, 3, 3, 4, 4],
        "sha256sum ran on nodes {seen:?}"
    );
    let t = text(&out.stdout);
    let sums: Vec<&str> = t
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(sums.len(), 8, "{t}");
    assert!(sums.iter().all(|s| *s == want), "{t}");
}

#[test]
fn make_j8_compiles_on_several_nodes() {
    let c = Cluster::up(4, 1.0);
    c.sched_set(1, "round-robin");
    let dir = shared_dir("make");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let mut main = String::from("#include <stdio.h>\n");
    let mut objs = Vec::new();
    for i in 0..20 {
        write_file(
            &dir.join(format!("f{i}.c")),
            &format!("int f{i}(int x) {{ int s = 0; for (int k = 0; k <= x; k++) s += k * {i}; return s; }}\n"),
        );
        main.push_str(&format!("int f{i}(int);\n"));
        objs.push(format!("f{i}.o"));
    }
    main.push_str("int main(void) { long t = 0;\n");
    for i in 0..20 {
        main.push_str(&format!("  t += f{i}(10);\n"));
    }
    main.push_str("  printf(\"total %ld\\n\", t); return 0; }\n");
    write_file(&dir.join("main.c"), &main);
    objs.push("main.o".into());
    // The compile wrapper records where it runs: `read` is a shell builtin,
    // so the hostname is that of the node running this very shell.
    write_file(
        &dir.join("cc.sh"),
        "#!/bin/sh\nread h < /proc/sys/kernel/hostname\necho \"$h\" >> nodes.log\nexec gcc \"$@\"\n",
    );
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(dir.join("cc.sh"))
        .status()
        .unwrap();
    write_file(
        &dir.join("Makefile"),
        &format!(
            "OBJS = {}\nprog: $(OBJS)\n\tgcc -o $@ $(OBJS)\n%.o: %.c\n\t./cc.sh -O1 -c $< -o $@\n",
            objs.join(" ")
        ),
    );
    let d = dir.to_str().unwrap();
    // gcc's temporary files must be where every node sees them (each node's
    // /tmp is its own, as on real hosts).
    let o = c.sh(
        1,
        &format!("cd {d} && TMPDIR={d}/tmp make -j8 -s && ./prog"),
    );
    assert_ok(&o);
    // 0+1+..+10 = 55; sum over i of 55*i for i < 20 = 55 * 190.
    assert_eq!(text(&o.stdout).trim(), format!("total {}", 55 * 190));
    let log = std::fs::read_to_string(dir.join("nodes.log")).unwrap();
    let mut nodes: Vec<&str> = log.lines().collect();
    assert_eq!(nodes.len(), 21, "{log}");
    nodes.sort();
    nodes.dedup();
    assert!(nodes.len() >= 3, "compiled on {nodes:?} only");
}

#[test]
fn user_policy_switched_mid_batch_governs_every_node() {
    let c = Cluster::up(3, 1.0);
    c.sched_set(1, "round-robin");
    // A batch keeps running across the switch.
    let batch = c
        .cmd(
            1,
            &[
                "sh",
                "-c",
                "for i in 1 2 3 4 5 6; do sleep 4 & done; wait; echo batch-done",
            ],
        )
        .spawn_stdout();
    assert!(wait_for(Duration::from_secs(10), || nodes_running(
        &c, "sleep 4"
    )
    .len()
        == 6));
    let policy = shared_dir("policy").join("all-on-3.rhai");
    write_file(&policy, "fn place(nodes, req) { 3 }\n");
    c.sched_set(2, policy.to_str().unwrap());
    for n in 1..=3 {
        let o = c.sh(n, "read h < /proc/sys/kernel/hostname; echo $h; sh -c 'read h < /proc/sys/kernel/hostname; echo $h'");
        let t = text(&o.stdout);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            vec![format!("krg-n{n}").as_str(), "krg-n3"],
            "from node {n}: {t}"
        );
    }
    let out = batch.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout).trim(), "batch-done");
}

#[test]
fn a_file_stdin_is_shared_like_on_one_machine() {
    let c = Cluster::up(2, 1.0);
    let f = shared_dir("stdin").join("lines");
    write_file(&f, "a\nb\nc\nd\ne\nf\n");
    // The remote child reads one line of the loop's stdin; the loop goes on
    // after it, as with a local child sharing the file offset.
    let script = format!(
        "while read l; do echo \"loop $l\"; KRG_NODE=2 sh -c 'read x; read h < /proc/sys/kernel/hostname; echo \"child $x $h\"'; done < {}",
        f.display()
    );
    let o = c.sh(1, &script);
    let t = text(&o.stdout);
    assert_eq!(
        t.lines().collect::<Vec<_>>(),
        vec![
            "loop a",
            "child b krg-n2",
            "loop c",
            "child d krg-n2",
            "loop e",
            "child f krg-n2"
        ],
        "{t}\n{}",
        text(&o.stderr)
    );
}

#[test]
fn every_way_of_creating_a_program_is_placed() {
    let c = Cluster::up(2, 1.0);
    let prog = cc(&repo_root().join("examples/spawn_ways.c"), "spawn_ways");
    let o = c.cmd(1, &[prog.to_str().unwrap(), "2"]).output().unwrap();
    let t = text(&o.stdout);
    for way in ["fork-exec", "vfork-exec", "posix_spawnp", "system", "popen"] {
        assert!(
            t.contains(&format!("{way} krg-n2")),
            "{way} did not run on node 2:\n{t}\n{}",
            text(&o.stderr)
        );
        let status = t
            .lines()
            .find(|l| l.starts_with(&format!("{way}: ")))
            .unwrap_or_else(|| panic!("no status for {way}: {t}"));
        assert!(status.ends_with("exit 7"), "{status}");
    }
    // fork and posix_spawn return the child's gpid (allocated on node 1).
    for way in ["fork-exec", "vfork-exec", "posix_spawnp"] {
        let l = t
            .lines()
            .find(|l| l.starts_with(&format!("{way}: ")))
            .unwrap();
        let pid: i64 = l.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert_eq!(node_of(pid), 1, "{l}");
    }
}

#[test]
fn losing_the_node_of_a_remote_child_does_not_hang_its_parent() {
    let c = Cluster::up(3, 1.0);
    let mut p = c
        .sh_cmd(1, "KRG_NODE=3 sleep 60; echo \"status $?\"")
        .spawn_outputs();
    assert!(wait_for(Duration::from_secs(5), || {
        c.ps(1)
            .iter()
            .any(|r| r["command"] == "sleep 60" && r["node"] == 3)
    }));
    // Pull node 3's plug: its pid 1 (the agent) dies, and every process in
    // its pid namespace with it.
    signal(c.agent_pid(3), nix::sys::signal::Signal::SIGKILL);
    let t = Instant::now();
    let out = {
        let mut o = String::new();
        std::io::Read::read_to_string(p.stdout.as_mut().unwrap(), &mut o).unwrap();
        o
    };
    let mut err = String::new();
    std::io::Read::read_to_string(p.stderr.as_mut().unwrap(), &mut err).unwrap();
    let _ = p.wait();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(out.trim(), "status 137", "{out} {err}");
    assert!(err.contains("node 3"), "{err}");
}

#[test]
fn a_remote_program_sees_its_shadows_parent_and_group() {
    let c = Cluster::up(2, 1.0);
    let py = "import os; print(os.getpid(), os.getppid(), os.getpgrp())";
    // setsid: the shell leads its own group (and session).
    let script = format!("echo $$; KRG_NODE=2 python3 -c '{py}'");
    let o = c.cmd(1, &["setsid", "sh", "-c", &script]).output().unwrap();
    let t = text(&o.stdout);
    let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), 2, "{t}\n{}", text(&o.stderr));
    let shell = lines[0][0];
    let (pid, ppid, pgrp) = (lines[1][0], lines[1][1], lines[1][2]);
    assert_eq!(node_of(pid.parse().unwrap()), 1, "{t}");
    assert_eq!(ppid, shell, "{t}");
    // The shell's group, whose leader is the shell.
    assert_eq!(pgrp, shell, "{t}");
}

#[test]
fn killing_a_process_group_reaches_its_remote_members() {
    let c = Cluster::up(2, 1.0);
    let (mut job, leader) = c.started_gpid(
        1,
        &[
            "setsid",
            "sh",
            "-c",
            "echo $$; KRG_NODE=2 sleep 62 & sleep 62 & wait",
        ],
    );
    let members = |c: &Cluster| {
        c.ps(2)
            .iter()
            .filter(|p| p["pgid"].as_i64() == Some(leader))
            .map(|p| p["node"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    assert!(
        wait_for(Duration::from_secs(5), || {
            let mut m = members(&c);
            m.sort();
            m == vec![1, 1, 2]
        }),
        "{:?}",
        c.ps(2)
    );
    c.kill_ok(2, &["-TERM", "--", &format!("-{leader}")]);
    assert_eq!(job.wait().unwrap().code(), Some(143));
    assert!(
        wait_for(Duration::from_secs(5), || members(&c).is_empty()),
        "{:?}",
        c.ps(2)
    );
}

#[test]
fn credentials_umask_rlimits_cwd_and_env_travel() {
    let c = Cluster::up(2, 1.0);
    let dir = shared_dir("travel");
    let d = dir.to_str().unwrap();
    let script = format!(
        "cd {d} && umask 027 && ulimit -n 512 && export KRG_TEST_VAR=here && \
         KRG_NODE=2 sh -c 'read h < /proc/sys/kernel/hostname; echo $h $(id -u) $(id -g) $(umask) $(ulimit -n) $PWD $KRG_TEST_VAR'"
    );
    let o = c.as_nobody(1, &["sh", "-c", &script]);
    let t = text(&o.stdout);
    assert_eq!(
        t.split_whitespace().collect::<Vec<_>>(),
        vec!["krg-n2", "65534", "65534", "0027", "512", d, "here"],
        "{t}\n{}",
        text(&o.stderr)
    );
}
