//! The node's table of SSI processes: registration, gpid allocation,
//! capabilities, `/proc` readings for `krg ps`, and signal delivery.
//!
//! Mirrors libkrg's `processes` module on the agent side. A process is known
//! by its kernel pid plus its start time (so a recycled kernel pid is never
//! mistaken for the old process); signals go through a pidfd opened at
//! registration, so they can never reach a recycled pid either.

use crate::agent::sys;
use libkrg::caps::Caps;
use libkrg::gpid;
use libkrg::proto::{ErrorReply, ProcInfo};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

/// One registered SSI process.
#[derive(Debug)]
pub struct Proc {
    pub gpid: i32,
    pub kpid: i32,
    pub start_ticks: u64,
    pub caps_eff: Caps,
    pub caps_inh: Caps,
    /// The `KRG_CAPS` value the current program image started with.
    pub caps_env: Option<String>,
    /// Whether the process itself has said Hello (vs. registered by its parent).
    pub greeted: bool,
    pidfd: Option<OwnedFd>,
    /// This entry is a shadow: its program runs on that node (and is listed
    /// and signalled there).
    pub running_on: Option<u32>,
    /// Started here for a shadow elsewhere: its next Hello is not placed
    /// again, and it shows its shadow's parent and group.
    pub skip_place: bool,
    pub vppid: Option<i32>,
    pub vpgid: Option<i32>,
    /// The command line to show instead of /proc's (a restored image: the
    /// kernel's record of the command line points into memory the image
    /// replaced).
    pub command: Option<String>,
    /// An image being restored: not capturable until it asks `Whoami`
    /// (its handlers and threads are not back before that).
    pub restoring: bool,
    /// Restored by a post-copy migration whose pages may still be coming
    /// (its userfaultfd and migration stream are open until then).
    pub postcopy: bool,
    /// Told to run on another node, not yet started there (its shadow's
    /// `RemoteExec` under way): its standard fds are about to move.
    pub placing: bool,
    /// A restored process: the children it had where it was captured
    /// (gpids), which it may start child shadows for, and that node.
    pub adopt: Vec<i32>,
    pub adopt_from: u32,
}

impl Proc {
    /// A process entry of gpid `g`, local kernel pid `kpid`, with its
    /// (effective, inheritable) capabilities: not greeted, not a shadow,
    /// nothing under way.
    fn new(
        g: i32,
        kpid: i32,
        start_ticks: u64,
        caps: (Caps, Caps),
        caps_env: Option<String>,
    ) -> Proc {
        Proc {
            gpid: g,
            kpid,
            start_ticks,
            caps_eff: caps.0,
            caps_inh: caps.1,
            caps_env,
            greeted: false,
            pidfd: pidfd_open(kpid),
            running_on: None,
            skip_place: false,
            vppid: None,
            vpgid: None,
            command: None,
            restoring: false,
            postcopy: false,
            placing: false,
            adopt: Vec::new(),
            adopt_from: 0,
        }
    }
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone)]
pub struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub utime: u64,
    pub stime: u64,
    pub start_ticks: u64,
    pub rss_pages: u64,
}

/// Parse `/proc/<pid>/stat`; `None` if the process is gone.
pub fn read_stat(kpid: i32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{kpid}/stat")).ok()?;
    parse_stat(&s)
}

pub(crate) fn parse_stat(s: &str) -> Option<Stat> {
    // comm may contain spaces and parentheses: it ends at the last ')'.
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = s.get(close + 2..)?.split_whitespace().collect();
    // rest[0] is field 3 (state).
    let f = |i: usize| rest.get(i - 3).and_then(|v| v.parse::<i64>().ok());
    Some(Stat {
        comm,
        state: rest.first()?.chars().next()?,
        ppid: f(4)? as i32,
        pgrp: f(5)? as i32,
        session: f(6)? as i32,
        utime: f(14)? as u64,
        stime: f(15)? as u64,
        start_ticks: f(22)? as u64,
        rss_pages: f(24)?.max(0) as u64,
    })
}

