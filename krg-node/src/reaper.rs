//! When the agent is pid 1 of a pid namespace (a node of the local
//! cluster), orphans are re-parented to it and must be reaped, or they stay
//! zombies for ever. A plain thread waits for any child; the programs the
//! agent starts for remote exec are *managed*: their own waiter thread reaps
//! them (it needs their status), so the reaper leaves them alone.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

static MANAGED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Held while starting a managed child, so that the reaper cannot reap it
/// between its birth and [`manage`].
pub fn managed_lock() -> MutexGuard<'static, Option<HashSet<i32>>> {
    MANAGED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Add `kpid` to the managed set through a held guard.
pub fn manage_locked(guard: &mut MutexGuard<'static, Option<HashSet<i32>>>, kpid: i32) {
    guard.get_or_insert_with(HashSet::new).insert(kpid);
}

/// The child was reaped by its waiter.
pub fn unmanage(kpid: i32) {
    if let Some(s) = managed_lock().as_mut() {
        s.remove(&kpid);
    }
}

/// Start the reaper thread if this process is pid 1.
pub fn install_if_init() {
    if std::process::id() != 1 {
        return;
    }
    let r = std::thread::Builder::new()
        .name("krg-reaper".into())
        .spawn(|| loop {
            // Look without reaping: a managed child's status is its waiter's.
            let Ok(pid) = crate::sys::ended_child() else {
                std::thread::sleep(std::time::Duration::from_millis(200));
                continue;
            };
            let guard = managed_lock();
            if guard.as_ref().is_some_and(|s| s.contains(&pid)) {
                drop(guard);
                // Its waiter reaps it in a moment.
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            // Not managed, so nobody waits for it.
            crate::sys::reap(pid);
        });
    if let Err(e) = r {
        eprintln!("krg-node: cannot start the zombie reaper: {e}");
    }
}
