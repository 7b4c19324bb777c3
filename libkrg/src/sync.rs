//! Cluster-aware synchronisation, the application side: System V
//! semaphores (`semget`, `semop`, `semtimedop`, `semctl`) whose sets live
//! at a home node and are the same on every node. (Process-shared pthread
//! objects and POSIX semaphores live in shared memory: see [`crate::dsm`].)

#![deny(unsafe_code)]

use crate::client::{self, CallError};
use crate::krg_log;
use crate::log::Level;
use crate::proto::{Request, Response, SemInfo};
use crate::sys::user::Ptr;
use libc::{c_int, key_t, sembuf, semid_ds, size_t, timespec};
use std::time::{Duration, Instant};

const IPC_INFO: c_int = 3;
const SEM_STAT: c_int = 18;
const SEM_INFO: c_int = 19;
const SEM_STAT_ANY: c_int = 20;
const GETALL: c_int = 13;
const SETVAL: c_int = 16;
const SETALL: c_int = 17;

fn fail(errno: i32) -> c_int {
    crate::rt::set_errno(errno);
    -1
}

fn call_err(what: &str, e: CallError) -> c_int {
    krg_log!(Level::Debug, "{what}: {e}");
    fail(e.errno())
}

fn unexpected(what: &str, r: &Response) -> c_int {
    krg_log!(
        Level::Warn,
        "{what}: unexpected answer from the agent: {r:?}"
    );
    fail(libc::EIO)
}

/// Whether System V semaphores are krg's for this process (capability
/// `dsm`, as shared memory).
pub fn active() -> bool {
    crate::dsm::active()
}

/// `semget(key, nsems, flags)`.
pub fn semget(key: key_t, nsems: c_int, flags: c_int) -> c_int {
    match client::call(&Request::SemGet { key, nsems, flags }) {
        Ok(Response::Id(id)) => id,
        Ok(r) => unexpected("semget", &r),
        Err(e) => call_err(&format!("semget key {key:#x}"), e),
    }
}

/// `semtimedop(semid, sops, nsops, timeout)` (`semop` with no timeout), of
/// the caller's `ops` (`None`: null) and `timeout`.
fn semop(
    semid: c_int,
    nsops: size_t,
    ops: Option<&[sembuf]>,
    timeout: Option<Ptr<'_, timespec>>,
) -> c_int {
    if nsops == 0 {
        return fail(libc::EINVAL);
    }
    let Some(v) = ops else {
        return fail(libc::EFAULT);
    };
    let ops: Vec<(u16, i16, i16)> = v.iter().map(|s| (s.sem_num, s.sem_op, s.sem_flg)).collect();
    let deadline = match timeout.map(|t| t.read()) {
        None => None,
        Some(t) => {
            if t.tv_sec < 0 || !(0..1_000_000_000).contains(&t.tv_nsec) {
                return fail(libc::EINVAL);
            }
            Some(Instant::now() + Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
        }
    };
    loop {
        let timeout_ns =
            deadline.map(|d| d.saturating_duration_since(Instant::now()).as_nanos() as u64);
        let req = Request::SemOp {
            semid,
            ops: ops.clone(),
            timeout_ns,
        };
        match client::call(&req) {
            Ok(Response::Ok) => return 0,
            Ok(Response::Pending) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return fail(libc::EAGAIN);
                }
            }
            Ok(r) => return unexpected("semop", &r),
            Err(e) => return call_err(&format!("semop on set {semid}"), e),
        }
    }
}

fn stat(semid: c_int) -> Result<SemInfo, c_int> {
    let req = Request::SemCtl {
        semid,
        num: 0,
        cmd: libc::IPC_STAT,
        val: 0,
        array: Vec::new(),
        set: None,
    };
    match client::call(&req) {
        Ok(Response::Sem(i)) => Ok(i),
        Ok(r) => Err(unexpected("semctl IPC_STAT", &r)),
        Err(e) => Err(call_err(&format!("semctl {semid} IPC_STAT"), e)),
    }
}

/// What `semctl` asks of the agent: the request, and what the caller
/// gets back.
enum Answer {
    /// IPC_STAT: the set's description.
    Ds(SemInfo),
    /// GETALL: the values.
    Vals(Vec<u16>),
    /// Everything else: the result.
    Done(c_int),
}

