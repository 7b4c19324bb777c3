//! libkrg: the core of krg, a single system image for Linux clusters built as
//! a library OS.
//!
//! This crate holds what both sides share (the local protocol and its
//! validated framing, gpids, capabilities) and every in-process mechanism,
//! one module per subsystem. `krg-preload` turns it into `libkrg.so`;
//! `krg-node` uses the protocol and client.
//!
//! `unsafe` is denied everywhere but in `sys` (the wrappers of system
//! calls and the views of the application's pointers), in the `abi` fences
//! of the modules whose entry points take the application's raw pointers,
//! and in the parts of `checkpoint` that run without libc or below Rust's
//! rules (its restorer, architecture code, capture allocator, post-copy
//! thread and signal handler, named in `checkpoint/mod.rs`). See
//! docs/architecture/README.md.

#![deny(unsafe_code)]

pub mod capi;
pub mod caps;
pub mod checkpoint;
pub mod client;
pub mod dirs;
pub mod distant;
pub mod dsm;
pub mod error;
pub mod frame;
pub mod gpid;
pub mod hookclient;
pub mod log;
pub mod pidcalls;
pub mod proc_self;
pub mod processes;
pub mod procfs;
pub mod proto;
pub mod rt;
pub mod start;
pub mod streams;
pub mod sync;
#[allow(unsafe_code)]
mod sys;
