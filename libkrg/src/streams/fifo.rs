//! FIFOs opened by path, the application side (see
//! docs/architecture/streams.md, "FIFOs").
//!
//! The `open` family's hooks ask [`open`] first. For a FIFO (a named pipe
//! on a file system, not a `/proc/.../fd` link to a pipe) opened read-only
//! or write-only, by a process with the `streams` capability, the open is
//! a rendezvous through the agents: it waits, as a FIFO's open does, for a
//! process opening the same file the other way anywhere in the cluster. If
//! that process is on this node the FIFO itself is opened (the kernel
//! pairs them); otherwise the answer is a TCP connection to its node, which
//! stands for the FIFO like a pipe whose ends parted.
//!
//! Non-blocking opens do not wait, as on one machine: a reader's opens the
//! FIFO here at once and announces itself (`FifoStand`), so that writers
//! elsewhere reach it through this node's agent, which writes their
//! streams into the FIFO; a writer's meets a reader waiting or announced
//! anywhere, or fails with `ENXIO`.
//!
//! The entry points take the application's strings: they are the module's
//! `abi` fence, which makes `sys::user` views of them.

#![deny(unsafe_code)]

use super::moving;
use crate::client;
use crate::proto::{Request, Response};
use crate::sys::user::CStrPtr;
use crate::sys::{fd as sysfd, raw};
use libc::{c_char, c_int};
use std::ffi::CStr;
use std::os::fd::{AsRawFd, IntoRawFd};

pub use abi::{fopen, open};

/// The fence of this module: its entry points take the application's raw
/// strings (allowed `unsafe`: their contract is the C call's), make views
/// of them and call the safe code below.
#[allow(unsafe_code)]
mod abi {
    use super::*;

    /// What the open family should do: `Some(result)` when this library
    /// opened `path` (a FIFO met across the cluster; the fd, or -1 with
    /// `errno`), `None` to open it as usual.
    ///
    /// # Safety
    /// `path` is null or a NUL-terminated string.
    pub unsafe fn open(dirfd: c_int, path: *const c_char, flags: c_int) -> Option<c_int> {
        // SAFETY: the function's contract, for the duration of the call.
        let path = unsafe { CStrPtr::new(path) }?;
        super::open_path(dirfd, path, flags)
    }

    /// What `fopen` should do, as [`open`] says for the `open` family:
    /// `Some(stream)` when this library opened `path` (a FIFO met across
    /// the cluster, wrapped with `fdopen`; null with `errno` on failure),
    /// `None` to open it as usual. glibc's `fopen` opens without the PLT,
    /// so the `open` hooks never see it.
    ///
    /// # Safety
    /// `path` and `mode` are null or NUL-terminated strings.
    pub unsafe fn fopen(path: *const c_char, mode: *const c_char) -> Option<*mut libc::FILE> {
        // SAFETY: the function's contract, for the duration of the call.
        let (path, mode) = unsafe { (CStrPtr::new(path), CStrPtr::new(mode)) };
        super::fopen_path(path, mode?)
    }
}

