//! The built-in placement policies, as pure functions of the candidate
//! nodes (their last probes plus the placements this agent made to them
//! recently) so that they can be tested with synthetic nodes.

use libkrg::proto::NodeStatus;
use rand::Rng;
use std::cmp::Ordering;

/// Two loads closer than this are equal (then memory decides).
const LOAD_EPSILON: f64 = 1e-6;
/// Free memory is compared in steps of this many kB, so that the noise of
/// a few pages does not decide between two equally loaded nodes.
const MEM_STEP_KB: u64 = 16 * 1024;

/// A node the scheduler may choose: up, with its last probe and the number
/// of placements this agent made to it recently.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub status: NodeStatus,
    pub recent: u32,
}

impl Candidate {
    pub fn id(&self) -> u32 {
        self.status.id
    }

    fn cpus(&self) -> f64 {
        if self.status.cpus.is_finite() && self.status.cpus > 0.01 {
            self.status.cpus
        } else {
            0.01
        }
    }

    /// The probed load (runnable / cpus) plus the recent placements, which
    /// the next probes have not seen yet, counted as runnable tasks.
    pub fn effective_load(&self) -> f64 {
        let probed = if self.status.load.is_finite() {
            self.status.load.max(0.0)
        } else {
            f64::INFINITY
        };
        probed + self.recent as f64 / self.cpus()
    }

    /// Whether `pack` may still put one more program here: SSI processes
    /// plus recent placements below the CPU capacity.
    fn has_room(&self) -> bool {
        ((self.status.processes as u64 + self.recent as u64) as f64) < self.cpus()
    }
}

/// The built-in policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Local,
    RoundRobin,
    LeastLoaded,
    TwoChoices,
    Pack,
}

