//! The case generator: bash scripts from a small grammar of the shell
//! constructs ordinary programs are made of (pipelines, `while read`
//! loops, groups sharing a stdin, here-documents, redirections, background
//! jobs, command substitution, nested shells, exit statuses, C programs
//! and Python scripts starting programs), every one deterministic on one
//! machine by construction:
//!
//! - a stdin shared by several readers is read exactly: the `read`
//!   builtin and `head -c` on pipes, `head -n` only on files (GNU head
//!   seeks back there), everything else reads to the end;
//! - a pipeline cut short by `head` shows its exit statuses (`PIPESTATUS`,
//!   `pipefail`) only when the stages upstream are endless (`yes`), which
//!   always die of SIGPIPE; a finite producer may or may not have finished;
//! - only the last stage of a pipeline writes to stdout, background jobs
//!   write files of their own, `tee` files are read after the pipeline;
//! - programs that print when SIGPIPE hits them (Python) are never cut.
//!
//! Case K of seed S depends on (S, K) only, so `--seed S --case K` gives
//! the same script on any machine. Scripts find the fixed data files in
//! `$DT_DATA` and the C helpers in `$DT_BIN`.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;

/// One generated case.
#[derive(Debug, Clone)]
pub struct Case {
    pub seed: u64,
    pub index: u64,
    pub script: String,
    /// Made to last (slow producers): where injected migrations land.
    pub slow: bool,
    /// The constructs it uses, for the report.
    pub features: BTreeSet<&'static str>,
}

/// splitmix64: spreads (seed, index) over the PRNG's seed space.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn case_rng(seed: u64, index: u64, salt: u64) -> StdRng {
    StdRng::seed_from_u64(mix(mix(seed) ^ index) ^ salt)
}

/// Case `index` of `seed`.
pub fn generate(seed: u64, index: u64) -> Case {
    let mut g = G {
        rng: case_rng(seed, index, 0),
        pipefail: false,
        files: 0,
        tees: Vec::new(),
        features: BTreeSet::new(),
    };
    let slow = g.rng.gen_bool(0.2);
    let script = g.script(slow);
    Case {
        seed,
        index,
        script,
        slow,
        features: g.features,
    }
}

/// Quote `s` for a POSIX shell: one word, taken literally.
pub fn sq(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-+=.,/:@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What flows through a pipe, roughly: enough to pick filters that make
/// sense for it and keep loops and outputs small.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Content {
    /// One number per line.
    Nums,
    /// Lines of words.
    Text,
    /// Arbitrary bytes.
    Bin,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    content: Content,
    lines: u64,
    bytes: u64,
    /// Never ends (`yes`): must be cut by a truncating stage.
    endless: bool,
    /// Complains on stderr or exits non-zero when cut (Python): never cut.
    fragile: bool,
}

impl Flow {
    fn new(content: Content, lines: u64, bytes: u64) -> Flow {
        Flow {
            content,
            lines,
            bytes,
            endless: false,
            fragile: false,
        }
    }
    fn small(lines: u64) -> Flow {
        Flow::new(Content::Text, lines, lines * 8)
    }
}

/// The shell a fragment is for: bash at the top, dash inside `sh -c`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sh {
    Bash,
    Posix,
}

/// A pipeline being built.
struct Pipe {
    stages: Vec<String>,
    flow: Flow,
    /// Every stage's exit status is the same on every run.
    sure: bool,
    /// A stage wrote a file (tee): nothing downstream may cut the stream.
    no_cut: bool,
}

/// Longest stdin a loop or an exec-per-line stage gets (each line may be
/// one remote exec under krg).
const LOOP_LINES: u64 = 24;

struct G {
    rng: StdRng,
    pipefail: bool,
    files: u32,
    /// Files `tee` is writing in the pipeline being built: read back after it.
    tees: Vec<(String, Flow)>,
    features: BTreeSet<&'static str>,
}

const WORDS: &[&str] = &[
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima",
];

