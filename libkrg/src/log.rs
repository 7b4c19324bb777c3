//! The one logging facility of the in-process library: off unless `KRG_LOG`
//! is set (`error`, `warn`, `info`, `debug`, `trace`, or `1` for `info`).
//!
//! Formatting goes into a fixed stack buffer and out with one `write(2)` to
//! stderr: no allocation and no lock, so it is usable from hooks and after
//! fork.

#![deny(unsafe_code)]

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
#[repr(u8)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// 0 = off; 255 = not yet read from the environment.
static MAX: AtomicU8 = AtomicU8::new(255);

/// Parse a `KRG_LOG` value into a maximum level (0 = off).
pub fn parse_level(v: &str) -> u8 {
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "0" | "off" | "none" => 0,
        "error" => 1,
        "warn" | "warning" => 2,
        "1" | "on" | "info" | "true" => 3,
        "debug" => 4,
        "trace" | "all" => 5,
        // A filter meant for the agent (`krg_node=debug`) still turns the
        // library's log on.
        _ => 3,
    }
}

/// Read `KRG_LOG` (called once, at library initialisation).
pub fn init_from_env() {
    let lvl = std::env::var("KRG_LOG")
        .map(|v| parse_level(&v))
        .unwrap_or(0);
    MAX.store(lvl, Ordering::Relaxed);
}

/// Whether messages of `level` are written.
pub fn enabled(level: Level) -> bool {
    let max = MAX.load(Ordering::Relaxed);
    max != 255 && level as u8 <= max
}

struct StackBuf {
    buf: [u8; 512],
    len: usize,
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Write one line to stderr, unconditionally (used for the few messages a
/// user must see, such as "agent not running").
pub fn emit(args: fmt::Arguments<'_>) {
    let mut b = StackBuf {
        buf: [0; 512],
        len: 0,
    };
    let _ = b.write_fmt(args);
    b.buf[b.len] = b'\n';
    b.len += 1;
    let _ = crate::sys::fd::write(2, &b.buf[..b.len]);
}

/// Write one log line if `level` is enabled.
pub fn log(level: Level, args: fmt::Arguments<'_>) {
    if enabled(level) {
        // The raw system call keeps the log independent of any hook.
        let pid = crate::sys::raw::getpid();
        emit(format_args!("krg[{pid}] {level:?}: {args}"));
    }
}

/// `krg_log!(Level::Info, "...", args)`.
#[macro_export]
macro_rules! krg_log {
    ($lvl:expr, $($arg:tt)*) => {
        $crate::log::log($lvl, format_args!($($arg)*))
    };
}
