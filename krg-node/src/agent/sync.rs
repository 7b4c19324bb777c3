//! Cluster-wide System V semaphores: each set lives at a home node (named
//! by its id, as segments are), which applies every `semop` atomically and
//! keeps the blocked ones queued. See docs/architecture/dsm.md.
//!
//! A blocked `semop` waits at the home for one *round* (half a second)
//! and is answered `Pending` if it could not be done by then; the library
//! asks again. So no call is ever longer than an agent's call deadline, and
//! a caller that dies simply stops asking.

use super::common::lock;
use super::common::{ctx, err, Caller, Handled};
use super::dsm::{access_of, cred, home_of, keyed, now, on_exit};
use super::node::Node;
use super::peer::dsm::Cred;
use super::peer::sync::{SemHomeOp, SemReply};
use libkrg::proto::{ErrorReply, Request, Response, SemInfo};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{debug, warn};

const SEQ_BITS: u32 = 20;
/// Linux's limits: semaphores per set, largest value, operations per call.
const SEMMSL: i32 = 32000;
const SEMVMX: i32 = 32767;
const SEMOPM: usize = 500;
/// How long a blocked operation waits at the home before `Pending`.
const ROUND: Duration = Duration::from_millis(500);
const SEM_DEST: u32 = 0o1000;
/// semctl commands (linux/sem.h).
const GETPID: i32 = 11;
const GETVAL: i32 = 12;
const GETALL: i32 = 13;
const GETNCNT: i32 = 14;
const GETZCNT: i32 = 15;
const SETVAL: i32 = 16;
const SETALL: i32 = 17;

/// One blocked `semop`.
#[derive(Debug)]
struct Waiter {
    ops: Vec<(u16, i16, i16)>,
    pid: i32,
    result: Mutex<Option<Result<(), ErrorReply>>>,
    wake: Notify,
}

#[derive(Debug)]
struct Set {
    info: SemInfo,
    vals: Vec<u16>,
    pids: Vec<i32>,
    queue: Vec<Arc<Waiter>>,
    /// SEM_UNDO adjustments per process (gpid), per semaphore.
    undo: HashMap<i32, Vec<i32>>,
}

/// The semaphore sets homed here, and this node's processes that asked
/// for their operations to be undone at exit.
#[derive(Debug)]
pub struct Sems {
    node: Arc<Node>,
    keys: Mutex<HashMap<i32, i32>>,
    sets: Mutex<HashMap<i32, Arc<Mutex<Set>>>>,
    seq: AtomicU32,
    /// Local processes that used SEM_UNDO: kernel pid -> (gpid, sets).
    undoers: Mutex<HashMap<i32, (i32, Vec<i32>)>>,
}

enum Try {
    Done,
    Block,
}

impl Set {
    /// Apply `ops` all at once, or not at all.
    fn try_ops(&mut self, ops: &[(u16, i16, i16)], pid: i32) -> Result<Try, ErrorReply> {
        let mut v = self.vals.clone();
        for &(num, op, _) in ops {
            let cur = v[num as usize] as i32;
            if op > 0 {
                if cur + op as i32 > SEMVMX {
                    return Err(err(
                        libc::ERANGE,
                        format!("semaphore {num}: above {SEMVMX}"),
                    ));
                }
                v[num as usize] = (cur + op as i32) as u16;
            } else if op == 0 {
                if cur != 0 {
                    return Ok(Try::Block);
                }
            } else if cur + (op as i32) < 0 {
                return Ok(Try::Block);
            } else {
                v[num as usize] = (cur + op as i32) as u16;
            }
        }
        for &(num, op, flg) in ops {
            self.pids[num as usize] = pid;
            if flg as i32 & libc::SEM_UNDO != 0 && op != 0 {
                let n = self.vals.len();
                self.undo.entry(pid).or_insert_with(|| vec![0; n])[num as usize] -= op as i32;
            }
        }
        self.vals = v;
        self.info.otime = now();
        Ok(Try::Done)
    }