/// Real, effective and saved uids from `/proc/<pid>/status`.
pub fn read_uids(kpid: i32) -> Option<[u32; 3]> {
    let s = std::fs::read_to_string(format!("/proc/{kpid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Uid:"))?;
    let v: Vec<u32> = line[4..]
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (v.len() >= 3).then(|| [v[0], v[1], v[2]])
}

fn read_cmdline(kpid: i32, comm: &str) -> String {
    match std::fs::read(format!("/proc/{kpid}/cmdline")) {
        Ok(b) if !b.is_empty() => {
            let parts: Vec<String> = b
                .split(|c| *c == 0)
                .filter(|p| !p.is_empty())
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            parts.join(" ")
        }
        _ => format!("[{comm}]"),
    }
}

fn clock_ticks() -> f64 {
    sys::sysconf(libc::_SC_CLK_TCK).map_or(100.0, |t| t as f64)
}

fn uptime_s() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

fn pidfd_open(kpid: i32) -> Option<OwnedFd> {
    sys::pidfd_open(kpid).ok()
}

fn err(errno: i32, msg: impl Into<String>) -> ErrorReply {
    ErrorReply::other(errno, msg)
}

/// The process table of one node.
#[derive(Debug)]
pub struct ProcTable {
    node: u32,
    by_gpid: HashMap<i32, Proc>,
    by_kpid: HashMap<i32, i32>,
    /// Next candidate for a gpid whose natural value is taken.
    next_spare: u32,
    /// Processes that are gone but whose gpid may still be asked about: a
    /// parent translating the pid `waitpid` just returned, or a process
    /// group (or session) whose leader exited while members remain.
    /// Kernel pid -> (gpid, when it went).
    ghosts: HashMap<i32, (i32, std::time::Instant)>,
    /// gpids born here that run on another node, and where (the origin
    /// node answers for its gpids).
    located: HashMap<i32, u32>,
    /// Shadows here whose program came back to this node: the program has
    /// the gpid's entry, but the shadow is still its parent's kernel child
    /// and stands for the gpid to it (a parent's wait, a parent's own
    /// migration). Also child shadows started where their child's program
    /// runs. Kernel pid -> (gpid, start time, the node the shadow's program
    /// went to next: where the shadow reports the end of its own children).
    returned: HashMap<i32, (i32, u64, Option<u32>)>,
}

