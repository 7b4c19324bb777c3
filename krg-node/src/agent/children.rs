//! The children of a migrated process, the agent's side (see libkrg's
//! `checkpoint::children` and docs/architecture/checkpoint.md, "A parent
//! and its children").
//!
//! The source agent lists the mover's children (by gpid) in the spawn
//! request; the target lets the restored process start a child shadow for
//! each of them, and no other. A shadow reports each kernel child that
//! ends (`ChildExited`); the report goes to the node its program went to,
//! whose child shadow for that gpid ends the same way. A report that comes
//! before its child shadow waits for it.

use super::common::lock;
use super::common::{err, Caller, Handled};
use super::node::Node;
use libkrg::proto::{ErrorReply, Request, Response};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Ends reported before their child shadow asked (bounded: a report whose
/// child shadow never comes must not stay forever).
const MAX_EARLY: usize = 4096;

/// What is known here of the end of a child that runs elsewhere.
#[derive(Debug)]
enum End {
    /// Reported: its wait status.
    Ended(i32),
    /// Its child shadows here wait (several when the parent came back).
    Awaited(Vec<tokio::sync::oneshot::Sender<i32>>),
}

/// The ends of children that run elsewhere, for their child shadows here.
#[derive(Debug)]
pub struct Children {
    node: Arc<Node>,
    /// Child ends by gpid.
    ends: Mutex<HashMap<i32, End>>,
}

/// Gpids of the live kernel children of local process `kpid`, or the first
/// that is not an SSI process.
pub(super) fn children_gpids(
    kpid: i32,
    translate: impl Fn(i32) -> Option<i32>,
) -> Result<Vec<i32>, i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{kpid}/task")) else {
        return Ok(out);
    };
    for t in tasks.flatten() {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for k in kids
            .split_whitespace()
            .filter_map(|k| k.parse::<i32>().ok())
        {
            out.push(translate(k).ok_or(k)?);
        }
    }
    Ok(out)
}

/// A local request about the children of a moved process (see
/// `Agent::handle_local`).
pub(super) async fn handle(children: &Arc<Children>, req: Request, who: Caller) -> Handled {
    match req {
        Request::MovedChildren => children.moved_children(who),
        Request::ChildShadow { gpid } => children.child_shadow(who, gpid).await,
        Request::ChildExited { kpid, status } => children.child_exited(who, kpid, status).await,
        other => Err(super::common::misrouted(&other)),
    }
}

impl Children {
    pub fn new(node: Arc<Node>) -> Children {
        Children {
            node,
            ends: Mutex::default(),
        }
    }

    /// `MovedChildren` from a restored process.
    fn moved_children(&self, who: Caller) -> Result<Response, ErrorReply> {
        let t = self.node.procs();
        let p = t
            .translate(who.pid)
            .and_then(|g| t.get(g))
            .ok_or_else(|| err(libc::EPERM, "not an SSI process"))?;
        Ok(Response::Children(p.adopt.clone()))
    }

    /// `ChildShadow`: the caller stands for child `g` of its parent, a
    /// restored process that had that child where it was captured; answered
    /// with the child's wait status once it has ended.
    async fn child_shadow(&self, who: Caller, g: i32) -> Result<Response, ErrorReply> {
        let st = super::procs::table::read_stat(who.pid)
            .ok_or_else(|| err(libc::ESRCH, "caller exited"))?;
        {
            let mut t = self.node.procs();
            let parent = t
                .translate(st.ppid)
                .ok_or_else(|| err(libc::EPERM, "the caller's parent is not an SSI process"))?;
            let (from, caps_eff, caps_inh) = {
                let p = t.get_mut(parent).expect("translated gpid is in the table");
                let Some(i) = p.adopt.iter().position(|c| *c == g) else {
                    return Err(err(
                        libc::EPERM,
                        format!("pid {g} is not a child that pid {parent} brought here"),
                    ));
                };
                p.adopt.remove(i);
                (p.adopt_from, p.caps_eff, p.caps_inh)
            };
            t.child_shadow(who.pid, g, from, (caps_eff, caps_inh), parent)?;
        }
        let rx = {
            let mut e = lock(&self.ends);
            let (tx, rx) = tokio::sync::oneshot::channel();
            match e.remove(&g) {
                Some(End::Ended(status)) => return Ok(Response::WaitStatus(status)),
                // A parent that comes back to a node has a child shadow
                // here already (its shadow's child): both end with the
                // child.
                Some(End::Awaited(mut v)) => {
                    v.retain(|t| !t.is_closed());
                    v.push(tx);
                    e.insert(g, End::Awaited(v));
                }
                None => {
                    e.insert(g, End::Awaited(vec![tx]));
                }
            }
            rx
        };
        let status = rx.await.map_err(|_| {
            err(
                libc::ECONNRESET,
                format!("pid {g}: its end will not be known here"),
            )
        })?;
        Ok(Response::WaitStatus(status))
    }

    /// `ChildExited` from a shadow: its kernel child `kpid` ended. The
    /// report goes where the shadow's program went.
    async fn child_exited(
        &self,
        who: Caller,
        kpid: i32,
        status: i32,
    ) -> Result<Response, ErrorReply> {
        let child = {
            let t = self.node.procs();
            let st = super::procs::table::read_stat(kpid)
                .ok_or_else(|| err(libc::ESRCH, format!("kernel pid {kpid}: no such process")))?;
            if st.ppid != who.pid {
                return Err(err(
                    libc::EPERM,
                    format!("kernel pid {kpid} is not the caller's child"),
                ));
            }
            t.translate(kpid)
                .ok_or_else(|| err(libc::ESRCH, format!("kernel pid {kpid}: no gpid")))?
        };
        // A shadow that has just taken over may report before its
        // migration is recorded as done here.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        let next = loop {
            let next = self.node.procs().next_hop(who.pid);
            match next {
                Some(n) => break n,
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                None => return Err(err(libc::EPERM, "the caller is not a shadow")),
            }
        };
        if next == self.node.node_id() {
            self.child_ended(child, status);
        } else {
            let c = self.node.client(next).await?;
            c.child_exited(super::common::ctx(), child, status)
                .await
                .map_err(|e| {
                    self.node.drop_client(next);
                    err(libc::EHOSTUNREACH, format!("node {next}: {e}"))
                })?;
        }
        tracing::debug!("pid {child} ended ({status:#x}): told node {next}");
        Ok(Response::Ok)
    }

    /// Child `g` ended elsewhere: its child shadow here ends likewise.
    pub(crate) fn child_ended(&self, g: i32, status: i32) {
        let mut e = lock(&self.ends);
        match e.remove(&g) {
            Some(End::Awaited(v)) => {
                for tx in v {
                    let _ = tx.send(status);
                }
            }
            _ => {
                if e.len() >= MAX_EARLY {
                    if let Some(k) = e.keys().next().copied() {
                        e.remove(&k);
                    }
                }
                e.insert(g, End::Ended(status));
            }
        }
    }
}