/// [`open`] of a path that is not null.
fn open_path(dirfd: c_int, path: CStrPtr<'_>, flags: c_int) -> Option<c_int> {
    if !super::active() {
        return None;
    }
    let acc = flags & libc::O_ACCMODE;
    // Read-write (Linux never blocks it) and O_PATH opens keep the local
    // FIFO's behaviour.
    if acc == libc::O_RDWR || flags & libc::O_PATH != 0 {
        return None;
    }
    let path = path.to_cstr();
    let b = path.to_bytes();
    if b.starts_with(b"/proc/") || b.starts_with(b"/dev/") {
        // A pipe reopened through /proc/<pid>/fd (or /dev/stdin...): not
        // a named FIFO.
        return None;
    }
    let st = sysfd::fstatat(dirfd, path, 0).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return None;
    }
    // Rare from here on: allocation is fine.
    let full = canonical(dirfd, b)?;
    let write = acc == libc::O_WRONLY;
    let nonblock = flags & libc::O_NONBLOCK != 0;
    if !write && nonblock {
        return Some(stand(dirfd, path, flags, full, &st));
    }
    let req = Request::FifoOpen {
        path: full.clone(),
        dev: st.st_dev,
        ino: st.st_ino,
        write,
        nonblock,
    };
    // Not guarded: the wait may be long, and the program's signals must
    // reach it meanwhile (a handler that returns resumes the wait).
    match client::call_fds(&req) {
        // Its partner opens it on this node now: a blocking open meets it
        // (a non-blocking writer's would race the reader's).
        Ok((Response::Local, _)) if nonblock => {
            let fd = raw_open(dirfd, path, flags & !libc::O_NONBLOCK);
            if fd >= 0 {
                let _ = super::sock::set_nonblock(fd, true);
            }
            Some(fd)
        }
        Ok((Response::Local, _)) => None,
        Ok((Response::StreamFd, mut fds)) if fds.len() == 1 => {
            let fd = fds.remove(0);
            let cloexec = flags & libc::O_CLOEXEC != 0;
            let _ = sysfd::set_fd_flags(fd.as_raw_fd(), if cloexec { libc::FD_CLOEXEC } else { 0 });
            let raw = fd.into_raw_fd();
            let _ = super::sock::set_nonblock(raw, nonblock);
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

/// A non-blocking reader's open: the FIFO itself, opened here at once as
/// on one machine; then the agent is told that a reader stands on this
/// node, so that writers on other nodes reach it (their agent's stream is
/// written into the FIFO by this node's agent). The fd, or -1 with errno.
fn stand(dirfd: c_int, path: &CStr, flags: c_int, full: Vec<u8>, st: &libc::stat) -> c_int {
    let fd = raw_open(dirfd, path, flags);
    if fd < 0 {
        return fd;
    }
    let req = Request::FifoStand {
        path: full,
        dev: st.st_dev,
        ino: st.st_ino,
    };
    if let Err(e) = client::call(&req) {
        // The local FIFO works on; only writers elsewhere will not see it.
        crate::krg_log!(crate::log::Level::Warn, "FIFO reader not announced: {e}");
    }
    fd
}

/// `openat` as a system call: this library's own open, past the hooks.
/// The fd, or -1 with errno.
fn raw_open(dirfd: c_int, path: &CStr, flags: c_int) -> c_int {
    // The mode is unused (a FIFO exists).
    match raw::openat(dirfd, path, flags, 0o666) {
        Ok(fd) => fd.into_raw_fd(),
        Err(e) => {
            crate::rt::set_errno(e.raw_os_error().unwrap_or(libc::EIO));
            -1
        }
    }
}

/// The `open` flags of an `fopen` mode ("r", "w", "a", with "+", "e",
/// "x", "b", ...), as glibc reads it.
pub fn fopen_flags(mode: &[u8]) -> Option<c_int> {
    let mut flags = match mode.first()? {
        b'r' => libc::O_RDONLY,
        b'w' => libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        b'a' => libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
        _ => return None,
    };
    for c in mode[1..].iter().take_while(|c| **c != b',') {
        match c {
            b'+' => flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR,
            b'e' => flags |= libc::O_CLOEXEC,
            b'x' => flags |= libc::O_EXCL,
            _ => {}
        }
    }
    Some(flags)
}

/// [`fopen`] with a mode.
fn fopen_path(path: Option<CStrPtr<'_>>, mode: CStrPtr<'_>) -> Option<*mut libc::FILE> {
    let mode = mode.to_cstr();
    let flags = fopen_flags(mode.to_bytes())?;
    let fd = open_path(libc::AT_FDCWD, path?, flags)?;
    if fd < 0 {
        return Some(std::ptr::null_mut());
    }
    // Our new fd in a stream with the caller's mode string.
    let f = sysfd::fdopen(fd, mode);
    if f.is_null() {
        let e = crate::rt::errno();
        // The fd is ours and nothing else refers to it.
        let _ = sysfd::close(fd);
        crate::rt::set_errno(e);
    }
    Some(f)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fopen_modes_read_as_glibc_reads_them() {
        assert_eq!(fopen_flags(b"r"), Some(libc::O_RDONLY));
        assert_eq!(fopen_flags(b"rb"), Some(libc::O_RDONLY));
        assert_eq!(
            fopen_flags(b"we"),
            Some(libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC)
        );
        assert_eq!(
            fopen_flags(b"a"),
            Some(libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND)
        );
        assert_eq!(
            fopen_flags(b"r+").map(|f| f & libc::O_ACCMODE),
            Some(libc::O_RDWR)
        );
        assert_eq!(fopen_flags(b"w,ccs=UTF-8+"), fopen_flags(b"w"));
        assert_eq!(fopen_flags(b""), None);
        assert_eq!(fopen_flags(b"q"), None);
    }
}