/// How long a reaped process stays translatable when no group or session
/// still carries its pid.
const GHOST_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl ProcTable {
    pub fn new(node: u32) -> ProcTable {
        ProcTable {
            node,
            by_gpid: HashMap::new(),
            by_kpid: HashMap::new(),
            next_spare: 1,
            ghosts: HashMap::new(),
            located: HashMap::new(),
            returned: HashMap::new(),
        }
    }

    pub fn node(&self) -> u32 {
        self.node
    }

    /// The live entry for a kernel pid, checking the start time so that a
    /// recycled pid is never taken for the process that had it before.
    fn live_gpid(&self, kpid: i32, start: u64) -> Option<i32> {
        if let Some(g) = self
            .by_kpid
            .get(&kpid)
            .filter(|g| self.by_gpid.get(g).is_some_and(|p| p.start_ticks == start))
        {
            return Some(*g);
        }
        self.returned
            .get(&kpid)
            .filter(|(_, t, _)| *t == start)
            .map(|(g, _, _)| *g)
    }

    fn remove(&mut self, g: i32) {
        if let Some(p) = self.by_gpid.remove(&g) {
            if self.by_kpid.get(&p.kpid) == Some(&g) {
                self.by_kpid.remove(&p.kpid);
            }
            self.ghosts.insert(p.kpid, (g, std::time::Instant::now()));
        }
    }

    /// The gpid a gone process had, if its kernel pid was not reused since.
    fn ghost(&self, kpid: i32) -> Option<i32> {
        if let Some((g, _, _)) = self.returned.get(&kpid) {
            // Reaped before the sweep saw it go.
            return (!std::path::Path::new(&format!("/proc/{kpid}")).exists()).then_some(*g);
        }
        let (g, _) = self.ghosts.get(&kpid)?;
        // A live process with that kernel pid (SSI or not) means reuse.
        if self.by_kpid.contains_key(&kpid)
            || std::path::Path::new(&format!("/proc/{kpid}")).exists()
        {
            return None;
        }
        Some(*g)
    }

    fn alloc_gpid(&mut self, kpid: i32) -> Result<i32, ErrorReply> {
        if let Some(g) = gpid::make(self.node, kpid as u32) {
            if !self.by_gpid.contains_key(&g) && !self.located.contains_key(&g) {
                return Ok(g);
            }
        }
        // The natural value is held (a process born here that now runs
        // elsewhere still owns it): take the next free local value.
        for _ in 0..gpid::LOCAL_MASK {
            let cand = self.next_spare;
            self.next_spare = if cand >= gpid::LOCAL_MASK as u32 {
                1
            } else {
                cand + 1
            };
            if let Some(g) = gpid::make(self.node, cand) {
                if !self.by_gpid.contains_key(&g) && !self.located.contains_key(&g) {
                    return Ok(g);
                }
            }
        }
        Err(err(
            libc::EAGAIN,
            format!("node {}: no free gpid", self.node),
        ))
    }

    /// Register a local process (or find it). `caps_env` is given when the
    /// process itself says Hello; `None` when its parent registers it.
    pub fn register(
        &mut self,
        kpid: i32,
        hello: Option<Option<String>>,
    ) -> Result<&Proc, ErrorReply> {
        let st = read_stat(kpid).ok_or_else(|| {
            err(
                libc::ESRCH,
                format!("no process with kernel pid {kpid} on node {}", self.node),
            )
        })?;
        // A refused KRG_CAPS refuses the registration: the process then runs
        // as a plain local process and must not be listed.
        if let Some(Some(spec)) = &hello {
            Caps::apply(Caps::NONE, spec)
                .map_err(|e| err(libc::EINVAL, format!("KRG_CAPS: {e}")))?;
        }
        let g = match self.live_gpid(kpid, st.start_ticks) {
            Some(g) => g,
            None => {
                if let Some(old) = self.by_kpid.get(&kpid).copied() {
                    self.remove(old);
                }
                self.ghosts.remove(&kpid);
                let g = self.alloc_gpid(kpid)?;
                let parent = self
                    .live_gpid(
                        st.ppid,
                        read_stat(st.ppid).map(|s| s.start_ticks).unwrap_or(0),
                    )
                    .and_then(|pg| self.by_gpid.get(&pg));
                let (inh_base, parent_env) = match parent {
                    Some(p) => (p.caps_inh, p.caps_env.clone()),
                    None => (Caps::DEFAULT, None),
                };
                self.by_gpid.insert(
                    g,
                    Proc::new(g, kpid, st.start_ticks, (inh_base, inh_base), parent_env),
                );
                self.by_kpid.insert(kpid, g);
                g
            }
        };
        if let Some(env) = hello {
            let p = self.by_gpid.get_mut(&g).expect("entry just found or made");
            // A KRG_CAPS inherited unchanged keeps what the parent passed on
            // (capset may have changed it since); a new value applies on top.
            if env != p.caps_env || (!p.greeted && p.caps_env.is_none() && env.is_some()) {
                if let Some(spec) = env.as_deref() {
                    let c = Caps::apply(p.caps_inh, spec)
                        .map_err(|e| err(libc::EINVAL, format!("KRG_CAPS: {e}")))?;
                    p.caps_eff = c;
                    p.caps_inh = c;
                }
                p.caps_env = env;
            }
            p.greeted = true;
        }
        Ok(self.by_gpid.get(&g).expect("entry just found or made"))
    }

    /// A new gpid of this node for a local kernel pid (a restored image
    /// whose own gpid is taken).
    pub fn alloc_for(&mut self, kpid: i32) -> Result<i32, ErrorReply> {
        self.alloc_gpid(kpid)
    }

    /// Register a program started here for a shadow on another node: it
    /// keeps its gpid (born elsewhere).
    #[allow(clippy::too_many_arguments)]
    pub fn register_remote(
        &mut self,
        kpid: i32,
        g: i32,
        caps_eff: Caps,
        caps_inh: Caps,
        caps_env: Option<String>,
        vppid: i32,
        vpgid: i32,
    ) -> Result<(), ErrorReply> {
        // A live local process with that gpid refuses; an entry of one
        // that ended (not swept yet) is replaced.
        if self.by_gpid.get(&g).is_some_and(|p| {
            p.running_on.is_none()
                && read_stat(p.kpid).map(|s| s.start_ticks) == Some(p.start_ticks)
        }) {
            return Err(err(
                libc::EBUSY,
                format!("pid {g} already runs on node {}", self.node),
            ));
        }
        let st = read_stat(kpid).ok_or_else(|| {
            err(
                libc::ESRCH,
                format!("pid {g}: exited at once on node {}", self.node),
            )
        })?;
        if let Some(old) = self.by_gpid.get(&g) {
            if old.kpid != kpid && old.running_on.is_none() {
                self.by_kpid.remove(&old.kpid);
            } else if old.kpid != kpid {
                self.returned
                    .insert(old.kpid, (g, old.start_ticks, old.running_on));
            }
        }
        // A shadow of the same gpid here (the program came back) is
        // replaced in the table; it keeps running and relaying.
        self.by_gpid.insert(
            g,
            Proc {
                skip_place: true,
                vppid: Some(vppid),
                vpgid: Some(vpgid),
                ..Proc::new(g, kpid, st.start_ticks, (caps_eff, caps_inh), caps_env)
            },
        );
        self.by_kpid.insert(kpid, g);
        Ok(())
    }

    /// Where a gpid's program runs, if not here (known for the gpids born
    /// here and for shadows here).
    pub fn runs_elsewhere(&self, g: i32) -> Option<u32> {
        if let Some(p) = self.by_gpid.get(&g) {
            return p.running_on;
        }
        self.located.get(&g).copied()
    }

    /// The origin's record of where one of its gpids runs.
    pub fn set_location(&mut self, g: i32, node: u32) {
        if node == self.node {
            self.located.remove(&g);
        } else {
            self.located.insert(g, node);
        }
    }

    /// Whether the program of `g` runs here (a live local entry, not a
    /// shadow).
    pub fn runs_here(&self, g: i32) -> bool {
        self.by_gpid.get(&g).is_some_and(|p| {
            p.running_on.is_none()
                && read_stat(p.kpid).map(|s| s.start_ticks) == Some(p.start_ticks)
        })
    }

    /// Let local process `kpid` stand for `g` to its parent while the
    /// entry of `g` stays another's (a child shadow started on the node
    /// where its child's program already runs).
    pub fn stand_in(&mut self, kpid: i32, g: i32) -> Result<(), ErrorReply> {
        let st = read_stat(kpid)
            .ok_or_else(|| err(libc::ESRCH, format!("kernel pid {kpid}: no such process")))?;
        self.returned.insert(kpid, (g, st.start_ticks, None));
        Ok(())
    }

    /// The node the program of the local shadow `kpid` went to next, where
    /// the shadow reports the end of its kernel children: its entry's, or,
    /// if its program came back here since, the one it had.
    pub fn next_hop(&self, kpid: i32) -> Option<u32> {
        let st = read_stat(kpid)?;
        if let Some(p) = self
            .by_kpid
            .get(&kpid)
            .and_then(|g| self.by_gpid.get(g))
            .filter(|p| p.kpid == kpid && p.start_ticks == st.start_ticks)
        {
            return p.running_on;
        }
        self.returned
            .get(&kpid)
            .filter(|(_, t, _)| *t == st.start_ticks)
            .and_then(|(_, _, next)| *next)
    }

    /// Register local process `kpid` as the child shadow of `g` for
    /// `parent`, a process that came here from node `from` and had `g` as
    /// a child there.
    ///
    /// Where the shadow routes (signals, `krg migrate`) matters: `from` is
    /// only a guess. Its own child shadow of `g` points to the node the
    /// parent came from before, which may be this one: a parent that went
    /// 1 -> 4 -> 1 left node 1 pointing at 4 and node 4 at 1, and every
    /// request about `g` went round until "lost while routing" (difftest
    /// seed 3 case 3). The origin of `g` always knows where it runs (its
    /// own shadow, or the moves it was told of): a child shadow on another
    /// node points there; on the origin, what it knew stays.
    pub fn child_shadow(
        &mut self,
        kpid: i32,
        g: i32,
        from: u32,
        caps: (Caps, Caps),
        parent: i32,
    ) -> Result<(), ErrorReply> {
        if self.runs_here(g) {
            // The child's program moved here before its parent did: it
            // keeps its entry (signals, ps), the child shadow only stands
            // for it to the parent.
            return self.stand_in(kpid, g);
        }
        let to = match gpid::node_of(g) {
            Some(origin) if origin != self.node => origin,
            _ => self
                .runs_elsewhere(g)
                .filter(|n| *n != self.node)
                .unwrap_or(from),
        };
        self.register_remote(kpid, g, caps.0, caps.1, None, parent, g)?;
        // Listed and signalled where it runs, like a shadow.
        self.set_shadow(g, to);
        Ok(())
    }

    /// Mark the local process `g` as the shadow of a program now on `node`.
    pub fn set_shadow(&mut self, g: i32, node: u32) {
        if let Some(p) = self.by_gpid.get_mut(&g) {
            p.running_on = Some(node);
        }
    }

    /// The local process `g` runs here after all (a migration failed).
    pub fn clear_shadow(&mut self, g: i32) {
        if let Some(p) = self.by_gpid.get_mut(&g) {
            p.running_on = None;
        }
    }

    /// gpid of a local kernel pid: a registered live process, or one gone
    /// recently (see `ghosts`).
    pub fn translate(&self, kpid: i32) -> Option<i32> {
        match read_stat(kpid) {
            Some(st) => self.live_gpid(kpid, st.start_ticks),
            None => self.ghost(kpid),
        }
    }

    /// The gpid of a kernel process group (or session) id on this node: a
    /// program started here for a shadow leads a kernel group of its own
    /// (the agent starts it in a new session) but belongs to its shadow's
    /// group, and so do its descendants that stay in that group. Any other
    /// group is its leader's gpid; the kernel id if no SSI process leads it.
    pub fn group_gpid(&self, kpgid: i32) -> i32 {
        if kpgid <= 0 {
            return kpgid;
        }
        if let Some(g) = self.translate(kpgid) {
            if let Some(v) = self.by_gpid.get(&g).and_then(|p| p.vpgid) {
                if v > 0 {
                    return v;
                }
            }
            return g;
        }
        kpgid
    }

    /// Local kernel pid of a gpid: a live process, or a gone one whose pid
    /// still names a process group or session here.
    pub fn resolve(&self, g: i32) -> Option<i32> {
        if let Some(p) = self.by_gpid.get(&g) {
            return Some(p.kpid);
        }
        self.ghosts
            .iter()
            .find(|(k, (gg, _))| *gg == g && self.ghost(**k).is_some())
            .map(|(k, _)| *k)
    }

    /// The kernel pid of a gpid whose program runs here: as `resolve`, but
    /// never a shadow standing for a program on another node (calls on a
    /// process's own state must not reach the shadow instead).
    pub fn resolve_running(&self, g: i32) -> Result<i32, ErrorReply> {
        if let Some(node) = self.runs_elsewhere(g) {
            return Err(err(
                libc::ESRCH,
                format!("pid {g} runs on node {node}, not on node {}", self.node),
            ));
        }
        self.resolve(g)
            .ok_or_else(|| err(libc::ESRCH, format!("pid {g}: not on node {}", self.node)))
    }

    pub fn get(&self, g: i32) -> Option<&Proc> {
        self.by_gpid.get(&g)
    }

    pub fn get_mut(&mut self, g: i32) -> Option<&mut Proc> {
        self.by_gpid.get_mut(&g)
    }

    /// Drop the entries of processes that no longer exist (reaped zombies
    /// included); a zombie stays listed until its parent reaps it.
    pub fn sweep(&mut self) {
        let dead: Vec<i32> = self
            .by_gpid
            .values()
            .filter(|p| read_stat(p.kpid).map(|s| s.start_ticks) != Some(p.start_ticks))
            .map(|p| p.gpid)
            .collect();
        for g in dead {
            self.remove(g);
        }
        // A returned shadow that ended is translatable a while longer, as
        // any process that ended.
        let gone: Vec<(i32, i32)> = self
            .returned
            .iter()
            .filter(|(k, (_, t, _))| read_stat(**k).map(|s| s.start_ticks) != Some(*t))
            .map(|(k, (g, _, _))| (*k, *g))
            .collect();
        for (k, g) in gone {
            self.returned.remove(&k);
            if self.by_kpid.get(&k) == Some(&g) {
                self.by_kpid.remove(&k);
            }
            self.ghosts.insert(k, (g, std::time::Instant::now()));
        }
        // Keep a ghost while a live process still has its pid as process
        // group or session, else for GHOST_GRACE.
        let mut in_use = std::collections::HashSet::new();
        for p in self.by_gpid.values() {
            if let Some(st) = read_stat(p.kpid) {
                in_use.insert(st.pgrp);
                in_use.insert(st.session);
            }
        }
        // The kernel never reuses a pid that still names a group or session,
        // so a ghost whose pid exists again is stale.
        self.ghosts.retain(|k, (_, t)| {
            !std::path::Path::new(&format!("/proc/{k}")).exists()
                && (in_use.contains(k) || t.elapsed() < GHOST_GRACE)
        });
    }

    /// Processes counted in `krg status` (zombies excluded).
    pub fn live_count(&self) -> u32 {
        self.by_gpid
            .values()
            .filter(|p| p.running_on.is_none())
            .filter(|p| matches!(read_stat(p.kpid), Some(s) if s.start_ticks == p.start_ticks && s.state != 'Z'))
            .count() as u32
    }

    fn gpid_or_kernel(&self, kpid: i32) -> i32 {
        if kpid <= 0 {
            return kpid;
        }
        self.translate(kpid).unwrap_or(kpid)
    }

    /// `krg ps` rows for this node.
    pub fn ps(&self) -> Vec<ProcInfo> {
        let hz = clock_ticks();
        let up = uptime_s();
        let mut out = Vec::new();
        for p in self.by_gpid.values() {
            // A shadow's program is listed where it runs.
            if p.running_on.is_some() {
                continue;
            }
            let Some(st) = read_stat(p.kpid) else {
                continue;
            };
            if st.start_ticks != p.start_ticks {
                continue;
            }
            let uid = read_uids(p.kpid).map(|u| u[0]).unwrap_or(u32::MAX);
            let cpu_ticks = st.utime + st.stime;
            let elapsed = (up - st.start_ticks as f64 / hz).max(0.0);
            let cpu_s = cpu_ticks as f64 / hz;
            out.push(ProcInfo {
                pid: p.gpid,
                node: self.node,
                ppid: p.vppid.unwrap_or_else(|| self.gpid_or_kernel(st.ppid)),
                pgid: self.group_gpid(st.pgrp),
                uid,
                user: user_name(uid),
                state: st.state.to_string(),
                cpu: if elapsed > 0.0 {
                    (cpu_s / elapsed * 100.0) as f32
                } else {
                    0.0
                },
                rss_kb: st.rss_pages * (page_size() / 1024),
                cpu_time_ms: (cpu_s * 1000.0) as u64,
                elapsed_s: elapsed,
                command: p
                    .command
                    .clone()
                    .unwrap_or_else(|| read_cmdline(p.kpid, &st.comm)),
                caps: p.caps_eff.0,
            });
        }
        out.sort_by_key(|p| p.pid);
        out
    }

    /// May a caller with effective uid `caller` signal or control `p`?
    /// The kill(2) rule: root, or the caller's uid is the target's real or
    /// saved uid.
    pub fn permitted(p: &Proc, caller: u32) -> Result<(), ErrorReply> {
        if caller == 0 {
            return Ok(());
        }
        match read_uids(p.kpid) {
            Some([r, _, s]) if r == caller || s == caller => Ok(()),
            Some([r, _, _]) => Err(err(
                libc::EPERM,
                format!(
                    "pid {}: operation not permitted (owned by uid {r}, caller uid {caller})",
                    p.gpid
                ),
            )),
            None => Err(err(libc::ESRCH, format!("pid {}: no such process", p.gpid))),
        }
    }

    /// Deliver `sig` to one local process after the permission check.
    pub fn kill(&self, g: i32, sig: i32, caller: u32) -> Result<(), ErrorReply> {
        let p = self
            .by_gpid
            .get(&g)
            .filter(|p| read_stat(p.kpid).map(|s| s.start_ticks) == Some(p.start_ticks))
            .ok_or_else(|| {
                err(
                    libc::ESRCH,
                    format!("pid {g}: no such process on node {}", self.node),
                )
            })?;
        Self::permitted(p, caller)?;
        send_signal(p, sig).map_err(|e| err(e, format!("pid {g}: signal {sig}: {}", errno_str(e))))
    }

    /// Deliver `sig` to every local member of process group `pgid` (a gpid or
    /// a kernel pgid). Returns (members found, members signalled, last error).
    pub fn kill_group(&self, pgid: i32, sig: i32, caller: u32) -> (u32, u32, Option<ErrorReply>) {
        let (mut found, mut sent, mut last) = (0, 0, None);
        let mut members = Vec::new();
        for p in self.by_gpid.values() {
            let Some(st) = read_stat(p.kpid) else {
                continue;
            };
            // A shadow's program is signalled where it runs (and the shadow
            // would forward the signal a second time).
            if st.start_ticks != p.start_ticks || st.state == 'Z' || p.running_on.is_some() {
                continue;
            }
            if self.group_gpid(st.pgrp) != pgid {
                continue;
            }
            members.push((p.start_ticks, p));
        }
        // Oldest first: parents before their children. The kernel signals
        // a group at once; one by one, a shell signalled after its children
        // could see them die and exit 0 before its own signal arrives.
        members.sort_by_key(|m| m.0);
        for (_, p) in members {
            found += 1;
            match Self::permitted(p, caller).and_then(|_| {
                send_signal(p, sig).map_err(|e| err(e, format!("pid {}: {}", p.gpid, errno_str(e))))
            }) {
                Ok(()) => sent += 1,
                Err(e) => last = Some(e),
            }
        }
        (found, sent, last)
    }
}

