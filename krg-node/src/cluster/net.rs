//! The sealed network of a local cluster instance: one named network
//! namespace per node (`krg-nK`, or `krg-<name>-nK` for instance `<name>`;
//! address 10.77.X.K/24 on its `eth0`), each linked by a veth pair to the
//! bridge `br0`, which lives in a namespace of the instance's own (`krg-br`,
//! `krg-<name>-br`). Nothing is ever created in the machine's own
//! namespace, so the machine has no route into 10.77.X.0/24; and since each
//! instance has its own bridge, no packet passes between instances.

use super::instance::{Instance, NETNS_DIR};
use super::sys::{self, ip};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// The bridge, in the instance's bridge namespace (the name is the same in
/// every instance: they never share a namespace).
const BRIDGE: &str = "br0";

/// The file that holds node `id`'s network namespace.
pub(super) fn netns_path(inst: &Instance, id: u32) -> PathBuf {
    Path::new(NETNS_DIR).join(inst.netns_name(id))
}

/// Node `id`'s address in subnet `x` (10.77.X.K).
pub(super) fn address(x: u8, id: u32) -> Ipv4Addr {
    // Callers keep ids within 1..=MAX_NODES (200), so this never truncates.
    Ipv4Addr::new(10, 77, x, id as u8)
}

/// The instance's named namespaces that exist now (by name).
pub(super) fn existing(inst: &Instance) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| inst.owns_netns(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The namespace inodes of [`existing`], to find processes inside them.
pub(super) fn existing_inodes(inst: &Instance) -> HashSet<u64> {
    existing(inst)
        .iter()
        .filter_map(|n| sys::ns_inode(&Path::new(NETNS_DIR).join(n)))
        .collect()
}

/// Create the bridge namespace, the node namespaces 1..=n, the veth pairs and
/// the addresses (in subnet `x`).
pub(super) fn create(inst: &Instance, x: u8, n: u32) -> Result<()> {
    let br = &inst.bridge_netns();
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
        let _ = writeln!(add, "netns add {}", inst.netns_name(id));
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
            inst.netns_name(id)
        );
        let _ = writeln!(veth, "link set v{id} master {BRIDGE} up");
    }
    ip(&["-n", br, "-b", "-"], Some(&veth)).context("creating the veth pairs")?;

    for id in 1..=n {
        let ns = inst.netns_name(id);
        ip(
            &["-n", &ns, "-b", "-"],
            Some(&format!(
                "link set lo up\naddr add {}/24 dev eth0\nlink set eth0 up\n",
                address(x, id)
            )),
        )
        .with_context(|| format!("configuring the network of node {id} (namespace {ns})"))?;
    }
    Ok(())
}

/// Delete every link of the instance's bridge namespace, then every
/// namespace of the instance (and no other). Deleting the links explicitly
/// makes sure no veth or bridge survives even if something still holds a
/// reference to a namespace.
pub(super) fn destroy(inst: &Instance) -> Result<()> {
    let names = existing(inst);
    let br = inst.bridge_netns();
    if names.contains(&br) {
        if let Ok(out) = ip(&["-n", &br, "-o", "link", "show"], None) {
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
                let _ = ip(&["-n", &br, "-force", "-b", "-"], Some(&del));
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
    let left = existing(inst);
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
    fn paths_and_addresses() {
        let d = Instance::default_instance();
        assert_eq!(netns_path(&d, 7), Path::new("/run/netns/krg-n7"));
        let f = Instance::named("foo").unwrap();
        assert_eq!(netns_path(&f, 7), Path::new("/run/netns/krg-foo-n7"));
        assert_eq!(address(0, 1).to_string(), "10.77.0.1");
        assert_eq!(address(0, 200).to_string(), "10.77.0.200");
        assert_eq!(address(254, 3).to_string(), "10.77.254.3");
    }
}
