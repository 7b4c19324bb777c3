//! difftest: a differential tester. Shell scripts generated from a grammar
//! (pipelines, `while read` loops, groups sharing a stdin, here-documents,
//! redirections, background jobs, nested shells, C and Python programs
//! starting programs; see gen.rs) run natively and under krg, with every
//! placement policy and with migrations injected at random moments; their
//! stdout, exit status and (where deterministic) stderr must be the same
//! bytes. Ordinary programs lost bytes, hung or gave wrong answers under
//! krg while every unit and integration test passed: this finds the next
//! such bug.
//!
//! ```sh
//! cargo test -p krg-node --test difftest                 # a brief run
//! cargo test -p krg-node --test difftest -- --cases 3000 --seed 42
//! cargo test -p krg-node --test difftest -- --seed 42 --case 17   # one case
//! cargo test -p krg-node --test difftest -- --help
//! ```
//!
//! A test target with `harness = false`: this `main` is the whole test,
//! and exits non-zero on any failure.

#[path = "../common/mod.rs"]
mod common;
mod fixture;
mod gen;
mod run;

use common::*;
use run::{MigStats, Outcome};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const POLICIES: &[&str] = &[
    "local",
    "round-robin",
    "least-loaded",
    "two-choices",
    "pack",
];
const NODES: u32 = 4;
const BRIEF_CASES: u64 = 30;

