//! krg-node: the agent (`krg-node`), the user command (`krg`) and the local
//! cluster that runs several agents on one machine.

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod logging;
pub mod reaper;
#[allow(unsafe_code)]
pub mod sys;
