//! The messages of streams between agents (see
//! docs/architecture/streams.md): the cluster-wide loopback's port home,
//! the ends of moving streams, FIFOs and UNIX socket names.

use serde::{Deserialize, Serialize};

/// A request to the port home.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum PortOp {
    /// Reserve `port` for `node`.
    Reserve { port: u16, node: u32, reuse: bool },
    /// Who holds `port`.
    Owner { port: u16 },
}

/// One end of a moving stream, at its node, as the agents look for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum End {
    /// The TCP connection `(local, peer)` (socket addresses as text, as
    /// that end sees them).
    Tcp(String, String),
    /// A pipe (fd link `pipe:[N]`) or FIFO (its path) of this node;
    /// `mover` (a kernel pid) holds the moving end.
    Pipe { link: String, mover: i32 },
    /// The UNIX stream or seqpacket socket `ino` of this node, held by
    /// `mover`: its peer socket is the other end.
    Unix { ino: u64, mover: i32 },
    /// The process end of seqpacket relay `id` of this node (see
    /// `seqpacket.rs`): the peer of the relay's socket.
    Relay { id: u64 },
}

/// A FIFO (or a UNIX socket name) as every node names it: its canonical
/// path, and the device and inode the opener's node sees (a path in a
/// directory private to a node, or another file under the same name, is
/// another FIFO).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct FifoKey {
    pub path: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
}

/// What an opener does, from the home.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum FifoMatch {
    /// Its partner is on its node: open the FIFO itself.
    Local,
    /// The reader: take the connection for stream `id` (its node holds
    /// the place).
    Accept { id: u64 },
    /// The writer: connect to `node` for stream `id`.
    Connect { id: u64, node: u32 },
}