const HELP: &str = "\
difftest: scripts run natively and under krg must print the same bytes

  --cases N        cases to run (env KRG_DIFFTEST_CASES; default 30)
  --seed S         the run's seed (env KRG_DIFFTEST_SEED; default random)
  --case K         run case K of the seed only
  --first K        start at case K (default 0)
  --script FILE    run the script in FILE as the only case
  --modes LIST     comma-separated: local,round-robin,least-loaded,
                   two-choices,pack,migrate (default all); migrate-POLICY
                   injects migrations under that policy (migrate: a random one)
  --migrate-runs N runs with migrations injected per case (default 1)
  --mig-max N      at most N migrations per run
  --mig-only STR   migrate only processes whose command starts with STR
  --repeat N       run each mode N times (how often does it fail?)
  --timeout SECS   most a run may take (default 60; the limit is 15 s
                   + 10x the native run): longer counts as a hang
  --time-limit S   start no case after S seconds (env KRG_DIFFTEST_TIME)
  --print          print the scripts, run nothing
  --native-only    run each case twice natively on this host, no cluster
                   (checks the generator's determinism)
  --quiet          one line per failing case only
  --no-regressions skip the scripts of regressions/ (they run after the
                   generated cases, unless --case or --script is given)";

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Policy(&'static str),
    /// Migrations injected, under this policy (`None`: a random one each run).
    Migrate(Option<&'static str>),
}

impl Mode {
    fn name(&self) -> String {
        match self {
            Mode::Policy(p) => p.to_string(),
            Mode::Migrate(None) => "migrate".into(),
            Mode::Migrate(Some(p)) => format!("migrate-{p}"),
        }
    }

    /// `modes` by name, comma-separated (as `--modes` takes them).
    fn names(modes: &[Mode]) -> String {
        modes.iter().map(Mode::name).collect::<Vec<_>>().join(",")
    }
}

#[derive(Debug, Clone)]
struct Opts {
    seed: u64,
    cases: u64,
    first: u64,
    script: Option<PathBuf>,
    modes: Vec<Mode>,
    migrate_runs: u32,
    aim: run::Aim,
    repeat: u32,
    timeout: Duration,
    time_limit: Option<Duration>,
    print: bool,
    native_only: bool,
    quiet: bool,
    /// Run the scripts of `regressions/` after the generated cases.
    regressions: bool,
}

fn policy(name: &str) -> Option<&'static str> {
    POLICIES.iter().copied().find(|p| *p == name)
}

/// Every policy, then migrations injected under a random one.
fn all_modes() -> Vec<Mode> {
    POLICIES
        .iter()
        .map(|p| Mode::Policy(p))
        .chain([Mode::Migrate(None)])
        .collect()
}

/// A mode by its name (`pack`, `migrate`, `migrate-pack`).
fn parse_mode(m: &str) -> Result<Mode, String> {
    match m {
        "migrate" => Ok(Mode::Migrate(None)),
        _ => if let Some(p) = m.strip_prefix("migrate-") {
            policy(p).map(|p| Mode::Migrate(Some(p)))
        } else {
            policy(m).map(Mode::Policy)
        }
        .ok_or(format!("unknown mode {m}")),
    }
}

fn parse_args() -> Result<Option<Opts>, String> {
    let env_num = |k: &str| -> Result<Option<u64>, String> {
        match std::env::var(k) {
            Ok(v) if !v.is_empty() => v
                .parse()
                .map(Some)
                .map_err(|_| format!("{k}={v}: not a number")),
            _ => Ok(None),
        }
    };
    let mut o = Opts {
        seed: env_num("KRG_DIFFTEST_SEED")?.unwrap_or_else(rand::random),
        cases: env_num("KRG_DIFFTEST_CASES")?.unwrap_or(BRIEF_CASES),
        first: 0,
        script: None,
        modes: all_modes(),
        migrate_runs: 1,
        aim: run::Aim::default(),
        repeat: 1,
        timeout: Duration::from_secs(60),
        time_limit: env_num("KRG_DIFFTEST_TIME")?.map(Duration::from_secs),
        print: false,
        native_only: false,
        quiet: false,
        regressions: true,
    };
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| -> Result<u64, String> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            v.parse().map_err(|_| format!("{name} {v}: not a number"))
        };
        match a.as_str() {
            "--help" | "-h" => {
                println!("{HELP}");
                return Ok(None);
            }
            "--cases" => o.cases = val("--cases")?,
            "--seed" => o.seed = val("--seed")?,
            "--case" => {
                o.regressions = false;
                o.first = val("--case")?;
                o.cases = 1;
            }
            "--first" => o.first = val("--first")?,
            "--migrate-runs" => o.migrate_runs = val("--migrate-runs")? as u32,
            "--repeat" => o.repeat = val("--repeat")?.max(1) as u32,
            "--mig-max" => o.aim.max = Some(val("--mig-max")?),
            "--mig-only" => o.aim.only = Some(args.next().ok_or("--mig-only needs a string")?),
            "--timeout" => o.timeout = Duration::from_secs(val("--timeout")?),
            "--time-limit" => o.time_limit = Some(Duration::from_secs(val("--time-limit")?)),
            "--script" => {
                let f = PathBuf::from(args.next().ok_or("--script needs a file")?);
                // cargo test runs us in krg-node/: a path relative to the
                // workspace, where the command was typed, works too.
                let f = [f.clone(), repo_root().join(&f)]
                    .into_iter()
                    .find(|p| p.is_file())
                    .ok_or(format!("--script {}: no such file", f.display()))?;
                o.script = Some(f);
                o.cases = 1;
                o.regressions = false;
            }
            "--modes" => {
                let list = args.next().ok_or("--modes needs a list")?;
                o.modes = list
                    .split(',')
                    .map(parse_mode)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("--modes: {e}"))?;
            }
            "--print" => o.print = true,
            "--no-regressions" => o.regressions = false,
            "--native-only" => o.native_only = true,
            "--quiet" => o.quiet = true,
            // What `cargo test` passes to every test binary.
            "--list" => {
                println!("difftest: test");
                return Ok(None);
            }
            "--color" | "--format" | "--test-threads" | "--skip" | "--logfile" | "-Z" => {
                args.next();
            }
            _ if a.starts_with('-') => {}
            _ => filters.push(a),
        }
    }
    // `cargo test NAME` runs every test binary with NAME as a filter.
    if !filters.is_empty() && !filters.iter().any(|f| "difftest".contains(f.as_str())) {
        return Ok(None);
    }
    Ok(Some(o))
}

/// The case numbers of the regression scripts (after any generated case).
const REGRESSION_INDEX: u64 = 1 << 40;

