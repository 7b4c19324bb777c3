//! krg: the user command of the krg cluster.

use clap::Parser;

fn main() {
    krg_node::logging::init_cli();
    let cli = krg_node::cli::Cli::parse();
    std::process::exit(krg_node::cli::main(cli));
}
