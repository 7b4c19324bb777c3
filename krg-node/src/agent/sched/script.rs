//! User-supplied placement policies: rhai scripts, compiled once when the
//! policy is set and run for every placement in a sandbox (no file or
//! module access, bounded operations, call depth and sizes), so that a
//! bad script can neither hang nor crash the agent. See
//! docs/architecture/scheduler.md for the interface.

use super::policy::Candidate;
use super::PlaceRequest;
use rhai::{Array, CallFnOptions, Dynamic, Engine, Map, Scope, AST};
use std::fmt;

/// Operations one placement may spend: a runaway script is stopped after
/// about 4 ms in a release build. examples/sched/prefer-idle.rhai spends
/// about 75 per node (37,000 for 500 nodes).
pub const MAX_OPERATIONS: u64 = 100_000;
/// The function a policy must define.
pub const ENTRY: &str = "place";
/// A policy sees at most this many arguments of `argv`...
pub const SCRIPT_ARGS: usize = 64;
/// ...each cut to this many bytes (and `exe` to `PATH_MAX`), so that the
/// request stays far below the script's own size limits.
pub const SCRIPT_ARG_BYTES: usize = 256;
const SCRIPT_EXE_BYTES: usize = 4096;
/// Largest string (or total of the strings in an array or map) a script
/// may build.
const MAX_STRING: usize = 64 * 1024;

/// A compiled user policy.
pub struct Script {
    engine: Engine,
    ast: AST,
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script").finish_non_exhaustive()
    }
}

/// The sandboxed engine every policy runs in.
fn engine() -> Engine {
    let mut e = Engine::new();
    // No `import` of files: the default resolver would read any .rhai file
    // the agent can read.
    e.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    e.disable_symbol("eval");
    e.set_max_operations(MAX_OPERATIONS);
    e.set_max_call_levels(32);
    e.set_max_expr_depths(64, 32);
    e.set_max_string_size(MAX_STRING);
    e.set_max_array_size(10_000);
    e.set_max_map_size(10_000);
    e.set_max_variables(1_000);
    e.set_max_modules(0);
    e.on_print(|s| tracing::info!("sched script: {s}"));
    e.on_debug(|s, _, pos| tracing::info!("sched script ({pos}): {s}"));
    e
}

impl Script {
    /// Compile a policy; the error says where it fails.
    pub fn compile(source: &str) -> Result<Script, String> {
        let engine = engine();
        let ast = engine.compile(source).map_err(|e| e.to_string())?;
        let found = ast
            .iter_functions()
            .find(|f| f.name == ENTRY && f.params.len() == 2);
        if found.is_none() {
            let other = ast
                .iter_functions()
                .find(|f| f.name == ENTRY)
                .map(|f| format!(" (it takes {} parameters)", f.params.len()))
                .unwrap_or_default();
            return Err(format!(
                "it must define `fn {ENTRY}(nodes, req)` returning a node id{other}"
            ));
        }
        Ok(Script { engine, ast })
    }