/// How a regression script runs: its header's `# difftest-modes: LIST`
/// and `# difftest-repeat: N` (default: every mode, once).
struct Regression {
    modes: Vec<Mode>,
    repeat: u32,
}

/// The scripts of `krg-node/tests/difftest/regressions/` (cases campaigns
/// found failing once: each runs in every run of the tester, in the modes
/// and as many times as its header says, a budget that keeps the brief
/// run short: a net for the bug's return, not a measure of its rate),
/// sorted.
fn regressions() -> Vec<(PathBuf, Regression)> {
    let dir = repo_root().join("krg-node/tests/difftest/regressions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let field = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
            };
            let modes = field("# difftest-modes:")
                .map(|l| {
                    l.split(',')
                        .map(|m| {
                            parse_mode(m.trim()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                        })
                        .collect()
                })
                .unwrap_or_else(all_modes);
            let repeat = field("# difftest-repeat:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            (p, Regression { modes, repeat })
        })
        .collect()
}

/// A case to run: generated, or read from a file.
fn case(o: &Opts, index: u64) -> gen::Case {
    match &o.script {
        Some(p) => gen::Case {
            seed: o.seed,
            index,
            script: std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            slow: true,
            features: Default::default(),
        },
        None => gen::generate(o.seed, index),
    }
}

/// Where a case's runs happen: one fresh directory per run, under the
/// shared test directory (every node sees it; /tmp is per node).
struct Env {
    data: PathBuf,
    bin: PathBuf,
    runs: PathBuf,
    failures: PathBuf,
}

impl Env {
    fn new() -> Env {
        let base = shared_dir("difftest");
        let data = base.join("data");
        fixture::write_data(&data);
        let kit = cc(&repo_root().join("examples/unix/spawnkit.c"), "spawnkit");
        let runs = base.join(format!("runs-{}", std::process::id()));
        let failures = base.join("failures");
        std::fs::create_dir_all(&failures).unwrap();
        Env {
            data,
            bin: kit.parent().unwrap().to_path_buf(),
            runs,
            failures,
        }
    }

    fn fresh_dir(&self, tag: &str) -> PathBuf {
        let d = self.runs.join(tag);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `bash -c SCRIPT MARKER` prepared for a run in `dir`.
    fn prepare(&self, mut cmd: Command, dir: &Path) -> Command {
        cmd.current_dir(dir)
            .env("DT_DATA", &self.data)
            .env("DT_BIN", &self.bin)
            .env("LC_ALL", "C");
        cmd
    }
}

fn marker(c: &gen::Case) -> String {
    format!("difftest-{}-{}", c.seed, c.index)
}

/// How a run differed from the native one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Hang,
    HeldOpen,
    Stdout,
    Status,
    Stderr,
    Leftover,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Hang => "hang",
            Kind::HeldOpen => "held-open",
            Kind::Stdout => "stdout",
            Kind::Status => "status",
            Kind::Stderr => "stderr",
            Kind::Leftover => "leftover",
        }
    }
}

fn kinds(native: &Outcome, got: &Outcome, stderr_sure: bool) -> Vec<Kind> {
    let mut k = Vec::new();
    if got.status.is_none() {
        k.push(Kind::Hang);
    }
    if got.held_open {
        k.push(Kind::HeldOpen);
    }
    if got.stdout != native.stdout {
        k.push(Kind::Stdout);
    }
    if got.status.is_some() && got.status != native.status {
        k.push(Kind::Status);
    }
    if stderr_sure && got.stderr != native.stderr {
        k.push(Kind::Stderr);
    }
    k
}

fn show(b: &[u8]) -> String {
    let s: String = b.escape_ascii().to_string();
    if s.len() > 120 {
        format!("{}...", &s[..120])
    } else {
        s
    }
}

