//! libkrg.so in real programs (bash, python3, the C examples), against the
//! real agent (`krg-node`, one per test on its own socket), without an agent
//! (standalone), refused by the agent, and with `KRG_DISABLE=1`.
//!
//! What the programs asked the agent is read from the agent's own log: with
//! `KRG_LOG=debug` it writes one line per local request,
//! `pid P uid U: <Request debug>`.

use libkrg::gpid;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The node id the test agents run as.
const NODE: u32 = 1;

fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_krg-node"))
}

/// target/debug (where cargo puts the binaries and libkrg.so).
fn bin_dir() -> PathBuf {
    agent_bin().parent().unwrap().to_path_buf()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The newest modification time of the files under `dir`.
fn newest(dir: &Path) -> std::time::SystemTime {
    let mut t = std::time::SystemTime::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        let mt = if m.is_dir() {
            newest(&e.path())
        } else {
            m.modified().unwrap()
        };
        t = t.max(mt);
    }
    t
}

/// libkrg.so, which `cargo test` does not rebuild by itself (a cdylib is
/// not linked into tests): refuse to test a stale one.
fn preload() -> PathBuf {
    let so = bin_dir().join("libkrg.so");
    let hint = "run `cargo build --workspace` first (scripts/test does)";
    let built = std::fs::metadata(&so)
        .unwrap_or_else(|_| panic!("{} is missing: {hint}", so.display()))
        .modified()
        .unwrap();
    for src in ["krg-preload/src", "libkrg/src"] {
        assert!(
            newest(&repo().join(src)) <= built,
            "{} is older than {src}: {hint}",
            so.display()
        );
    }
    so
}

