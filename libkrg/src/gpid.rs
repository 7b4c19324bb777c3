//! Cluster-wide process ids (gpids).
//!
//! A gpid fits `pid_t`, is positive, and encodes its origin node in the bits
//! above [`NODE_SHIFT`]: `gpid = node << 22 | local`. Linux never hands out a
//! kernel pid of 2^22 or more (`PID_MAX_LIMIT`), and node ids start at 1, so
//! every gpid is distinguishable from a kernel pid by value alone: anything
//! below 2^22 is a node-local kernel pid and passes through untouched.
//!
//! The local part is normally the process's kernel pid on its origin node;
//! the origin agent picks another free value when that one is still held by
//! a process that left the node, so a gpid never changes and never repeats
//! while its owner lives.

#![deny(unsafe_code)]

/// Bits reserved for the local part of a gpid.
pub const NODE_SHIFT: u32 = 22;
/// Mask of the local part.
pub const LOCAL_MASK: i32 = (1 << NODE_SHIFT) - 1;
/// Largest node id: `511 << 22 | LOCAL_MASK` is `i32::MAX`.
pub const MAX_NODE: u32 = 511;

/// Build a gpid from a node id (1..=511) and a local part (< 2^22).
pub fn make(node: u32, local: u32) -> Option<i32> {
    if node == 0 || node > MAX_NODE || local == 0 || local > LOCAL_MASK as u32 {
        return None;
    }
    Some(((node << NODE_SHIFT) | local) as i32)
}

/// Whether a pid value is a gpid (as opposed to a node-local kernel pid).
pub fn is_gpid(pid: i32) -> bool {
    pid >= (1 << NODE_SHIFT)
}

/// The origin node of a gpid.
pub fn node_of(gpid: i32) -> Option<u32> {
    is_gpid(gpid).then_some((gpid as u32) >> NODE_SHIFT)
}

/// The local part of a gpid.
pub fn local_of(gpid: i32) -> Option<u32> {
    is_gpid(gpid).then_some((gpid & LOCAL_MASK) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let g = make(3, 1234).unwrap();
        assert!(is_gpid(g));
        assert_eq!(node_of(g), Some(3));
        assert_eq!(local_of(g), Some(1234));
    }

    #[test]
    fn extremes_fit_pid_t() {
        assert_eq!(make(MAX_NODE, LOCAL_MASK as u32), Some(i32::MAX));
        assert_eq!(make(1, 1), Some(1 << 22 | 1));
        assert_eq!(make(0, 5), None);
        assert_eq!(make(512, 5), None);
        assert_eq!(make(1, 0), None);
        assert_eq!(make(1, 1 << 22), None);
    }

    #[test]
    fn kernel_pids_are_not_gpids() {
        assert!(!is_gpid(1));
        assert!(!is_gpid(4_194_303));
        assert!(!is_gpid(-5));
        assert_eq!(node_of(100), None);
    }
}