/// Where two outputs part: lengths, first differing byte and line, and
/// the text around it on each side.
fn diff_summary(what: &str, a: &[u8], b: &[u8]) -> String {
    let at = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let line = a[..at].iter().filter(|&&c| c == b'\n').count() + 1;
    let from = a[..at]
        .iter()
        .rposition(|&c| c == b'\n')
        .map_or(0, |p| p + 1);
    let ctx = |s: &[u8]| {
        let end = (at + 80).min(s.len());
        show(&s[from.min(s.len())..end])
    };
    let lines = |s: &[u8]| s.iter().filter(|&&c| c == b'\n').count();
    format!(
        "  {what}: native {} bytes ({} lines), krg {} bytes ({} lines); first difference at byte {at} (line {line})\n    native: \"{}\"\n    krg:    \"{}\"",
        a.len(),
        lines(a),
        b.len(),
        lines(b),
        ctx(a),
        ctx(b)
    )
}

fn status_text(s: Option<i32>) -> String {
    s.map_or("none (timed out)".into(), |s| s.to_string())
}

/// The failure report of one run.
fn report(c: &gen::Case, mode: &str, k: &[Kind], native: &Outcome, got: &Outcome) -> String {
    let names: Vec<&str> = k.iter().map(|k| k.name()).collect();
    let mut r = format!(
        "FAIL seed={} case={} mode={mode} kind={} ({:.1} s, native {:.1} s)\n",
        c.seed,
        c.index,
        names.join(","),
        got.secs,
        native.secs
    );
    if got.stdout != native.stdout {
        r.push_str(&diff_summary("stdout", &native.stdout, &got.stdout));
        r.push('\n');
    }
    r.push_str(&format!(
        "  status: native {}, krg {}\n",
        status_text(native.status),
        status_text(got.status)
    ));
    if got.stderr != native.stderr {
        r.push_str(&diff_summary("stderr", &native.stderr, &got.stderr));
        r.push('\n');
        // krg's own messages say what went wrong: all of them, if short.
        for (who, e) in [("native", &native.stderr), ("krg", &got.stderr)] {
            if !e.is_empty() && e.len() <= 2000 {
                r.push_str(&format!("  {who} stderr:\n"));
                for l in String::from_utf8_lossy(e).lines() {
                    r.push_str(&format!("    {l}\n"));
                }
            }
        }
    }
    r
}

/// Write the case where it can be run again alone; its path.
fn save(env: &Env, c: &gen::Case, text: &str) -> PathBuf {
    let p = env
        .failures
        .join(format!("seed-{}-case-{}.sh", c.seed, c.index));
    let comments: String = text.lines().map(|l| format!("# {l}\n")).collect();
    let body = format!(
        "# difftest case; rerun alone:\n#   cargo test -p krg-node --test difftest -- --seed {} --case {}\n# or this file (after editing it): ... -- --script {}\n{comments}{}",
        c.seed,
        c.index,
        p.display(),
        c.script
    );
    std::fs::write(&p, body).unwrap();
    p
}

