//! The load balancer: every agent, once a second, moves at most one of its
//! running CPU-bound processes to a less loaded node.
//!
//! Policies (hot-swapped cluster-wide with `krg sched balance NAME`; they
//! travel and are versioned with the placement policy):
//! - `off` (the default): nothing moves by itself.
//! - `threshold`: move when this node stays more loaded than the least
//!   loaded node by more than one process's worth on both sides: with
//!   `L` = runnable tasks per CPU, move one process from here (capacity
//!   `c`) to `t` (capacity `ct`) only if `L - 1/c >= Lt + 1/ct`, so that
//!   after the move this node is still at least as loaded as the target:
//!   a move never reverses the imbalance, which is what prevents
//!   ping-pong. The imbalance must last two rounds (unless it is worth three
//!   processes or more: then at once); then each round plans
//!   as many moves (at most four) as keep that rule, each weighed with the
//!   ones before it; moves of the last few seconds are counted before the
//!   load probes see them; a process moved recently is not moved again for
//!   a while.
//!
//! Only processes that run libkrg, have the `migrate` capability, are
//! runnable and capturable (no children, no fd that cannot move) are
//! candidates; the one with the most CPU time lately goes first.

use super::Scheduler;
use crate::agent::common::lock;
use libkrg::caps::Caps;
use libkrg::proto::ErrorReply;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// Period of a balancing round.
pub const EVERY: Duration = Duration::from_millis(500);
/// The policy in force when an agent starts.
pub const DEFAULT: &str = "off";
/// Every policy name.
pub const NAMES: &[&str] = &["off", "threshold"];
/// A process is not moved again sooner than this.
const PROCESS_COOLDOWN: Duration = Duration::from_secs(10);
/// Moves younger than this are counted in the loads (the probes average
/// over about a second and travel in heartbeats).
const IN_FLIGHT: Duration = Duration::from_millis(1500);
/// Rounds an imbalance must last before the first move.
const PERSIST_ROUNDS: u32 = 2;
/// An imbalance of this many processes' worth needs no persistence.
const BIG_GAP: f64 = 3.0;
/// Most moves one node starts in a round.
const MAX_PER_ROUND: usize = 4;

/// Validate a balancing policy name.
pub fn check_name(name: &str) -> Result<(), String> {
    if NAMES.contains(&name) {
        Ok(())
    } else {
        Err(format!(
            "unknown load-balancing policy `{name}`: one of {}",
            NAMES.join(", ")
        ))
    }
}

/// The balancer's memory on one agent.
#[derive(Debug, Default)]
pub struct State {
    /// Consecutive rounds this node was found overloaded.
    over_rounds: u32,
    /// Recent moves from here: (when, target node).
    moves: Vec<(Instant, u32)>,
    /// When each process was last moved by this agent.
    moved: HashMap<i32, Instant>,
    /// Last CPU time seen per process (ms), to rank candidates.
    cpu: HashMap<i32, u64>,
    /// A move is under way (one at a time).
    busy: bool,
}

/// One node as the balancer weighs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub id: u32,
    pub cpus: f64,
    /// Runnable tasks per CPU.
    pub load: f64,
}

/// The `threshold` decision: the node to move one process to, if any.
/// `me` is this node (already corrected for moves in flight).
pub fn threshold_target(me: Load, others: &[Load]) -> Option<u32> {
    let per = |l: &Load| 1.0 / l.cpus.max(0.01);
    others
        .iter()
        .filter(|t| t.id != me.id)
        .filter(|t| me.load - per(&me) >= t.load + per(t) - 1e-9)
        .min_by(|a, b| {
            (a.load + per(a))
                .partial_cmp(&(b.load + per(b)))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.id.cmp(&b.id))
        })
        .map(|t| t.id)
}

