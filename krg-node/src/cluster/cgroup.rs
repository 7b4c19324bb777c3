//! The nodes' cgroups (v1): `/sys/fs/cgroup/{cpu,cpuacct}/krg-cluster/nK`
//! (`krg-cluster-<name>/nK` for instance `<name>`: siblings, never nested,
//! so one instance's parent never holds another's nodes). The cpu
//! controller gives node K its capacity (CFS quota over a 100 ms period);
//! cpuacct counts what the node used.

use super::instance::Instance;
use super::sys;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The cgroup v1 hierarchies a node joins (deduplicated at use: on systems
/// that co-mount cpu and cpuacct both names lead to the same directory).
const ROOTS: [&str; 2] = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuacct"];
/// The CFS period; the quota is `cpus * PERIOD_US`.
pub(super) const PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts.
const MIN_QUOTA_US: u64 = 1_000;

/// The hierarchies, each once.
pub(super) fn roots() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen = Vec::new();
    for r in ROOTS {
        let real = std::fs::canonicalize(r).unwrap_or_else(|_| PathBuf::from(r));
        if !seen.contains(&real) {
            seen.push(real);
            out.push(PathBuf::from(r));
        }
    }
    out
}

/// Fail early, and clearly, if cgroup v1's cpu controller is not there.
pub(super) fn check() -> Result<()> {
    for r in ROOTS {
        if !Path::new(r).join("cgroup.procs").exists() {
            bail!("{r} is not a cgroup v1 hierarchy (the local cluster needs cgroup v1's cpu and cpuacct controllers)");
        }
    }
    if !Path::new(ROOTS[0]).join("cpu.cfs_quota_us").exists() {
        bail!(
            "{}/cpu.cfs_quota_us is missing: the kernel has no CFS bandwidth control",
            ROOTS[0]
        );
    }
    Ok(())
}

/// The CFS quota that gives `cpus` CPUs.
pub(super) fn quota_us(cpus: f64) -> u64 {
    (cpus * PERIOD_US as f64).round() as u64
}

/// Whether `cpus` gives a quota the kernel accepts.
pub(super) fn valid_cpus(cpus: f64) -> bool {
    cpus.is_finite() && cpus > 0.0 && quota_us(cpus) >= MIN_QUOTA_US && cpus <= 4096.0
}

/// Node `id`'s cgroup directories, one per hierarchy.
pub(super) fn node_dirs(inst: &Instance, id: u32) -> Vec<PathBuf> {
    roots()
        .into_iter()
        .map(|r| r.join(inst.cgroup_parent()).join(format!("n{id}")))
        .collect()
}

/// Node `id`'s `cgroup.procs` files (writing a pid there moves the process).
pub(super) fn procs_files(inst: &Instance, id: u32) -> Vec<PathBuf> {
    node_dirs(inst, id)
        .into_iter()
        .map(|d| d.join("cgroup.procs"))
        .collect()
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value} to {}", path.display()))
}

/// Create node `id`'s cgroups and set its CPU quota.
pub(super) fn create(inst: &Instance, id: u32, cpus: f64) -> Result<()> {
    for d in node_dirs(inst, id) {
        std::fs::create_dir_all(&d)
            .with_context(|| format!("creating cgroup {} for node {id}", d.display()))?;
    }
    let cpu = Path::new(ROOTS[0])
        .join(inst.cgroup_parent())
        .join(format!("n{id}"));
    write(&cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
    write(&cpu.join("cpu.cfs_quota_us"), &quota_us(cpus).to_string())?;
    Ok(())
}

/// Every node cgroup directory of the instance that exists now, in every
/// hierarchy.
fn existing_node_dirs(inst: &Instance) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for r in roots() {
        if let Ok(d) = std::fs::read_dir(r.join(inst.cgroup_parent())) {
            v.extend(
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    v.sort();
    v
}

/// Every process in any node cgroup of the instance.
pub(super) fn all_tasks(inst: &Instance) -> Vec<i32> {
    let mut v = Vec::new();
    for d in existing_node_dirs(inst) {
        if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
            v.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// The instance's cgroup parents that exist now.
pub(super) fn any_left(inst: &Instance) -> Vec<PathBuf> {
    roots()
        .into_iter()
        .map(|r| r.join(inst.cgroup_parent()))
        .filter(|p| p.exists())
        .collect()
}

/// Remove every node cgroup of the instance and its parents, killing what
/// is still inside and retrying until the kernel lets go (`rmdir` fails
/// with EBUSY while a task, even a dying one, is in the group).
pub(super) fn destroy(inst: &Instance, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut busy = Vec::new();
        for d in existing_node_dirs(inst) {
            if let Err(e) = std::fs::remove_dir(&d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    busy.push(format!("{}: {e}", d.display()));
                }
            }
        }
        if busy.is_empty() {
            for p in any_left(inst) {
                if let Err(e) = std::fs::remove_dir(&p) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        busy.push(format!("{}: {e}", p.display()));
                    }
                }
            }
        }
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("cannot remove cgroups: {}", busy.join("; "));
        }
        let tasks = all_tasks(inst);
        if !tasks.is_empty() {
            sys::kill_and_wait(&tasks, Duration::from_millis(500));
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_from_cpus() {
        assert_eq!(quota_us(1.0), 100_000);
        assert_eq!(quota_us(0.5), 50_000);
        assert_eq!(quota_us(1.5), 150_000);
        assert_eq!(quota_us(0.01), 1_000);
    }

    #[test]
    fn cpus_the_kernel_accepts() {
        for c in [0.01, 0.5, 1.0, 2.0, 64.0] {
            assert!(valid_cpus(c), "{c}");
        }
        for c in [0.0, -1.0, 0.004, f64::NAN, f64::INFINITY, 1e9] {
            assert!(!valid_cpus(c), "{c}");
        }
    }

    #[test]
    fn node_paths() {
        let d = Instance::default_instance();
        let dirs = node_dirs(&d, 3);
        assert!(dirs.contains(&PathBuf::from("/sys/fs/cgroup/cpu/krg-cluster/n3")));
        assert!(procs_files(&d, 3)
            .iter()
            .all(|p| p.ends_with("krg-cluster/n3/cgroup.procs")));
        let f = Instance::named("foo").unwrap();
        assert!(node_dirs(&f, 3).contains(&PathBuf::from("/sys/fs/cgroup/cpu/krg-cluster-foo/n3")));
    }
}