/// A fresh directory for one test, under the target dir (unique per test
/// and per test process, so parallel tests and runs never share a socket).
fn tmpdir(name: &str) -> PathBuf {
    let d = bin_dir()
        .join("krg-test")
        .join(format!("preload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One real agent, killed and reaped when dropped (also when a test fails,
/// in which case its log is printed and its directory kept).
struct Agent {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(name: &str) -> Agent {
        let dir = tmpdir(name);
        let sock = dir.join("krg.sock");
        let log = dir.join("agent.log");
        let key = dir.join("key");
        std::fs::write(&key, "preload-test-key-0123456789\n").unwrap();
        let child = Command::new(agent_bin())
            .args(["--node-id", &NODE.to_string(), "--listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--key-file")
            .arg(&key)
            .arg("--sock")
            .arg(&sock)
            .env("KRG_LOG", "debug")
            .env_remove("LD_PRELOAD")
            .env_remove("KRG_DISABLE")
            .env_remove("KRG_STANDALONE")
            .env_remove("KRG_CAPS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start krg-node");
        // From here on the guard tears the agent down, whatever happens.
        let mut a = Agent {
            child,
            dir,
            sock,
            log,
        };
        a.wait_ready();
        a
    }

    /// Wait until the local socket accepts connections.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("krg-node exited ({st}) before serving:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "krg-node did not open {} in time:\n{}",
                self.sock.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every local request the agent received: (caller's kernel pid, the
    /// request's debug form).
    fn requests(&self) -> Vec<(i32, String)> {
        self.log()
            .lines()
            .filter_map(|l| {
                let rest = &l[l.find(" DEBUG pid ")? + 11..];
                let (pid, rest) = rest.split_once(" uid ")?;
                let (_uid, req) = rest.split_once(": ")?;
                Some((pid.parse().ok()?, req.to_string()))
            })
            .collect()
    }

    /// How many requests of one kind (`Hello`, `Ensure`, `Kill`...) arrived.
    fn count(&self, kind: &str) -> usize {
        self.requests()
            .iter()
            .filter(|(_, r)| r.split([' ', '{', '(']).next() == Some(kind))
            .count()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- agent log ({})\n{}", self.dir.display(), self.log());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Compile one of the C examples.
fn example(name: &str, dir: &Path) -> PathBuf {
    compile(&repo().join("examples").join(format!("{name}.c")), dir)
}

/// The C example `name`, compiled and run with the library talking to
/// `agent`; its output.
fn run_example(agent: &Agent, name: &str) -> Output {
    let prog = example(name, &agent.dir);
    run(&mut under_krg(&agent.sock, &prog))
}

/// Compile a C source into `dir`, with krg.h on the include path.
fn compile(src: &Path, dir: &Path) -> PathBuf {
    let out = dir.join(src.file_stem().unwrap());
    let st = Command::new("cc")
        .arg("-O1")
        .arg("-I")
        .arg(repo().join("libkrg/include"))
        .arg("-o")
        .arg(&out)
        .arg(src)
        .arg("-lpthread")
        .status()
        .expect("run cc");
    assert!(st.success(), "cc {}", src.display());
    out
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    eprintln!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `prog` with the library, talking to the agent at `sock`.
fn under_krg(sock: &Path, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(prog);
    c.env("LD_PRELOAD", preload())
        .env("KRG_NODE_SOCK", sock)
        .env_remove("KRG_DISABLE")
        .env_remove("KRG_STANDALONE")
        .env_remove("KRG_CAPS")
        .env_remove("KRG_LOG");
    c
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The integer after `key` on the first line that starts with it.
fn val(s: &str, key: &str) -> i32 {
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no '{key}' in {s}"))
}

#[test]
fn c_example_pids_with_an_agent() {
    let agent = Agent::start("pids");
    let out = run_example(&agent, "pids");
    assert!(out.status.success());
    let s = stdout(&out);
    assert!(s.contains(&format!("(gpid, node {NODE})")), "{s}");
    assert!(s.contains("ok: 0 failure(s)"), "{s}");
    assert_eq!(stderr(&out), "");
    // Every child was registered by its parent, and the signals to children
    // and to the group went through the agent.
    assert!(agent.count("Ensure") >= 5, "{:?}", agent.requests());
    assert!(agent.count("Kill") >= 3, "{:?}", agent.requests());
}

#[test]
fn threads_that_fork_with_an_agent() {
    let agent = Agent::start("threads");
    let out = run_example(&agent, "threads_fork");
    assert!(out.status.success());
    assert!(stdout(&out).contains("0 bad"));
    assert_eq!(stderr(&out), "");
    // 4 threads x 25 forks, each child registered by its parent.
    assert!(agent.count("Ensure") >= 100, "{:?}", agent.requests());
}

#[test]
fn c_api() {
    let agent = Agent::start("capi");
    let prog = example("krginfo", &agent.dir);
    let out = run(under_krg(&agent.sock, &prog).env("KRG_CAPS", "migrate,checkpoint"));
    assert!(out.status.success());
    let s = stdout(&out);
    assert!(s.contains("mode: active"), "{s}");
    assert!(s.contains(&format!("node: {NODE}\n")), "{s}");
    // The agent applied KRG_CAPS (its default is every capability).
    assert!(s.contains("caps: 0x5: migrate checkpoint\n"), "{s}");
    let g = val(&s, "gpid: ");
    assert!(gpid::is_gpid(g));
    assert_eq!(gpid::node_of(g), Some(NODE));
    assert_eq!(agent.count("CapGet"), 1, "{:?}", agent.requests());
    // Without the library, the weak symbols are absent and it says so.
    let out = run(&mut Command::new(&prog));
    assert!(stdout(&out).contains("not loaded"));
}

#[test]
fn bash_pids_jobs_and_exec() {
    let agent = Agent::start("bash");
    let script = r#"
        echo "me $$"
        sleep 5 & p=$!
        echo "bg $p"
        kill $p; wait $p; echo "killed $?"
        bash -c 'echo "child ppid $PPID"'
        exec python3 -c 'import os; print("exec", os.getpid())'
    "#;
    for _ in 0..5 {
        let out = run(under_krg(&agent.sock, "bash").arg("-c").arg(script));
        assert!(out.status.success());
        assert_eq!(stderr(&out), "");
        let s = stdout(&out);
        let me = val(&s, "me ");
        assert!(gpid::is_gpid(me), "{s}");
        assert_eq!(gpid::node_of(me), Some(NODE));
        let bg = val(&s, "bg ");
        assert!(gpid::is_gpid(bg), "{s}");
        assert_eq!(gpid::node_of(bg), Some(NODE));
        assert_eq!(val(&s, "killed "), 143, "bash lost the killed job's status");
        assert_eq!(val(&s, "child ppid "), me);
        assert_eq!(val(&s, "exec "), me, "exec must keep the gpid");
    }
    // `kill $p` of the background job went through the agent.
    assert!(agent.count("Kill") >= 5, "{:?}", agent.requests());
}

#[test]
fn python_os_functions() {
    let agent = Agent::start("python");
    let script = r#"
import os, signal, subprocess, sys, time
node = int(sys.argv[1])
me = os.getpid()
assert me >= 1 << 22 and me >> 22 == node, (me, node)
pid = os.fork()
if pid == 0:
    os._exit(0 if os.getppid() == me else 1)
wp, st = os.waitpid(pid, 0)
assert wp == pid and os.waitstatus_to_exitcode(st) == 0, (wp, pid, st)
pid = os.fork()
if pid == 0:
    time.sleep(10); os._exit(0)
assert pid >> 22 == node, pid
os.kill(pid, signal.SIGKILL)
wp, st = os.waitpid(pid, 0)
assert wp == pid and os.waitstatus_to_exitcode(st) == -signal.SIGKILL, (wp, pid, st)
p = subprocess.Popen(["sh", "-c", "echo $$ $PPID"], stdout=subprocess.PIPE)
child, parent = map(int, p.communicate()[0].split())
assert child == p.pid and parent == me, (child, p.pid, parent, me)
assert p.wait() == 0
pid = os.posix_spawn("/bin/true", ["true"], os.environ)
assert pid >> 22 == node, pid
assert os.waitpid(pid, 0)[0] == pid
pid = os.fork()
if pid == 0:
    os._exit(3)
info = os.waitid(os.P_PID, pid, os.WEXITED)
assert info.si_pid == pid and info.si_status == 3, info
try:
    os.kill((node << 22) | 999999, 0)
    raise SystemExit("kill of an unknown gpid succeeded")
except ProcessLookupError:
    pass
print("python ok")
"#;
    let out = run(under_krg(&agent.sock, "python3")
        .arg("-c")
        .arg(script)
        .arg(NODE.to_string()));
    assert!(out.status.success());
    assert!(stdout(&out).contains("python ok"));
    assert_eq!(stderr(&out), "");
    // The unknown gpid was asked of the agent, not guessed locally.
    let unknown = format!("Kill {{ pid: {}, sig: 0 }}", (NODE << 22) | 999_999);
    assert!(
        agent.requests().iter().any(|(_, r)| *r == unknown),
        "{:?}",
        agent.requests()
    );
}

#[test]
fn standalone_warns_once_per_tree() {
    let dir = tmpdir("standalone");
    let sock = dir.join("nobody.sock");
    let out = run(under_krg(&sock, "bash").arg("-c").arg(
        "bash -c 'bash -c true; sh -c true'; python3 -c 'import os; os.waitpid(os.fork() or os._exit(0) or 0, 0)'; echo $$",
    ));
    assert!(out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("krg: no agent at {} (connect: ", sock.display())),
        "{err}"
    );
    assert!(err.contains("running as a plain local process"));
    let pid: i32 = stdout(&out).trim().parse().unwrap();
    assert!(!gpid::is_gpid(pid));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent refuses a Hello whose KRG_CAPS names an unknown capability:
/// the process says why, once, and runs as a plain local process, and so
/// does its tree, without asking the agent again.
#[test]
fn refused_hello_is_standalone_with_the_reason() {
    let agent = Agent::start("refused");
    let out = run(under_krg(&agent.sock, "bash")
        .env("KRG_CAPS", "teleport")
        .arg("-c")
        .arg(
            "echo \"me $$\"; bash -c 'echo \"child $$ $PPID\"'; sleep 0 & wait $!; echo \"bg $!\"",
        ));
    assert!(out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    let expected = format!(
        "krg: the agent at {} refused this process (KRG_CAPS: unknown capability 'teleport' \
         (known: migrate,distant-fork,checkpoint,dsm,streams,dfs,dsm-anon,all,none) \
         (Invalid argument)); running as a plain local process\n",
        agent.sock.display()
    );
    assert_eq!(err, expected);
    let s = stdout(&out);
    let me = val(&s, "me ");
    assert!(!gpid::is_gpid(me), "{s}");
    let child = s
        .lines()
        .find_map(|l| l.strip_prefix("child "))
        .unwrap_or_else(|| panic!("no child line in {s}"));
    let (c, pp) = child.split_once(' ').unwrap();
    assert!(!gpid::is_gpid(c.parse().unwrap()), "{s}");
    assert_eq!(pp.parse::<i32>().unwrap(), me, "{s}");
    assert!(!gpid::is_gpid(val(&s, "bg ")), "{s}");
    // One Hello (refused); the tree did not ask again, nor anything else.
    let reqs = agent.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].0, me);
    assert_eq!(
        reqs[0].1,
        format!(
            r#"Hello {{ version: {}, caps_env: Some("teleport"), pinned: None }}"#,
            libkrg::proto::PROTO_VERSION
        )
    );
}

#[test]
fn disabled_is_invisible() {
    let agent = Agent::start("disabled");
    let out = run(under_krg(&agent.sock, "bash")
        .env("KRG_DISABLE", "1")
        .env("KRG_LOG", "trace")
        .arg("-c")
        .arg("sleep 0 & wait; bash -c 'echo $$'"));
    assert!(out.status.success());
    assert_eq!(stderr(&out), "");
    assert!(!gpid::is_gpid(stdout(&out).trim().parse().unwrap()));
    assert_eq!(agent.requests(), vec![], "KRG_DISABLE contacted the agent");
    // The same program without KRG_DISABLE does talk to this agent, so the
    // check above can fail.
    let out = run(under_krg(&agent.sock, "bash")
        .arg("-c")
        .arg("sleep 0 & wait; bash -c 'echo $$'"));
    assert!(out.status.success());
    assert!(gpid::is_gpid(stdout(&out).trim().parse().unwrap()));
    assert!(agent.count("Hello") >= 1, "{:?}", agent.requests());
}

/// vfork is a trampoline: a real vfork when the library passes through
/// (the child shares memory), a fork in an SSI process; both must keep the
/// parent's stack intact and hand back the pid waitpid reports.
#[test]
fn vfork_in_every_mode() {
    let agent = Agent::start("vfork");
    let src = agent.dir.join("vf.c");
    std::fs::write(
        &src,
        r#"
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void)
{
    volatile int shared = 0;
    pid_t me = getpid();
    for (int i = 0; i < 20; i++) {
        pid_t c = vfork();
        if (c == 0) {
            shared = 1;
            char *argv[] = {"true", NULL};
            execv("/bin/true", argv);
            _exit(127);
        }
        int st;
        if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st)) return 1;
    }
    pid_t c = vfork();
    if (c == 0) _exit(getppid() == me ? 0 : 1);
    int st;
    if (waitpid(c, &st, 0) != c || WEXITSTATUS(st)) return 2;
    printf("%s %d\n", shared ? "shared" : "copied", (int)me);
    return 0;
}
"#,
    )
    .unwrap();
    let prog = compile(&src, &agent.dir);
    let mode = |out: &Output| -> (String, i32) {
        assert!(out.status.success(), "{out:?}");
        let s = stdout(out);
        let (m, pid) = s.trim().split_once(' ').unwrap();
        (m.to_string(), pid.parse().unwrap())
    };
    // Active: a fork, and every child registered by the parent.
    let (m, me) = mode(&run(&mut under_krg(&agent.sock, &prog)));
    assert_eq!(m, "copied");
    assert_eq!(gpid::node_of(me), Some(NODE));
    assert!(agent.count("Ensure") >= 21, "{:?}", agent.requests());
    // Disabled and standalone: the real vfork.
    let before = agent.requests().len();
    let (m, me) = mode(&run(under_krg(&agent.sock, &prog).env("KRG_DISABLE", "1")));
    assert_eq!(m, "shared");
    assert!(!gpid::is_gpid(me));
    assert_eq!(agent.requests().len(), before);
    let out = run(&mut under_krg(&agent.dir.join("nobody.sock"), &prog));
    assert_eq!(stderr(&out).lines().count(), 1);
    let (m, me) = mode(&out);
    assert_eq!(m, "shared");
    assert!(!gpid::is_gpid(me));
}

/// `/proc/<gpid>` paths reach the kernel's `/proc/<kernel pid>` for processes
/// of this node: a script reading its own status through a child (`cat`
/// resolves its parent's gpid through the agent), and a background child's
/// directory exists while it lives. A gpid that does not run here (node 2)
/// stays a path that does not exist.
#[test]
fn proc_paths_of_gpids_in_shell_scripts() {
    let agent = Agent::start("procsh");
    let out = run(under_krg(&agent.sock, "sh")
        .arg("-c")
        .arg("cat /proc/$$/status | grep -c ^Pid:"));
    assert!(out.status.success());
    assert_eq!(stderr(&out), "");
    assert_eq!(stdout(&out), "1\n");
    assert!(agent.count("Resolve") >= 1, "{:?}", agent.requests());

    let other = (2 << 22) | 1;
    let script = format!(
        r#"
        echo "me $$"
        grep ^Name: /proc/$$/status
        test -d /proc/$$/fd && echo "fd dir"
        sleep 5 & p=$!
        echo "bg $p"
        test -e /proc/$p && echo "child seen"
        grep -q ^State: /proc/$p/status && echo "child status"
        kill $p; wait $p
        test -e /proc/$p || echo "child gone"
        test -e /proc/{other} || echo "other node absent"
        cat /proc/{other}/status 2>&1 | grep -q 'No such file' && echo "enoent"
        test -r /proc/self/status && echo "self"
        "#
    );
    let out = run(under_krg(&agent.sock, "bash").arg("-c").arg(&script));
    assert!(out.status.success());
    assert_eq!(stderr(&out), "");
    let s = stdout(&out);
    assert!(gpid::is_gpid(val(&s, "me ")), "{s}");
    assert!(gpid::is_gpid(val(&s, "bg ")), "{s}");
    for line in [
        "Name:\tbash",
        "fd dir",
        "child seen",
        "child status",
        "child gone",
        "other node absent",
        "enoent",
        "self",
    ] {
        assert!(s.lines().any(|l| l == line), "no '{line}' in {s}");
    }
}

/// A program opening `/proc/<its own gpid>` gets its own kernel directory,
/// without asking the agent.
#[test]
fn proc_paths_of_the_own_gpid_in_python() {
    let agent = Agent::start("procpy");
    let script = r#"
import os
me = os.getpid()
assert me >= 1 << 22, me
with open(f"/proc/{me}/cmdline", "rb") as f:
    argv = f.read().split(b"\0")
assert b"-c" in argv, argv
with open(f"/proc/{me}/status") as f:
    kpid = int(next(l for l in f if l.startswith("Pid:")).split()[1])
assert kpid < 1 << 22, kpid
assert os.path.exists(f"/proc/{me}/fd")
assert os.stat(f"/proc/{me}").st_ino == os.stat(f"/proc/{kpid}").st_ino
assert os.readlink(f"/proc/{me}/exe") == os.readlink("/proc/self/exe")
assert sorted(os.listdir(f"/proc/{me}/fd")) == sorted(os.listdir("/proc/self/fd"))
print("python proc ok")
"#;
    let before = agent.count("Resolve");
    let out = run(under_krg(&agent.sock, "python3").arg("-c").arg(script));
    assert!(out.status.success());
    assert_eq!(stderr(&out), "");
    assert!(stdout(&out).contains("python proc ok"));
    assert_eq!(
        agent.count("Resolve"),
        before,
        "the own gpid needs no agent call: {:?}",
        agent.requests()
    );
}

/// procps `ps` looks itself up with `/proc/<getpid()>` (without the
/// translation it stops with "fatal library error, lookup self"). Under krg
/// it runs; its listing comes from reading the `/proc` directory, which is
/// not translated, so it shows kernel pids and selects by kernel pid: `ps -p
/// <kernel pid>` finds the shell, `ps -p $$` (a gpid) finds nothing.
#[test]
fn procps_ps_under_the_library() {
    let have_ps = Command::new("sh")
        .arg("-c")
        .arg("command -v ps")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_ps {
        eprintln!("note: procps `ps` is not installed; skipping");
        return;
    }
    let agent = Agent::start("procps");
    let script = r#"
        echo "me $$"
        k=$(awk '/^Pid:/ { print $2 }' /proc/$$/status)
        echo "kernel $k"
        ps -p $k -o pid=,comm=
        echo "ps rc $?"
        ps -p $$ -o pid=,comm=
        echo "ps gpid rc $?"
    "#;
    let out = run(under_krg(&agent.sock, "sh").arg("-c").arg(script));
    assert!(out.status.success());
    assert_eq!(stderr(&out), "", "ps failed to look itself up");
    let s = stdout(&out);
    let me = val(&s, "me ");
    assert!(gpid::is_gpid(me), "{s}");
    let k = val(&s, "kernel ");
    assert!(k > 0 && !gpid::is_gpid(k), "{s}");
    assert!(
        s.lines().any(|l| l.trim() == format!("{k} sh")),
        "no row for sh in {s}"
    );
    assert_eq!(val(&s, "ps rc "), 0, "{s}");
    // The listing is in kernel pids (readdir of /proc is not translated).
    assert_eq!(val(&s, "ps gpid rc "), 1, "{s}");
}

/// The calls that take or return a pid beside fork, kill and wait
/// (`libkrg::pidcalls`): examples/pidcalls.c checks each with getpid() or
/// a child's pid as fork gave it, and that a gpid of a node that does not
/// exist is ESRCH everywhere. Before the hooks, every one of them failed
/// (the kernel does not know a gpid: ESRCH, EPERM for credentials) or
/// showed a kernel pid.
#[test]
fn pid_calls_with_an_agent() {
    let agent = Agent::start("pidcalls");
    let prog = example("pidcalls", &agent.dir);
    let out = run(&mut under_krg(&agent.sock, &prog));
    let s = stdout(&out);
    assert!(out.status.success(), "{s}");
    assert!(s.contains("ok: 0 failure(s)"), "{s}");
    assert_eq!(stderr(&out), "");
    let me = val(&s, "pid ");
    assert!(gpid::is_gpid(me), "{s}");
    // The child's gpid was asked of the agent (it may not run here), the
    // own gpid never.
    let asked: Vec<String> = agent
        .requests()
        .into_iter()
        .filter(|(_, r)| r.starts_with("ResolveRunning"))
        .map(|(_, r)| r)
        .collect();
    assert!(asked.len() >= 10, "{asked:?}");
    assert!(
        !asked.iter().any(|r| r.contains(&format!("gpid: {me} "))),
        "the own gpid needs no agent call: {asked:?}"
    );
    // Without the library: the same checks on kernel pids.
    let out = run(&mut Command::new(&prog));
    assert!(stdout(&out).contains("ok: 0 failure(s)"));
}

/// nginx, unless it is not installed (scripts/test installs it).
fn nginx() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx is not installed: scripts/test installs it (apt-get install nginx)")
}

/// A child killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP GET of `/` on the loopback port: the response's body.
fn http_get(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    Ok(r.split_once("\r\n\r\n")
        .map_or(r.clone(), |(_, b)| b.to_string()))
}

/// nginx with `master_process on` (its default): the master gives each
/// worker's channel itself as owner, `fcntl(F_SETOWN, getpid())`. With the
/// gpid the kernel said ESRCH and no worker started ("fcntl(F_SETOWN)
/// failed while spawning "worker process" (3: No such process)").
#[test]
fn nginx_master_process_starts_its_workers() {
    let nginx = nginx();
    let agent = Agent::start("nginx");
    let d = agent.dir.join("nginx");
    std::fs::create_dir_all(&d).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = |f: &str| d.join(f).display().to_string();
    let conf = format!(
        r#"
daemon off;
master_process on;
worker_processes 2;
# Workers as the test's user: they reach the agent's socket in the test's
# directory whatever its permissions (ignored, with a warning, unless root).
user root;
pid {pid};
error_log {log} info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "worker $pid\n"; }}
    }}
}}
"#,
        pid = p("nginx.pid"),
        log = p("error.log"),
        t = d.display(),
    );
    std::fs::write(d.join("nginx.conf"), conf).unwrap();
    let args = ["-p", &p(""), "-c", &p("nginx.conf"), "-e", &p("error.log")];
    let mut master = Reaped(
        under_krg(&agent.sock, &nginx)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx"),
    );
    let log = || std::fs::read_to_string(d.join("error.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Ok(b) = http_get(port) {
            break b;
        }
        assert!(
            Instant::now() < deadline && master.0.try_wait().unwrap().is_none(),
            "nginx does not answer on port {port}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let worker = val(&body, "worker ");
    assert!(gpid::is_gpid(worker), "{body}");
    assert_eq!(gpid::node_of(worker), Some(NODE));
    let l = log();
    assert!(!l.contains("failed"), "{l}");
    assert_eq!(l.matches("start worker process ").count(), 2, "{l}");
    // `nginx -s quit` signals the master by the gpid in its pid file.
    let master_pid: i32 = std::fs::read_to_string(d.join("nginx.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(gpid::is_gpid(master_pid));
    let out = run(under_krg(&agent.sock, &nginx)
        .args(args)
        .args(["-s", "quit"]));
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = master.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "nginx did not quit:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(st.success(), "{st}:\n{}", log());
    assert_eq!(log().matches("exited with code 0").count(), 2, "{}", log());
}

/// A program whose malloc is jemalloc and whose library allocates in its
/// constructor, before libkrg.so's constructor ran: jemalloc's
/// initialisation calls readlink (a hook) with its init lock held. Before,
/// the hook initialised libkrg there, which allocated through jemalloc and
/// deadlocked (with every signal blocked: SIGTERM did nothing). Hooks
/// reached before the constructor now pass straight through.
#[test]
fn a_jemalloc_program_whose_library_allocates_first_starts() {
    let agent = Agent::start("jemalloc");
    let src = repo().join("examples/unix");
    let lib = agent.dir.join("libctorlib.so");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(src.join("ctorlib.c"))
        .status()
        .expect("run cc");
    assert!(st.success(), "cc ctorlib.c");
    let prog = agent.dir.join("jemalloc_ctor");
    let st = Command::new("cc")
        .arg("-o")
        .arg(&prog)
        .arg(src.join("jemalloc_ctor.c"))
        .arg(format!("-L{}", agent.dir.display()))
        .args(["-lctorlib", "-ljemalloc"])
        .arg(format!("-Wl,-rpath,{}", agent.dir.display()))
        .status()
        .expect("run cc");
    assert!(
        st.success(),
        "cc jemalloc_ctor.c (needs libjemalloc-dev, which scripts/test installs)"
    );
    // SIGKILL: a program stuck with its signals blocked ignores SIGTERM.
    for sock in [agent.sock.clone(), agent.dir.join("no-agent.sock")] {
        let mut c = under_krg(&sock, "timeout");
        c.args(["-s", "KILL", "20"]).arg(&prog);
        let out = run(&mut c);
        assert_eq!(stdout(&out), "ready 1\n", "agent at {}", sock.display());
    }
    assert!(agent.count("Hello") >= 1, "{:?}", agent.requests());
}

/// libkrg's capture handler (signal 62) may interrupt malloc in the same
/// thread; in a single-threaded program glibc takes no lock, so a malloc
/// or free from the handler corrupts the heap. A refused checkpoint used
/// to keep its reason with malloc once the capture arena was gone
/// (`malloc(N) in the capture handler`, seen by examples/ckpt/
/// handlermalloc.c preloaded before libkrg.so). Here a program that lives
/// in malloc (examples/ckpt/mallocbusy.c) is refused ten times (fd 3 is
/// a pipe to another process): no allocation in the handler, the program
/// runs on with its heap intact.
#[test]
fn a_refused_checkpoint_calls_no_malloc_in_the_programs_handler() {
    let agent = Agent::start("handlermalloc");
    let spy = agent.dir.join("libhandlermalloc.so");
    let st = Command::new("cc")
        .args(["-O1", "-shared", "-fPIC", "-o"])
        .arg(&spy)
        .arg(repo().join("examples/ckpt/handlermalloc.c"))
        .arg("-ldl")
        .status()
        .expect("run cc");
    assert!(st.success(), "cc handlermalloc.c");
    let prog = example("ckpt/mallocbusy", &agent.dir);
    let mut c = under_krg(&agent.sock, "bash");
    c.env(
        "LD_PRELOAD",
        format!("{} {}", spy.display(), preload().display()),
    )
    .args([
        "-c",
        &format!(
            "exec 3> >(cat > /dev/null); exec {} 20000 < /dev/zero > /dev/null",
            prog.display()
        ),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut err, &mut first).unwrap();
    let pid = val(&first, "mallocbusy: pid");
    let krg = bin_dir().join("krg");
    for _ in 0..10 {
        let out = Command::new(&krg)
            .env("KRG_NODE_SOCK", &agent.sock)
            .args(["checkpoint", "-o"])
            .arg(agent.dir.join("ckpt"))
            .arg(pid.to_string())
            .output()
            .expect("run krg checkpoint");
        assert!(
            !out.status.success() && stderr(&out).contains("fd 3"),
            "the checkpoint is refused for fd 3: {}",
            stderr(&out)
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    assert!(alive, "mallocbusy ended during the checkpoints:\n{rest}");
    assert!(
        !rest.contains("in the capture handler"),
        "libc allocations in the capture handler:\n{rest}"
    );
}
