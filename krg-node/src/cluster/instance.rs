//! Instances: several local clusters side by side on one machine, so that
//! tests (and people) can each have their own. `KRG_CLUSTER=<name>` (or
//! `krg cluster --name <name>`) selects one; unset or empty selects the
//! default instance, whose names are those of the single local cluster of
//! old (`/run/krg-cluster`, `krg-nK`, `krg-br`, `10.77.0.0/24`, cgroup
//! `krg-cluster`). Instance `foo` has `/run/krg-cluster-foo`,
//! `krg-foo-nK`, `krg-foo-br`, cgroup `krg-cluster-foo` and a subnet
//! `10.77.X.0/24` allocated at `up` (see [`free_subnet`]).
//!
//! Names are 1 to 8 of `[a-z0-9]`: no `-`, so `krg-<name>-` prefixes never
//! overlap between instances nor with the default's `krg-nK` / `krg-br`.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Where iproute2 keeps named network namespaces.
pub(super) const NETNS_DIR: &str = "/run/netns";

/// The environment variable that selects an instance.
pub const ENV: &str = "KRG_CLUSTER";
/// The longest instance name.
pub const MAX_NAME: usize = 8;
/// The default instance's host directory (state, key, logs).
pub(super) const DEFAULT_RUN_DIR: &str = "/run/krg-cluster";
/// Held while a named instance picks its subnet (and writes its state file,
/// which records it), so two `up`s never pick the same one.
pub(super) const MACHINE_LOCK: &str = "/run/krg-cluster.lock";
/// The subnets of named instances: 10.77.X.0/24 with X in this range (the
/// default instance has X = 0).
pub(super) const SUBNETS: std::ops::RangeInclusive<u8> = 1..=254;

/// One local cluster of this machine, by name (`None`: the default one).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instance {
    name: Option<String>,
}

/// Whether `name` may name an instance: 1 to 8 of `[a-z0-9]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl Instance {
    /// The default instance (today's single local cluster).
    pub fn default_instance() -> Instance {
        Instance { name: None }
    }

    /// Instance `name`; the empty name is the default instance.
    pub fn named(name: &str) -> Result<Instance> {
        if name.is_empty() {
            return Ok(Instance::default_instance());
        }
        if !valid_name(name) {
            bail!(
                "{name:?} cannot name a local cluster instance: 1 to {MAX_NAME} characters of a-z and 0-9"
            );
        }
        Ok(Instance {
            name: Some(name.to_string()),
        })
    }

    /// The instance `--name` gives, else `KRG_CLUSTER`, else the default.
    pub fn select(option: Option<&str>) -> Result<Instance> {
        match option {
            Some(n) => Instance::named(n),
            None => Instance::from_env(),
        }
    }

    /// The instance `KRG_CLUSTER` selects (the default if unset or empty).
    pub fn from_env() -> Result<Instance> {
        match std::env::var(ENV) {
            Ok(v) => Instance::named(&v).map_err(|e| e.context(format!("{ENV}={v}"))),
            Err(std::env::VarError::NotPresent) => Ok(Instance::default_instance()),
            Err(e) => bail!("{ENV}: {e}"),
        }
    }

    /// The name; `None` for the default instance.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// "local cluster" or "local cluster foo", for messages.
    pub fn title(&self) -> String {
        match &self.name {
            None => "local cluster".into(),
            Some(n) => format!("local cluster {n}"),
        }
    }

    /// The `krg cluster SUB` command line that acts on this instance, for
    /// messages that tell the user what to run.
    pub fn command(&self, sub: &str) -> String {
        match &self.name {
            None => format!("krg cluster {sub}"),
            Some(n) => format!("{ENV}={n} krg cluster {sub}"),
        }
    }

    /// The host directory of state, key, lock and logs.
    pub fn run_dir(&self) -> PathBuf {
        match &self.name {
            None => PathBuf::from(DEFAULT_RUN_DIR),
            Some(n) => PathBuf::from(format!("{DEFAULT_RUN_DIR}-{n}")),
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.run_dir().join("state.json")
    }

    pub fn key_file(&self) -> PathBuf {
        self.run_dir().join("cluster.key")
    }

    /// The nodes' /etc/hosts (bound read-only over theirs): the machine's
    /// lines, then every node's name and address.
    pub fn hosts_file(&self) -> PathBuf {
        self.run_dir().join("hosts")
    }

    /// Held while `up` or `down` of this instance works.
    pub fn lock_file(&self) -> PathBuf {
        self.run_dir().join("lock")
    }

    /// Node `id`'s log on the host.
    pub fn log_path(&self, id: u32) -> PathBuf {
        self.run_dir().join(format!("n{id}.log"))
    }

    /// What every network namespace name of this instance starts with.
    fn netns_prefix(&self) -> String {
        match &self.name {
            None => "krg-".into(),
            Some(n) => format!("krg-{n}-"),
        }
    }

    /// Node `id`'s named network namespace (`krg-nK`, `krg-foo-nK`).
    pub fn netns_name(&self, id: u32) -> String {
        format!("{}n{id}", self.netns_prefix())
    }

    /// The namespace of the bridge (`krg-br`, `krg-foo-br`).
    pub fn bridge_netns(&self) -> String {
        format!("{}br", self.netns_prefix())
    }

    /// Whether a named network namespace is one of this instance's.
    pub fn owns_netns(&self, ns: &str) -> bool {
        Instance::of_netns(ns).as_ref() == Some(self)
    }

    /// The instance a network namespace name belongs to, if any:
    /// `krg-br` and `krg-nK` are the default's, `krg-<name>-br` and
    /// `krg-<name>-nK` are `<name>`'s.
    pub fn of_netns(ns: &str) -> Option<Instance> {
        let rest = ns.strip_prefix("krg-")?;
        let (name, node) = match rest.split_once('-') {
            Some((name, node)) if valid_name(name) => (Some(name), node),
            Some(_) => return None,
            None => (None, rest),
        };
        let is_node = |s: &str| {
            s.strip_prefix('n')
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        };
        (node == "br" || is_node(node)).then(|| Instance {
            name: name.map(str::to_string),
        })
    }

    /// The parent of the nodes' cgroups in each hierarchy.
    pub fn cgroup_parent(&self) -> String {
        match &self.name {
            None => "krg-cluster".into(),
            Some(n) => format!("krg-cluster-{n}"),
        }
    }

    /// The instance a directory name (in /run or a cgroup hierarchy) is the
    /// run directory or cgroup parent of: `krg-cluster` or
    /// `krg-cluster-<name>`.
    pub fn of_dir_name(dir: &str) -> Option<Instance> {
        match dir.strip_prefix("krg-cluster")? {
            "" => Some(Instance::default_instance()),
            rest => {
                let name = rest.strip_prefix('-')?;
                valid_name(name).then(|| Instance {
                    name: Some(name.to_string()),
                })
            }
        }
    }
}

