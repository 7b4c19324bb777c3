//! Directory listings for code that must not call malloc-heavy libc
//! (`opendir`): the capture, a signal handler's helpers. Numbers only:
//! `/proc/self/fd`, `/proc/self/task`.

#![deny(unsafe_code)]

use crate::error::{Error, ResultExt};
use crate::sys::raw;

/// Entries of a directory, with getdents64 (std's `read_dir` goes through
/// libc's `opendir`, which mallocs).
pub fn numbers(path: &str) -> Result<Vec<i32>, Error> {
    let f = std::fs::File::open(path).during(path)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let mut buf = vec![0u8; 32 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match raw::getdents64(fd, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                return Err(Error::errno(errno, crate::rt::Errno(errno).to_string()).path(path));
            }
        };
        if n == 0 {
            break;
        }
        let mut off = 0usize;
        while off + 19 <= n {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            if reclen == 0 || off + reclen > n {
                break;
            }
            let name = &buf[off + 19..off + reclen];
            let end = name.iter().position(|c| *c == 0).unwrap_or(name.len());
            if let Ok(v) = std::str::from_utf8(&name[..end])
                .unwrap_or("")
                .parse::<i32>()
            {
                out.push(v);
            }
            off += reclen;
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The process's open fd numbers.
pub fn open_fds() -> Result<Vec<i32>, Error> {
    numbers("/proc/self/fd")
}
