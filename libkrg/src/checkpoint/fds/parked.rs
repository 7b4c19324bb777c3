//! A connection, listener or pipe leading out of the process, kept open by
//! the agent of `node` as park `id` since a checkpoint with `--kill`
//! (`Request::Park`): the restore takes the very socket or pipe back there.

#![deny(unsafe_code)]

use super::{FdKind, FdState, Kind, Restoring};
use crate::error::Error;
use crate::proto::{Request, Response};
use std::os::fd::{IntoRawFd, RawFd};

pub struct Parked;

/// The image entry of an fd parked on `node` as `id`.
pub fn entry(node: u32, id: i32) -> FdKind {
    FdKind::Parked { node, id }
}

impl Kind for Parked {
    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::Parked { node, id } = f.kind else {
            unreachable!("Parked::restore of {:?}", f.kind)
        };
        let what = |e: Error| e.during(format!("parked as {id}")).node(node).fd(f.fd);
        let (r, mut got) =
            crate::client::call_fds(&Request::Unpark { id }).map_err(|e| what(e.into()))?;
        match (r, got.pop()) {
            (Response::StreamFd, Some(fd)) => Ok(Some(fd.into_raw_fd())),
            (other, _) => Err(what(Error::other(format!("unexpected answer {other:?}")))),
        }
    }
}
