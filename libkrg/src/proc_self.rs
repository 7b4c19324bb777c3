//! What a process reads of itself to be started again elsewhere (by a
//! migration's image, or as a program placed on another node): its
//! `/proc/self` files and links, its umask and resource limits.

#![deny(unsafe_code)]

use crate::error::{Error, ResultExt};

/// Read a whole (proc) file with plain system calls.
pub fn read_file(path: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).during(path)
}

/// Where symbolic link `path` points, as bytes (`/proc/self/exe`, `cwd`).
pub fn read_link(path: &str) -> Result<Vec<u8>, Error> {
    std::fs::read_link(path)
        .map(|p| p.into_os_string().into_encoded_bytes())
        .during(path)
}

/// The strings of a NUL-separated list (`/proc/self/cmdline`, `environ`).
pub fn split_nul(b: &[u8]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = b.split(|c| *c == 0).map(<[u8]>::to_vec).collect();
    if v.last().is_some_and(Vec::is_empty) {
        v.pop();
    }
    v
}

/// This process's umask, from `/proc/self/status` (umask(2) would have to
/// set it to read it, a race with the other threads).
pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Every resource limit: `(resource, soft, hard)`. Linux has 16
/// (`RLIMIT_CPU` = 0 .. `RLIMIT_RTTIME` = 15).
pub fn rlimits() -> Vec<(u32, u64, u64)> {
    (0..16u32)
        .filter_map(|r| {
            crate::sys::process::getrlimit(r)
                .ok()
                .map(|(soft, hard)| (r, soft, hard))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_separated_lists_and_limits_are_read() {
        assert_eq!(
            split_nul(b"sh\0-c\0echo hi\0"),
            vec![b"sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()]
        );
        assert_eq!(
            split_nul(b"a\0\0b\0"),
            vec![b"a".to_vec(), b"".to_vec(), b"b".to_vec()]
        );
        assert!(umask() <= 0o777);
        assert!(rlimits().len() >= 10);
    }
}