impl std::fmt::Display for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name.as_deref().unwrap_or("(default)"))
    }
}

/// The subnet 10.77.X.0/24 of index X.
pub fn subnet(x: u8) -> String {
    format!("10.77.{x}.0/24")
}

/// The lowest subnet index of [`SUBNETS`] that no live instance holds.
pub(super) fn free_subnet(held: &[u8]) -> Option<u8> {
    SUBNETS.into_iter().find(|x| !held.contains(x))
}

/// Every instance something is left of on this machine (a run directory
/// with a state file, a network namespace or a cgroup parent), sorted, the
/// default first.
pub(super) fn present(cgroup_roots: &[PathBuf]) -> Vec<Instance> {
    let mut found = Vec::new();
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for n in names(Path::new("/run")) {
        if let Some(i) = Instance::of_dir_name(&n) {
            if i.state_file().exists() {
                found.push(i);
            }
        }
    }
    found.extend(
        names(Path::new(NETNS_DIR))
            .iter()
            .filter_map(|n| Instance::of_netns(n)),
    );
    for r in cgroup_roots {
        found.extend(names(r).iter().filter_map(|n| Instance::of_dir_name(n)));
    }
    found.sort();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for n in ["a", "foo", "t0abc123", "12345678", "br"] {
            assert!(valid_name(n), "{n}");
            assert!(Instance::named(n).is_ok(), "{n}");
        }
        for n in ["", "123456789", "Foo", "a-b", "a_b", "a.b", "é", "a b"] {
            assert!(!valid_name(n), "{n:?}");
        }
        assert!(Instance::named("a-b").is_err());
        assert_eq!(
            Instance::named("").unwrap(),
            Instance::default_instance(),
            "empty is the default"
        );
    }

    #[test]
    fn the_default_instance_keeps_the_old_names() {
        let d = Instance::default_instance();
        assert_eq!(d.run_dir(), Path::new("/run/krg-cluster"));
        assert_eq!(d.state_file(), Path::new("/run/krg-cluster/state.json"));
        assert_eq!(d.key_file(), Path::new("/run/krg-cluster/cluster.key"));
        assert_eq!(d.lock_file(), Path::new("/run/krg-cluster/lock"));
        assert_eq!(d.log_path(2), Path::new("/run/krg-cluster/n2.log"));
        assert_eq!(d.netns_name(7), "krg-n7");
        assert_eq!(d.bridge_netns(), "krg-br");
        assert_eq!(d.cgroup_parent(), "krg-cluster");
        assert_eq!(d.title(), "local cluster");
        assert_eq!(d.command("down"), "krg cluster down");
        assert_eq!(subnet(0), "10.77.0.0/24");
    }

    #[test]
    fn a_named_instance_has_names_of_its_own() {
        let f = Instance::named("foo").unwrap();
        assert_eq!(f.run_dir(), Path::new("/run/krg-cluster-foo"));
        assert_eq!(f.state_file(), Path::new("/run/krg-cluster-foo/state.json"));
        assert_eq!(f.log_path(3), Path::new("/run/krg-cluster-foo/n3.log"));
        assert_eq!(f.netns_name(3), "krg-foo-n3");
        assert_eq!(f.bridge_netns(), "krg-foo-br");
        assert_eq!(f.cgroup_parent(), "krg-cluster-foo");
        assert_eq!(f.command("down"), "KRG_CLUSTER=foo krg cluster down");
        assert_eq!(subnet(9), "10.77.9.0/24");
    }

    #[test]
    fn namespaces_belong_to_exactly_one_instance() {
        let d = Instance::default_instance();
        let n1 = Instance::named("n1").unwrap();
        let br = Instance::named("br").unwrap();
        let foo = Instance::named("foo").unwrap();
        let all = [&d, &n1, &br, &foo];
        let cases: [(&str, Option<&Instance>); 16] = [
            ("krg-br", Some(&d)),
            ("krg-n1", Some(&d)),
            ("krg-n200", Some(&d)),
            ("krg-n1-n1", Some(&n1)),
            ("krg-n1-br", Some(&n1)),
            ("krg-br-br", Some(&br)),
            ("krg-br-n4", Some(&br)),
            ("krg-foo-n12", Some(&foo)),
            ("krg-foo-br", Some(&foo)),
            ("krg-n", None),
            ("krg-nx", None),
            ("krg-n1a", None),
            ("krg-brx", None),
            ("krg-foo-n", None),
            ("krg-Foo-n1", None),
            ("other", None),
        ];
        for (ns, owner) in cases {
            assert_eq!(Instance::of_netns(ns).as_ref(), owner, "{ns}");
            for i in all {
                assert_eq!(i.owns_netns(ns), owner == Some(i), "{ns} and {i}");
            }
        }
        for i in all {
            for id in [1, 9, 200] {
                assert_eq!(Instance::of_netns(&i.netns_name(id)).as_ref(), Some(i));
            }
            assert_eq!(Instance::of_netns(&i.bridge_netns()).as_ref(), Some(i));
        }
        for ns in [
            "krg-test",
            "krg-foo-bar-n1",
            "krg-toolongname-n1",
            "krg--n1",
        ] {
            assert_eq!(Instance::of_netns(ns), None, "{ns}");
        }
    }

    #[test]
    fn run_dirs_and_cgroups_name_their_instance() {
        assert_eq!(
            Instance::of_dir_name("krg-cluster"),
            Some(Instance::default_instance())
        );
        assert_eq!(
            Instance::of_dir_name("krg-cluster-foo"),
            Some(Instance::named("foo").unwrap())
        );
        // The machine lock, the old tests' lock, unrelated names.
        for n in [
            "krg-cluster.lock",
            "krg-cluster-tests.lock",
            "krg-cluster-",
            "krg-clusters",
            "krg-cluster-a-b",
            "krg",
        ] {
            assert_eq!(Instance::of_dir_name(n), None, "{n}");
        }
        for i in [Instance::default_instance(), Instance::named("z9").unwrap()] {
            let dir = i.run_dir();
            let last = dir.file_name().unwrap().to_str().unwrap();
            assert_eq!(Instance::of_dir_name(last), Some(i.clone()));
            assert_eq!(Instance::of_dir_name(&i.cgroup_parent()), Some(i));
        }
    }

    #[test]
    fn subnets_are_allocated_lowest_free_first() {
        assert_eq!(free_subnet(&[]), Some(1));
        assert_eq!(free_subnet(&[1, 2, 4]), Some(3));
        assert_eq!(free_subnet(&[0, 1]), Some(2), "0 is the default's");
        let all: Vec<u8> = SUBNETS.collect();
        assert_eq!(free_subnet(&all), None);
        let mut most = all.clone();
        most.retain(|&x| x != 254);
        assert_eq!(free_subnet(&most), Some(254));
    }
}
