//! krg-node: the krg agent, one per host.

#![deny(unsafe_code)]

use clap::Parser;
use krg_node::agent::{
    self,
    config::{Config, Flags},
};

fn main() {
    let flags = Flags::parse();
    krg_node::logging::init_agent();
    let cfg = match Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("krg-node: {e:#}");
            std::process::exit(2);
        }
    };
    krg_node::reaper::install_if_init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("krg-node: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(agent::run(cfg)) {
        eprintln!("krg-node: {e:#}");
        std::process::exit(1);
    }
}
