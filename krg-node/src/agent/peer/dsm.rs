//! The messages of the shared-memory protocol between agents (see
//! docs/architecture/dsm.md): to a segment's home, and from the home to a
//! node; carried by the shared-memory link (`dsm/link.rs`), and read-ahead
//! requests by tarpc (`Peer::dsm_home`).

use libkrg::proto::{ErrorReply, ShmInfo};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// A request to a segment's home.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum HomeOp {
    Get {
        key: i32,
        size: u64,
        flags: i32,
        cred: Cred,
        pid: i32,
    },
    Open {
        name: String,
        oflag: i32,
        mode: u32,
        size: u64,
        init: Option<ByteBuf>,
        cred: Cred,
        pid: i32,
    },
    Unlink {
        name: String,
        cred: Cred,
    },
    /// May this caller open the object (`want`: rwx bits)? Answered with
    /// its `Info`.
    Check {
        shmid: i32,
        want: u32,
        cred: Cred,
    },
    /// `ftruncate`: grow a POSIX object to `size` bytes.
    Resize {
        shmid: i32,
        size: u64,
        cred: Cred,
    },
    Attach {
        shmid: i32,
        rdonly: bool,
        cred: Cred,
        pid: i32,
        node: u32,
    },
    Detach {
        shmid: i32,
        pid: i32,
        node: u32,
    },
    Ctl {
        shmid: i32,
        cmd: i32,
        set: Option<(u32, u32, u32)>,
        cred: Cred,
    },
    /// `node` reads ahead: read copies of these pages, those the home can
    /// give (`Grants`).
    AcquireRead {
        shmid: i32,
        pages: Vec<u32>,
        node: u32,
    },
    /// `node` wants page `page` readable (or writable): answered with the
    /// page (`Grant`).
    Acquire {
        shmid: i32,
        page: u32,
        node: u32,
        write: bool,
    },
    List,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum HomeReply {
    Id(i32),
    Info(ShmInfo),
    List(Vec<ShmInfo>),
    Grant(Grant),
    Grants(Vec<(u32, Grant)>),
    Done,
}

/// The home's answer to `Acquire`: the page for the requester, version
/// `ver` of the page's grants (a node applies grants and revocations in
/// version order, so a revocation that overtakes the grant it revokes
/// waits for it).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Grant {
    pub ver: u64,
    pub write: bool,
    /// The contents, or `None`: zeros if the requester has no copy, its
    /// own copy if it has one.
    pub data: Option<ByteBuf>,
}

/// What a home asks of a node that holds a page. `ver` is the version of
/// the last grant this node got for the page: the request waits until the
/// node has applied it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum NodeOp {
    /// Drop the page here, returning its contents if `want`.
    Invalidate {
        shmid: i32,
        page: u32,
        want: bool,
        ver: u64,
    },
    /// Keep a read-only copy, returning the contents.
    Downgrade { shmid: i32, page: u32, ver: u64 },
    /// The contents of a valid copy.
    Fetch { shmid: i32, page: u32, ver: u64 },
    /// The segment is gone: free its memory here.
    Drop { shmid: i32 },
}

/// A request on the shared-memory link.
#[derive(Serialize, Deserialize, Debug)]
pub enum Req {
    Home(HomeOp),
    Node(NodeOp),
    ReadMany(i32, Vec<(u32, u64, bool)>),
}

/// Its answer.
#[derive(Serialize, Deserialize, Debug)]
pub enum Resp {
    Home(Result<HomeReply, ErrorReply>),
    Node(Result<Option<ByteBuf>, ErrorReply>),
    Many(Result<Vec<Option<ByteBuf>>, ErrorReply>),
}
