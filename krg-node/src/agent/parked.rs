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
use std::os::fd::OwnedFd;
use std::sync::Mutex;

/// The parks of this node: id -> (owner uid, the fd).
#[derive(Debug, Default)]
pub struct Parked(Mutex<HashMap<i32, (u32, OwnedFd)>>);

impl Parked {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i32, (u32, OwnedFd)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
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
        let f = super::dsm::pidfd_getfd(who.pid, fd).map_err(|e| {
            err(
                libc::EBADF,
                format!("parking fd {fd} of kernel pid {}: {}", who.pid, e.msg),
            )
        })?;
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