impl G {
    fn chance(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.rng.gen_range(lo..=hi)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        *v.choose(&mut self.rng).unwrap()
    }
    fn word(&mut self) -> &'static str {
        self.pick(WORDS)
    }
    fn feat(&mut self, f: &'static str) {
        self.features.insert(f);
    }
    fn new_file(&mut self, stem: &str) -> String {
        self.files += 1;
        format!("{stem}{}", self.files)
    }
    /// A size from a few to a few million, favouring small ones.
    fn size(&mut self, max: u64) -> u64 {
        let tier = self.range(0, 9);
        let top = match tier {
            0..=3 => 20,
            4..=6 => 2_000,
            7..=8 => 100_000,
            _ => max,
        }
        .min(max);
        self.range(1, top.max(1))
    }

    fn script(&mut self, slow: bool) -> String {
        let mut out = Vec::new();
        if self.chance(0.25) {
            self.pipefail = true;
            self.feat("pipefail");
            out.push("set -o pipefail".to_string());
        }
        let n = self.range(1, 4) as usize;
        let slow_at = self.range(0, n as u64 - 1) as usize;
        for i in 0..n {
            let s = if slow && i == slow_at {
                self.slow_stmt() + &self.read_back_tee()
            } else {
                self.stmt(Sh::Bash, 0)
            };
            out.push(s);
        }
        if self.chance(0.3) {
            out.push(self.ending());
        }
        let mut s = out.join("\n");
        s.push('\n');
        s
    }

    /// How the script ends: its exit status.
    fn ending(&mut self) -> String {
        self.feat("exit-status");
        match self.range(0, 5) {
            0 => format!("exit {}", self.range(0, 9)),
            1 => "false".into(),
            2 => format!("(exit {})", self.range(1, 120)),
            3 => format!("sh -c 'exit {}'", self.range(1, 120)),
            4 => "sh -c 'kill -TERM $$'".into(),
            _ => format!("test {} -gt 5", self.range(0, 9)),
        }
    }

    /// `echo "rc=$?"` after a statement, now and then.
    fn with_rc(&mut self, s: String) -> String {
        if self.chance(0.3) {
            self.feat("exit-status");
            format!("{s}\necho \"rc=$?\"")
        } else {
            s
        }
    }

    fn stmt(&mut self, sh: Sh, depth: u32) -> String {
        loop {
            let k = self.range(0, 15);
            let s = match k {
                0..=3 => self.pipeline_stmt(sh),
                4 => self.loop_stmt(sh),
                5 => self.group_stmt(sh),
                6 => self.heredoc_stmt(sh),
                7 => self.redirect_stmt(),
                8 => self.background_stmt(sh),
                9 => self.subst_stmt(sh),
                10 if depth < 2 => self.nested_stmt(depth),
                11 => self.status_stmt(sh),
                12 => self.cprog_stmt(),
                13 if sh == Sh::Bash && depth == 0 => self.python_stmt(),
                14 => self.file_stdin_stmt(),
                15 => self.fd3_stmt(),
                _ => continue,
            };
            return s + &self.read_back_tee();
        }
    }

    // ---- sources -------------------------------------------------------

    /// A stage that writes something to stdout from nothing.
    fn source(&mut self, sh: Sh) -> (String, Flow) {
        match self.range(0, 12) {
            0..=2 => {
                let n = self.size(300_000);
                let s = if self.chance(0.3) {
                    let a = self.range(0, 50);
                    format!("seq {a} {}", a + n)
                } else {
                    format!("seq {n}")
                };
                (s, Flow::new(Content::Nums, n, n * 6))
            }
            3 => {
                let n = self.size(50_000);
                (
                    format!("head -n {n} \"$DT_DATA/text\""),
                    Flow::new(Content::Text, n, n * 30),
                )
            }
            4 => {
                let n = self.size(4 << 20);
                (
                    format!("head -c {n} \"$DT_DATA/bin\""),
                    Flow::new(Content::Bin, n / 256, n),
                )
            }
            5 => {
                self.feat("yes");
                let w = self.word();
                if self.chance(0.5) {
                    let n = self.size(200_000);
                    (
                        format!("yes {w} | head -n {n}"),
                        Flow::new(Content::Text, n, n * 7),
                    )
                } else {
                    let mut f = Flow::new(Content::Text, u64::MAX / 4, u64::MAX / 4);
                    f.endless = true;
                    (format!("yes {w}"), f)
                }
            }
            6 => (
                "cat \"$DT_DATA/words\"".into(),
                Flow::new(Content::Text, 500, 3500),
            ),
            7 => {
                let n = self.range(1, 6);
                let items: Vec<String> = (0..n)
                    .map(|_| format!("{} {}", self.word(), self.range(0, 99)))
                    .collect();
                if self.chance(0.5) {
                    (
                        format!(
                            "printf '%s\\n' {}",
                            items.iter().map(|s| sq(s)).collect::<Vec<_>>().join(" ")
                        ),
                        Flow::small(n),
                    )
                } else {
                    (
                        format!("/bin/echo {}", sq(&items.join(" "))),
                        Flow::small(1),
                    )
                }
            }
            8 => self.heredoc_source(sh),
            9 => {
                let n = self.size(20_000);
                (
                    format!("awk 'BEGIN {{ for (i = 1; i <= {n}; i++) print i * i % 1000 }}'"),
                    Flow::new(Content::Nums, n, n * 4),
                )
            }
            10 => {
                self.feat("exec");
                let n = self.range(1, 30);
                (
                    format!("sh -c 'seq {n}; exec /bin/echo end'"),
                    Flow::new(Content::Nums, n + 1, n * 3),
                )
            }
            11 => {
                self.feat("popen");
                let n = self.size(5000);
                (
                    format!("\"$DT_BIN/spawnkit\" popen-r 'seq {n} | sort -r'"),
                    Flow::new(Content::Nums, n + 1, n * 5),
                )
            }
            _ => {
                let n = self.range(1, 40);
                (
                    format!("for i in $(seq {n}); do echo \"i=$i\"; done"),
                    Flow::new(Content::Text, n, n * 5),
                )
            }
        }
    }

    /// A source that takes a second or more: something to migrate.
    fn slow_source(&mut self) -> (String, Flow) {
        self.feat("slow");
        let n = self.range(10, 30);
        let s = match self.range(0, 3) {
            0 => format!("for i in $(seq {n}); do echo \"tick $i\"; sleep 0.05; done"),
            1 => format!("\"$DT_BIN/spawnkit\" slow {n} 50"),
            2 => format!(
                "awk 'BEGIN {{ for (i = 1; i <= {n}; i++) {{ print \"a\" i; fflush(); system(\"sleep 0.05\") }} }}'"
            ),
            _ => format!(
                "{{ i=0; while [ $i -lt {n} ]; do i=$((i + 1)); /bin/echo \"w $i\"; sleep 0.05; done; }}"
            ),
        };
        (s, Flow::new(Content::Text, n, n * 8))
    }

    fn heredoc_source(&mut self, sh: Sh) -> (String, Flow) {
        self.feat("heredoc");
        let n = self.range(1, 8);
        let lines: Vec<String> = (0..n)
            .map(|i| {
                let mut l = format!("{} {i}", self.word());
                if self.chance(0.3) {
                    l.push_str(" $((3 * 7)) ${HOME:+home}");
                }
                l
            })
            .collect();
        let body = lines.join("\n");
        // In a group, so that what follows the source (`| filter`) can
        // come after the document's last line.
        let s = match self.range(0, if sh == Sh::Bash { 3 } else { 2 }) {
            0 => format!("{{ cat <<EOF\n{body}\nEOF\n}}"),
            1 => format!("{{ cat <<'EOF'\n{body}\nEOF\n}}"),
            2 => format!("{{ cat <<-EOF\n\t{}\n\tEOF\n}}", lines.join("\n\t")),
            _ => {
                self.feat("herestring");
                format!("cat <<< {}", sq(&lines[0]))
            }
        };
        (s, Flow::small(n))
    }

    // ---- filters -------------------------------------------------------

    /// Append a stage reading the pipe. `cut`: may it stop reading early?
    fn filter(&mut self, p: &mut Pipe, sh: Sh, cut: bool) {
        let f = p.flow;
        let text = f.content != Content::Bin;
        // An endless stream only goes through stages that pass lines on
        // as they come (one that drops them all would wait forever).
        let fin = !f.endless;
        loop {
            let (stage, flow, truncates): (String, Flow, bool) = match self.range(0, 29) {
                0 => ("cat".into(), f, false),
                1 if cut => {
                    let n = self.size(5000);
                    let g = Flow::new(f.content, n.min(f.lines), f.bytes.min(n * 40));
                    (format!("head -n {n}"), g, true)
                }
                2 if cut => {
                    let n = self.size(1 << 20);
                    let g = Flow::new(f.content, f.lines.min(n), n.min(f.bytes));
                    (format!("head -c {n}"), g, true)
                }
                3 if fin => {
                    let n = self.range(1, 30);
                    if self.chance(0.2) {
                        (format!("tail -c {n}"), Flow::new(Content::Bin, 1, n), false)
                    } else {
                        let g = Flow::new(f.content, n.min(f.lines), f.bytes.min(n * 40));
                        (format!("tail -n {n}"), g, false)
                    }
                }
                4 if fin => {
                    let w = if text {
                        self.pick(&["wc -l", "wc -c", "wc", "wc -w"])
                    } else {
                        self.pick(&["wc -l", "wc -c"])
                    };
                    (w.into(), Flow::small(1), false)
                }
                5 if fin && text => {
                    let s = self.pick(&[
                        "sort",
                        "sort -r",
                        "sort -u",
                        "sort | uniq -c",
                        "sort -n",
                        "sort -k2",
                    ]);
                    let mut g = f;
                    if s.contains('u') {
                        self.feat("sort-uniq");
                        g.lines = g.lines.min(600);
                        g.bytes = g.bytes.min(g.lines * 16);
                    }
                    (s.into(), g, false)
                }
                6 if fin && text => ("uniq".into(), f, false),
                7 => {
                    let t = self.pick(&["tr a-z A-Z", "tr -d 0-4", "tr -s 'a-z '", "tr 0-9 a-j"]);
                    (t.into(), f, false)
                }
                8 if text => {
                    let s = if fin {
                        self.pick(&[
                            "sed 's/1/one/g'",
                            "sed -n 'p;n'",
                            "sed -e 's/^/> /' -e 's/a/A/2'",
                            "sed '/7/d'",
                        ])
                    } else {
                        self.pick(&["sed 's/a/4/g'", "sed -n 'p;n'"])
                    };
                    (s.into(), f, false)
                }
                9 if text && cut => {
                    let n = self.range(1, 50);
                    let g = Flow::new(f.content, n.min(f.lines), f.bytes.min(n * 40));
                    (format!("sed {n}q"), g, true)
                }
                10 if fin && text => {
                    let a = self.pick(&[
                        "awk '{ print NR \": \" $1 }'",
                        "awk '{ s += length($0) } END { print s + 0, NR }'",
                        "awk 'NR % 7 == 3'",
                        "awk '{ n[$1]++ } END { for (k in n) c++; print c + 0 }'",
                        "awk -v OFS=, '{ $1 = $1; print }'",
                    ]);
                    let g = if a.contains("END") { Flow::small(1) } else { f };
                    (a.into(), g, false)
                }
                11 if fin && text => {
                    let w = if f.content == Content::Nums {
                        self.range(0, 9).to_string()
                    } else {
                        self.word()[..2].to_string()
                    };
                    let (s, g) = match self.range(0, 3) {
                        0 => (format!("grep {w}"), f),
                        1 => (format!("grep -v {w}"), f),
                        2 => (format!("grep -c {w}"), Flow::small(1)),
                        _ => (format!("grep -n {w}"), f),
                    };
                    (s, g, false)
                }
                12 if text => {
                    let c = self.pick(&["cut -c1-3", "cut -d' ' -f1", "cut -c2-"]);
                    (c.into(), f, false)
                }
                13 if fin => ("md5sum".into(), Flow::small(1), false),
                14 => {
                    self.feat("gzip");
                    ("gzip -nc | gzip -dc".into(), f, false)
                }
                15 if fin && !p.no_cut => {
                    self.feat("tee");
                    let t = self.new_file("tee");
                    self.tees.push((t.clone(), f));
                    p.no_cut = true;
                    (format!("tee {t}"), f, false)
                }
                16 if fin && text && f.lines <= 200 => {
                    self.feat("xargs");
                    let x = match self.range(0, 3) {
                        0 => format!("xargs -n {} /bin/echo", self.range(4, 30)),
                        1 => "xargs /usr/bin/printf '<%s>\\n'".to_string(),
                        2 if f.lines <= 12 => "xargs -I{} /bin/echo 'item {}'".to_string(),
                        _ => "xargs /bin/echo".to_string(),
                    };
                    (x, Flow::small(f.lines), false)
                }
                17 if fin && text && f.lines <= LOOP_LINES => {
                    self.feat("while-read");
                    // Text: the flow's content is a guess after some filters;
                    // only seq's lines go to expr.
                    let body = self.loop_body(Content::Text, sh);
                    (
                        format!("while read -r x; do {body}; done"),
                        Flow::small(f.lines * 2),
                        false,
                    )
                }
                18 => {
                    self.feat("group");
                    let (s, g) = self.group_stage(f, sh);
                    (s, g, false)
                }
                19 => {
                    self.feat("exec");
                    let s = self.pick(&[
                        "sh -c 'exec cat'",
                        "sh -c 'read -r a; echo \"first=$a\"; exec tr a-z A-Z'",
                        "bash -c 'exec \"$@\"' _ tr 0-9 a-j",
                        "sh -c 'exec \"$0\" \"$@\"' sed 's/^/+/'",
                    ]);
                    (s.into(), f, false)
                }
                20 if fin => {
                    self.feat("popen");
                    let c = self.pick(&["md5sum", "wc -c", "sort -r | head -n 3", "tail -n 2"]);
                    (
                        format!("\"$DT_BIN/spawnkit\" popen-w {}", sq(c)),
                        Flow::small(4),
                        false,
                    )
                }
                21 if fin => {
                    self.feat("cloexec-chain");
                    let c1 = self.pick(&["tr a-z A-Z", "wc -c", "md5sum", "cat"]);
                    let c2 = self.pick(&["cat", "wc -l", "tr a-z A-Z"]);
                    let g = if c1 == "cat" || c1.starts_with("tr") {
                        f
                    } else {
                        Flow::small(4)
                    };
                    (
                        format!("\"$DT_BIN/spawnkit\" chain {} {}", sq(c1), sq(c2)),
                        g,
                        false,
                    )
                }
                22 if fin && text => ("cat -n".into(), f, false),
                23 if fin => {
                    self.feat("spawn");
                    let m = self.pick(&["fork", "vfork", "spawn"]);
                    (format!("\"$DT_BIN/spawnkit\" run {m} tr a-z A-Z"), f, false)
                }
                24 if fin => ("cksum".into(), Flow::small(1), false),
                25 if fin && f.bytes < 200_000 => {
                    self.feat("nested-shell");
                    let inner = self.pick(&["cat | tr a-z A-Z", "sort | tail -n 4", "wc -l"]);
                    let sh_ = self.pick(&["sh", "bash"]);
                    (format!("{sh_} -c {}", sq(inner)), Flow::small(4), false)
                }
                26 if fin && text => ("rev".into(), f, false),
                27 if fin => ("od -An -c | tail -n 3".into(), Flow::small(3), false),
                28 if fin && text => ("fold -w 7".into(), f, false),
                29 if fin && text => ("nl -ba".into(), f, false),
                _ => continue,
            };
            if truncates && (p.no_cut || f.fragile) {
                continue;
            }
            // A finite producer cut short may or may not have finished:
            // its exit status is not the same on every run.
            if truncates && fin {
                p.sure = false;
            }
            p.stages.push(stage);
            p.flow = flow;
            return;
        }
    }

    /// A group of commands sharing the pipe as stdin, readers exact (on a
    /// pipe), the last to the end.
    fn group_stage(&mut self, f: Flow, sh: Sh) -> (String, Flow) {
        let mut parts: Vec<String> = Vec::new();
        let readers = self.range(1, 3);
        for _ in 0..readers {
            let p = match self.range(0, 4) {
                0 => "read -r a; /bin/echo \"a=$a\"".to_string(),
                1 => format!("head -c {}; echo", self.range(1, 40)),
                2 => "read -r a b; /bin/echo \"$b:$a\"".to_string(),
                3 => format!("sh -c 'read -r l; echo \"{}: $l\"'", self.word()),
                _ => "read -r skip".to_string(),
            };
            parts.push(p);
        }
        if self.chance(0.5) {
            parts.push(self.no_stdin_ext().to_string());
        }
        let (last, g) = if f.endless {
            (format!("head -n {}", self.range(1, 50)), Flow::small(50))
        } else {
            match self.range(0, 3) {
                0 => ("cat".into(), f),
                1 => ("wc -c".into(), Flow::small(1)),
                2 => ("md5sum".into(), Flow::small(1)),
                _ => ("tr a-z A-Z".into(), f),
            }
        };
        parts.push(last);
        let body = parts.join("; ");
        let s = if self.chance(0.5) || sh == Sh::Posix {
            format!("{{ {body}; }}")
        } else {
            format!("( {body} )")
        };
        (s, g)
    }

    /// An external program that does not read its stdin (but inherits it).
    fn no_stdin_ext(&mut self) -> String {
        match self.range(0, 4) {
            0 => format!("/bin/echo {}", self.word()),
            1 => format!("expr {} + {}", self.range(0, 99), self.range(0, 99)),
            2 => format!(
                "/usr/bin/printf '%s-%s\\n' {} {}",
                self.word(),
                self.range(0, 9)
            ),
            3 => format!("sh -c 'echo {}'", self.word()),
            _ => "/bin/true".to_string(),
        }
    }

    /// The body of `while read -r x; do ...; done`.
    fn loop_body(&mut self, c: Content, sh: Sh) -> String {
        let mut parts = Vec::new();
        let n = self.range(1, 2);
        for _ in 0..n {
            let p = match self.range(0, 10) {
                0 => "/bin/echo \"$x\"".to_string(),
                // Readers of the loop's own stdin, exact or to its end.
                9 => format!("head -c {}; echo", self.range(1, 12)),
                10 if self.chance(0.3) => "cat".to_string(),
                1 if c == Content::Nums => "expr \"$x\" \\* 3".to_string(),
                2 => "/usr/bin/printf '<%s>\\n' \"$x\"".to_string(),
                3 => "echo \"$x\" | tr 0-9a-z 5-90-4n-za-m".to_string(),
                4 => "v=$(/bin/echo \"$x\" | wc -c); echo \"len $v\"".to_string(),
                5 => "sh -c 'echo \"[$1]\"' _ \"$x\"".to_string(),
                6 => "read -r y; /bin/echo \"$x/$y\"".to_string(),
                7 if sh == Sh::Bash => "cat <<< \"$x\"".to_string(),
                8 => self.no_stdin_ext(),
                _ => "echo \"$x\"".to_string(),
            };
            parts.push(p);
        }
        parts.join("; ")
    }

    /// 2-4 stages from a source; the output kept small.
    fn pipeline(
        &mut self,
        sh: Sh,
        src: (String, Flow),
        min_filters: u64,
        show_status: bool,
    ) -> Pipe {
        let (s, flow) = src;
        let mut p = Pipe {
            stages: vec![s],
            flow,
            sure: true,
            no_cut: false,
        };
        let n = self.range(min_filters, 3);
        for i in 0..n {
            // An endless stream must be cut by the end.
            let must_cut = p.flow.endless && i + 1 == n;
            if must_cut {
                let k = self.range(1, 5000);
                p.stages.push(format!("head -n {k}"));
                p.flow = Flow::new(Content::Text, k, k * 8);
            } else {
                // With pipefail or a status shown, a finite stream is never cut.
                let cut = p.flow.endless || !(show_status || self.pipefail);
                self.filter(&mut p, sh, cut);
            }
        }
        if p.flow.endless {
            p.stages.push(format!("head -n {}", self.range(1, 3000)));
            p.flow = Flow::small(3000);
        }
        if p.flow.bytes > 300_000 {
            let r = self.pick(&["md5sum", "wc -c", "tail -n 3", "cksum"]);
            p.stages.push(r.into());
            p.flow = Flow::small(3);
        }
        p
    }

    fn pipeline_stmt(&mut self, sh: Sh) -> String {
        self.feat("pipeline");
        let show = sh == Sh::Bash && self.chance(0.25);
        let src = self.source(sh);
        let p = self.pipeline(sh, src, 1, show);
        let mut s = p.stages.join(" | ");
        if show && p.sure {
            self.feat("pipestatus");
            s.push_str("\necho \"ps=${PIPESTATUS[*]}\"");
        }
        self.with_rc(s)
    }

    /// After a pipeline: what its `tee` wrote.
    fn read_back_tee(&mut self) -> String {
        let mut s = String::new();
        for (name, f) in std::mem::take(&mut self.tees) {
            if f.bytes > 100_000 || f.content == Content::Bin {
                s.push_str(&format!("\nmd5sum < {name}"));
            } else {
                s.push_str(&format!("\ncat {name}"));
            }
        }
        s
    }

    /// A `while read` loop at the top, from a pipe, a file or a here-doc.
    fn loop_stmt(&mut self, sh: Sh) -> String {
        self.feat("while-read");
        let n = self.range(1, LOOP_LINES);
        let c = if self.chance(0.5) {
            Content::Nums
        } else {
            Content::Text
        };
        let body = self.loop_body(c, sh);
        let src = if c == Content::Nums {
            format!("seq {n}")
        } else {
            format!("head -n {n} \"$DT_DATA/text\"")
        };
        let s = match self.range(0, 3) {
            0 => format!("{src} | while read -r x; do {body}; done"),
            1 => {
                self.feat("file-stdin");
                let f = self.new_file("in");
                format!("{src} > {f}\nwhile read -r x; do {body}; done < {f}\necho after")
            }
            2 => format!(
                "{src} | while read -r x; do {body}; done | {}",
                self.pick_tail()
            ),
            _ => {
                self.feat("heredoc");
                let lines: Vec<String> = (1..=n.min(8))
                    .map(|i| match c {
                        Content::Nums => format!("{i}"),
                        _ => format!("{} {i}", self.word()),
                    })
                    .collect();
                format!(
                    "while read -r x; do {body}; done <<EOF\n{}\nEOF",
                    lines.join("\n")
                )
            }
        };
        self.with_rc(s)
    }

    fn pick_tail(&mut self) -> String {
        (self.pick(&["cat", "wc -l", "sort", "md5sum", "tail -n 5", "tr a-z A-Z"])).into()
    }

    fn group_stmt(&mut self, sh: Sh) -> String {
        self.feat("group");
        let src = self.source(sh);
        let f = src.1;
        let (g, _) = self.group_stage(f, sh);
        let mut s = format!("{} | {g}", src.0);
        if f.endless {
            // The group cuts with head -n: fine for an endless producer.
        } else if f.bytes > 300_000 {
            s.push_str(" | tail -c 300");
        }
        if self.chance(0.3) {
            s = format!("{s} | {}", self.pick_tail());
        }
        self.with_rc(s)
    }

    fn heredoc_stmt(&mut self, sh: Sh) -> String {
        self.feat("heredoc");
        // 2-4 use here-strings: bash only.
        let k = if sh == Sh::Bash {
            self.range(0, 5)
        } else {
            self.pick(&[0, 1, 5])
        };
        match k {
            0 => {
                let (s, _) = self.heredoc_source(sh);
                format!("{s} | {}", self.pick_tail())
            }
            1 => {
                // A here-doc read by a group: exact readers, then the rest.
                let n = self.range(2, 6);
                let lines: Vec<String> = (0..n).map(|i| format!("{} {i}", self.word())).collect();
                format!(
                    "{{ read -r first; /bin/echo \"first: $first\"; sh -c 'read -r l; echo \"second: $l\"'; cat; }} <<EOF\n{}\nEOF",
                    lines.join("\n")
                )
            }
            2 => {
                self.feat("herestring");
                format!(
                    "tr a-z A-Z <<< {}",
                    sq(&format!("{} {}", self.word(), self.word()))
                )
            }
            3 => {
                self.feat("herestring");
                "read -r a b c <<< \"1 2 3 4\"; /bin/echo \"$c,$b,$a\"".into()
            }
            4 => {
                self.feat("herestring");
                let v = self.range(1, 200);
                format!("v=$(seq {v}); wc -l <<< \"$v\"; md5sum <<< \"$v\"")
            }
            _ => {
                let f = self.new_file("doc");
                format!(
                    "cat > {f} <<'END'\n$literal `x`\n\\n {}\nEND\ncat {f}",
                    self.word()
                )
            }
        }
    }

    fn redirect_stmt(&mut self) -> String {
        self.feat("redirect");
        let f = self.new_file("out");
        let w = self.word();
        let s = match self.range(0, 6) {
            0 => format!("/bin/echo {w} > {f}; seq 3 >> {f}; /bin/echo end >> {f}; cat {f}"),
            1 => {
                format!("{{ /bin/echo out1; ls -d /nonexistent-{w}; /bin/echo out2; }} 2>&1 | cat")
            }
            2 => "sh -c 'echo to-out; echo to-err >&2; echo again' 2>&1 | tr a-z A-Z".to_string(),
            3 => format!("cat /nonexistent-{w} 2>/dev/null; echo \"rc=$?\""),
            4 => {
                format!("( exec > {f}; /bin/echo a; sh -c 'echo b'; echo c ); wc -l < {f}; cat {f}")
            }
            5 => format!(
                "seq 5 > {f}; tr 0-9 a-j < {f} > {f}.t; cat {f}.t; sort -r < {f} | head -n 2"
            ),
            _ => format!("{{ /bin/echo x; /bin/echo y >&2; }} > {f} 2>&1; cat {f}"),
        };
        s
    }

    /// Jobs in the background writing their own files, then wait and cat.
    fn background_stmt(&mut self, sh: Sh) -> String {
        self.feat("background");
        let n = self.range(1, 3);
        let mut lines = Vec::new();
        let mut files = Vec::new();
        for _ in 0..n {
            let f = self.new_file("job");
            let src = self.source(sh);
            let p = self.pipeline(sh, src, 0, false);
            let job = p.stages.join(" | ");
            let job = if p.stages.len() > 1 || self.chance(0.3) {
                format!("( {job} ) > {f} &")
            } else {
                format!("{job} > {f} &")
            };
            lines.push(job);
            files.push(f);
        }
        if self.chance(0.5) {
            lines.push("/bin/echo started".into());
        }
        if self.chance(0.4) {
            lines.push("sleep 0.1 & p=$!".into());
            lines.push("wait $p; echo \"sleep rc=$?\"".into());
        }
        lines.push("wait".into());
        lines.push(format!("cat {}", files.join(" ")));
        lines.join("\n")
    }

    fn subst_stmt(&mut self, sh: Sh) -> String {
        self.feat("cmd-subst");
        match self.range(0, 4) {
            0 => {
                let src = self.source(sh);
                let p = self.pipeline(sh, src, 0, false);
                format!(
                    "v=$({})\n/bin/echo \"len=${{#v}}\"\nprintf '%s\\n' \"$v\" | {}",
                    p.stages.join(" | "),
                    self.pick_tail()
                )
            }
            1 => format!(
                "for w in $(seq {}); do /bin/echo \"w$w\"; done",
                self.range(1, 12)
            ),
            2 => "echo \"nested $(echo $(seq 3) | tr ' ' +) $(expr 6 \\* 7)\"".into(),
            3 => format!(
                "n=$(head -n {} \"$DT_DATA/text\" | wc -l); /bin/echo \"n=$n\"",
                self.range(1, 9000)
            ),
            _ => "a=$(sh -c 'echo inner; exit 3'); echo \"a=$a rc=$?\"".into(),
        }
    }

    /// A statement run by an inner `sh -c` or `bash -c`.
    fn nested_stmt(&mut self, depth: u32) -> String {
        self.feat("nested-shell");
        let bash = self.chance(0.5);
        let inner = self.stmt(if bash { Sh::Bash } else { Sh::Posix }, depth + 1);
        let inner = if self.chance(0.3) {
            format!("{inner}\nexit {}", self.range(0, 5))
        } else {
            inner
        };
        let s = if bash {
            format!("bash -c {} nested-{depth}", sq(&inner))
        } else {
            format!("sh -c {}", sq(&inner))
        };
        let s = if self.chance(0.3) {
            format!("{s} | {}", self.pick_tail())
        } else {
            s
        };
        self.with_rc(s)
    }

    fn status_stmt(&mut self, sh: Sh) -> String {
        self.feat("exit-status");
        let s = match self.range(0, 7) {
            0 => "false; echo \"rc=$?\"".to_string(),
            1 => format!("(exit {}); echo \"rc=$?\"", self.range(0, 255)),
            2 => format!("sh -c 'exit {}'; echo \"rc=$?\"", self.range(0, 255)),
            3 => "sh -c 'kill -TERM $$'; echo \"rc=$?\"".to_string(),
            4 => "! /bin/true; echo \"rc=$?\"".to_string(),
            5 => format!(
                "if seq 20 | grep -q {}; then /bin/echo found; else /bin/echo missing; fi",
                self.range(0, 40)
            ),
            6 if sh == Sh::Bash => {
                self.feat("pipestatus");
                format!(
                    "/bin/false | sh -c 'cat; exit {}' | /bin/true; echo \"ps=${{PIPESTATUS[*]}}\"",
                    self.range(0, 9)
                )
            }
            _ => "/bin/true && /bin/echo and || /bin/echo or".to_string(),
        };
        s
    }

    fn cprog_stmt(&mut self) -> String {
        match self.range(0, 4) {
            0 => {
                self.feat("system");
                let cmds = [
                    "echo from-system",
                    "seq 4 | tr 1-4 a-d",
                    "exit 3",
                    "kill -TERM $$",
                    "/bin/echo x | wc -c",
                ];
                let n = self.range(1, 3);
                let chosen: Vec<String> = (0..n).map(|_| sq(self.pick(&cmds))).collect();
                format!("\"$DT_BIN/spawnkit\" system {}", chosen.join(" "))
            }
            1 => {
                self.feat("popen");
                let c = self.pick(&[
                    "seq 30 | tail -n 4",
                    "ls -d / /nonexistent 2>&1; exit 2",
                    "cat \"$DT_DATA/words\" | wc -l",
                ]);
                format!("\"$DT_BIN/spawnkit\" popen-r {}", sq(c))
            }
            2 => {
                self.feat("spawn");
                let m = self.pick(&["fork", "vfork", "spawn"]);
                format!(
                    "\"$DT_BIN/spawnkit\" run {m} sh -c 'echo \"$0 ran\"; exit {}'",
                    self.range(0, 5)
                )
            }
            3 => {
                self.feat("cloexec-chain");
                let n = self.range(1, 2000);
                format!("seq {n} | \"$DT_BIN/spawnkit\" chain 'wc -l' 'tr a-z A-Z'")
            }
            _ => {
                self.feat("popen");
                format!(
                    "head -n {} \"$DT_DATA/text\" | \"$DT_BIN/spawnkit\" popen-w 'sort | uniq -c | sort -rn | head -n 3'",
                    self.range(1, 3000)
                )
            }
        }
    }

    fn python_stmt(&mut self) -> String {
        self.feat("python");
        let f = self.new_file("py");
        let n = self.range(1, 3000);
        let cmd = self.pick(&["sort", "tr a-z A-Z", "md5sum", "wc -l", "cat"]);
        let argv: Vec<String> = cmd.split(' ').map(|w| format!("{w:?}")).collect();
        let argv = argv.join(", ");
        let (prog, stdin) = match self.range(0, 7) {
            0 => (
                format!(
                    "import subprocess, sys\ndata = sys.stdin.buffer.read()\nr = subprocess.run([{argv}], input=data, stdout=subprocess.PIPE)\nsys.stdout.buffer.write(r.stdout)\nprint(\"rc\", r.returncode)"
                ),
                true,
            ),
            1 => (
                format!(
                    "import subprocess, sys\np = subprocess.Popen([{argv}], stdin=subprocess.PIPE, stdout=subprocess.PIPE)\nout, _ = p.communicate(b\"\".join(b\"%d {}\\n\" % i for i in range({n})))\nsys.stdout.buffer.write(out)\nprint(\"rc\", p.returncode)",
                    self.word()
                ),
                false,
            ),
            2 => (
                format!(
                    "import os\nf = os.popen(\"seq {n} | tail -n 3\")\nprint(f.read(), end=\"\")\nprint(\"close\", f.close())\nprint(\"close2\", os.popen(\"exit 3\").close())"
                ),
                false,
            ),
            3 => (
                "import os, sys\nprint(\"before\", flush=True)\nrc = os.system(\"echo from-system; exit 3\")\nprint(\"system\", os.waitstatus_to_exitcode(rc))".to_string(),
                false,
            ),
            4 => (
                format!(
                    "import subprocess\np1 = subprocess.Popen([\"seq\", \"{n}\"], stdout=subprocess.PIPE)\np2 = subprocess.Popen([\"md5sum\"], stdin=p1.stdout, stdout=subprocess.PIPE)\np1.stdout.close()\nout = p2.communicate()[0]\nprint(out.decode().split()[0], p1.wait(), p2.returncode)"
                ),
                false,
            ),
            5 => (
                format!(
                    "import subprocess\np = subprocess.Popen([\"seq\", \"{n}\"], stdout=subprocess.PIPE, text=True)\ntotal = sum(int(l) for l in p.stdout)\nprint(total, p.wait())"
                ),
                false,
            ),
            6 => (
                format!(
                    "import subprocess, sys\nout = subprocess.check_output(\"seq {n} | {cmd}\", shell=True)\nsys.stdout.buffer.write(out)\nsys.stdout.flush()\nprint(\"call\", subprocess.call([\"/bin/echo\", \"called\"]))"
                ),
                false,
            ),
            _ => (
                "import subprocess, sys\nfor line in sys.stdin:\n    r = subprocess.run([\"/bin/echo\", line.strip()], capture_output=True, text=True)\n    print(r.stdout.strip().upper())".to_string(),
                true,
            ),
        };
        let run = if stdin {
            let src = if self.chance(0.5) {
                format!("seq {}", self.range(1, LOOP_LINES))
            } else {
                format!("head -n {} \"$DT_DATA/words\"", self.range(1, LOOP_LINES))
            };
            format!("{src} | /usr/bin/python3 {f}")
        } else {
            format!("/usr/bin/python3 {f}")
        };
        let run = if self.chance(0.3) {
            format!("{run} | {}", self.pick_tail())
        } else {
            run
        };
        self.with_rc(format!("cat > {f} <<'PY'\n{prog}\nPY\n{run}"))
    }

    /// A file as shared stdin: `head -n` seeks back on files.
    fn file_stdin_stmt(&mut self) -> String {
        self.feat("file-stdin");
        let f = self.new_file("data");
        let n = self.range(3, 400);
        let k = self.range(1, 5);
        let mid = self.no_stdin_ext();
        let s = match self.range(0, 3) {
            0 => format!("seq {n} > {f}\n{{ head -n {k}; /bin/echo --; cat | wc -l; }} < {f}"),
            1 => format!("seq {n} > {f}\n{{ read -r a; read -r b; {mid}; /bin/echo \"$a $b\"; tail -n 2; }} < {f}"),
            2 => format!(
                "head -n {n} \"$DT_DATA/text\" > {f}\n( head -n {k} > /dev/null; sh -c 'read -r l; echo \"next: $l\"'; md5sum ) < {f}"
            ),
            _ => format!(
                "seq {n} > {f}\nwhile read -r x; do [ \"$x\" -ge {k} ] && break; done < {f}\n/bin/echo \"stopped\"; cat < {f} | wc -l"
            ),
        };
        s
    }

    /// An fd above 2 given to programs: `3>file` then `>&3`.
    fn fd3_stmt(&mut self) -> String {
        self.feat("fd3");
        let f = self.new_file("fd");
        let s = match self.range(0, 2) {
            0 => format!("exec 3>{f}\n/bin/echo one >&3\nsh -c 'echo two >&3'\nexec 3>&-\ncat {f}"),
            1 => format!("{{ /bin/echo a; /bin/echo b >&3; sh -c 'echo c >&3'; }} 3>{f}\ncat {f}"),
            _ => format!("sh -c 'seq 3 >&3; echo out' 3>{f}; cat {f}"),
        };
        s
    }

    /// A statement that lasts a second or more: a slow producer feeding a
    /// loop, a pipeline or a group.
    fn slow_stmt(&mut self) -> String {
        let (src, f) = self.slow_source();
        match self.range(0, 4) {
            0 => {
                self.feat("while-read");
                let body = self.loop_body(Content::Text, Sh::Bash);
                format!("{src} | while read -r x; do {body}; done")
            }
            1 => {
                let mut p = Pipe {
                    stages: vec![src],
                    flow: f,
                    sure: true,
                    no_cut: false,
                };
                let n = self.range(1, 3);
                for _ in 0..n {
                    self.filter(&mut p, Sh::Bash, false);
                }
                p.stages.join(" | ")
            }
            2 => {
                self.feat("group");
                let (g, _) = self.group_stage(f, Sh::Bash);
                format!("{src} | {g}")
            }
            3 => {
                self.feat("background");
                let j = self.new_file("job");
                format!("( {src} ) > {j} &\nseq 5 | while read -r x; do /bin/echo \"fg $x\"; sleep 0.05; done\nwait\ncat {j}")
            }
            _ => {
                self.feat("cmd-subst");
                format!("v=$({src} | tr a-z A-Z)\n/bin/echo \"$v\" | tail -n 3")
            }
        }
    }
}
