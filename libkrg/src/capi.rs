//! The C ABI for tuned applications (declared in `libkrg/include/krg.h`).
//!
//! These functions are exported by `libkrg.so`. A program can call them
//! directly (link with `-lkrg`) or declare them weak, so that it also runs
//! without the library (see `examples/krginfo.c`). None of them allocates or
//! locks once the library is initialised; none can unwind.

#![deny(unsafe_code)]

use crate::gpid::is_gpid;
use crate::hookclient::Reply;
use crate::processes;
use crate::proto::{Request, PROTO_VERSION};
use crate::rt::{self, set_errno, Entry, Mode, Why};
use libc::{c_int, c_uint, pid_t};

/// `KRG_MODE_DISABLED`: `KRG_DISABLE=1`, the library does nothing.
pub const KRG_MODE_DISABLED: c_int = 0;
/// `KRG_MODE_STANDALONE`: no agent, a plain local process.
pub const KRG_MODE_STANDALONE: c_int = 1;
/// `KRG_MODE_ACTIVE`: an SSI process registered with its node's agent.
pub const KRG_MODE_ACTIVE: c_int = 2;

fn active() -> Result<(), c_int> {
    match rt::enter() {
        Entry::Krg => Ok(()),
        Entry::PassThrough(Why::Disabled) => Err(libc::ENOSYS),
        Entry::PassThrough(Why::Standalone | Why::Early) => Err(libc::ENOTCONN),
        // Called from inside krg: answer from the state alone.
        Entry::PassThrough(Why::Reentrant) => match rt::mode() {
            Mode::Active => Ok(()),
            Mode::Disabled => Err(libc::ENOSYS),
            _ => Err(libc::ENOTCONN),
        },
    }
}

fn ckpt_err(e: crate::error::Error) -> c_int {
    crate::krg_log!(crate::log::Level::Warn, "{e}");
    set_errno(e.errno);
    -1
}

pub use abi::*;

/// The exported functions (allowed `unsafe`: `#[no_mangle]` symbols, and
/// `krg_checkpoint`'s C string).
#[allow(unsafe_code)]
mod abi {
    use super::*;
    use crate::sys::user::CStrPtr;

    /// The mode of the library in this process (`KRG_MODE_*`).
    #[no_mangle]
    pub extern "C" fn krg_mode() -> c_int {
        match active() {
            Ok(()) => KRG_MODE_ACTIVE,
            Err(libc::ENOSYS) => KRG_MODE_DISABLED,
            Err(_) => KRG_MODE_STANDALONE,
        }
    }

    /// The calling process's gpid; -1 with errno `ENOSYS` (disabled) or
    /// `ENOTCONN` (standalone) when it has none.
    #[no_mangle]
    pub extern "C" fn krg_getgpid() -> pid_t {
        match active() {
            Ok(()) => {
                let g = processes::my_gpid();
                if is_gpid(g) {
                    g
                } else {
                    set_errno(libc::ENOTCONN);
                    -1
                }
            }
            Err(e) => {
                set_errno(e);
                -1
            }
        }
    }

    /// The id of the node the calling process runs on; 0 when it is not an SSI
    /// process.
    #[no_mangle]
    pub extern "C" fn krg_node_id() -> c_uint {
        match active() {
            Ok(()) => processes::node_id(),
            Err(_) => 0,
        }
    }

    /// The calling process's effective SSI capabilities (`KRG_CAP_*` bits),
    /// asked from the agent so that a `krg capset` made since the start shows;
    /// -1 with errno when it has none.
    #[no_mangle]
    pub extern "C" fn krg_caps() -> c_int {
        if let Err(e) = active() {
            set_errno(e);
            return -1;
        }
        let gpid = processes::my_gpid();
        match rt::agent_call(&Request::CapGet { gpid }) {
            Ok(Reply::Caps { effective, .. }) => (effective & crate::caps::Caps::ALL.0) as c_int,
            // The agent is unreachable or does not know: what Hello said.
            _ => processes::hello_caps() as c_int,
        }
    }

    /// Write the calling process's image to directory `dir` (it must exist and
    /// be visible where the image will be restarted) and go on. Returns 0 after
    /// taking it, 1 when the process was restarted from it (like fork, it
    /// returns twice), -1 with errno on failure (nothing changed).
    ///
    /// # Safety
    /// `dir` must be a NUL-terminated string.
    #[no_mangle]
    pub unsafe extern "C" fn krg_checkpoint(dir: *const libc::c_char) -> c_int {
        if let Err(e) = active() {
            set_errno(e);
            return -1;
        }
        // SAFETY: the caller passes a NUL-terminated string (or null).
        let Some(d) = (unsafe { CStrPtr::new(dir) }) else {
            set_errno(libc::EINVAL);
            return -1;
        };
        let d = d.to_cstr();
        let p = std::path::Path::new(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(d.to_bytes()),
        );
        match crate::checkpoint::checkpoint_self(p) {
            Ok(restored) => c_int::from(restored),
            Err(e) => ckpt_err(e),
        }
    }

    /// Move the calling process to node `node`. Returns 0 in the moved process
    /// (on `node`), or -1 with errno here if it could not move (nothing
    /// changed).
    #[no_mangle]
    pub extern "C" fn krg_migrate(node: c_uint) -> c_int {
        if let Err(e) = active() {
            set_errno(e);
            return -1;
        }
        match crate::checkpoint::migrate_self(node) {
            Ok(()) => 0,
            Err(e) => ckpt_err(e),
        }
    }

    /// Run `f` in the capturing thread before each checkpoint or migration of
    /// this process (the other threads still run). 0, or -1 (`ENOSPC`: 16 are
    /// registered already).
    #[no_mangle]
    pub extern "C" fn krg_on_checkpoint(f: extern "C" fn()) -> c_int {
        if crate::checkpoint::on_checkpoint(f) {
            0
        } else {
            set_errno(libc::ENOSPC);
            -1
        }
    }

    /// Run `f` in a process restored from an image (restart or migration),
    /// before its other threads go on. 0, or -1 (`ENOSPC`).
    #[no_mangle]
    pub extern "C" fn krg_on_restart(f: extern "C" fn()) -> c_int {
        if crate::checkpoint::on_restart(f) {
            0
        } else {
            set_errno(libc::ENOSPC);
            -1
        }
    }

    /// The protocol version this library speaks.
    #[no_mangle]
    pub extern "C" fn krg_proto_version() -> c_uint {
        PROTO_VERSION
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `#define NAME VALUE` in krg.h.
    fn define(h: &str, name: &str) -> Option<String> {
        h.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("#define") && w.next() == Some(name))
                .then(|| w.next().unwrap_or("").to_string())
        })
    }

    #[test]
    fn header_constants_match() {
        let h = include_str!("../include/krg.h");
        for (name, v) in [
            ("KRG_MODE_DISABLED", KRG_MODE_DISABLED as u32),
            ("KRG_MODE_STANDALONE", KRG_MODE_STANDALONE as u32),
            ("KRG_MODE_ACTIVE", KRG_MODE_ACTIVE as u32),
            ("KRG_GPID_NODE_SHIFT", crate::gpid::NODE_SHIFT),
        ] {
            assert_eq!(define(h, name), Some(v.to_string()), "krg.h: {name}");
        }
        for (name, bit) in crate::caps::NAMES {
            let macro_name = format!("KRG_CAP_{}", name.to_uppercase().replace('-', "_"));
            assert_eq!(
                define(h, &macro_name),
                Some(format!("{bit}u")),
                "krg.h: {macro_name}"
            );
        }
    }
}
