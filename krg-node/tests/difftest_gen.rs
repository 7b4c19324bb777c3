//! The differential tester's generator (tests/difftest/gen.rs) on its own,
//! no cluster: a seed gives the same cases everywhere, every case parses,
//! and the grammar's constructs all turn up.

mod common;
#[path = "difftest/gen.rs"]
mod gen;

use common::Spawn;
use std::collections::BTreeSet;
use std::process::Command;

#[test]
fn a_seed_and_case_number_give_the_same_script_every_time() {
    for seed in [0, 1, 42, u64::MAX] {
        for k in [0, 1, 17, 2999] {
            assert_eq!(gen::generate(seed, k).script, gen::generate(seed, k).script);
        }
    }
    // ... and other seeds or cases other scripts (almost always).
    let a: BTreeSet<String> = (0..50).map(|k| gen::generate(42, k).script).collect();
    assert!(a.len() >= 45, "only {} distinct scripts in 50", a.len());
    let b: BTreeSet<String> = (0..50).map(|k| gen::generate(43, k).script).collect();
    assert!(a.intersection(&b).count() <= 5);
}

#[test]
fn a_case_does_not_depend_on_the_cases_before_it() {
    let late = gen::generate(7, 123).script;
    for k in 0..10 {
        gen::generate(7, k);
    }
    assert_eq!(gen::generate(7, 123).script, late);
}

fn bash_n(script: &str) -> Result<(), String> {
    let o = Command::new("bash")
        .arg("-n")
        .output_with_input(script.as_bytes());
    if o.status.success() && o.stderr.is_empty() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

#[test]
fn every_script_parses() {
    for seed in [1, 2, 3] {
        for k in 0..150 {
            let c = gen::generate(seed, k);
            if let Err(e) = bash_n(&c.script) {
                panic!("seed {seed} case {k}: bash -n: {e}\n{}", c.script);
            }
        }
    }
}

#[test]
fn scripts_stay_in_their_directory_and_the_shared_data() {
    for k in 0..300 {
        let s = gen::generate(5, k).script;
        // /tmp is private to each node: a case must not use it.
        assert!(!s.contains("/tmp"), "case {k} uses /tmp:\n{s}");
    }
}

#[test]
fn the_grammar_covers_what_broke_before() {
    let mut seen = BTreeSet::new();
    let mut slow = 0;
    for k in 0..400 {
        let c = gen::generate(11, k);
        seen.extend(c.features.iter().copied());
        slow += c.slow as u32;
    }
    for f in [
        "pipeline",
        "while-read",
        "group",
        "heredoc",
        "herestring",
        "redirect",
        "fd3",
        "exec",
        "background",
        "cmd-subst",
        "nested-shell",
        "exit-status",
        "pipefail",
        "pipestatus",
        "yes",
        "gzip",
        "tee",
        "xargs",
        "sort-uniq",
        "popen",
        "system",
        "spawn",
        "cloexec-chain",
        "python",
        "file-stdin",
        "slow",
    ] {
        assert!(seen.contains(f), "no case of 400 uses {f}: {seen:?}");
    }
    assert!((40..=200).contains(&slow), "{slow} slow cases of 400");
}

#[test]
fn quoting_keeps_any_word_one_word() {
    for w in ["", "a b", "it's", "$x", "a'b'c", "\\n", "*"] {
        let out = Command::new("sh")
            .args(["-c", &format!("printf '%s' {}", gen::sq(w))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), w);
    }
}