fn page_size() -> u64 {
    sys::sysconf(libc::_SC_PAGESIZE).map_or(4096, |p| p as u64)
}

fn errno_str(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// The errno of a failed signal.
fn send_signal(p: &Proc, sig: i32) -> Result<(), i32> {
    let r = match &p.pidfd {
        Some(fd) => sys::pidfd_send_signal(fd.as_fd(), sig),
        // The start time was checked by the caller.
        None => sys::kill(p.kpid, sig),
    };
    r.map_err(|e| crate::sys::errno(&e).unwrap_or(libc::EIO))
}

/// `/proc` file `name` of local process `kpid`, then the same of each of
/// its threads: after a restore the thread-group leader may be an exited
/// thread (a zombie, whose files say little) while the others run on.
pub(crate) fn thread_files(kpid: i32, name: &str) -> impl Iterator<Item = std::path::PathBuf> + '_ {
    let tasks = std::fs::read_dir(format!("/proc/{kpid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(move |t| t.path().join(name));
    std::iter::once(std::path::PathBuf::from(format!("/proc/{kpid}/{name}"))).chain(tasks)
}

/// Whether a local process still runs: any of its threads is not a zombie.
pub(crate) fn alive(kpid: i32) -> bool {
    thread_files(kpid, "stat").any(|p| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| parse_stat(&s))
            .is_some_and(|s| s.state != 'Z')
    })
}