/// `semctl(semid, num, cmd, arg)` for a command that is krg's (`c`, the
/// command without IPC_64), with what the caller's `arg` gave (`val`,
/// `array`, `set`).
fn ask(
    semid: c_int,
    num: c_int,
    cmd: c_int,
    c: c_int,
    val: c_int,
    array: Vec<u16>,
    set: Option<(u32, u32, u32)>,
) -> Answer {
    let req = Request::SemCtl {
        semid,
        num,
        cmd: c,
        val,
        array,
        set,
    };
    match client::call(&req) {
        Ok(Response::Sem(i)) if c == libc::IPC_STAT => Answer::Ds(i),
        Ok(Response::SemVals(v)) if c == GETALL => Answer::Vals(v),
        Ok(Response::Id(v)) => Answer::Done(v),
        Ok(Response::Ok) => Answer::Done(0),
        Ok(r) => Answer::Done(unexpected("semctl", &r)),
        Err(e) => Answer::Done(call_err(&format!("semctl {semid} cmd {cmd}"), e)),
    }
}

/// `ds` as IPC_STAT describes set `i`.
fn fill_ds(ds: &mut semid_ds, i: &SemInfo) {
    ds.sem_perm.__key = i.key;
    ds.sem_perm.uid = i.uid;
    ds.sem_perm.gid = i.gid;
    ds.sem_perm.cuid = i.cuid;
    ds.sem_perm.cgid = i.cgid;
    ds.sem_perm.mode = i.mode as _;
    ds.sem_otime = i.otime;
    ds.sem_ctime = i.ctime;
    ds.sem_nsems = i.nsems as _;
}

pub use abi::{semctl, semtimedop};

/// The fence of this module: its entry points that take the application's
/// raw pointers (allowed `unsafe`: their contract is the C call's).
#[allow(unsafe_code)]
mod abi {
    use super::*;
    use crate::sys::user::{self, PtrMut};

    /// `semtimedop(semid, sops, nsops, timeout)` (`semop` with no
    /// timeout).
    ///
    /// # Safety
    /// `sops` points at `nsops` readable `sembuf`s and `timeout` is null or
    /// readable, as semop(2) requires.
    pub unsafe fn semtimedop(
        semid: c_int,
        sops: *mut sembuf,
        nsops: size_t,
        timeout: *const timespec,
    ) -> c_int {
        // SAFETY: the function's contract, for the duration of the call.
        let (ops, timeout) = unsafe {
            (
                (!sops.is_null()).then(|| user::slice(sops, nsops)),
                Ptr::new(timeout),
            )
        };
        semop(semid, nsops, ops, timeout)
    }

    /// `semctl(semid, num, cmd, arg)`; `arg` is the `union semun` as
    /// passed (an int or a pointer). IPC_INFO, SEM_INFO and SEM_STAT (the
    /// system's limits and its own table) go to `real`.
    ///
    /// # Safety
    /// `arg` holds what `cmd` requires: a writable `semid_ds` (IPC_STAT),
    /// a readable one (IPC_SET), an array of `nsems` values (GETALL,
    /// SETALL).
    pub unsafe fn semctl(
        semid: c_int,
        num: c_int,
        cmd: c_int,
        arg: usize,
        real: impl FnOnce(c_int, c_int, c_int, usize) -> c_int,
    ) -> c_int {
        const IPC_64: c_int = 0x100;
        let c = cmd & !IPC_64;
        if matches!(c, IPC_INFO | SEM_INFO | SEM_STAT | SEM_STAT_ANY) {
            return real(semid, num, cmd, arg);
        }
        let mut val = 0;
        let mut array = Vec::new();
        let mut set = None;
        match c {
            libc::IPC_SET => {
                // SAFETY: a readable semid_ds or null by the contract.
                let Some(ds) = (unsafe { Ptr::new(arg as *const semid_ds) }) else {
                    return fail(libc::EFAULT);
                };
                let p = ds.read().sem_perm;
                set = Some((p.uid, p.gid, p.mode as u32));
            }
            SETVAL => val = arg as u32 as i32,
            SETALL => {
                let n = match stat(semid) {
                    Ok(i) => i.nsems as usize,
                    Err(r) => return r,
                };
                if arg == 0 {
                    return fail(libc::EFAULT);
                }
                // SAFETY: an array of the set's nsems values by the
                // contract.
                array = unsafe { user::slice(arg as *const u16, n) }.to_vec();
            }
            libc::IPC_STAT | GETALL if arg == 0 => return fail(libc::EFAULT),
            _ => {}
        }
        match ask(semid, num, cmd, c, val, array, set) {
            Answer::Ds(i) => {
                // SAFETY: IPC_STAT: a writable semid_ds, not null (checked
                // above), by the contract.
                if let Some(ds) = unsafe { PtrMut::new(arg as *mut semid_ds) } {
                    let mut d = ds.read();
                    fill_ds(&mut d, &i);
                    ds.write(d);
                }
                0
            }
            Answer::Vals(v) => {
                // SAFETY: GETALL: an array of nsems values by the contract
                // (v has nsems entries), not null (checked above).
                unsafe { user::slice_mut(arg as *mut u16, v.len()) }.copy_from_slice(&v);
                0
            }
            Answer::Done(r) => r,
        }
    }
}
