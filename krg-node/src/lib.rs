//! krg-node: the agent (`krg-node`), the user command (`krg`) and the local
//! cluster that runs several agents on one machine.
//!
//! `unsafe` is fenced: allowed only in the `sys` modules (this crate's,
//! `agent::sys` and `cluster::sys`), as small safe wrappers.

#![deny(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod logging;
pub mod reaper;
#[allow(unsafe_code)]
pub mod sys;