impl Scheduler {
    fn balancer(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.balancer)
    }

    /// One round (called every [`EVERY`]): the moves to make, in order
    /// (none most of the time). When there are some, the balancer is busy
    /// until [`Scheduler::balance_done`]; each move's outcome goes to
    /// [`Scheduler::balance_moved`].
    pub(crate) fn balance_plan(&self) -> Vec<(i32, u32)> {
        if self.sched.balance() != "threshold" {
            self.balancer().over_rounds = 0;
            return Vec::new();
        }
        let now = Instant::now();
        let me_id = self.node.node_id();
        let statuses = self.node.status();
        let mut loads: Vec<Load> = statuses
            .iter()
            .filter(|s| s.up && s.cpus > 0.0 && s.load.is_finite())
            .map(|s| Load {
                id: s.id,
                cpus: s.cpus,
                load: s.load,
            })
            .collect();
        {
            let mut st = self.balancer();
            if st.busy {
                return Vec::new();
            }
            st.moves.retain(|(t, _)| now.duration_since(*t) < IN_FLIGHT);
            st.moved
                .retain(|_, t| now.duration_since(*t) < PROCESS_COOLDOWN);
            // Count the moves the probes have not seen yet.
            for (_, to) in &st.moves {
                for l in loads.iter_mut() {
                    if l.id == *to {
                        l.load += 1.0 / l.cpus;
                    } else if l.id == me_id {
                        l.load -= 1.0 / l.cpus;
                    }
                }
            }
            let Some(me) = loads.iter().find(|l| l.id == me_id).copied() else {
                return Vec::new();
            };
            let Some(first) = threshold_target(me, &loads) else {
                st.over_rounds = 0;
                return Vec::new();
            };
            st.over_rounds += 1;
            // A gap of several processes is no blip: act at once.
            let gap = loads
                .iter()
                .find(|l| l.id == first)
                .map(|t| (me.load - t.load) * me.cpus.min(t.cpus))
                .unwrap_or(0.0);
            if gap >= BIG_GAP {
                st.over_rounds = st.over_rounds.max(PERSIST_ROUNDS);
            }
            // Rank the runnable local processes by CPU time since last round.
            let procs = self.node.procs().ps();
            let mut cands: Vec<(u64, i32)> = Vec::new();
            let mut seen = HashMap::new();
            for p in &procs {
                let prev = st.cpu.get(&p.pid).copied().unwrap_or(p.cpu_time_ms);
                seen.insert(p.pid, p.cpu_time_ms);
                if p.node == me_id
                    && p.state == "R"
                    && Caps::from_bits(p.caps).contains(Caps::MIGRATE)
                    && !st.moved.contains_key(&p.pid)
                {
                    cands.push((p.cpu_time_ms.saturating_sub(prev), p.pid));
                }
            }
            st.cpu = seen;
            if st.over_rounds < PERSIST_ROUNDS || cands.is_empty() {
                return Vec::new();
            }
            cands.sort_by(|a, b| b.cmp(a));
            // As many moves as it takes to stop being the most loaded (at
            // most MAX_PER_ROUND), each weighed with the ones before it.
            let mut plan = Vec::new();
            for (_, g) in cands {
                let Some(me) = loads.iter().find(|l| l.id == me_id).copied() else {
                    break;
                };
                let Some(to) = threshold_target(me, &loads) else {
                    break;
                };
                for l in loads.iter_mut() {
                    if l.id == to {
                        l.load += 1.0 / l.cpus;
                    } else if l.id == me_id {
                        l.load -= 1.0 / l.cpus;
                    }
                }
                plan.push((g, to));
                if plan.len() >= MAX_PER_ROUND {
                    break;
                }
            }
            if plan.is_empty() {
                return Vec::new();
            }
            st.busy = true;
            plan
        }
    }

    /// A move of [`Scheduler::balance_plan`] ended: `Ok` with the time it
    /// took; the process is not moved again for a while either way.
    pub(crate) fn balance_moved(&self, g: i32, to: u32, done: Result<u64, ErrorReply>) {
        match done {
            Ok(ms) => {
                info!("balancer: moved pid {g} to node {to} ({ms} ms)");
                let mut st = self.balancer();
                let t = Instant::now();
                st.moves.push((t, to));
                st.moved.insert(g, t);
            }
            Err(e) => {
                debug!("balancer: pid {g} stays: {}", e.msg);
                self.balancer().moved.insert(g, Instant::now());
            }
        }
    }

    /// The moves of the last plan are over.
    pub(crate) fn balance_done(&self) {
        self.balancer().busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(id: u32, cpus: f64, procs: f64) -> Load {
        Load {
            id,
            cpus,
            load: procs / cpus,
        }
    }

    #[test]
    fn moves_only_when_it_does_not_reverse_the_imbalance() {
        // 8 processes on one of four half-CPU nodes: move to the emptiest.
        let others = [
            l(1, 0.5, 8.0),
            l(2, 0.5, 0.0),
            l(3, 0.5, 1.0),
            l(4, 0.5, 0.0),
        ];
        assert_eq!(threshold_target(others[0], &others), Some(2));
        // 3 against 1: one move makes it 2 and 2.
        let two = [l(1, 0.5, 3.0), l(2, 0.5, 1.0)];
        assert_eq!(threshold_target(two[0], &two), Some(2));
        // 2 against 1: a move would make it 1 against 2: stay.
        let two = [l(1, 0.5, 2.0), l(2, 0.5, 1.0)];
        assert_eq!(threshold_target(two[0], &two), None);
        // Balanced: nothing.
        let even = [l(1, 0.5, 2.0), l(2, 0.5, 2.0), l(3, 0.5, 2.0)];
        assert_eq!(threshold_target(even[0], &even), None);
        // A bigger node takes more: 4 on 1 CPU vs 1 on 2 CPUs.
        let mixed = [l(1, 1.0, 4.0), l(2, 2.0, 1.0)];
        assert_eq!(threshold_target(mixed[0], &mixed), Some(2));
    }

    #[test]
    fn names() {
        assert!(check_name("off").is_ok());
        assert!(check_name("threshold").is_ok());
        assert!(check_name("bogus").unwrap_err().contains("threshold"));
    }
}
