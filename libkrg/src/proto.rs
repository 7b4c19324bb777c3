//! The messages between an application process (or the `krg` command) and
//! its node's agent, over the agent's local Unix socket.
//!
//! Frames are a little-endian `u32` length followed by an rkyv archive of a
//! [`Request`] or [`Response`]; every frame is validated (rkyv `bytecheck`)
//! before use, see [`crate::frame`]. The data types used here are also
//! serde-serialisable because the agents exchange them with each other.

use rkyv::{Archive, Deserialize, Serialize};

/// Bumped whenever a message changes incompatibly.
pub const PROTO_VERSION: u32 = 1;

/// A request to the local agent. The caller's pid, uid and gid come from
/// `SO_PEERCRED`, never from the message.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub enum Request {
    /// Register the calling process, or refresh its entry after `exec`.
    /// `caps_env` is the value of `KRG_CAPS` it started with.
    Hello {
        version: u32,
        caps_env: Option<String>,
    },
    /// The gpid of a local kernel pid that is the caller itself or one of
    /// its children; registers the process if the agent does not know it yet
    /// (a child just created by fork or posix_spawn).
    Ensure { kpid: i32 },
    /// The gpid of a local kernel pid, if it is a registered SSI process.
    /// Answers `Pid(kpid)` unchanged for a process that is not.
    Translate { kpid: i32 },
    /// The local kernel pid of a gpid that runs on this node.
    Resolve { gpid: i32 },
    /// `kill(2)` semantics on gpids: `pid > 0` one process, `pid < -1` the
    /// process group `-pid`. Delivered wherever the targets run.
    Kill { pid: i32, sig: i32 },
    /// Every SSI process of the cluster.
    Ps,
    /// Every node of the cluster.
    Status,
    /// The capabilities of a process.
    CapGet { gpid: i32 },
    /// Change the capabilities of a process: `spec` in `KRG_CAPS` syntax,
    /// applied to the sets selected by `effective` and `inheritable`.
    CapSet {
        gpid: i32,
        spec: String,
        effective: bool,
        inheritable: bool,
    },
}

/// The agent's answer to a [`Request`].
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub enum Response {
    Hello { gpid: i32, node: u32, caps: u32 },
    Pid(i32),
    Ok,
    Err(ErrorReply),
    Ps(Vec<ProcInfo>),
    Status(Vec<NodeStatus>),
    Caps(CapsInfo),
}

/// A failed request: the errno the application should see, and what failed.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct ErrorReply {
    pub errno: i32,
    pub msg: String,
}

/// One SSI process, as `krg ps` shows it.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct ProcInfo {
    pub pid: i32,
    pub node: u32,
    pub ppid: i32,
    pub pgid: i32,
    pub uid: u32,
    pub user: String,
    /// One-letter kernel state (R, S, D, T, Z, ...).
    pub state: String,
    /// CPU use since start, in percent of one CPU (as ps computes it).
    pub cpu: f32,
    pub rss_kb: u64,
    /// User plus system CPU time, in milliseconds.
    pub cpu_time_ms: u64,
    /// Seconds since the process started.
    pub elapsed_s: f64,
    pub command: String,
    pub caps: u32,
}

/// One node, as `krg status` shows it.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct NodeStatus {
    pub id: u32,
    pub address: String,
    /// `true` while the node answers heartbeats.
    pub up: bool,
    /// CPU capacity (the cgroup quota in the local cluster; fractions allowed).
    pub cpus: f64,
    /// Runnable tasks divided by `cpus`, averaged over about a second.
    pub load: f64,
    pub mem_total_kb: u64,
    pub mem_free_kb: u64,
    /// SSI processes running on the node.
    pub processes: u32,
}

/// The capabilities of one process.
#[derive(
    Archive, Serialize, Deserialize, serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq,
)]
pub struct CapsInfo {
    pub gpid: i32,
    pub effective: u32,
    pub inheritable: u32,
}
