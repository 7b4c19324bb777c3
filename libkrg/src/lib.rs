//! libkrg: the core of krg, a single system image for Linux clusters built as
//! a library OS.
//!
//! This crate holds what both sides share (the local protocol and its
//! validated framing, gpids, capabilities) and every in-process mechanism,
//! one module per subsystem. `krg-preload` turns it into `libkrg.so`;
//! `krg-node` uses the protocol and client.

pub mod capi;
pub mod caps;
pub mod checkpoint;
pub mod client;
pub mod dirs;
pub mod distant;
pub mod dsm;
pub mod frame;
pub mod gpid;
pub mod hookclient;
pub mod log;
pub mod pidcalls;
pub mod processes;
pub mod procfs;
pub mod proto;
pub mod rt;
pub mod streams;
pub mod sync;
#[allow(unsafe_code)]
mod sys;
