//! Logging of the agent and the `krg` command: `tracing`, filtered by
//! `KRG_LOG` (same variable as the in-process library). The agent logs
//! warnings (refused peers, malformed requests) unless told otherwise; the
//! command logs nothing unless told.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

fn init(default: &str) {
    let filter = match std::env::var("KRG_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            let v = match v.trim() {
                "1" | "on" | "true" => "info",
                "0" | "off" | "none" => "off",
                other => other,
            }
            .to_string();
            // tarpc traces every RPC at info: keep it quiet unless asked.
            let v = if v.contains("tarpc") {
                v
            } else {
                format!("{v},tarpc=warn")
            };
            EnvFilter::try_new(&v).unwrap_or_else(|_| EnvFilter::new(default))
        }
        _ => EnvFilter::new(format!("{default},tarpc=error")),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// For `krg-node`.
pub fn init_agent() {
    init("warn");
}

/// For `krg`.
pub fn init_cli() {
    init("off");
}
