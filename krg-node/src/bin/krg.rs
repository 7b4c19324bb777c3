//! krg: the user command of the krg cluster.

#![deny(unsafe_code)]

use clap::Parser;

fn main() {
    // Like every Unix command: a reader that goes away (`krg ps | head`)
    // ends it quietly, instead of a panic of println! on EPIPE (Rust
    // ignores SIGPIPE by default). Its own sockets send with MSG_NOSIGNAL.
    let _ = krg_node::sys::default_signal(nix::sys::signal::Signal::SIGPIPE);
    krg_node::logging::init_cli();
    let cli = krg_node::cli::Cli::parse();
    std::process::exit(krg_node::cli::main(cli));
}
