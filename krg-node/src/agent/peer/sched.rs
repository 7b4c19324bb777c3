//! The messages of the cluster scheduler between agents: its policy,
//! versioned (see docs/architecture/scheduler.md).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The version of a policy: when it was set (unix ms), then by which node.
/// Ordered lexicographically; the highest wins everywhere.
#[derive(
    Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default,
)]
pub struct SchedVersion {
    pub ms: u64,
    pub node: u32,
}

impl fmt::Display for SchedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.ms, self.node)
    }
}

/// A policy as it travels between agents.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SchedPolicy {
    /// Built-in name, or the file name of a user policy.
    pub name: String,
    /// The rhai text of a user policy; `None` for a built-in one.
    pub source: Option<String>,
    /// Where a user policy was read from; empty for a built-in one.
    pub origin: String,
    pub version: SchedVersion,
    /// The load-balancing policy (see `agent::balance`): it travels
    /// and is versioned with the placement policy.
    pub balance: String,
}
