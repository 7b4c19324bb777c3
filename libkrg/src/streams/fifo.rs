//! FIFOs opened by path, the application side (see
//! docs/architecture/streams.md, "FIFOs").
//!
//! The `open` family's hooks ask [`open`] first. For a FIFO (a named pipe
//! on a file system, not a `/proc/.../fd` link to a pipe) opened read-only
//! or write-only and blocking, by a process with the `streams` capability,
//! the open is a rendezvous through the agents: it waits, as a FIFO's open
//! does, for a process opening the same file the other way anywhere in the
//! cluster. If that process is on this node the FIFO itself is opened (the
//! kernel pairs them); otherwise the answer is a TCP connection to its
//! node, which stands for the FIFO like a pipe whose ends parted.

use super::moving;
use crate::client;
use crate::proto::{Request, Response};
use libc::{c_char, c_int};
use std::ffi::CStr;
use std::os::fd::{AsRawFd, IntoRawFd};

/// What the open family should do: `Some(result)` when this library opened
/// `path` (a FIFO met across the cluster; the fd, or -1 with `errno`),
/// `None` to open it as usual.
///
/// # Safety
/// `path` is null or a NUL-terminated string.
pub unsafe fn open(dirfd: c_int, path: *const c_char, flags: c_int) -> Option<c_int> {
    if path.is_null() || !super::active() {
        return None;
    }
    let acc = flags & libc::O_ACCMODE;
    // Read-write (Linux never blocks it), non-blocking and O_PATH opens keep
    // the local FIFO's behaviour.
    if acc == libc::O_RDWR || flags & (libc::O_NONBLOCK | libc::O_PATH) != 0 {
        return None;
    }
    // SAFETY: the caller's contract.
    let p = unsafe { CStr::from_ptr(path) };
    let b = p.to_bytes();
    if b.starts_with(b"/proc/") || b.starts_with(b"/dev/") {
        // A pipe reopened through /proc/<pid>/fd (or /dev/stdin...): not
        // a named FIFO.
        return None;
    }
    // SAFETY: st is ours; fstatat only reads the path.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatat(dirfd, path, &mut st, 0) } != 0
        || st.st_mode & libc::S_IFMT != libc::S_IFIFO
    {
        return None;
    }
    // Rare from here on: allocation is fine.
    let full = canonical(dirfd, b)?;
    let req = Request::FifoOpen {
        path: full.clone(),
        dev: st.st_dev,
        ino: st.st_ino,
        write: acc == libc::O_WRONLY,
    };
    // Not guarded: the wait may be long, and the program's signals must
    // reach it meanwhile (a handler that returns resumes the wait).
    match client::call_fds(&req) {
        Ok((Response::Local, _)) => None,
        Ok((Response::StreamFd, mut fds)) if fds.len() == 1 => {
            let fd = fds.remove(0);
            let cloexec = flags & libc::O_CLOEXEC != 0;
            // SAFETY: sets the close-on-exec flag of our new socket.
            unsafe {
                libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_SETFD,
                    if cloexec { libc::FD_CLOEXEC } else { 0 },
                )
            };
            let raw = fd.into_raw_fd();
            moving::note_pipe_born(raw, true);
            crate::krg_log!(
                crate::log::Level::Debug,
                "FIFO {} met on another node: fd {raw}",
                String::from_utf8_lossy(&full)
            );
            Some(raw)
        }
        Ok((other, _)) => {
            crate::krg_log!(
                crate::log::Level::Warn,
                "FIFO {}: unexpected answer {other:?}",
                String::from_utf8_lossy(&full)
            );
            crate::rt::set_errno(libc::EIO);
            Some(-1)
        }
        Err(e) => {
            crate::krg_log!(
                crate::log::Level::Warn,
                "FIFO {}: {e}",
                String::from_utf8_lossy(&full)
            );
            crate::rt::set_errno(e.errno());
            Some(-1)
        }
    }
}

/// The canonical path of `path` relative to `dirfd`.
fn canonical(dirfd: c_int, path: &[u8]) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
    let joined = if p.is_absolute() || dirfd == libc::AT_FDCWD {
        p.to_path_buf()
    } else {
        std::fs::read_link(format!("/proc/self/fd/{dirfd}"))
            .ok()?
            .join(p)
    };
    std::fs::canonicalize(joined)
        .ok()
        .map(|c| c.as_os_str().as_bytes().to_vec())
}