impl Builtin {
    pub const ALL: [Builtin; 5] = [
        Builtin::Local,
        Builtin::RoundRobin,
        Builtin::LeastLoaded,
        Builtin::TwoChoices,
        Builtin::Pack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Builtin::Local => "local",
            Builtin::RoundRobin => "round-robin",
            Builtin::LeastLoaded => "least-loaded",
            Builtin::TwoChoices => "two-choices",
            Builtin::Pack => "pack",
        }
    }

    pub fn from_name(s: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.name() == s)
    }

    /// Every built-in name, for messages.
    pub fn names() -> String {
        Builtin::ALL
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Lower is better: effective load, then more free memory, then lower id.
pub fn compare(a: &Candidate, b: &Candidate) -> Ordering {
    let (la, lb) = (a.effective_load(), b.effective_load());
    if (la - lb).abs() > LOAD_EPSILON || la.is_infinite() != lb.is_infinite() {
        if let Some(o) = la.partial_cmp(&lb) {
            if o != Ordering::Equal {
                return o;
            }
        }
    }
    let (ma, mb) = (
        a.status.mem_free_kb / MEM_STEP_KB,
        b.status.mem_free_kb / MEM_STEP_KB,
    );
    mb.cmp(&ma).then(a.id().cmp(&b.id()))
}

/// The least loaded candidate; `None` only for an empty list.
pub fn least_loaded(nodes: &[Candidate]) -> Option<u32> {
    nodes.iter().min_by(|a, b| compare(a, b)).map(|c| c.id())
}

/// The next candidate after `last` in id order, wrapping around.
pub fn round_robin(nodes: &[Candidate], last: Option<u32>) -> Option<u32> {
    let mut ids: Vec<u32> = nodes.iter().map(|c| c.id()).collect();
    ids.sort_unstable();
    let first = *ids.first()?;
    Some(match last {
        Some(l) => ids.iter().copied().find(|&id| id > l).unwrap_or(first),
        None => first,
    })
}

/// Power of two choices: two distinct candidates drawn at random, the less
/// loaded wins.
pub fn two_choices(nodes: &[Candidate], rng: &mut impl Rng) -> Option<u32> {
    match nodes.len() {
        0 => None,
        1 => Some(nodes[0].id()),
        n => {
            let i = rng.gen_range(0..n);
            let mut j = rng.gen_range(0..n - 1);
            if j >= i {
                j += 1;
            }
            let (a, b) = (&nodes[i], &nodes[j]);
            Some(if compare(a, b) == Ordering::Greater {
                b.id()
            } else {
                a.id()
            })
        }
    }
}

/// Fill a node before the next: the first node by id with room for one
/// more program, else the least loaded.
pub fn pack(nodes: &[Candidate]) -> Option<u32> {
    let mut sorted: Vec<&Candidate> = nodes.iter().collect();
    sorted.sort_by_key(|c| c.id());
    sorted
        .into_iter()
        .find(|c| c.has_room())
        .map(|c| c.id())
        .or_else(|| least_loaded(nodes))
}

/// Apply a built-in policy. `rr_last` is the round-robin cursor of the
/// deciding agent (updated by the caller once the choice is final).
/// `None` only for an empty candidate list.
pub fn choose(
    policy: Builtin,
    nodes: &[Candidate],
    origin: u32,
    rr_last: Option<u32>,
    rng: &mut impl Rng,
) -> Option<u32> {
    match policy {
        Builtin::Local => {
            if nodes.iter().any(|c| c.id() == origin) {
                Some(origin)
            } else {
                least_loaded(nodes)
            }
        }
        Builtin::RoundRobin => round_robin(nodes, rr_last),
        Builtin::LeastLoaded => least_loaded(nodes),
        Builtin::TwoChoices => two_choices(nodes, rng),
        Builtin::Pack => pack(nodes),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    pub(crate) fn node(id: u32, cpus: f64, load: f64, free_mb: u64, procs: u32) -> Candidate {
        Candidate {
            status: NodeStatus {
                id,
                address: format!("10.0.0.{id}:7400"),
                up: true,
                cpus,
                load,
                mem_total_kb: 8 * 1024 * 1024,
                mem_free_kb: free_mb * 1024,
                processes: procs,
            },
            recent: 0,
        }
    }

    fn idle4() -> Vec<Candidate> {
        (1..=4).map(|i| node(i, 1.0, 0.0, 4096, 0)).collect()
    }

    #[test]
    fn names_round_trip() {
        for b in Builtin::ALL {
            assert_eq!(Builtin::from_name(b.name()), Some(b));
        }
        assert_eq!(Builtin::from_name("fastest"), None);
        assert_eq!(
            Builtin::names(),
            "local, round-robin, least-loaded, two-choices, pack"
        );
    }

    #[test]
    fn local_stays_on_origin() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut n = idle4();
        n[2].status.load = 5.0;
        assert_eq!(choose(Builtin::Local, &n, 3, None, &mut rng), Some(3));
        // An origin that is not a candidate (not up): least loaded.
        assert_eq!(choose(Builtin::Local, &n, 9, None, &mut rng), Some(1));
    }

    #[test]
    fn round_robin_cycles_in_id_order() {
        let mut n = idle4();
        n.reverse();
        let mut last = None;
        let mut got = Vec::new();
        for _ in 0..8 {
            let c = round_robin(&n, last).unwrap();
            got.push(c);
            last = Some(c);
        }
        assert_eq!(got, vec![1, 2, 3, 4, 1, 2, 3, 4]);
        // Node 3 went down: skipped; the cursor survives membership changes.
        n.retain(|c| c.id() != 3);
        assert_eq!(round_robin(&n, Some(2)), Some(4));
        assert_eq!(round_robin(&n, Some(4)), Some(1));
        assert_eq!(round_robin(&[], Some(4)), None);
    }

    #[test]
    fn least_loaded_by_load_then_memory_then_id() {
        let mut n = idle4();
        n[0].status.load = 0.5;
        n[1].status.load = 0.2;
        n[2].status.load = 0.2;
        n[3].status.load = 0.9;
        // Tie between 2 and 3: same memory: lower id.
        assert_eq!(least_loaded(&n), Some(2));
        // More free memory wins the tie.
        n[2].status.mem_free_kb += 64 * 1024;
        assert_eq!(least_loaded(&n), Some(3));
        // A few pages of difference do not.
        n[1].status.mem_free_kb = n[2].status.mem_free_kb - 8;
        n[1].status.mem_free_kb -= n[1].status.mem_free_kb % MEM_STEP_KB;
        n[2].status.mem_free_kb = n[1].status.mem_free_kb + 8;
        assert_eq!(least_loaded(&n), Some(2));
        // Load is relative to capacity: recent placements count too.
        n[1].recent = 1;
        assert_eq!(least_loaded(&n), Some(3));
        n[2].recent = 1;
        n[2].status.cpus = 4.0;
        assert_eq!(least_loaded(&n), Some(3));
        n[2].recent = 4;
        assert_eq!(least_loaded(&n), Some(1));
    }

    #[test]
    fn least_loaded_spreads_with_recent_placements() {
        let mut n = idle4();
        let mut got = Vec::new();
        for _ in 0..8 {
            let c = least_loaded(&n).unwrap();
            n.iter_mut().find(|x| x.id() == c).unwrap().recent += 1;
            got.push(c);
        }
        assert_eq!(got, vec![1, 2, 3, 4, 1, 2, 3, 4]);
    }

    #[test]
    fn bad_probe_values_lose() {
        let mut n = idle4();
        n[0].status.load = f64::NAN;
        n[1].status.cpus = 0.0;
        n[1].recent = 1;
        n[2].status.load = f64::INFINITY;
        assert_eq!(least_loaded(&n), Some(4));
    }

    #[test]
    fn two_choices_takes_the_lighter_of_two() {
        let mut n = idle4();
        n[0].status.load = 3.0;
        n[1].status.load = 2.0;
        n[2].status.load = 1.0;
        n[3].status.load = 0.0;
        let mut rng = StdRng::seed_from_u64(42);
        let mut counts = [0u32; 5];
        for _ in 0..2000 {
            let c = two_choices(&n, &mut rng).unwrap();
            counts[c as usize] += 1;
        }
        // Node 1 is never the lighter of two distinct nodes.
        assert_eq!(counts[1], 0);
        // P(4) = 1/2, P(3) = 1/3, P(2) = 1/6.
        assert!(counts[4] > counts[3] && counts[3] > counts[2] && counts[2] > 0);
        // Deterministic for a given seed.
        let mut r1 = StdRng::seed_from_u64(7);
        let mut r2 = StdRng::seed_from_u64(7);
        let a: Vec<_> = (0..50).map(|_| two_choices(&n, &mut r1)).collect();
        let b: Vec<_> = (0..50).map(|_| two_choices(&n, &mut r2)).collect();
        assert_eq!(a, b);
        // One candidate: that one; none: none.
        assert_eq!(two_choices(&n[2..3], &mut rng), Some(3));
        assert_eq!(two_choices(&[], &mut rng), None);
    }

    #[test]
    fn pack_fills_a_node_before_the_next() {
        let mut n: Vec<Candidate> = (1..=3).map(|i| node(i, 2.0, 0.0, 4096, 0)).collect();
        let mut got = Vec::new();
        for _ in 0..6 {
            let c = pack(&n).unwrap();
            n.iter_mut().find(|x| x.id() == c).unwrap().recent += 1;
            got.push(c);
        }
        assert_eq!(got, vec![1, 1, 2, 2, 3, 3]);
        // Full everywhere: least loaded (recent counted as load).
        n[1].recent = 1;
        assert_eq!(pack(&n), Some(2));
        // SSI processes already running count against the capacity.
        let mut n: Vec<Candidate> = (1..=3).map(|i| node(i, 1.5, 0.0, 4096, 0)).collect();
        n[0].status.processes = 2;
        assert_eq!(pack(&n), Some(2));
        n[1].status.processes = 1;
        assert_eq!(pack(&n), Some(2));
        n[1].recent = 1;
        assert_eq!(pack(&n), Some(3));
    }

    #[test]
    fn empty_candidate_list_gives_none() {
        let mut rng = StdRng::seed_from_u64(1);
        for b in Builtin::ALL {
            assert_eq!(choose(b, &[], 1, None, &mut rng), None, "{}", b.name());
        }
    }
}
