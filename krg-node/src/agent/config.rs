//! Agent configuration: command-line flags, or a TOML file with the same keys.

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// krg-node: the krg agent, one per host.
#[derive(Parser, Debug, Clone, Default)]
#[command(name = "krg-node", version, about)]
pub struct Flags {
    /// TOML file with the same keys as the flags (node_id, listen, ...);
    /// flags given on the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id, 1..=511 (it is encoded in the gpids born here).
    #[arg(long)]
    pub node_id: Option<u32>,
    /// Address the agent listens on for other agents (tarpc over TCP).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address other agents should use to reach this one (defaults to
    /// `--listen` when that is not a wildcard address).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// A peer agent to keep in touch with (repeatable).
    #[arg(long = "peer")]
    pub peers: Vec<SocketAddr>,
    /// An agent of the cluster to join through; the rest is learnt from it.
    #[arg(long)]
    pub seed: Option<SocketAddr>,
    /// Directory for the agent's own state.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// File holding the cluster key shared by every agent of the cluster.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Unix socket served to the application processes of this node.
    #[arg(long)]
    pub sock: Option<PathBuf>,
    /// CPU capacity of this node (default: the cgroup CPU quota, else the
    /// number of CPUs).
    #[arg(long)]
    pub cpus: Option<f64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<u32>,
    listen: Option<SocketAddr>,
    advertise: Option<SocketAddr>,
    #[serde(default)]
    peers: Vec<SocketAddr>,
    seed: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    key_file: Option<PathBuf>,
    sock: Option<PathBuf>,
    cpus: Option<f64>,
}

/// The resolved configuration of one agent.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: u32,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub peers: Vec<SocketAddr>,
    pub state_dir: PathBuf,
    pub key: Vec<u8>,
    pub sock: PathBuf,
    pub cpus: Option<f64>,
}

impl Config {
    pub fn from_flags(f: Flags) -> Result<Config> {
        let file = match &f.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config file {}", p.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config file {}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let node_id = f
            .node_id
            .or(file.node_id)
            .context("no node id: give --node-id or node_id in the config file")?;
        if node_id == 0 || node_id > libkrg::gpid::MAX_NODE {
            bail!(
                "node id {node_id} out of range 1..={}",
                libkrg::gpid::MAX_NODE
            );
        }
        let listen = f
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "0.0.0.0:7400".parse().expect("literal address"));
        let advertise = match f.advertise.or(file.advertise) {
            Some(a) => a,
            None if listen.ip().is_unspecified() => {
                bail!("--listen {listen} is a wildcard address: give --advertise")
            }
            None => listen,
        };
        let mut peers = f.peers;
        peers.extend(file.peers);
        if let Some(s) = f.seed.or(file.seed) {
            peers.push(s);
        }
        peers.retain(|p| *p != advertise);
        peers.sort();
        peers.dedup();
        let key_file = f
            .key_file
            .or(file.key_file)
            .context("no cluster key: give --key-file or key_file in the config file")?;
        let key_text = std::fs::read_to_string(&key_file)
            .with_context(|| format!("reading cluster key file {}", key_file.display()))?;
        let key = key_text.trim().as_bytes().to_vec();
        if key.len() < 16 {
            bail!(
                "cluster key in {} is too short ({} bytes; at least 16)",
                key_file.display(),
                key.len()
            );
        }
        let cpus = f.cpus.or(file.cpus);
        if let Some(c) = cpus {
            if !(c > 0.0 && c.is_finite()) {
                bail!("--cpus {c}: must be a positive number");
            }
        }
        Ok(Config {
            node_id,
            listen,
            advertise,
            peers,
            state_dir: f
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/krg")),
            key,
            sock: f
                .sock
                .or(file.sock)
                .unwrap_or_else(|| PathBuf::from(libkrg::client::DEFAULT_SOCK)),
            cpus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("krg-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn toml_file_and_flags() {
        let d = dir("toml");
        std::fs::write(d.join("key"), "0123456789abcdef0123\n").unwrap();
        let toml = format!(
            "node_id = 4\nlisten = \"10.0.0.4:7400\"\npeers = [\"10.0.0.1:7400\"]\nseed = \"10.0.0.2:7400\"\nkey_file = \"{}\"\ncpus = 0.5\n",
            d.join("key").display()
        );
        std::fs::write(d.join("node.toml"), toml).unwrap();
        let flags = Flags {
            config: Some(d.join("node.toml")),
            ..Flags::default()
        };
        let c = Config::from_flags(flags.clone()).unwrap();
        assert_eq!(c.node_id, 4);
        assert_eq!(c.advertise, "10.0.0.4:7400".parse::<SocketAddr>().unwrap());
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.cpus, Some(0.5));
        assert_eq!(c.key, b"0123456789abcdef0123");
        // A flag wins over the file.
        let c = Config::from_flags(Flags {
            node_id: Some(7),
            ..flags
        })
        .unwrap();
        assert_eq!(c.node_id, 7);
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let d = dir("bad");
        std::fs::write(d.join("key"), "short").unwrap();
        std::fs::write(d.join("typo.toml"), "node_idd = 3\n").unwrap();
        let e = Config::from_flags(Flags {
            config: Some(d.join("typo.toml")),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("node_idd"), "{e:#}");
        let e = Config::from_flags(Flags {
            node_id: Some(1),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            key_file: Some(d.join("key")),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("too short"), "{e:#}");
        let e = Config::from_flags(Flags {
            node_id: Some(512),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("out of range"), "{e:#}");
        let e = Config::from_flags(Flags {
            node_id: Some(1),
            listen: Some("0.0.0.0:7400".parse().unwrap()),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("--advertise"), "{e:#}");
    }
}
