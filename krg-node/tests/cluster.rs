//! Integration tests of the foundation on a real local cluster: separate
//! hosts, membership, authentication, cluster-wide pids, ps/kill/status,
//! capabilities, the library's fallbacks. Each test brings its own cluster
//! up and down (the Drop of `Cluster` tears it down even on failure).

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GPID_SHIFT: u32 = 22;

fn node_of(gpid: i64) -> i64 {
    gpid >> GPID_SHIFT
}

#[test]
fn cluster_up_down_leaves_nothing() {
    let c = Cluster::up(3, 0.5);
    // A second `up` of the same instance is a clear error.
    let again = c
        .krg_cluster()
        .args(["up", "--nodes", "2"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_contains(&text(&again.stderr), "already up");
    // Every node sees every node up, with its CPU quota.
    for n in 1..=3 {
        let st = c.status(n);
        assert_eq!(st.len(), 3, "node {n} sees {st:?}");
        for s in &st {
            assert_eq!(s["state"], "up", "from node {n}: {s}");
            assert_eq!(s["cpus"].as_f64(), Some(0.5));
            for k in [
                "id",
                "address",
                "load",
                "mem_total_kb",
                "mem_free_kb",
                "processes",
            ] {
                assert!(!s[k].is_null(), "status lacks {k}: {s}");
            }
        }
    }
    let cgroup = |h: &str| format!("/sys/fs/cgroup/{h}/{}", c.cgroup_parent());
    let quota = std::fs::read_to_string(format!("{}/n2/cpu.cfs_quota_us", cgroup("cpu"))).unwrap();
    assert_eq!(quota.trim(), "50000");
    let list = c.krg_cluster().arg("list").output().unwrap();
    assert!(list.status.success());
    let l = text(&list.stdout);
    assert!(
        l.contains(&c.addr(3)) && l.contains(&c.name) && l.contains(&c.subnet()),
        "{l}"
    );
    // An instance that is not up points at those that are.
    let none = c
        .krg_cluster()
        .args(["list", "--name", "zz9none"])
        .output()
        .unwrap();
    let n = text(&none.stdout);
    assert!(
        none.status.success() && n.contains("is up; other instances are") && n.contains(&c.name),
        "{n}"
    );

    let down = c.krg_cluster().arg("down").output().unwrap();
    assert!(down.status.success(), "{}", text(&down.stderr));
    // Everything of this instance must be gone (other tests' instances, and
    // whoever uses the default one, may be up meanwhile).
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ours = format!("krg-{}-", c.name);
    assert!(
        !text(&netns.stdout).contains(&ours),
        "left: {}",
        text(&netns.stdout)
    );
    assert!(!std::path::Path::new(&cgroup("cpu")).exists());
    assert!(!std::path::Path::new(&cgroup("cpuacct")).exists());
    // Its agents are told its key file.
    let ps = Command::new("pgrep")
        .args([
            "-f",
            &format!("krg-node --node-id .* {}/", c.run_dir().display()),
        ])
        .output()
        .unwrap();
    assert_eq!(text(&ps.stdout), "", "agents left");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&ours), "mounts left");
    assert!(!c.run_dir().join("state.json").exists());
    assert!(!c.run_dir().join("cluster.key").exists());
    assert!(
        c.run_dir().join("n1.log").exists(),
        "the logs stay for post-mortems"
    );
    // Down with nothing up is not an error.
    let down = c.krg_cluster().arg("down").output().unwrap();
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert_contains(&text(&down.stdout), "no local cluster");
}

