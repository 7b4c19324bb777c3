//! The sealed network of the local cluster: one named network namespace per
//! node (`krg-nK`, address 10.77.0.K/24 on its `eth0`), each linked by a veth
//! pair to the bridge `br0`, which lives in a namespace of its own
//! (`krg-br`). Nothing is ever created in the machine's own namespace, so
//! the machine has no route into 10.77.0.0/24.

use super::sys::{self, ip};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Where iproute2 keeps named network namespaces.
pub(super) const NETNS_DIR: &str = "/run/netns";
/// The namespace that holds the bridge.
pub(super) const BRIDGE_NETNS: &str = "krg-br";
/// The bridge.
const BRIDGE: &str = "br0";
/// The cluster's subnet, shown to users.
pub(super) const SUBNET: &str = "10.77.0.0/24";

/// The named network namespace of node `id`.
pub(super) fn netns_name(id: u32) -> String {
    format!("krg-n{id}")
}

/// The file that holds node `id`'s network namespace.
pub(super) fn netns_path(id: u32) -> PathBuf {
    Path::new(NETNS_DIR).join(netns_name(id))
}

/// Node `id`'s address (10.77.0.K).
pub(super) fn address(id: u32) -> Ipv4Addr {
    // Callers keep ids within 1..=MAX_NODES (200), so this never truncates.
    Ipv4Addr::new(10, 77, 0, id as u8)
}

/// Whether a namespace name is one of ours.
fn is_ours(name: &str) -> bool {
    name == BRIDGE_NETNS
        || name
            .strip_prefix("krg-n")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The cluster's named namespaces that exist now (ours only, by name).
pub(super) fn existing() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| is_ours(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The namespace inodes of [`existing`], to find processes inside them.
pub(super) fn existing_inodes() -> HashSet<u64> {
    existing()
        .iter()
        .filter_map(|n| sys::ns_inode(&Path::new(NETNS_DIR).join(n)))
        .collect()
}

/// Create the bridge namespace, the node namespaces 1..=n, the veth pairs and
/// the addresses.
pub(super) fn create(n: u32) -> Result<()> {
    let br = BRIDGE_NETNS;
    ip(&["netns", "add", br], None).context("creating the bridge's network namespace")?;
    ip(
        &["-n", br, "-b", "-"],
        Some(&format!(
            "link set lo up\nlink add {BRIDGE} type bridge\nlink set {BRIDGE} up\n"
        )),
    )
    .with_context(|| format!("creating bridge {BRIDGE} in namespace {br}"))?;

    let mut add = String::new();
    for id in 1..=n {
        let _ = writeln!(add, "netns add {}", netns_name(id));
    }
    ip(&["-b", "-"], Some(&add)).context("creating the nodes' network namespaces")?;

    // The veth is created inside the bridge namespace and its peer is put
    // straight into the node's: no interface ever appears in the machine's
    // own namespace, not even for a moment.
    let mut veth = String::new();
    for id in 1..=n {
        let _ = writeln!(
            veth,
            "link add v{id} type veth peer name eth0 netns {}",
            netns_name(id)
        );
        let _ = writeln!(veth, "link set v{id} master {BRIDGE} up");
    }
    ip(&["-n", br, "-b", "-"], Some(&veth)).context("creating the veth pairs")?;

    for id in 1..=n {
        let ns = netns_name(id);
        ip(
            &["-n", &ns, "-b", "-"],
            Some(&format!(
                "link set lo up\naddr add {}/24 dev eth0\nlink set eth0 up\n",
                address(id)
            )),
        )
        .with_context(|| format!("configuring the network of node {id} (namespace {ns})"))?;
    }
    Ok(())
}

/// Delete every link of the bridge namespace, then every namespace of ours.
/// Deleting the links explicitly makes sure no veth or bridge survives even
/// if something still holds a reference to a namespace.
pub(super) fn destroy() -> Result<()> {
    let names = existing();
    if names.iter().any(|n| n == BRIDGE_NETNS) {
        if let Ok(out) = ip(&["-n", BRIDGE_NETNS, "-o", "link", "show"], None) {
            let mut del = String::new();
            for line in out.lines() {
                // "7: v1@if2: <BROADCAST,...> ..." or "3: br0: <...> ..."
                let Some(name) = line.split(": ").nth(1) else {
                    continue;
                };
                let name = name.split('@').next().unwrap_or(name);
                if name != "lo" && !name.is_empty() {
                    let _ = writeln!(del, "link del {name}");
                }
            }
            if !del.is_empty() {
                // -force: go on after a failure (a veth already gone with
                // its peer); what is left is checked below.
                let _ = ip(&["-n", BRIDGE_NETNS, "-force", "-b", "-"], Some(&del));
            }
        }
    }
    if !names.is_empty() {
        let mut del = String::new();
        for n in &names {
            let _ = writeln!(del, "netns del {n}");
        }
        let _ = ip(&["-force", "-b", "-"], Some(&del));
    }
    let left = existing();
    if !left.is_empty() {
        bail!(
            "network namespaces left after `ip netns del`: {}",
            left.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert_eq!(netns_name(7), "krg-n7");
        assert_eq!(netns_path(7), Path::new("/run/netns/krg-n7"));
        assert_eq!(address(1).to_string(), "10.77.0.1");
        assert_eq!(address(200).to_string(), "10.77.0.200");
    }

    #[test]
    fn only_our_namespaces_are_ours() {
        for n in ["krg-br", "krg-n1", "krg-n200"] {
            assert!(is_ours(n), "{n}");
        }
        for n in ["krg-n", "krg-nx", "krg-n1a", "krg-brx", "other", "krg-test"] {
            assert!(!is_ours(n), "{n}");
        }
    }
}
