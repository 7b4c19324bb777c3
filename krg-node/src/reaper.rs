//! When the agent is pid 1 of a pid namespace (a node of the local
//! cluster), orphans are re-parented to it and must be reaped, or they stay
//! zombies for ever. A plain thread blocked in `waitid` does that.

/// Start the reaper thread if this process is pid 1.
pub fn install_if_init() {
    if std::process::id() != 1 {
        return;
    }
    let r = std::thread::Builder::new()
        .name("krg-reaper".into())
        .spawn(|| loop {
            // SAFETY: waitpid with a null status pointer is allowed; it
            // reaps any child (orphans included) and blocks until one exits.
            let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::__WALL) };
            if r < 0 {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
    if let Err(e) = r {
        eprintln!("krg-node: cannot start the zombie reaper: {e}");
    }
}