/// Whether local process `kpid` has a handler for signal `sig` (its
/// `SigCgt` mask, from any of its threads). Blocked or not: a process in a
/// capture of its own blocks it for a moment (and is refused as busy
/// elsewhere); one being placed is never sent it (`streams`).
pub(crate) fn catches(kpid: i32, sig: i32) -> bool {
    thread_files(kpid, "status").any(|p| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .is_some_and(|m| (1..=64).contains(&sig) && m & (1u64 << (sig - 1)) != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm() {
        let s = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5555 1000 250 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.comm, "a b) c)");
        assert_eq!(st.state, 'S');
        assert_eq!(st.ppid, 1);
        assert_eq!(st.pgrp, 1234);
        assert_eq!(st.utime, 7);
        assert_eq!(st.stime, 3);
        assert_eq!(st.start_ticks, 5555);
        assert_eq!(st.rss_pages, 250);
    }

    #[test]
    fn self_registration_is_stable_and_reuse_safe() {
        let me = std::process::id() as i32;
        let mut t = ProcTable::new(3);
        let g = t.register(me, Some(Some("-dfs".into()))).unwrap().gpid;
        assert_eq!(gpid::node_of(g), Some(3));
        assert_eq!(t.register(me, Some(Some("-dfs".into()))).unwrap().gpid, g);
        assert!(!t.get(g).unwrap().caps_eff.contains(Caps::DFS));
        assert_eq!(t.translate(me), Some(g));
        // A stale entry for the same kernel pid with another start time is
        // replaced, never reused.
        t.by_gpid.get_mut(&g).unwrap().start_ticks += 1;
        assert_eq!(t.translate(me), None);
        let g2 = t.register(me, None).unwrap().gpid;
        assert_eq!(t.translate(me), Some(g2));
        assert!(t.kill(g2, 0, 0).is_ok());
        assert_eq!(t.kill(g2 + 1, 0, 0).unwrap_err().errno, libc::ESRCH);
    }

    #[test]
    fn a_shadow_resolves_but_does_not_resolve_as_running() {
        let mut t = ProcTable::new(1);
        let mut shadow = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let sk = shadow.id() as i32;
        let g = t.register(sk, None).unwrap().gpid;
        assert_eq!(t.resolve_running(g).unwrap(), sk);
        t.set_shadow(g, 2);
        assert_eq!(t.resolve(g), Some(sk), "waits and signals reach the shadow");
        let e = t.resolve_running(g).unwrap_err();
        assert_eq!(e.errno, libc::ESRCH);
        assert!(e.msg.contains("runs on node 2"), "{}", e.msg);
        t.clear_shadow(g);
        assert_eq!(t.resolve_running(g).unwrap(), sk);
        assert_eq!(t.resolve_running(g + 1).unwrap_err().errno, libc::ESRCH);
        shadow.kill().unwrap();
        shadow.wait().unwrap();
    }

    #[test]
    fn a_child_shadow_routes_to_what_the_origin_knows_not_back() {
        let none = Caps::from_bits(0);
        let mut sleepers: Vec<std::process::Child> = (0..3)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap()
            })
            .collect();
        let k: Vec<i32> = sleepers.iter().map(|c| c.id() as i32).collect();
        // Node 1 placed child g on node 3: its shadow here points there.
        let mut origin = ProcTable::new(1);
        let g = origin.register(k[0], None).unwrap().gpid;
        origin.set_shadow(g, 3);
        // The parent went to node 4 and came back from it: the child
        // shadow made for it here still routes to node 3, not to node 4.
        origin.child_shadow(k[1], g, 4, (none, none), 1).unwrap();
        assert_eq!(origin.runs_elsewhere(g), Some(3));
        // On node 4 (not g's origin), a child shadow routes to the origin,
        // whatever node the parent came from.
        let mut other = ProcTable::new(4);
        other.child_shadow(k[2], g, 2, (none, none), 1).unwrap();
        assert_eq!(other.runs_elsewhere(g), Some(1));
        for c in &mut sleepers {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    #[test]
    fn a_shadow_whose_program_came_back_still_stands_for_its_gpid() {
        let mut t = ProcTable::new(1);
        let mut shadow = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut back = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let (sk, bk) = (shadow.id() as i32, back.id() as i32);
        let g = t.register(sk, None).unwrap().gpid;
        t.set_shadow(g, 2);
        // The program comes back: a new kernel process with the same gpid.
        let none = Caps::from_bits(0);
        t.register_remote(bk, g, none, none, None, 1, g).unwrap();
        assert_eq!(t.translate(bk), Some(g));
        assert_eq!(t.translate(sk), Some(g), "the parent's kernel child");
        assert_eq!(t.resolve(g), Some(bk), "signals go to the program");
        // Reaped by its parent: still translatable, before and after a sweep.
        shadow.kill().unwrap();
        shadow.wait().unwrap();
        assert_eq!(t.translate(sk), Some(g));
        t.sweep();
        assert_eq!(t.translate(sk), Some(g));
        assert_eq!(t.translate(bk), Some(g));
        back.kill().unwrap();
        back.wait().unwrap();
    }
}
