//! The messages of System V semaphores between agents: requests to a
//! set's home (see docs/architecture/dsm.md).

use super::dsm::Cred;
use libkrg::proto::SemInfo;
use serde::{Deserialize, Serialize};

/// A request to a semaphore set's home.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum SemHomeOp {
    Get {
        key: i32,
        nsems: i32,
        flags: i32,
        cred: Cred,
    },
    Op {
        semid: i32,
        ops: Vec<(u16, i16, i16)>,
        cred: Cred,
        pid: i32,
        /// Wait at most this long (one round at most).
        wait_ns: u64,
    },
    Ctl {
        semid: i32,
        num: i32,
        cmd: i32,
        val: i32,
        array: Vec<u16>,
        set: Option<(u32, u32, u32)>,
        cred: Cred,
        pid: i32,
    },
    /// Process `pid` exited: apply its SEM_UNDO adjustments.
    Exit { semid: i32, pid: i32 },
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum SemReply {
    Id(i32),
    Info(SemInfo),
    Vals(Vec<u16>),
    Done,
    Pending,
}
