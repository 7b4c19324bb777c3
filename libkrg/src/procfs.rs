//! `/proc/<gpid>` paths: the `/proc` part of the processes subsystem.
//!
//! A program under krg sees gpids (`getpid`, `$$`, `os.getpid()`), but the
//! kernel's `/proc` only knows kernel pids, so a program that builds a path
//! from its pid (`/proc/<getpid()>/stat`, procps `ps` looking itself up,
//! `cat /proc/$$/status` in a script) would find nothing. The path-taking
//! hooks (`open`, `stat`, `opendir`, `readlink`, ...) hand their path to
//! [`with_path`], which rewrites a leading `/proc/<gpid>` component to
//! `/proc/<kernel pid>` when that gpid runs on this node:
//!
//! * the process's own gpid becomes its own kernel pid, with no agent call;
//! * another gpid is asked of the local agent (`Resolve`, allocation-free);
//! * a gpid that does not run on this node (the agent says ESRCH, or cannot
//!   be reached) leaves the path unchanged: `/proc/<gpid>` does not exist in
//!   the kernel's `/proc` (no kernel pid reaches 2^22), so the call fails with
//!   `ENOENT`, exactly as for a pid that does not exist here.
//!
//! Only the exact form `/proc/<digits>` followed by `/` or the end of the
//! string is recognised, with the digits written as the kernel writes pids
//! (no sign, no leading zero). Everything else is untouched: numbers below
//! 2^22 (kernel pids), `/proc/self`, `/proc/thread-self`, `//proc/...`,
//! `/proc//<gpid>`, `/proc/./<gpid>`, relative paths (`<gpid>/status` with a
//! directory descriptor of `/proc` included), and paths that reach `/proc`
//! through a symbolic link. Directory listings of `/proc` are not translated
//! either (`ls /proc` shows kernel pids).
//!
//! Cost for an ordinary path: at most six byte comparisons after the hook's
//! usual `rt::enter` (one thread-local and one atomic load). No allocation,
//! no lock: the rewritten path lives in a `PATH_MAX` stack buffer, and since
//! a kernel pid has fewer digits than a gpid it always fits when the
//! original did. A path longer than the kernel accepts is left as it is (the
//! kernel then says `ENAMETOOLONG`).

#![deny(unsafe_code)]

use crate::gpid::is_gpid;
use crate::hookclient::Reply;
use crate::processes;
use crate::proto::Request;
use crate::rt;
use crate::sys::user::CStrPtr;
use crate::{krg_log, log};
use libc::{c_char, pid_t};

/// The kernel's limit on a path, terminating NUL included.
pub const PATH_MAX: usize = libc::PATH_MAX as usize;

const PREFIX: &[u8] = b"/proc/";

/// The pid of a `/proc/<digits>` prefix of `path`, and the index of the
/// byte after the digits (a `/` or the NUL), if the digits are a gpid.
/// Reads no further than the first byte that does not match, so an
/// ordinary path costs a comparison or two.
pub fn gpid_prefix(path: CStrPtr<'_>) -> Option<(pid_t, usize)> {
    let mut bytes = path.bytes();
    for &c in PREFIX {
        if bytes.next() != Some(c) {
            return None;
        }
    }
    let start = PREFIX.len();
    let mut value: u64 = 0;
    let mut i = start;
    loop {
        let c = bytes.next().unwrap_or(0);
        match c {
            b'0'..=b'9' => {
                if i == start && c == b'0' {
                    return None; // "0" or a leading zero: not a pid name
                }
                value = value * 10 + u64::from(c - b'0');
                if value > i32::MAX as u64 {
                    return None;
                }
                i += 1;
            }
            b'/' | 0 if i > start => break,
            _ => return None,
        }
    }
    let pid = value as pid_t;
    is_gpid(pid).then_some((pid, i))
}