    /// Run the policy's `place(nodes, req)`; the id it returns, or why
    /// there is none. The caller checks the id is a candidate.
    pub fn place(&self, nodes: &[Candidate], req: &PlaceRequest) -> Result<u32, String> {
        let arr: Array = nodes.iter().map(node_map).collect();
        let mut r = Map::new();
        r.insert("origin".into(), Dynamic::from_int(req.origin_node as i64));
        r.insert("uid".into(), Dynamic::from_int(req.uid as i64));
        r.insert(
            "exe".into(),
            Dynamic::from(cut(&req.exe, SCRIPT_EXE_BYTES).to_string()),
        );
        let argv: Array = req
            .argv
            .iter()
            .take(SCRIPT_ARGS)
            .map(|a| Dynamic::from(cut(a, SCRIPT_ARG_BYTES).to_string()))
            .collect();
        r.insert("argv".into(), Dynamic::from_array(argv));
        let mut scope = Scope::new();
        // Only the functions count: top-level statements are not run for
        // each placement.
        let opts = CallFnOptions::new().eval_ast(false);
        let out: Dynamic = self
            .engine
            .call_fn_with_options(
                opts,
                &mut scope,
                &self.ast,
                ENTRY,
                (Dynamic::from_array(arr), Dynamic::from_map(r)),
            )
            .map_err(|e| e.to_string())?;
        let t = out.type_name();
        let id = out
            .as_int()
            .map_err(|_| format!("`{ENTRY}` returned a {t}, not a node id"))?;
        u32::try_from(id).map_err(|_| format!("`{ENTRY}` returned {id}, not a node id"))
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn node_map(c: &Candidate) -> Dynamic {
    let s = &c.status;
    let mut m = Map::new();
    m.insert("id".into(), Dynamic::from_int(s.id as i64));
    m.insert("cpus".into(), Dynamic::from_float(s.cpus));
    m.insert("load".into(), Dynamic::from_float(s.load));
    m.insert(
        "mem_total_kb".into(),
        Dynamic::from_int(i64::try_from(s.mem_total_kb).unwrap_or(i64::MAX)),
    );
    m.insert(
        "mem_free_kb".into(),
        Dynamic::from_int(i64::try_from(s.mem_free_kb).unwrap_or(i64::MAX)),
    );
    m.insert("processes".into(), Dynamic::from_int(s.processes as i64));
    m.insert("recent".into(), Dynamic::from_int(c.recent as i64));
    Dynamic::from_map(m)
}

#[cfg(test)]
mod tests {
    use super::super::policy::tests::node;
    use super::*;
    use std::time::{Duration, Instant};

    fn req() -> PlaceRequest {
        PlaceRequest {
            origin_node: 2,
            uid: 1000,
            exe: "/usr/bin/sha256sum".into(),
            argv: vec!["sha256sum".into(), "big".into()],
            pinned: None,
        }
    }

    fn nodes() -> Vec<Candidate> {
        let mut v: Vec<Candidate> = (1..=4).map(|i| node(i, 1.0, 0.0, 4096, 0)).collect();
        v[0].status.load = 0.9;
        v[3].recent = 2;
        v
    }

    #[test]
    fn a_script_sees_nodes_and_request() {
        let s = Script::compile(
            r#"
            fn place(nodes, req) {
                if req.uid != 1000 || req.exe != "/usr/bin/sha256sum" || req.argv[1] != "big" {
                    return 0;
                }
                // The last node has recent placements; pick the node with
                // the highest id among those without any.
                let best = 0;
                for n in nodes {
                    if n.recent == 0 && n.id > best && n.cpus == 1.0 && n.mem_free_kb > 0 {
                        best = n.id;
                    }
                }
                best
            }
            "#,
        )
        .unwrap();
        assert_eq!(s.place(&nodes(), &req()), Ok(3));
    }

    #[test]
    fn shipped_examples_compile_and_decide() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sched");
        let mut seen = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "rhai") {
                let src = std::fs::read_to_string(&p).unwrap();
                let s = Script::compile(&src).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                let id = s.place(&nodes(), &req()).unwrap();
                assert!((1..=4).contains(&id), "{}: {id}", p.display());
                seen += 1;
            }
        }
        assert!(seen >= 1);
    }

    #[test]
    fn compile_errors_say_where() {
        let e = Script::compile("fn place(nodes, req) { let x = ; }").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let e = Script::compile("fn choose(nodes, req) { 1 }").unwrap_err();
        assert!(e.contains("fn place(nodes, req)"), "{e}");
        let e = Script::compile("fn place(nodes) { 1 }").unwrap_err();
        assert!(e.contains("1 parameters"), "{e}");
    }

    #[test]
    fn runtime_errors_are_errors() {
        let s = Script::compile("fn place(nodes, req) { nodes[10].id }").unwrap();
        assert!(s.place(&nodes(), &req()).is_err());
        let s = Script::compile(r#"fn place(nodes, req) { "two" }"#).unwrap();
        let e = s.place(&nodes(), &req()).unwrap_err();
        assert!(e.contains("not a node id"), "{e}");
        let s = Script::compile("fn place(nodes, req) { -1 }").unwrap();
        assert!(s.place(&nodes(), &req()).is_err());
        let s = Script::compile("fn place(nodes, req) { throw \"no\" }").unwrap();
        assert!(s.place(&nodes(), &req()).is_err());
    }

    #[test]
    fn an_endless_script_is_stopped_quickly() {
        for src in [
            "fn place(nodes, req) { loop { } }",
            "fn place(nodes, req) { let s = \"x\"; loop { s += s; } }",
            "fn f(n) { f(n + 1) } fn place(nodes, req) { f(0) }",
        ] {
            let s = Script::compile(src).unwrap();
            let t = Instant::now();
            let e = s.place(&nodes(), &req()).unwrap_err();
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "{src}: {:?}",
                t.elapsed()
            );
            assert!(!e.is_empty());
        }
    }

    #[test]
    fn long_command_lines_are_cut_not_refused() {
        let s = Script::compile(
            "fn place(nodes, req) { let a = req.argv; a.len() * 1000 + a[1].len() + req.exe.len() }",
        )
        .unwrap();
        let mut r = req();
        r.exe = "/".repeat(10_000);
        r.argv = vec!["y".repeat(200_000); 1000];
        assert_eq!(
            s.place(&nodes(), &r),
            Ok((SCRIPT_ARGS * 1000 + SCRIPT_ARG_BYTES + SCRIPT_EXE_BYTES) as u32)
        );
        r.argv[1] = format!("x{}", "é".repeat(200));
        let s = Script::compile("fn place(nodes, req) { req.argv[1].len() }").unwrap();
        // Cut on a character boundary: 1 + 127 two-byte characters (rhai
        // counts characters).
        assert_eq!(s.place(&nodes(), &r), Ok(128));
    }

    #[test]
    fn no_modules_no_eval() {
        let s =
            Script::compile(r#"fn place(nodes, req) { import "/etc/hostname" as m; 1 }"#).unwrap();
        assert!(s.place(&nodes(), &req()).is_err());
        assert!(Script::compile(r#"fn place(nodes, req) { eval("1") }"#).is_err());
    }
}
