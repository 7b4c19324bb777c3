//! `krg checkpoint`, `krg restart`.

use super::agent_call;
use anyhow::{bail, Context, Result};
use libkrg::checkpoint::image;
use libkrg::proto::{RemoteExec, Request, Response, RestartReq};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The expected image size of a process (its resident memory), for the
/// progress display.
fn expected_bytes(pid: i32) -> Option<u64> {
    match agent_call(&Request::Ps).ok()? {
        Response::Ps(v) => v.iter().find(|p| p.pid == pid).map(|p| p.rss_kb * 1024),
        _ => None,
    }
}

/// Run `call` in a thread; on a terminal, show progress meanwhile: bytes
/// of `growing` (a file being written) against `total`, else a spinner.
fn with_progress<T: Send + 'static>(
    what: String,
    total: Option<u64>,
    growing: Option<std::path::PathBuf>,
    call: impl FnOnce() -> T + Send + 'static,
) -> T {
    use std::io::IsTerminal;
    let h = std::thread::spawn(call);
    if !std::io::stderr().is_terminal() {
        return h.join().expect("agent call thread");
    }
    let bar = match (total, &growing) {
        (Some(t), Some(_)) => {
            let b = indicatif::ProgressBar::new(t);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        }
        _ => {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b
        }
    };
    bar.set_message(what);
    while !h.is_finished() {
        if let Some(p) = &growing {
            if let Ok(m) = std::fs::metadata(p) {
                bar.set_position(m.len());
            }
        }
        bar.tick();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bar.finish_and_clear();
    h.join().expect("agent call thread")
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// `krg checkpoint PID [-o DIR] [--kill]`.
pub fn checkpoint(pid: i32, dir: Option<PathBuf>, kill: bool) -> Result<i32> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(format!("ckpt-{pid}")));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{}", dir.display()))?;
    let req = Request::Checkpoint {
        pid,
        dir: dir.as_os_str().as_bytes().to_vec(),
        kill,
    };
    let tmp = dir.join(format!(".{}.tmp", image::IMAGE_FILE));
    let r = with_progress(
        format!("checkpointing pid {pid}"),
        expected_bytes(pid),
        Some(tmp.clone()),
        move || agent_call(&req),
    );
    if !matches!(r, Ok(Response::Ckpt(_))) {
        // A capture that died half-way leaves its partial image behind.
        let _ = std::fs::remove_file(&tmp);
    }
    match r? {
        Response::Ckpt(i) => {
            println!(
                "pid {}: checkpointed on node {} to {} ({} in {} ms){}",
                i.pid,
                i.node,
                dir.display(),
                mib(i.bytes),
                i.ms,
                if kill { ", killed" } else { "" }
            );
            Ok(0)
        }
        Response::Err(e) => bail!("{}", e.msg),
        other => bail!("unexpected answer: {other:?}"),
    }
}

fn image_path(dir: &Path) -> Result<PathBuf> {
    let p = if dir.is_dir() {
        dir.join(image::IMAGE_FILE)
    } else {
        dir.to_path_buf()
    };
    p.canonicalize()
        .with_context(|| format!("no image at {}", p.display()))
}

/// `krg restart DIR [--node N]`: this command becomes the restored
/// process's shadow (its stdio, signals and exit status).
pub fn restart(dir: &Path, node: Option<u32>, quiet: bool) -> Result<i32> {
    let path = image_path(dir)?;
    let mut f = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
    let meta = image::read_meta(&mut f).with_context(|| format!("{}", path.display()))?;
    drop(f);
    let node = match node {
        Some(n) => libkrg::proto::parse_node_pin(&n.to_string())
            .with_context(|| format!("--node {n}: node ids are 1..={}", libkrg::gpid::MAX_NODE))?,
        None => 0,
    };
    let image = path.as_os_str().as_bytes().to_vec();
    // Connections parked by the checkpoint: restored where they wait.
    let parked_on = meta
        .fds
        .iter()
        .find_map(|f| match f.kind {
            image::FdKind::Parked { node, .. } => Some(node),
            _ => None,
        })
        .unwrap_or(0);
    // The shadow relays the program's output: a reader that goes away is
    // an EPIPE it passes on to the program, not a signal that ends it.
    let _ = crate::sys::ignore_signal(nix::sys::signal::Signal::SIGPIPE);
    let err = libkrg::distant::shadow_for(
        |port, token, stdio| {
            Request::Restart(RestartReq {
                image,
                node,
                parked_on,
                gpid: meta.gpid,
                caps: meta.caps,
                uid: meta.uid,
                gid: meta.gid,
                groups: meta.groups.clone(),
                exec: RemoteExec {
                    node,
                    exe: meta.exe.clone(),
                    argv: meta.argv.clone(),
                    env: meta.env.clone(),
                    cwd: meta.cwd.clone(),
                    umask: meta.umask,
                    rlimits: meta.rlimits.clone(),
                    stdio,
                    port,
                    token,
                    restore: false,
                    // The image puts back every disposition.
                    ignored: 0,
                },
            })
        },
        |g, n| {
            if !quiet {
                eprintln!("krg: pid {g} restarted on node {n}");
            }
        },
    );
    match err {
        Ok(never) => match never {},
        Err(e) => bail!("restart of {}: {e}", path.display()),
    }
}

/// `krg migrate PID NODE`.
pub fn migrate(pid: i32, node: u32, precopy: bool) -> Result<i32> {
    let node = libkrg::proto::parse_node_pin(&node.to_string())
        .with_context(|| format!("node {node}: node ids are 1..={}", libkrg::gpid::MAX_NODE))?;
    let r = with_progress(
        format!(
            "migrating pid {pid} to node {node}{}",
            expected_bytes(pid)
                .map(|b| format!(" ({})", mib(b)))
                .unwrap_or_default()
        ),
        None,
        None,
        move || agent_call(&Request::Migrate { pid, node, precopy }),
    )?;
    match r {
        Response::Ckpt(i) => {
            println!(
                "pid {}: migrated to node {} ({} in {} ms{})",
                i.pid,
                i.node,
                mib(i.bytes),
                i.ms,
                if i.postcopy {
                    ", post-copy: every page in"
                } else {
                    ""
                }
            );
            Ok(0)
        }
        Response::Err(e) => bail!("{}", e.msg),
        other => bail!("unexpected answer: {other:?}"),
    }
}