/// Rewrite `path` into `buf` if it starts with `/proc/<gpid>` and `lookup`
/// gives that gpid's kernel pid; `None` means "use the path as it is".
pub fn rewrite(
    path: Option<CStrPtr<'_>>,
    buf: &mut [u8; PATH_MAX],
    lookup: impl FnOnce(pid_t) -> Option<pid_t>,
) -> Option<()> {
    let path = path?;
    let (g, rest) = gpid_prefix(path)?;
    // Length of the tail (from the byte after the digits, NUL excluded),
    // bounded: a path the kernel would refuse is left for it to refuse.
    let tail = path.bytes().skip(rest).take(PATH_MAX - rest).count();
    if rest + tail >= PATH_MAX {
        return None;
    }
    let k = lookup(g)?;
    if k <= 0 || is_gpid(k) {
        return None;
    }
    let mut digits = [0u8; 10];
    let mut n = 0;
    let mut v = k as u32;
    while v > 0 {
        digits[n] = b'0' + (v % 10) as u8;
        v /= 10;
        n += 1;
    }
    let total = PREFIX.len() + n + tail;
    // Always true (a kernel pid has fewer digits than a gpid, and the
    // original path fitted); checked so that nothing below can fail.
    if total >= PATH_MAX {
        return None;
    }
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    for (d, s) in buf[PREFIX.len()..PREFIX.len() + n]
        .iter_mut()
        .zip(digits[..n].iter().rev())
    {
        *d = *s;
    }
    for (d, s) in buf[PREFIX.len() + n..total]
        .iter_mut()
        .zip(path.bytes().skip(rest))
    {
        *d = s;
    }
    buf[total] = 0;
    Some(())
}

/// The kernel pid of a gpid that runs on this node: the own gpid without
/// asking, another one through the agent (`Resolve`).
fn local_kernel_pid(g: pid_t) -> Option<pid_t> {
    if g == processes::my_gpid() {
        return Some(processes::my_kpid());
    }
    match rt::agent_call(&Request::Resolve { gpid: g }) {
        Ok(Reply::Pid(k)) if k > 0 && !is_gpid(k) => Some(k),
        _ => None,
    }
}

pub use abi::with_path;

/// The fence of this module's entry point that takes the application's
/// raw pointers (allowed `unsafe`: their contract is the C call's).
#[allow(unsafe_code)]
mod abi {
    use super::*;

    /// Call `f` with `path`, or with its translation when it names
    /// `/proc/<gpid>` of a process on this node (see the module
    /// documentation). errno is left as `f` sets it.
    ///
    /// # Safety
    /// `path` must be null or point to a NUL-terminated string (what the
    /// libc function the hook stands for requires anyway).
    #[inline]
    pub unsafe fn with_path<R>(path: *const c_char, f: impl FnOnce(*const c_char) -> R) -> R {
        // SAFETY: the function's contract, for the duration of the call.
        match unsafe { CStrPtr::new(path) } {
            // Fast path: a comparison or two for nearly every path, and no
            // buffer.
            Some(p) if gpid_prefix(p).is_some() => translated(p, f),
            _ => f(path),
        }
    }
}

