//! The agent's local Unix socket: application processes (libkrg) and the
//! `krg` command. Every frame is validated before use; the caller is
//! identified by SO_PEERCRED, never by what it says.

use super::common::Caller;
use super::Agent;
use anyhow::{Context, Result};
use libkrg::frame::{self, MAX_REQUEST};
use libkrg::proto::{ErrorReply, Request, Response};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

/// An idle client connection is closed after this long.
const IDLE: Duration = Duration::from_secs(60);
/// A started frame must be complete within this long.
const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// Bind the local socket (replacing a stale one) and open it to every user:
/// each request is checked against the caller's credentials instead.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()))
        }
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

/// Accept clients forever.
pub async fn serve(agent: Arc<Agent>, l: UnixListener) -> Result<()> {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let a = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = client(a, s).await {
                        debug!("local client: {e}");
                    }
                });
            }
            Err(e) => {
                warn!("accept on local socket: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn reply(s: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    s.write_all(&frame::encode(r)?).await
}

/// Answer a malformed request with an error and end the connection.
async fn refuse(s: &mut UnixStream, who: Caller, e: std::io::Error) -> std::io::Result<()> {
    warn!("local client pid {} uid {}: {e}", who.pid, who.uid);
    let r = Response::Err(ErrorReply::other(
        libc::EINVAL,
        format!("malformed request: {e}"),
    ));
    let _ = reply(s, &r).await;
    Ok(())
}

/// Send descriptors (SCM_RIGHTS) on one byte after an answer that
/// announced them.
async fn send_fds(s: &UnixStream, fds: &[OwnedFd]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    loop {
        s.writable().await?;
        let r = s.try_io(Interest::WRITABLE, || {
            let cmsg = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(
                s.as_raw_fd(),
                &[std::io::IoSlice::new(&[0u8])],
                &cmsg,
                MsgFlags::empty(),
                None,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Once the client has closed its end (it sends nothing while it waits
/// for an answer).
async fn hung_up(s: &UnixStream) {
    loop {
        if s.readable().await.is_err() {
            return;
        }
        let mut b = [0u8; 1];
        match s.try_read(&mut b) {
            // Readiness was stale: wait again.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // End of stream, an error, or bytes it should not have sent.
            _ => return,
        }
    }
}

async fn client(agent: Arc<Agent>, mut s: UnixStream) -> std::io::Result<()> {
    let cred = s.peer_cred()?;
    let who = Caller {
        pid: cred.pid().unwrap_or(0),
        uid: cred.uid(),
        gid: cred.gid(),
    };
    loop {
        let mut len = [0u8; 4];
        match tokio::time::timeout(IDLE, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            // EOF, error or idle: the client is done.
            _ => return Ok(()),
        }
        let n = match frame::check_len(len, MAX_REQUEST) {
            Ok(n) => n,
            Err(e) => return refuse(&mut s, who, e).await,
        };
        let mut body = vec![0u8; n];
        match tokio::time::timeout(FRAME_TIMEOUT, s.read_exact(&mut body)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(
                    "local client pid {}: truncated request ({n} bytes announced): {e}",
                    who.pid
                );
                return Ok(());
            }
            Err(_) => {
                warn!(
                    "local client pid {}: request of {n} bytes not sent in time",
                    who.pid
                );
                return Ok(());
            }
        }
        let req: Request = match frame::decode(&body) {
            Ok(r) => r,
            Err(e) => return refuse(&mut s, who, e).await,
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            // Requests may carry megabytes (a stream's pending bytes).
            let mut t = format!("{req:?}");
            if t.len() > 400 {
                let cut = (0..=400)
                    .rev()
                    .find(|i| t.is_char_boundary(*i))
                    .unwrap_or(0);
                t.truncate(cut);
                t.push_str(" ...");
            }
            debug!("pid {} uid {}: {t}", who.pid, who.uid);
        }
        // A FIFO's open waits for a partner as long as it takes: a client
        // that goes away (killed, interrupted) withdraws from the wait.
        let (r, fds) = if matches!(req, Request::FifoOpen { .. }) {
            tokio::select! {
                r = agent.handle_local(req, who) => r,
                _ = hung_up(&s) => return Ok(()),
            }
        } else {
            agent.handle_local(req, who).await
        };
        reply(&mut s, &r).await?;
        if !fds.is_empty() {
            send_fds(&s, &fds).await?;
        }
    }
}
