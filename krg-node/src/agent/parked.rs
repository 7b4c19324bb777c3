//! Connections kept open for a checkpointed process (see
//! docs/architecture/checkpoint.md, "Connections in an image").
//!
//! A process checkpointed with `--kill` whose fds lead to other processes
//! (a TCP or UNIX connection, a listener, a pipe) parks each here before it
//! is killed: the agent holds a copy (`pidfd_getfd`), so the other end sees
//! neither EOF nor a reset and waits, as for a stopped process; what was in
//! flight stays in the socket or pipe itself. The restore of the image on
//! this node takes the very same kernel objects back.

use super::{err, Agent, Caller};
use libkrg::proto::{ErrorReply, Response};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

/// The parks of this node: id -> (owner uid, the fd).
#[derive(Debug, Default)]
pub struct Parked(Mutex<HashMap<i32, (u32, OwnedFd)>>);

impl Parked {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i32, (u32, OwnedFd)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many fds are parked here.
    pub fn count(&self) -> usize {
        self.map().len()
    }
}

/// A copy of fd `fd` of kernel pid `pid`.
fn take(pid: i32, fd: i32) -> Result<OwnedFd, ErrorReply> {
    let e = |what: &str| {
        err(
            libc::EBADF,
            format!(
                "parking fd {fd} of kernel pid {pid}: {what}: {}",
                std::io::Error::last_os_error()
            ),
        )
    };
    // SAFETY: pidfd_open of a pid (no memory passed); the result is ours.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(e("pidfd_open"));
    }
    // SAFETY: the pidfd was just opened and is ours alone.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: copies fd `fd` of that process into ours (close-on-exec).
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(e("pidfd_getfd"));
    }
    // SAFETY: as above: the new fd is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

impl Agent {
    /// `Park`: keep a copy of the caller's fd `fd` until `Unpark`.
    pub(super) fn park(&self, who: Caller, fd: i32) -> Result<Response, ErrorReply> {
        if who.pid <= 0 {
            return Err(err(
                libc::EPERM,
                "caller is not visible in this node's pid namespace",
            ));
        }
        let f = take(who.pid, fd)?;
        let mut m = self.parked.map();
        let id = loop {
            let id = (rand::random::<u32>() >> 1) as i32;
            if id != 0 && !m.contains_key(&id) {
                break id;
            }
        };
        m.insert(id, (who.uid, f));
        tracing::info!(
            "kernel pid {}: fd {fd} parked here as {id} for its restart",
            who.pid
        );
        Ok(Response::Id(id))
    }

    /// `Unpark`: the fd parked as `id`, to its owner (or root).
    pub(super) fn unpark(
        &self,
        who: Caller,
        id: i32,
    ) -> Result<(Response, Vec<OwnedFd>), ErrorReply> {
        let mut m = self.parked.map();
        match m.get(&id) {
            None => Err(err(
                libc::ENOENT,
                format!(
                    "node {}: nothing is parked as {id} (restarted already, or the agent restarted)",
                    self.node_id()
                ),
            )),
            Some((uid, _)) if who.uid != 0 && who.uid != *uid => Err(err(
                libc::EPERM,
                format!("node {}: park {id} is another user's", self.node_id()),
            )),
            Some(_) => {
                let (_, f) = m.remove(&id).expect("checked above");
                Ok((Response::StreamFd, vec![f]))
            }
        }
    }
}
