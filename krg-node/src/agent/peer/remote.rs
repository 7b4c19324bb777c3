//! The messages of remote exec between agents (see
//! docs/architecture/remote-exec.md).

use libkrg::proto::RemoteExec;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Everything the target node needs to start the program.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SpawnSpec {
    pub gpid: i32,
    /// The node of the shadow (where the parent is).
    pub from: u32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub caps_eff: u32,
    pub caps_inh: u32,
    pub caps_env: Option<String>,
    pub vppid: i32,
    pub vpgid: i32,
    /// What the shadow sent (executable, argv, environment, cwd, umask,
    /// rlimits, stdio, its port and token).
    pub exec: RemoteExec,
    /// The shadow's address (its node's address, the port it listens on).
    pub shadow: SocketAddr,
    /// Restore this image (a path on the target node) instead of running
    /// the program afresh: the executable, argv and environment are the
    /// image's, `KRG_RESTORE` tells libkrg. A `gpid` of 0 then asks for a
    /// new gpid from the target node.
    pub restore: Option<Vec<u8>>,
    /// A migration: the gpids of the mover's children (they stay where
    /// they run; the restored process stands a child shadow for each).
    pub children: Vec<i32>,
}