    /// Let every queued operation that can now proceed do so, in order,
    /// until none can.
    fn wake(&mut self) {
        loop {
            let mut progressed = false;
            let mut i = 0;
            while i < self.queue.len() {
                let w = self.queue[i].clone();
                match self.try_ops(&w.ops, w.pid) {
                    Ok(Try::Block) => i += 1,
                    r => {
                        *lock(&w.result) = Some(r.map(|_| ()));
                        w.wake.notify_one();
                        self.queue.remove(i);
                        progressed = true;
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn count(&self, num: usize, zero: bool) -> i32 {
        self.queue
            .iter()
            .filter(|w| {
                w.ops
                    .iter()
                    .any(|&(n, op, _)| n as usize == num && if zero { op == 0 } else { op < 0 })
            })
            .count() as i32
    }
}

/// A local request about System V semaphores (see `Agent::handle_local`).
pub(super) async fn handle(sems: &Arc<Sems>, req: Request, who: Caller) -> Handled {
    match req {
        Request::SemGet { key, nsems, flags } => sems.sem_get(who, key, nsems, flags).await,
        Request::SemOp {
            semid,
            ops,
            timeout_ns,
        } => sems.sem_op(who, semid, ops, timeout_ns).await,
        Request::SemCtl {
            semid,
            num,
            cmd,
            val,
            array,
            set,
        } => sems.sem_ctl(who, semid, num, cmd, val, array, set).await,
        other => Err(super::common::misrouted(&other)),
    }
}

impl Sems {
    pub fn new(node: Arc<Node>) -> Sems {
        Sems {
            node,
            keys: Mutex::default(),
            sets: Mutex::default(),
            seq: AtomicU32::default(),
            undoers: Mutex::default(),
        }
    }

    fn sem_set(&self, semid: i32) -> Result<Arc<Mutex<Set>>, ErrorReply> {
        lock(&self.sets)
            .get(&semid)
            .cloned()
            .ok_or_else(|| err(libc::EINVAL, format!("no semaphore set {semid}")))
    }

    async fn sem_home(self: &Arc<Self>, home: u32, op: SemHomeOp) -> Result<SemReply, ErrorReply> {
        if home == self.node.node_id() {
            return Box::pin(self.sem_home_op(op)).await;
        }
        if !self.node.is_up(home) {
            return Err(err(
                libc::EIO,
                format!("the home node {home} of the semaphore set is down"),
            ));
        }
        let c = self.node.client(home).await?;
        c.sem_home(ctx(), op)
            .await
            .map_err(|e| self.node.peer_lost(home, "semaphore home", e))?
    }

    // -- the application's requests ----------------------------------------

    async fn sem_get(
        self: &Arc<Self>,
        who: Caller,
        key: i32,
        nsems: i32,
        flags: i32,
    ) -> Result<Response, ErrorReply> {
        let home = self.node.home_for_key(key);
        let op = SemHomeOp::Get {
            key,
            nsems,
            flags,
            cred: cred(who),
        };
        match self.sem_home(home, op).await? {
            SemReply::Id(id) => Ok(Response::Id(id)),
            r => Err(err(libc::EIO, format!("semget: unexpected {r:?}"))),
        }
    }

    async fn sem_op(
        self: &Arc<Self>,
        who: Caller,
        semid: i32,
        ops: Vec<(u16, i16, i16)>,
        timeout_ns: Option<u64>,
    ) -> Result<Response, ErrorReply> {
        let gpid = self.node.caller_gpid(who);
        if ops.iter().any(|o| o.2 as i32 & libc::SEM_UNDO != 0) && who.pid > 0 {
            let mut u = lock(&self.undoers);
            let first = !u.contains_key(&who.pid);
            let e = u.entry(who.pid).or_insert((gpid, Vec::new()));
            if !e.1.contains(&semid) {
                e.1.push(semid);
            }
            drop(u);
            if first {
                self.watch_sem_exit(who.pid);
            }
        }
        let op = SemHomeOp::Op {
            semid,
            ops,
            cred: cred(who),
            pid: gpid,
            wait_ns: timeout_ns.map_or(ROUND.as_nanos() as u64, |t| t.min(ROUND.as_nanos() as u64)),
        };
        match self.sem_home(home_of(semid), op).await? {
            SemReply::Done => Ok(Response::Ok),
            SemReply::Pending => Ok(Response::Pending),
            r => Err(err(libc::EIO, format!("semop: unexpected {r:?}"))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn sem_ctl(
        self: &Arc<Self>,
        who: Caller,
        semid: i32,
        num: i32,
        cmd: i32,
        val: i32,
        array: Vec<u16>,
        set: Option<(u32, u32, u32)>,
    ) -> Result<Response, ErrorReply> {
        let op = SemHomeOp::Ctl {
            semid,
            num,
            cmd,
            val,
            array,
            set,
            cred: cred(who),
            pid: self.node.caller_gpid(who),
        };
        Ok(match self.sem_home(home_of(semid), op).await? {
            SemReply::Id(v) => Response::Id(v),
            SemReply::Info(i) => Response::Sem(i),
            SemReply::Vals(v) => Response::SemVals(v),
            SemReply::Done => Response::Ok,
            SemReply::Pending => Response::Pending,
        })
    }

    /// Apply a process's SEM_UNDO adjustments when it exits.
    fn watch_sem_exit(self: &Arc<Self>, kpid: i32) {
        let a = self.clone();
        on_exit(kpid, move || {
            let Some((gpid, sets)) = lock(&a.undoers).remove(&kpid) else {
                return;
            };
            let a = a.clone();
            tokio::spawn(async move {
                for semid in sets {
                    if let Err(e) = a
                        .sem_home(home_of(semid), SemHomeOp::Exit { semid, pid: gpid })
                        .await
                    {
                        warn!("pid {gpid}: undoing on semaphore set {semid}: {}", e.msg);
                    }
                }
            });
        });
    }

    // -- the home -----------------------------------------------------------

    pub async fn sem_home_op(self: &Arc<Self>, op: SemHomeOp) -> Result<SemReply, ErrorReply> {
        match op {
            SemHomeOp::Get {
                key,
                nsems,
                flags,
                cred,
            } => self.sem_home_get(key, nsems, flags, &cred),
            SemHomeOp::Op {
                semid,
                ops,
                cred,
                pid,
                wait_ns,
            } => self.sem_home_op_wait(semid, ops, &cred, pid, wait_ns).await,
            SemHomeOp::Ctl {
                semid,
                num,
                cmd,
                val,
                array,
                set,
                cred,
                pid,
            } => self.sem_home_ctl(semid, num, cmd, val, array, set, &cred, pid),
            SemHomeOp::Exit { semid, pid } => {
                if let Ok(s) = self.sem_set(semid) {
                    let mut s = lock(&s);
                    if let Some(adj) = s.undo.remove(&pid) {
                        for (i, a) in adj.into_iter().enumerate() {
                            s.vals[i] = (s.vals[i] as i32 + a).clamp(0, SEMVMX) as u16;
                        }
                        s.wake();
                    }
                }
                Ok(SemReply::Done)
            }
        }
    }

    fn sem_home_get(
        &self,
        key: i32,
        nsems: i32,
        flags: i32,
        cred: &Cred,
    ) -> Result<SemReply, ErrorReply> {
        let mut keys = lock(&self.keys);
        if let Some(id) = keyed(&keys, key, flags, "semaphore set")? {
            let s = self.sem_set(id)?;
            let s = lock(&s);
            if nsems > s.info.nsems as i32 {
                return Err(err(
                    libc::EINVAL,
                    format!("semaphore set {id} has {} semaphores", s.info.nsems),
                ));
            }
            if !cred.allowed(&s.info, access_of(flags)) {
                return Err(err(
                    libc::EACCES,
                    format!("semaphore set {id}: permission denied"),
                ));
            }
            return Ok(SemReply::Id(id));
        }
        if nsems <= 0 || nsems > SEMMSL {
            return Err(err(libc::EINVAL, format!("{nsems} semaphores")));
        }
        let me = self.node.node_id();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) & ((1 << SEQ_BITS) - 1);
        let id = ((me << SEQ_BITS) | seq) as i32;
        let info = SemInfo {
            semid: id,
            key,
            home: me,
            uid: cred.uid,
            gid: cred.gid,
            cuid: cred.uid,
            cgid: cred.gid,
            mode: flags as u32 & 0o777,
            nsems: nsems as u32,
            otime: 0,
            ctime: now(),
        };
        let set = Set {
            info,
            vals: vec![0; nsems as usize],
            pids: vec![0; nsems as usize],
            queue: Vec::new(),
            undo: HashMap::new(),
        };
        lock(&self.sets).insert(id, Arc::new(Mutex::new(set)));
        if key != libc::IPC_PRIVATE {
            keys.insert(key, id);
        }
        debug!("semaphore set {id} (key {key:#x}, {nsems} semaphores)");
        Ok(SemReply::Id(id))
    }

    async fn sem_home_op_wait(
        self: &Arc<Self>,
        semid: i32,
        ops: Vec<(u16, i16, i16)>,
        cred: &Cred,
        pid: i32,
        wait_ns: u64,
    ) -> Result<SemReply, ErrorReply> {
        if ops.is_empty() || ops.len() > SEMOPM {
            return Err(err(
                if ops.is_empty() {
                    libc::EINVAL
                } else {
                    libc::E2BIG
                },
                "semop: operation count",
            ));
        }
        let set = self.sem_set(semid)?;
        let w = {
            let mut s = lock(&set);
            if ops.iter().any(|o| o.0 as u32 >= s.info.nsems) {
                return Err(err(
                    libc::EFBIG,
                    format!("semaphore set {semid}: no such semaphore"),
                ));
            }
            let alter = ops.iter().any(|o| o.1 != 0);
            if !cred.allowed(&s.info, if alter { 0o2 } else { 0o4 }) {
                return Err(err(
                    libc::EACCES,
                    format!("semaphore set {semid}: permission denied"),
                ));
            }
            match s.try_ops(&ops, pid)? {
                Try::Done => {
                    s.wake();
                    return Ok(SemReply::Done);
                }
                Try::Block if ops.iter().any(|o| o.2 as i32 & libc::IPC_NOWAIT != 0) => {
                    return Err(err(
                        libc::EAGAIN,
                        format!("semaphore set {semid}: would block"),
                    ));
                }
                Try::Block => {}
            }
            let w = Arc::new(Waiter {
                ops,
                pid,
                result: Mutex::new(None),
                wake: Notify::new(),
            });
            s.queue.push(w.clone());
            w
        };
        let _ = tokio::time::timeout(Duration::from_nanos(wait_ns), w.wake.notified()).await;
        let mut s = lock(&set);
        if let Some(r) = lock(&w.result).take() {
            return r.map(|_| SemReply::Done);
        }
        s.queue.retain(|x| !Arc::ptr_eq(x, &w));
        Ok(SemReply::Pending)
    }

    #[allow(clippy::too_many_arguments)]
    fn sem_home_ctl(
        &self,
        semid: i32,
        num: i32,
        cmd: i32,
        val: i32,
        array: Vec<u16>,
        set: Option<(u32, u32, u32)>,
        cred: &Cred,
        pid: i32,
    ) -> Result<SemReply, ErrorReply> {
        let arc = self.sem_set(semid)?;
        let mut s = lock(&arc);
        let owner = cred.owns(&s.info);
        let denied = || {
            err(
                libc::EACCES,
                format!("semaphore set {semid}: permission denied"),
            )
        };
        let in_range = |n: i32, s: &Set| {
            if n < 0 || n as u32 >= s.info.nsems {
                Err(err(
                    libc::EINVAL,
                    format!("semaphore set {semid}: no semaphore {n}"),
                ))
            } else {
                Ok(n as usize)
            }
        };
        match cmd {
            libc::IPC_STAT => {
                if !cred.allowed(&s.info, 0o4) {
                    return Err(denied());
                }
                Ok(SemReply::Info(s.info.clone()))
            }
            libc::IPC_SET => {
                if !owner {
                    return Err(err(
                        libc::EPERM,
                        format!("semaphore set {semid}: not its owner or creator"),
                    ));
                }
                let (uid, gid, mode) = set.ok_or_else(|| err(libc::EINVAL, "IPC_SET"))?;
                s.info.uid = uid;
                s.info.gid = gid;
                s.info.mode = (s.info.mode & !0o777) | (mode & 0o777);
                s.info.ctime = now();
                Ok(SemReply::Done)
            }
            libc::IPC_RMID => {
                if !owner {
                    return Err(err(
                        libc::EPERM,
                        format!("semaphore set {semid}: not its owner or creator"),
                    ));
                }
                s.info.mode |= SEM_DEST;
                for w in s.queue.drain(..) {
                    *lock(&w.result) = Some(Err(err(
                        libc::EIDRM,
                        format!("semaphore set {semid} removed"),
                    )));
                    w.wake.notify_one();
                }
                let key = s.info.key;
                drop(s);
                lock(&self.sets).remove(&semid);
                let mut keys = lock(&self.keys);
                if keys.get(&key) == Some(&semid) {
                    keys.remove(&key);
                }
                Ok(SemReply::Done)
            }
            GETVAL | GETPID | GETNCNT | GETZCNT | GETALL => {
                if !cred.allowed(&s.info, 0o4) {
                    return Err(denied());
                }
                if cmd == GETALL {
                    return Ok(SemReply::Vals(s.vals.clone()));
                }
                let n = in_range(num, &s)?;
                Ok(SemReply::Id(match cmd {
                    GETVAL => s.vals[n] as i32,
                    GETPID => s.pids[n],
                    GETNCNT => s.count(n, false),
                    _ => s.count(n, true),
                }))
            }
            SETVAL | SETALL => {
                if !cred.allowed(&s.info, 0o2) {
                    return Err(denied());
                }
                if cmd == SETVAL {
                    let n = in_range(num, &s)?;
                    if !(0..=SEMVMX).contains(&val) {
                        return Err(err(libc::ERANGE, format!("value {val}")));
                    }
                    s.vals[n] = val as u16;
                    s.pids[n] = pid;
                    for u in s.undo.values_mut() {
                        u[n] = 0;
                    }
                } else {
                    if array.len() != s.vals.len() || array.iter().any(|&v| v as i32 > SEMVMX) {
                        return Err(err(libc::ERANGE, "SETALL values"));
                    }
                    s.vals = array;
                    s.pids.iter_mut().for_each(|p| *p = pid);
                    s.undo.clear();
                }
                s.info.ctime = now();
                s.wake();
                Ok(SemReply::Done)
            }
            _ => Err(err(libc::EINVAL, format!("semctl command {cmd}"))),
        }
    }
}
