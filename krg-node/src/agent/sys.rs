//! The agent's own system calls that std and nix do not wrap (pidfds),
//! shared by its subsystems.

use libkrg::proto::ErrorReply;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

pub(super) fn sys_fd(r: libc::c_long, what: &str) -> Result<OwnedFd, ErrorReply> {
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(super::err(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("{what}: {e}"),
        ));
    }
    // SAFETY: the system call just returned this new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Watch a descriptor we own with the runtime.
pub(super) fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is moved into the AsyncFd, so the descriptor stays
    // open and the same for the AsyncFd's whole life.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

pub(super) fn pidfd_open(kpid: i32) -> Result<OwnedFd, ErrorReply> {
    // SAFETY: pidfd_open takes a pid and flags.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, kpid, 0) };
    sys_fd(r, &format!("pidfd_open({kpid})"))
}

/// A copy of descriptor `fd` of process `kpid` (also the parks'; see
/// `parked`).
pub(super) fn pidfd_getfd(kpid: i32, fd: i32) -> Result<OwnedFd, ErrorReply> {
    let p = pidfd_open(kpid)?;
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, p.as_raw_fd(), fd, 0) };
    sys_fd(r, &format!("pid {kpid}: fd {fd}"))
}