#[derive(Default)]
struct Tally {
    cases: u64,
    discarded: u64,
    stderr_unsure: u64,
    failed_cases: u64,
    runs: BTreeMap<String, u64>,
    fails: BTreeMap<(String, &'static str), u64>,
    mig: MigStats,
    migrate_runs_with_move: u64,
    failures: Vec<String>,
}

fn native_only(o: &Opts, env: &Env) -> i32 {
    let mut t = Tally::default();
    let end = o.first + o.cases;
    for i in o.first..end {
        let c = case(o, i);
        let m = marker(&c);
        let mut outs = Vec::new();
        for r in 0..2 {
            let dir = env.fresh_dir(&format!("c{i}-native{r}"));
            let mut cmd = Command::new("bash");
            cmd.args(["-c", &c.script, &m]);
            outs.push(run::output_within(env.prepare(cmd, &dir), o.timeout));
        }
        t.cases += 1;
        let (a, b) = (&outs[0], &outs[1]);
        if a.stdout != b.stdout || a.status != b.status || a.status.is_none() {
            t.discarded += 1;
            println!(
                "case {i}: native runs differ (status {} / {}){}",
                status_text(a.status),
                status_text(b.status),
                if a.stdout != b.stdout {
                    format!("\n{}", diff_summary("stdout", &a.stdout, &b.stdout))
                } else {
                    String::new()
                }
            );
            println!("{}", c.script);
        } else if a.stderr != b.stderr {
            t.stderr_unsure += 1;
        } else if !o.quiet {
            println!(
                "case {i}: ok {:.2} s, status {}, {} bytes",
                a.secs,
                status_text(a.status),
                a.stdout.len()
            );
            for l in String::from_utf8_lossy(&a.stderr).lines().take(3) {
                println!("  stderr: {l}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&env.runs);
    println!(
        "difftest --native-only: seed {}, {} cases, {} not deterministic, {} with stderr not deterministic",
        o.seed, t.cases, t.discarded, t.stderr_unsure
    );
    0
}

fn main() {
    let o = match parse_args() {
        Ok(Some(o)) => o,
        Ok(None) => return,
        Err(e) => {
            eprintln!("difftest: {e}\n{HELP}");
            std::process::exit(2);
        }
    };
    if o.print {
        for i in o.first..o.first + o.cases {
            let c = case(&o, i);
            println!(
                "### seed {} case {i}{} {:?}\n{}",
                o.seed,
                if c.slow { " (slow)" } else { "" },
                c.features,
                c.script
            );
        }
        return;
    }
    let env = Env::new();
    if o.native_only {
        std::process::exit(native_only(&o, &env));
    }
    std::process::exit(campaign(&o, &env));
}

/// `krg sched set NAME` on node 1 unless it is in force already.
fn set_policy(c: &Cluster, now: &mut Option<&'static str>, p: &'static str) {
    if *now == Some(p) {
        return;
    }
    let out = c.krg(1, &["sched", "set", p]);
    assert!(
        out.status.success(),
        "krg sched set {p}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    *now = Some(p);
}

fn campaign(o: &Opts, env: &Env) -> i32 {
    println!(
        "difftest: seed {} ({} cases from {}; modes {}; rerun with --seed {})",
        o.seed,
        o.cases,
        o.first,
        Mode::names(&o.modes),
        o.seed
    );
    let t0 = Instant::now();
    let c = Cluster::up(NODES, 1.0);
    let mut t = Tally::default();
    let mut now: Option<&'static str> = None;
    let mut rng = gen::case_rng(o.seed, u64::MAX, 1);
    for i in o.first..o.first + o.cases {
        if o.time_limit.is_some_and(|l| t0.elapsed() >= l) {
            println!("difftest: time limit reached after {} cases", t.cases);
            break;
        }
        let k = case(o, i);
        one_case(o, env, &c, &k, &mut t, &mut now, &mut rng);
        if o.quiet && t.cases % 25 == 0 {
            println!(
                "progress: {} cases, {} failed, {} discarded, {:.0} s",
                t.cases,
                t.failed_cases,
                t.discarded,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    if o.regressions {
        for (j, (path, r)) in regressions().into_iter().enumerate() {
            let k = gen::Case {
                seed: o.seed,
                index: REGRESSION_INDEX + j as u64,
                script: std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
                slow: true,
                features: Default::default(),
            };
            println!(
                "regression {}: case {} ({} x {})",
                path.display(),
                k.index,
                Mode::names(&r.modes),
                r.repeat
            );
            let ro = Opts {
                modes: r.modes,
                repeat: r.repeat,
                script: Some(path),
                ..o.clone()
            };
            one_case(&ro, env, &c, &k, &mut t, &mut now, &mut rng);
        }
    }
    let _ = std::fs::remove_dir_all(&env.runs);
    drop(c);
    summary(o, &t, t0.elapsed());
    // The line scripts/test counts tests from: this target is one test.
    let ok = t.failed_cases == 0;
    println!(
        "\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
        if ok { "ok" } else { "FAILED" },
        ok as u32,
        !ok as u32,
        t0.elapsed().as_secs_f64()
    );
    if ok {
        0
    } else {
        1
    }
}

fn one_case(
    o: &Opts,
    env: &Env,
    c: &Cluster,
    k: &gen::Case,
    t: &mut Tally,
    now: &mut Option<&'static str>,
    rng: &mut rand::rngs::StdRng,
) {
    use rand::seq::SliceRandom;
    let m = marker(k);
    let i = k.index;
    let bash = |plain: bool| -> Vec<String> {
        let mut v = Vec::new();
        if plain {
            // The native side is killed as a group by timeout(1) if it
            // hangs (krg kill cannot reach plain processes).
            v.extend([
                "timeout".to_string(),
                "-s".into(),
                "KILL".into(),
                o.timeout.as_secs().to_string(),
            ]);
        }
        v.extend(["bash".to_string(), "-c".into(), k.script.clone(), m.clone()]);
        v
    };
    t.cases += 1;
    let mut natives = Vec::new();
    for r in 0..2 {
        let dir = env.fresh_dir(&format!("c{i}/native{r}"));
        let argv = bash(true);
        let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
        let cmd = env.prepare(c.plain(1, &argv), &dir);
        natives.push(run::capture(
            cmd,
            o.timeout + Duration::from_secs(10),
            &|| {},
        ));
    }
    let native = &natives[0];
    if natives[0].stdout != natives[1].stdout
        || natives[0].status != natives[1].status
        || natives[0].status.is_none()
        || natives[0].status == Some(137)
    {
        t.discarded += 1;
        println!("case {i}: discarded (native runs differ or time out)");
        return;
    }
    let stderr_sure = natives[0].stderr == natives[1].stderr;
    if !stderr_sure {
        t.stderr_unsure += 1;
    }
    let mut runs: Vec<Mode> = Vec::new();
    for mode in &o.modes {
        let n = if matches!(mode, Mode::Migrate(_)) {
            o.migrate_runs
        } else {
            1
        };
        for _ in 0..n * o.repeat {
            runs.push(mode.clone());
        }
    }
    let mut failed = false;
    let mut line = Vec::new();
    let mut reports = Vec::new();
    // A hang costs its whole limit: well above what the native run took
    // (krg runs take a few times longer on this busy machine), at most
    // --timeout.
    let limit = o
        .timeout
        .min(Duration::from_secs(15) + native_time(native).mul_f64(10.0));
    for (r, mode) in runs.iter().enumerate() {
        let (pol, migrate) = match mode {
            Mode::Policy(p) => (*p, false),
            Mode::Migrate(Some(p)) => (*p, true),
            Mode::Migrate(None) => (*POLICIES.choose(rng).unwrap(), true),
        };
        set_policy(c, now, pol);
        let name = if migrate {
            format!("migrate/{pol}")
        } else {
            pol.to_string()
        };
        let dir = env.fresh_dir(&format!("c{i}/r{r}"));
        let argv = bash(false);
        let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
        let cmd = env.prepare(c.cmd(1, &argv), &dir);
        let done = AtomicBool::new(false);
        // What was still running when a run hung, before it is killed.
        let stuck = std::sync::Mutex::new(None);
        let (got, mig) = std::thread::scope(|s| {
            let inj = migrate.then(|| s.spawn(|| run::inject(c, NODES, &m, &o.aim, &done)));
            let got = run::capture(cmd, limit, &|| {
                *stuck.lock().unwrap() = run::ps(c);
                run::kill_all(c);
            });
            done.store(true, Ordering::SeqCst);
            (got, inj.map(|h| h.join().unwrap()))
        });
        *t.runs.entry(mode.name()).or_default() += 1;
        let mut note = format!("{} {:.1}s", short(&name), got.secs);
        if let Some(mig) = &mig {
            note.push_str(&format!(" mig {}/{}", mig.succeeded, mig.attempted));
            if mig.succeeded > 0 {
                t.migrate_runs_with_move += 1;
            }
            t.mig.add(mig);
        }
        let ks = kinds(native, &got, stderr_sure);
        if !ks.is_empty() {
            failed = true;
            note.push_str(" FAIL");
            for kd in &ks {
                *t.fails.entry((mode.name(), kd.name())).or_default() += 1;
            }
            let mut rep = report(k, &name, &ks, native, &got);
            if let Some(procs) = stuck.lock().unwrap().take() {
                rep.push_str("  still running (krg ps):\n");
                for p in &procs {
                    rep.push_str(&format!("    {}\n", ps_line(p)));
                }
            }
            if let Some(mig) = &mig {
                rep.push_str(&format!(
                    "  migrations: {} attempted, {} succeeded\n",
                    mig.attempted, mig.succeeded
                ));
                for l in &mig.log {
                    rep.push_str(&format!("    {l}\n"));
                }
            }
            print!("{rep}");
            reports.push(rep);
            t.failures.push(format!(
                "seed={} case={} mode={name} kind={}",
                k.seed,
                k.index,
                ks.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
            ));
        }
        line.push(note);
    }
    // Nothing of the case may outlive it: the cluster runs nothing else.
    if let Some(rep) = leftovers(c, k) {
        failed = true;
        print!("{rep}");
        reports.push(rep);
        *t.fails
            .entry(("any".into(), Kind::Leftover.name()))
            .or_default() += 1;
        t.failures.push(format!(
            "seed={} case={} mode=any kind=leftover",
            k.seed, k.index
        ));
    }
    if failed {
        t.failed_cases += 1;
        let saved = if o.script.is_none() {
            format!("  saved: {}\n", save(env, k, &reports.concat()).display())
        } else {
            String::new()
        };
        print!("  script:\n{}{saved}", indent(&k.script));
    } else {
        let _ = std::fs::remove_dir_all(env.runs.join(format!("c{i}")));
    }
    if !o.quiet || failed {
        println!(
            "case {i}{}: {} native {:.1}s | {}",
            if k.slow { " (slow)" } else { "" },
            if failed { "FAILED" } else { "ok" },
            native.secs,
            line.join(" | ")
        );
    }
}

/// One process of `krg ps --json`, on one line.
fn ps_line(p: &serde_json::Value) -> String {
    format!(
        "pid {} node {} ppid {} {} {}",
        p["pid"],
        p["node"],
        p["ppid"],
        p["state"].as_str().unwrap_or("?"),
        show(p["command"].as_str().unwrap_or("").as_bytes())
    )
}

fn native_time(o: &Outcome) -> Duration {
    Duration::from_secs_f64(o.secs)
}

/// SSI processes still there after the case's last run (given 2 s to
/// go): a report, and they are killed.
fn leftovers(c: &Cluster, k: &gen::Case) -> Option<String> {
    if run::ps(c).unwrap_or_default().is_empty() {
        return None;
    }
    std::thread::sleep(Duration::from_secs(2));
    let left = run::ps(c).unwrap_or_default();
    if left.is_empty() {
        return None;
    }
    let cmds: Vec<String> = left.iter().map(ps_line).collect();
    run::kill_all(c);
    Some(format!(
        "FAIL seed={} case={} mode=any kind=leftover: SSI processes still there after every run ended:\n  {}\n",
        k.seed,
        k.index,
        cmds.join("\n  ")
    ))
}

fn short(name: &str) -> String {
    name.replace("round-robin", "rr")
        .replace("least-loaded", "ll")
        .replace("two-choices", "2c")
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn summary(o: &Opts, t: &Tally, took: Duration) {
    println!("\n==== difftest summary: seed {} ====", o.seed);
    println!(
        "cases: {} run, {} discarded (native runs differ), {} with stderr not compared (not deterministic natively); {:.0} s",
        t.cases,
        t.discarded,
        t.stderr_unsure,
        took.as_secs_f64()
    );
    let runs: Vec<String> = t.runs.iter().map(|(m, n)| format!("{m} {n}")).collect();
    println!("runs per mode: {}", runs.join(", "));
    println!(
        "migrations: {} attempted, {} succeeded, {} process already gone; {} runs with at least one move",
        t.mig.attempted, t.mig.succeeded, t.mig.gone, t.migrate_runs_with_move
    );
    for (msg, n) in &t.mig.other {
        println!("  not migrated ({n}): {msg}");
    }
    if t.fails.is_empty() {
        println!("failures: none");
    } else {
        println!("failures: {} cases", t.failed_cases);
        for ((mode, kind), n) in &t.fails {
            println!("  {mode:<22} {kind:<10} {n}");
        }
        for f in &t.failures {
            println!("  {f}");
        }
    }
}
