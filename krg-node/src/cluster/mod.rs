//! The local cluster: N krg agents on this one machine, each a separate host
//! (own network, pid and mount namespaces, own cgroup with a CPU quota).
//! `krg cluster up|down|list|exec`. See docs/architecture/local-cluster.md.

use anyhow::Result;

/// Options of `krg cluster up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: u32,
    /// CPU capacity of each node (cgroup v1 quota); fractions allowed.
    pub cpus: f64,
}

pub fn up(_opts: &UpOptions) -> Result<()> {
    anyhow::bail!("krg cluster up: not built yet")
}

pub fn down() -> Result<()> {
    anyhow::bail!("krg cluster down: not built yet")
}

pub fn list() -> Result<()> {
    anyhow::bail!("krg cluster list: not built yet")
}

/// Run `cmd` on node `node` as an SSI process; returns the exit code to use.
pub fn exec(_node: u32, _cmd: &[String]) -> Result<i32> {
    anyhow::bail!("krg cluster exec: not built yet")
}
