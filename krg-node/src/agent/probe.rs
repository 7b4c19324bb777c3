//! Load probes: CPU capacity, runnable tasks, memory. Sampled about once a
//! second and shared with every peer in heartbeats (`krg status`).

use std::path::PathBuf;

/// CPU capacity: `--cpus`, else this process's cgroup v1 CPU quota, else the
/// number of online CPUs.
pub fn cpu_capacity(configured: Option<f64>) -> f64 {
    if let Some(c) = configured {
        return c;
    }
    if let Some(c) = cgroup_quota() {
        return c;
    }
    std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0)
}

fn cgroup_quota() -> Option<f64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _id = parts.next()?;
        let ctrls = parts.next()?;
        let p = parts.next()?;
        ctrls.split(',').any(|c| c == "cpu").then(|| p.to_string())
    })?;
    let dir = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
        .iter()
        .map(|b| PathBuf::from(format!("{b}{path}")))
        .find(|d| d.join("cpu.cfs_quota_us").exists())?;
    let quota: i64 = std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let period: i64 = std::fs::read_to_string(dir.join("cpu.cfs_period_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

/// Runnable threads visible in this node's /proc (its pid namespace in the
/// local cluster, the whole host on a real one), the agent's own excluded.
pub fn runnable_tasks() -> u32 {
    let me = std::process::id().to_string();
    let mut n = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(e.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("stat")) {
                if let Some(close) = s.rfind(')') {
                    if s.as_bytes().get(close + 2) == Some(&b'R') {
                        n += 1;
                    }
                }
            }
        }
    }
    n
}

/// (MemTotal, MemAvailable) in kB.
pub fn memory_kb() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |key: &str| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (get("MemTotal:"), get("MemAvailable:"))
}

/// Exponentially smoothed runnable/capacity ratio.
#[derive(Debug, Default)]
pub struct LoadAvg {
    value: Option<f64>,
}

impl LoadAvg {
    pub fn update(&mut self, runnable: u32, cpus: f64) -> f64 {
        let now = runnable as f64 / cpus.max(0.01);
        let v = match self.value {
            Some(old) => old * 0.5 + now * 0.5,
            None => now,
        };
        self.value = Some(v);
        v
    }

    pub fn get(&self) -> f64 {
        self.value.unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_sane() {
        assert!(cpu_capacity(None) > 0.0);
        assert_eq!(cpu_capacity(Some(0.5)), 0.5);
        let (t, f) = memory_kb();
        assert!(t > 0 && f <= t);
        let mut l = LoadAvg::default();
        assert_eq!(l.update(2, 0.5), 4.0);
        assert_eq!(l.update(0, 0.5), 2.0);
    }
}