#[test]
fn nodes_are_separate_hosts() {
    let c = Cluster::up(2, 1.0);
    // Each node has its own pid namespace: kernel pid 1 is each node's agent,
    // and pids collide across nodes.
    for n in 1..=2 {
        let o = c.plain(n, &["cat", "/proc/1/comm"]).output().unwrap();
        assert_eq!(text(&o.stdout).trim(), "krg-node");
    }
    // A process on node 1 is invisible on node 2.
    let mut s1 = c.plain(1, &["sleep", "31.4159"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let seen = c.pgrep(1, "sleep 31.4159");
    assert!(!seen.is_empty(), "node 1 does not see its own process");
    assert_eq!(
        c.pgrep(2, "sleep 31.4159"),
        "",
        "node 2 sees node 1's process"
    );
    let _ = s1.kill();
    let _ = s1.wait();
    // Private /tmp.
    let o = c
        .plain(
            1,
            &[
                "sh",
                "-c",
                "echo one > /tmp/krg-node-file && cat /tmp/krg-node-file",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(text(&o.stdout).trim(), "one");
    let o = c
        .plain(
            2,
            &[
                "sh",
                "-c",
                "cat /tmp/krg-node-file 2>/dev/null || echo absent",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(text(&o.stdout).trim(), "absent");
    assert!(!std::path::Path::new("/tmp/krg-node-file").exists());
    // Own network: node addresses, and the host has no route into the subnet.
    let o = c
        .plain(2, &["ip", "-4", "-o", "addr", "show", "eth0"])
        .output()
        .unwrap();
    assert_contains(&text(&o.stdout), &format!("{}/24", c.addr(2)));
    // No route into any instance's subnet.
    let r = Command::new("ip")
        .args(["route", "show", "root", "10.77.0.0/16"])
        .output()
        .unwrap();
    assert_eq!(text(&r.stdout), "", "host route into the cluster");
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(
        !text(&links.stdout).contains("br0"),
        "bridge in the host namespace"
    );
}

/// Every node's name resolves on every node, its own included (Java's
/// `InetAddress.getLocalHost()` threw `UnknownHostException: krg-n2`), to
/// the node's address; the names are the instance's, and a node cannot
/// change what the others resolve.
#[test]
fn node_names_resolve_on_every_node() {
    let c = Cluster::up(3, 1.0);
    for n in 1..=3 {
        let own = c
            .plain(n, &["sh", "-c", "getent hosts \"$(hostname)\""])
            .output()
            .unwrap();
        assert_eq!(
            text(&own.stdout).split_whitespace().collect::<Vec<_>>(),
            [c.addr(n), format!("krg-n{n}")],
            "node {n}: {}",
            text(&own.stderr)
        );
        for k in 1..=3 {
            let o = c
                .plain(n, &["getent", "hosts", &format!("krg-n{k}")])
                .output()
                .unwrap();
            assert_eq!(
                text(&o.stdout).split_whitespace().next(),
                Some(c.addr(k).as_str()),
                "krg-n{k} seen from node {n}"
            );
        }
    }
    let w = c
        .plain(1, &["sh", "-c", "echo 10.0.0.9 intruder >> /etc/hosts"])
        .output()
        .unwrap();
    assert!(!w.status.success(), "a node wrote the cluster's hosts file");
    let o = c
        .plain(2, &["getent", "hosts", "intruder"])
        .output()
        .unwrap();
    assert_eq!(text(&o.stdout), "");
}

#[test]
fn gpids_ps_and_kill_across_nodes() {
    let c = Cluster::up(3, 1.0);
    let (mut child, gpid) = c.started_gpid(2, &["sh", "-c", "echo $$; exec sleep 60"]);
    assert_eq!(node_of(gpid), 2, "gpid {gpid} should encode node 2");
    // Seen from every node, with the right columns.
    for n in 1..=3 {
        let ok = wait_for(Duration::from_secs(5), || {
            c.ps(n)
                .iter()
                .any(|p| p["pid"].as_i64() == Some(gpid) && p["command"] == "sleep 60")
        });
        assert!(ok, "node {n} does not list {gpid}: {:?}", c.ps(n));
    }
    let row = c
        .ps(1)
        .into_iter()
        .find(|p| p["pid"].as_i64() == Some(gpid))
        .unwrap();
    assert_eq!(row["node"], 2);
    assert_eq!(row["user"], "root");
    for k in ["ppid", "state", "cpu", "rss_kb"] {
        assert!(!row[k].is_null(), "ps lacks {k}: {row}");
    }
    let table = c.krg(3, &["ps"]);
    let t = text(&table.stdout);
    assert!(
        t.contains("PID") && t.contains("NODE") && t.contains("COMMAND"),
        "{t}"
    );
    assert!(t.contains(&gpid.to_string()));
    // The process count is probed once a second and shared in heartbeats.
    let counted = wait_for(Duration::from_secs(4), || {
        let st = c.status(1);
        st.iter()
            .any(|s| s["id"] == 2 && s["processes"].as_u64().unwrap_or(0) >= 1)
    });
    assert!(counted, "node 2's process not counted: {:?}", c.status(1));
    // Killed from node 3 with `krg kill`.
    c.kill_ok(3, &["-TERM", &gpid.to_string()]);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{status:?}");
    // Gone: ESRCH, from the command and from a program's kill(2).
    let ok = wait_for(Duration::from_secs(3), || {
        !c.ps(1).iter().any(|p| p["pid"].as_i64() == Some(gpid))
    });
    assert!(ok, "{gpid} still listed");
    let k = c.krg(1, &["kill", &gpid.to_string()]);
    assert!(!k.status.success());
    assert!(
        text(&k.stderr).to_lowercase().contains("no such process"),
        "{}",
        text(&k.stderr)
    );
    let o = c.sh(1, &format!("kill -0 {gpid} 2>&1; echo rc=$?"));
    assert_contains(&text(&o.stdout), "rc=1");
    // A program's kill(2) reaches a process on another node.
    let (mut victim, v) = c.started_gpid(3, &["sh", "-c", "echo $$; exec sleep 60"]);
    assert_eq!(node_of(v), 3);
    let o = c.sh(1, &format!("kill -KILL {v}; echo rc=$?"));
    assert!(
        text(&o.stdout).contains("rc=0"),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let status = victim.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 9), "{status:?}");
    // top shows the cluster.
    let top = c.krg(1, &["top", "-b", "-n", "1"]);
    assert_contains(&text(&top.stdout), "krg top");
}

#[test]
fn getpid_getppid_wait_and_exit_status() {
    let c = Cluster::up(1, 1.0);
    let script = r#"
        sh -c 'echo "child $$ parent $PPID"; exit 3' &
        c=$!
        wait $c
        echo "status $? bang $c me $$"
    "#;
    let o = c.sh(1, script);
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out} {}", text(&o.stderr));
    let child: Vec<&str> = lines[0].split_whitespace().collect();
    let parent: Vec<&str> = lines[1].split_whitespace().collect();
    let child_pid: i64 = child[1].parse().unwrap();
    assert!(node_of(child_pid) == 1, "{out}");
    assert_eq!(
        child[3], parent[5],
        "child's getppid is the parent's gpid: {out}"
    );
    assert_eq!(parent[1], "3", "exit status passes: {out}");
    assert_eq!(parent[3], child[1], "$! is the child's gpid: {out}");
    // python: os.fork / waitpid / getppid agree on gpids.
    let py = r#"
import os, sys
me = os.getpid()
pid = os.fork()
if pid == 0:
    print("child", os.getpid(), os.getppid(), flush=True)
    os._exit(5)
got, st = os.waitpid(pid, 0)
print("parent", me, pid, got, os.WEXITSTATUS(st), flush=True)
"#;
    let o = c.cmd(1, &["python3", "-c", py]).output().unwrap();
    let out = text(&o.stdout);
    let mut child = None;
    let mut parent = None;
    for l in out.lines() {
        let f: Vec<i64> = l
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        if l.starts_with("child") {
            child = Some(f);
        } else {
            parent = Some(f);
        }
    }
    let (ch, pa) = (child.expect(&out), parent.expect(&out));
    assert!(ch[0] >= 1 << GPID_SHIFT, "{out}");
    assert_eq!(ch[1], pa[0], "{out}");
    assert_eq!(pa[1], ch[0], "fork returned the child's gpid: {out}");
    assert_eq!(pa[2], ch[0], "waitpid returned the child's gpid: {out}");
    assert_eq!(pa[3], 5, "{out}");
    // /proc/self still works.
    let o = c.sh(1, "grep -c ^Pid: /proc/self/status");
    assert_eq!(text(&o.stdout).trim(), "1");
}

#[test]
fn kill_permissions_and_unknown_pids() {
    let c = Cluster::up(2, 1.0);
    let (mut root_proc, g) = c.started(2, &["sh", "-c", "echo $$; exec sleep 60"]);
    // Another user may not signal it, neither with krg kill nor with kill(2).
    let k = c.krg_as_nobody(1, &["kill", "-TERM", &g]);
    assert!(!k.status.success());
    assert_contains(&text(&k.stderr), "not permitted");
    let nob = c.as_nobody(
        1,
        &["sh", "-c", &format!("kill -TERM {g} 2>&1; echo rc=$?")],
    );
    let t = text(&nob.stdout);
    assert!(
        t.contains("rc=1") && t.to_lowercase().contains("not permitted"),
        "{t}"
    );
    // Still alive.
    let gn: i64 = g.parse().unwrap();
    assert!(
        c.ps(1).iter().any(|p| p["pid"].as_i64() == Some(gn)),
        "{g} died"
    );
    // Root may.
    c.kill_ok(1, &["-KILL", &g]);
    assert_eq!(root_proc.wait().unwrap().code(), Some(137));
    // Unknown gpids: ESRCH, including one on a node that does not exist.
    for bogus in [(1i64 << GPID_SHIFT) + 4_000_000, (77i64 << GPID_SHIFT) + 5] {
        let o = c.sh(1, &format!("kill -0 {bogus} 2>&1; echo rc=$?"));
        let t = text(&o.stdout);
        assert!(
            t.contains("rc=1") && t.to_lowercase().contains("no such process"),
            "{t}"
        );
    }
}

#[test]
fn capabilities_show_change_and_inherit() {
    let c = Cluster::up(2, 1.0);
    let mut p = c
        .cmd(
            1,
            &["sh", "-c", "echo $$; read x; sleep 60 & echo $!; wait"],
        )
        .env("KRG_CAPS", "-dfs,-dsm")
        .spawn_in_out();
    let g = read_line(&mut p);
    let show = c.krg(2, &["capset", &g]);
    let t = text(&show.stdout);
    assert!(show.status.success(), "{}", text(&show.stderr));
    assert!(
        t.contains("migrate") && !t.contains("dfs") && !t.contains("dsm"),
        "{t}"
    );
    // Change it from another node: its future children get the new set.
    let set = c.krg(2, &["capset", &g, "-migrate"]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    assert!(
        !text(&set.stdout).contains("migrate"),
        "{}",
        text(&set.stdout)
    );
    p.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let kid = read_line(&mut p);
    let show = c.krg(1, &["capset", &kid]);
    let t = text(&show.stdout);
    assert!(
        t.contains("distant-fork") && !t.contains("migrate"),
        "child {kid}: {t}"
    );
    // A bad name is refused with the list of names.
    let bad = c.krg(1, &["capset", &g, "+teleport"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("teleport"));
    let _ = c.krg(1, &["kill", "-KILL", &kid]);
    let _ = c.krg(1, &["kill", "-KILL", &g]);
    let _ = p.wait();
}

#[test]
fn disabled_and_agentless_library() {
    let c = Cluster::up(1, 1.0);
    // KRG_DISABLE=1: kernel pids, nothing printed.
    let o = c
        .cmd(
            1,
            &[
                "env",
                "KRG_DISABLE=1",
                "sh",
                "-c",
                "echo $$; sh -c 'echo $$'",
            ],
        )
        .output()
        .unwrap();
    for l in text(&o.stdout).lines() {
        assert!(l.parse::<i64>().unwrap() < 1 << GPID_SHIFT, "{l}");
    }
    assert!(o.stderr.is_empty(), "{}", text(&o.stderr));
    drop(c);
    // No agent: the program runs as a plain process after one warning line,
    // and its children do not repeat it.
    let o = Command::new("sh")
        .args(["-c", "echo $$; sh -c 'echo $$'; exit 4"])
        .env("LD_PRELOAD", preload())
        .env("KRG_NODE_SOCK", "/nonexistent/krg.sock")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    for l in text(&o.stdout).lines() {
        assert!(l.parse::<i64>().unwrap() < 1 << GPID_SHIFT, "{l}");
    }
}

#[test]
fn heartbeats_show_down_within_3s_and_up_again() {
    let c = Cluster::up(3, 1.0);
    let pid = c.agent_pid(2);
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let t = Instant::now();
    let down = wait_for(Duration::from_secs(5), || c.node_state(1, 2) == "down");
    let took = t.elapsed();
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    assert!(down, "node 2 never shown down");
    assert!(
        took < Duration::from_millis(3300),
        "shown down after {took:?}"
    );
    assert_eq!(c.node_state(3, 1), "up");
    let t = Instant::now();
    let up = wait_for(Duration::from_secs(5), || {
        c.node_state(1, 2) == "up" && c.node_state(3, 2) == "up"
    });
    assert!(up, "node 2 never came back");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "up again after {:?}",
        t.elapsed()
    );
}

#[test]
fn peer_without_the_key_is_refused_and_logged() {
    let c = Cluster::up(2, 1.0);
    let dir = shared_dir("badkey");
    let key = dir.join("bad.key");
    write_file(&key, "not-the-cluster-key-0123456789abcdef\n");
    let agent = bin_dir().join("krg-node");
    let (listen, seed) = (format!("{}:7409", c.addr(2)), format!("{}:7400", c.addr(1)));
    let mut intruder = c
        .plain(
            2,
            &[
                agent.to_str().unwrap(),
                "--node-id",
                "9",
                "--listen",
                &listen,
                "--seed",
                &seed,
                "--key-file",
                key.to_str().unwrap(),
                "--state-dir",
                "/run/krg/intruder",
                "--sock",
                "/run/krg/intruder.sock",
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logged = wait_for(Duration::from_secs(6), || {
        c.log(1).contains("node 9 does not hold the cluster key")
    });
    let _ = intruder.kill();
    let _ = intruder.wait();
    assert!(logged, "node 1 log: {}", c.log(1));
    assert_eq!(c.node_state(1, 9), "absent");
    assert_eq!(c.status(2).len(), 2);
}

#[test]
fn malformed_input_never_crashes_an_agent() {
    let c = Cluster::up(2, 1.0);
    let fuzz = r#"
import os, socket, struct, random, sys
random.seed(7)
for i in range(400):
    s = socket.socket(socket.AF_UNIX)
    s.connect('/run/krg/krg-node.sock')
    n = random.randint(0, 300)
    body = os.urandom(n)
    k = i % 4
    if k == 0: s.send(struct.pack('<I', n) + body)
    elif k == 1: s.send(struct.pack('<I', n + 40) + body)
    elif k == 2: s.send(struct.pack('<I', 0xffffffff))
    else: s.send(os.urandom(random.randint(1, 12)))
    s.close()
for i in range(200):
    t = socket.create_connection((sys.argv[1], 7400))
    if i % 2: t.send(b'KRG1' + os.urandom(random.randint(0, 100)))
    else: t.send(os.urandom(random.randint(1, 200)))
    t.close()
print("sent")
"#;
    let o = c
        .plain(1, &["python3", "-c", fuzz, &c.addr(2)])
        .output()
        .unwrap();
    assert_eq!(text(&o.stdout).trim(), "sent", "{}", text(&o.stderr));
    // A truncated but well-formed-looking request gets an error reply.
    let probe = r#"
import socket, struct
s = socket.socket(socket.AF_UNIX); s.connect('/run/krg/krg-node.sock')
s.send(struct.pack('<I', 1 << 30))
print(s.recv(4096))
"#;
    let o = c.plain(1, &["python3", "-c", probe]).output().unwrap();
    assert_contains(&text(&o.stdout), "malformed request");
    for n in 1..=2 {
        assert!(
            c.status(n).iter().all(|s| s["state"] == "up"),
            "node {n} after fuzz"
        );
    }
    for n in 1..=2 {
        let pid = c.agent_pid(n);
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "agent {n} died"
        );
    }
}

#[test]
fn exec_passes_stdio_status_and_signals() {
    let c = Cluster::up(2, 1.0);
    let mut cat = c.cmd(2, &["cat"]).spawn_in_out();
    let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut stdin = cat.stdin.take().unwrap();
    let d2 = data.clone();
    let w = std::thread::spawn(move || {
        stdin.write_all(&d2).unwrap();
    });
    let out = cat.wait_with_output().unwrap();
    w.join().unwrap();
    assert!(out.status.success());
    assert!(out.stdout == data, "stdin/stdout bytes differ");
    let o = c.sh(2, "echo to-stderr >&2; exit 7");
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(text(&o.stderr).trim(), "to-stderr");
    // Ctrl-C (SIGINT to krg) reaches the program.
    let mut sl = c.cmd(2, &["sleep", "30"]);
    // A harness started in the background by a non-interactive shell
    // inherits SIGINT ignored (POSIX), and so would krg: Ctrl-C's default
    // action is what this checks.
    use std::os::unix::process::CommandExt;
    // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        sl.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut sl = sl.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    signal(sl.id() as i32, nix::sys::signal::Signal::SIGINT);
    let st = sl.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    use std::os::unix::process::ExitStatusExt;
    assert!(st.code() == Some(130) || st.signal() == Some(2), "{st:?}");
}

#[test]
fn process_groups_are_signalled_by_gpid() {
    let c = Cluster::up(2, 1.0);
    // setsid makes the shell a group (and session) leader: the group's id is
    // the shell's gpid, and getpgrp/getsid say so.
    let (mut job, line) = c.started(
        2,
        &["setsid", "sh", "-c", "echo $$; sleep 60 & sleep 60 & wait"],
    );
    let leader: i64 = line.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(node_of(leader), 2);
    let members = |c: &Cluster| {
        c.ps(1)
            .into_iter()
            .filter(|p| p["pgid"].as_i64() == Some(leader))
            .count()
    };
    assert!(
        wait_for(Duration::from_secs(5), || members(&c) == 3),
        "{:?}",
        c.ps(1)
    );
    // From node 1: krg kill -- -PGID, then the whole group is gone.
    c.kill_ok(1, &["-TERM", "--", &format!("-{leader}")]);
    let st = job.wait().unwrap();
    assert_eq!(st.code(), Some(143), "{st:?}");
    assert!(
        wait_for(Duration::from_secs(5), || members(&c) == 0),
        "{:?}",
        c.ps(1)
    );
    // An unknown group: ESRCH.
    let k = c.krg(1, &["kill", "--", &format!("-{leader}")]);
    assert!(!k.status.success());
}

/// Two local clusters (instances) at once: own subnets, own nodes, no way
/// from one to the other; `down` of one leaves the other up and working.
#[test]
fn instances_side_by_side_cannot_reach_each_other() {
    // Brought up concurrently: the subnet allocation must not hand out one
    // subnet twice.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Cluster::up(2, 1.0));
        let b = s.spawn(|| Cluster::up(2, 1.0));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.net, b.net, "{} and {} share a subnet", a.name, b.name);
    for c in [&a, &b] {
        let st = c.status(1);
        let addrs: Vec<&str> = st.iter().map(|s| s["address"].as_str().unwrap()).collect();
        assert_eq!(
            addrs,
            [format!("{}:7400", c.addr(1)), format!("{}:7400", c.addr(2))],
            "instance {} sees only its own nodes",
            c.name
        );
    }
    let all = Command::new(krg_bin())
        .args(["cluster", "list", "--all"])
        .output()
        .unwrap();
    for c in [&a, &b] {
        assert!(
            text(&all.stdout)
                .lines()
                .any(|l| l.starts_with(&c.name) && l.contains(&c.subnet())),
            "{}",
            text(&all.stdout)
        );
    }

    // From a node of A, B's agents cannot be reached: no route to B's
    // subnet...
    let probe = r#"
import socket, sys
src, dst = sys.argv[1], sys.argv[2:]
for a in dst:
    s = socket.socket()
    s.settimeout(4)
    try:
        if src != "-": s.bind((src, 0))
        s.connect((a, 7400))
        print(a, "connected")
    except OSError as e:
        print(a, "failed", e)
"#;
    let out = a
        .plain(1, &["python3", "-c", probe, "-", &b.addr(1), &b.addr(2)])
        .output()
        .unwrap();
    let t = text(&out.stdout);
    assert_eq!(t.matches(" failed ").count(), 2, "{t}{}", text(&out.stderr));
    // ...and not even with an address in B's subnet: the instances have
    // separate bridges, no link between them.
    let add = Command::new("ip")
        .args(["netns", "exec", &a.netns(2), "ip", "addr", "add"])
        .arg(format!("{}/24", b.addr(250)))
        .args(["dev", "eth0"])
        .output()
        .unwrap();
    assert!(add.status.success(), "{}", text(&add.stderr));
    let out = a
        .plain(2, &["python3", "-c", probe, &b.addr(250), &b.addr(1)])
        .output()
        .unwrap();
    let t = text(&out.stdout);
    assert!(t.contains(" failed "), "{t}{}", text(&out.stderr));
    // Each instance has its own key.
    let key = |c: &Cluster| std::fs::read(c.run_dir().join("cluster.key")).unwrap();
    assert_ne!(key(&a), key(&b));

    // Down A: B is untouched.
    let b_agents: Vec<i32> = (1..=2).map(|n| b.agent_pid(n)).collect();
    let down = a.krg_cluster().arg("down").output().unwrap();
    assert!(down.status.success(), "{}", text(&down.stderr));
    let netns = text(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    );
    assert!(!netns.contains(&format!("krg-{}-", a.name)), "{netns}");
    for ns in [b.netns(1), b.netns(2), format!("krg-{}-br", b.name)] {
        assert!(
            netns
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns.as_str())),
            "{ns} gone: {netns}"
        );
    }
    assert!(!std::path::Path::new(&format!("/sys/fs/cgroup/cpu/{}", a.cgroup_parent())).exists());
    assert!(std::path::Path::new(&format!("/sys/fs/cgroup/cpu/{}/n2", b.cgroup_parent())).exists());
    for (n, pid) in (1..=2).zip(&b_agents) {
        assert_eq!(b.agent_pid(n), *pid);
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
    assert!(
        b.status(2).iter().all(|s| s["state"] == "up"),
        "{:?}",
        b.status(2)
    );
    let o = b.sh(1, "KRG_NODE=2 sh -c 'cat /proc/sys/kernel/hostname'");
    assert_eq!(text(&o.stdout).trim(), "krg-n2", "{}", text(&o.stderr));
    let list = b.krg_cluster().arg("list").output().unwrap();
    assert_eq!(
        text(&list.stdout).matches(" up ").count(),
        2,
        "{}",
        text(&list.stdout)
    );
}