#[cold]
#[inline(never)]
fn translated<R>(path: CStrPtr<'_>, f: impl FnOnce(*const c_char) -> R) -> R {
    let mut buf = [0u8; PATH_MAX];
    let mut seen = None;
    let lookup = |g| {
        let k = local_kernel_pid(g);
        seen = Some((g, k));
        k
    };
    let done = rewrite(Some(path), &mut buf, lookup);
    match seen {
        Some((g, Some(k))) => krg_log!(log::Level::Trace, "path /proc/{g} -> /proc/{k}"),
        Some((g, None)) => krg_log!(
            log::Level::Trace,
            "path /proc/{g}: not on this node, left unchanged"
        ),
        None => {}
    }
    match done {
        Some(()) => f(buf.as_ptr().cast()),
        None => f(path.as_ptr()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::{CStr, CString};

    const G: pid_t = 4194305; // node 1, local 1
    const K: pid_t = 4242;

    fn lookup(g: pid_t) -> Option<pid_t> {
        (g == G).then_some(K)
    }

    /// The rewritten path, or None if left unchanged.
    fn rw(path: &[u8]) -> Option<String> {
        let c = CString::new(path).unwrap();
        let mut buf = [0xffu8; PATH_MAX];
        rewrite(Some(c.as_c_str().into()), &mut buf, lookup)?;
        let s = CStr::from_bytes_until_nul(&buf).unwrap();
        Some(s.to_str().unwrap().to_string())
    }

    #[test]
    fn gpid_paths_are_translated() {
        assert_eq!(rw(b"/proc/4194305").as_deref(), Some("/proc/4242"));
        assert_eq!(
            rw(b"/proc/4194305/status").as_deref(),
            Some("/proc/4242/status")
        );
        assert_eq!(rw(b"/proc/4194305/").as_deref(), Some("/proc/4242/"));
        assert_eq!(
            rw(b"/proc/4194305/task/4194305/stat").as_deref(),
            Some("/proc/4242/task/4194305/stat"),
            "only the first component is a pid of the process namespace"
        );
    }

    #[test]
    fn other_paths_are_untouched() {
        for p in [
            &b"/proc/41943051x"[..],
            b"/proc/4194305x/status",
            b"/proc/12",
            b"/proc/12/status",
            b"/proc/4194303",
            b"/proc//4194305",
            b"//proc/4194305",
            b"/proc/./4194305",
            b"/proc/04194305",
            b"/proc/+4194305",
            b"/proc/-4194305",
            b"/proc/0",
            b"/proc/",
            b"/proc",
            b"/proc/self",
            b"/proc/self/status",
            b"/proc/thread-self/comm",
            b"/procx/4194305",
            b"proc/4194305",
            b"4194305/status",
            b"./proc/4194305",
            b"/etc/passwd",
            b"",
            b"/",
            b"/proc/99999999999999999999",
            b"/proc/2147483648",
        ] {
            assert_eq!(rw(p), None, "{}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn unknown_gpid_is_untouched() {
        // Not on this node: the lookup fails, the path stays (ENOENT).
        assert_eq!(rw(b"/proc/8388609/status"), None);
        assert_eq!(rw(b"/proc/2147483647"), None);
    }

    #[test]
    fn prefix_parser() {
        let p = |s: &str| {
            let c = CString::new(s).unwrap();
            gpid_prefix(c.as_c_str().into())
        };
        assert_eq!(p("/proc/4194304"), Some((4194304, 13)));
        assert_eq!(p("/proc/4194305/status"), Some((G, 13)));
        assert_eq!(p("/proc/2147483647/x"), Some((i32::MAX, 16)));
        assert_eq!(p("/proc/4194303"), None);
        assert_eq!(p("/proc/2147483648"), None);
    }

    #[test]
    fn path_max_limits() {
        // The longest path the kernel accepts: PATH_MAX - 1 bytes + NUL.
        let head = b"/proc/4194305/".to_vec();
        let mut p = head.clone();
        p.resize(PATH_MAX - 1, b'a');
        let out = rw(&p).expect("a path of PATH_MAX - 1 bytes is translated");
        assert_eq!(out.len(), PATH_MAX - 1 - 3);
        assert!(out.starts_with("/proc/4242/aaa"));
        assert!(out.ends_with('a'));
        // One more byte and the kernel would say ENAMETOOLONG: left alone.
        p.push(b'a');
        assert_eq!(p.len(), PATH_MAX);
        assert_eq!(rw(&p), None);
        let mut p = head;
        p.resize(3 * PATH_MAX, b'b');
        assert_eq!(rw(&p), None);
    }

    #[test]
    fn null_and_lookup_errors() {
        let mut buf = [0u8; PATH_MAX];
        assert_eq!(rewrite(None, &mut buf, lookup), None);
        let c = CString::new("/proc/4194305").unwrap();
        // A lookup that answers nonsense (a gpid, 0) leaves the path alone.
        for bad in [0, -1, G] {
            let r = rewrite(Some(c.as_c_str().into()), &mut buf, |_| Some(bad));
            assert_eq!(r, None);
        }
    }

    #[test]
    // The entry point takes a raw pointer.
    #[allow(unsafe_code)]
    fn with_path_outside_an_ssi_process() {
        // Ordinary paths go straight to f, the same pointer.
        let c = CString::new("/etc/passwd").unwrap();
        // SAFETY: a CString is NUL-terminated.
        let same = unsafe { with_path(c.as_ptr(), |p| p == c.as_ptr()) };
        assert!(same);
        // SAFETY: null is allowed.
        let null = unsafe { with_path(std::ptr::null(), |p| p.is_null()) };
        assert!(null);
    }
}
