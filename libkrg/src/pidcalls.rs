//! Pids in the calls that are not about a process's life (those are in
//! [`crate::processes`]): the owner of a descriptor's `SIGIO`/`SIGURG`
//! (`fcntl` `F_SETOWN`..., `ioctl` `FIOSETOWN`...), a terminal's groups
//! through `ioctl`, the holder of a conflicting lock (`F_GETLK`),
//! priorities, scheduling, resource limits, another process's memory,
//! capabilities, `tgkill`, and credentials on UNIX sockets
//! (`SO_PEERCRED`, `SCM_CREDENTIALS`).
//!
//! The rules are those of the rest of the library:
//!
//! * a gpid naming a *process* becomes the kernel pid of its program on
//!   this node ([`processes::to_kernel_running`]: the own gpid without
//!   asking, another through `ResolveRunning`); a process whose program
//!   runs on another node is `ESRCH`, as the kernel of this node cannot act
//!   on it (a shadow standing for it here is not it: its priority, limits
//!   or memory are not the program's);
//! * a gpid naming a *process group* becomes its kernel group on this node
//!   ([`processes::to_kernel`]: the own group without asking);
//! * kernel pids (below 2^22), 0 (the caller) and values the call does not
//!   read as pids (a uid for `PRIO_USER`) pass through;
//! * pids the kernel hands back become gpids (`to_global`: a process that
//!   is not an SSI process keeps its kernel pid).
//!
//! `fcntl`, `ioctl`, `getsockopt`, `sendmsg` and `recvmsg` are called all
//! the time for other things: their hooks hand those calls to libc after
//! one test of the command, option or control data
//! ([`fcntl_may_carry_pid`], [`ioctl_may_carry_pid`], [`is_peercred`],
//! [`sends_gpid_creds`], [`has_control`]), before entering the library
//! (`only_if` of the hook macro). The functions here make the same test
//! first, so that they are right on their own.
//!
//! Pointer arguments are the caller's, valid as the call's contract says;
//! a null one goes to the real function untouched, which says `EFAULT`.
//! Nothing here allocates or locks: structures to change are copied to the
//! stack, agent calls go through [`crate::rt::agent_call`].
//!
//! The entry points that take those pointers are the module's `abi` fence;
//! they make typed views of them (`sys::user`) for the safe code.

#![deny(unsafe_code)]

use crate::gpid::is_gpid;
use crate::processes::{self, fail};
use crate::sys::sock::{self, Cmsg};
use crate::sys::user::{Msg, MsgMut, Msgs, Ptr, PtrMut};
use libc::{c_int, c_short, c_uint, c_ulong, c_void, id_t, msghdr, pid_t, ssize_t};
use std::mem::size_of;

/// -1 with errno, in the return type of the call.
fn failed<R: From<i8>>(errno: c_int) -> R {
    crate::rt::set_errno(errno);
    R::from(-1)
}

/// A pid argument naming a process (0 is the caller).
fn process(pid: pid_t) -> Result<pid_t, c_int> {
    processes::to_kernel_running(pid)
}

/// A pid argument naming a process group (0 is the caller's).
fn group(pgid: pid_t) -> Result<pid_t, c_int> {
    processes::to_kernel(pgid)
}

/// An owner argument (`F_SETOWN`, `FIOSETOWN`, `SIOCSPGRP`): a process,
/// or a process group when negative.
fn owner_in(v: c_int) -> Result<c_int, c_int> {
    if v > 0 {
        return process(v);
    }
    match v.checked_neg() {
        Some(g) if g > 0 => group(g).map(|k| -k),
        _ => Ok(v),
    }
}

/// An owner the kernel gave back: a process, or a group when negative.
/// -1 is `F_GETOWN`'s error (group 1 is never an SSI group either).
fn owner_out(v: c_int) -> c_int {
    if v > 0 {
        return processes::to_global(v);
    }
    match v.checked_neg() {
        Some(g) if g > 1 => -processes::group_to_global(g),
        _ => v,
    }
}

// ---------------------------------------------------------------------------
// fcntl

/// `fcntl` commands not in the libc crate for every target (Linux uapi).
pub const F_SETOWN_EX: c_int = 15;
pub const F_GETOWN_EX: c_int = 16;
pub const F_OWNER_TID: c_int = 0;
pub const F_OWNER_PID: c_int = 1;
pub const F_OWNER_PGRP: c_int = 2;

/// `struct f_owner_ex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerEx {
    pub kind: c_int,
    pub pid: pid_t,
}

/// The commands that carry a pid, one bit each (all below 64).
const FCNTL_PID_CMDS: u64 = 1 << libc::F_GETLK
    | 1 << libc::F_SETOWN
    | 1 << libc::F_GETOWN
    | 1 << F_SETOWN_EX
    | 1 << F_GETOWN_EX;

/// Whether `cmd` may carry a pid: one bit test. Commands of 64 and above
/// share the bits of their number modulo 64: `F_DUPFD_CLOEXEC` (1030)
/// fails the test, the rare `F_GETPIPE_SZ` and `F_ADD_SEALS` (1032, 1033)
/// pass it and are told apart by the match in `fcntl_pid`.
#[inline(always)]
pub fn fcntl_may_carry_pid(cmd: c_int) -> bool {
    (FCNTL_PID_CMDS >> (cmd as u32 & 63)) & 1 != 0
}

/// `fcntl`'s argument for the commands that pass [`fcntl_may_carry_pid`],
/// as each reads it (made in [`abi::fcntl`]).
enum FcntlArg<'a> {
    /// An int, or no argument (`F_SETOWN`, `F_GETOWN`, the others).
    Value,
    /// `F_SETOWN_EX`'s structure (`None`: null).
    OwnerIn(Option<Ptr<'a, OwnerEx>>),
    /// `F_GETOWN_EX`'s.
    OwnerOut(Option<PtrMut<'a, OwnerEx>>),
    /// `F_GETLK`'s.
    Lock(Option<PtrMut<'a, libc::flock>>),
}

/// The pid-carrying commands (and the few others that share their bits):
/// `real` is the real fcntl on the caller's fd, `arg` the caller's
/// argument and `view` what it points to.
#[inline(never)]
fn fcntl_pid(
    cmd: c_int,
    arg: usize,
    view: FcntlArg<'_>,
    real: impl FnOnce(c_int, usize) -> c_int,
) -> c_int {
    match view {
        FcntlArg::Value => match cmd {
            libc::F_SETOWN => {
                // The kernel reads an int (the rest of the register is noise).
                let v = arg as c_int;
                match owner_in(v) {
                    Ok(k) if k == v => real(cmd, arg),
                    Ok(k) => real(cmd, k as isize as usize),
                    Err(e) => fail(e),
                }
            }
            libc::F_GETOWN => owner_out(real(cmd, arg)),
            _ => real(cmd, arg),
        },
        FcntlArg::OwnerIn(None) | FcntlArg::OwnerOut(None) | FcntlArg::Lock(None) => real(cmd, arg),
        FcntlArg::OwnerIn(Some(p)) => {
            let mut o = p.read();
            let k = match o.kind {
                // A thread id is the kernel's (gettid is not translated);
                // a gpid there is a process's, i.e. its main thread.
                F_OWNER_PID | F_OWNER_TID => process(o.pid),
                F_OWNER_PGRP => group(o.pid),
                _ => Ok(o.pid), // EINVAL from the kernel
            };
            match k {
                Ok(k) if k == o.pid => real(cmd, arg),
                Ok(k) => {
                    // A copy: the caller's structure is left as it was.
                    o.pid = k;
                    real(cmd, &o as *const OwnerEx as usize)
                }
                Err(e) => fail(e),
            }
        }
        FcntlArg::OwnerOut(Some(p)) => {
            let r = real(cmd, arg);
            if r == 0 {
                // The kernel just filled it.
                let mut o = p.read();
                let g = match o.kind {
                    F_OWNER_PID => processes::to_global(o.pid),
                    F_OWNER_PGRP => processes::group_to_global(o.pid),
                    _ => o.pid,
                };
                if g != o.pid {
                    o.pid = g;
                    p.write(o);
                }
            }
            r
        }
        FcntlArg::Lock(Some(p)) => {
            let r = real(cmd, arg);
            if r == 0 {
                // The kernel just filled it (l_pid is that of the process
                // holding a conflicting lock; -1 for an OFD lock).
                let mut fl = p.read();
                if fl.l_type != libc::F_UNLCK as c_short && fl.l_pid > 0 {
                    fl.l_pid = processes::to_global(fl.l_pid);
                    p.write(fl);
                }
            }
            r
        }
    }
}

// ---------------------------------------------------------------------------
// ioctl

/// Socket `ioctl`s of the owner (include/uapi/linux/sockios.h; not in the
/// libc crate). Their argument is an `int *` as for `F_SETOWN`.
pub const FIOSETOWN: c_ulong = 0x8901;
pub const SIOCSPGRP: c_ulong = 0x8902;
pub const FIOGETOWN: c_ulong = 0x8903;
pub const SIOCGPGRP: c_ulong = 0x8904;
/// Terminal `ioctl`s of its groups (x86_64 and aarch64 numbers).
pub const TIOCGPGRP: c_ulong = 0x540F;
pub const TIOCSPGRP: c_ulong = 0x5410;
pub const TIOCGSID: c_ulong = 0x5429;

/// The bucket (0..64) of a request for [`ioctl_may_carry_pid`]: a
/// multiplicative hash of its 32 bits (the kernel's `cmd` is an unsigned
/// int). The factor was searched for so that, of the 245 terminal and
/// socket requests 0x5401-0x5460 and 0x8905-0x898f and a dozen common
/// others (`FICLONE`, `FS_IOC_GETFLAGS`, `BLKGETSIZE64`, `TIOCGPTN`...),
/// only the rare `TIOCEXCL` (0x540c), 0x891b and 0x891e share a bucket
/// with a pid request; the low six bits alone would put `FIONCLEX` and
/// `TCGETS` there.
const fn ioctl_bucket(req: u32) -> u32 {
    req.wrapping_mul(0x5851_45c7) >> 26
}

/// The buckets of the pid-carrying requests, one bit each.
const IOCTL_PID_BUCKETS: u64 = 1 << ioctl_bucket(FIOSETOWN as u32)
    | 1 << ioctl_bucket(SIOCSPGRP as u32)
    | 1 << ioctl_bucket(FIOGETOWN as u32)
    | 1 << ioctl_bucket(SIOCGPGRP as u32)
    | 1 << ioctl_bucket(TIOCGPGRP as u32)
    | 1 << ioctl_bucket(TIOCSPGRP as u32)
    | 1 << ioctl_bucket(TIOCGSID as u32);

/// Whether `req` may carry a pid: one bit test (of its bucket). The few
/// other requests that pass it are told apart by the match in
/// `ioctl_pid`.
#[inline(always)]
pub fn ioctl_may_carry_pid(req: c_ulong) -> bool {
    (IOCTL_PID_BUCKETS >> ioctl_bucket(req as u32)) & 1 != 0
}

/// The `pid_t` a pid request's argument points to (made in
/// [`abi::ioctl`]).
enum PidArg<'a> {
    /// Read by the request (`TIOCSPGRP`, `FIOSETOWN`, `SIOCSPGRP`).
    In(Ptr<'a, pid_t>),
    /// Written by it (`TIOCGPGRP`, `TIOCGSID`, `FIOGETOWN`, `SIOCGPGRP`).
    Out(PtrMut<'a, pid_t>),
}

/// `ioctl` request `req` with a pid argument: `real` is the real ioctl on
/// the caller's fd and request, `arg` the caller's argument and `view`
/// what it points to.
#[inline(never)]
fn ioctl_pid(
    req: c_ulong,
    arg: usize,
    view: PidArg<'_>,
    real: impl FnOnce(usize) -> c_int,
) -> c_int {
    // The kernel reads the request as an unsigned int.
    match (req as u32 as c_ulong, view) {
        (TIOCSPGRP, PidArg::In(p)) => {
            let v = p.read();
            processes::tcsetpgrp(v, |k| {
                if k == v {
                    real(arg)
                } else {
                    real(&k as *const pid_t as usize)
                }
            })
        }
        (FIOSETOWN | SIOCSPGRP, PidArg::In(p)) => {
            let v = p.read();
            match owner_in(v) {
                Ok(k) if k == v => real(arg),
                Ok(k) => real(&k as *const pid_t as usize),
                Err(e) => fail(e),
            }
        }
        (TIOCGPGRP, PidArg::Out(p)) => answered(real(arg), p, processes::group_to_global),
        (TIOCGSID, PidArg::Out(p)) => answered(real(arg), p, processes::session_to_global),
        (FIOGETOWN | SIOCGPGRP, PidArg::Out(p)) => answered(real(arg), p, owner_out),
        _ => real(arg),
    }
}

/// `r`, the real ioctl's result; when 0, the pid it wrote at `p` is
/// translated in place.
fn answered(r: c_int, p: PtrMut<'_, pid_t>, to_global: fn(pid_t) -> pid_t) -> c_int {
    if r == 0 {
        let v = p.read();
        let g = to_global(v);
        if g != v {
            p.write(g);
        }
    }
    r
}

// ---------------------------------------------------------------------------
// Priorities, scheduling, limits, memory, signals to threads

/// `getpriority`/`setpriority(which, who)`: `who` is a process for
/// `PRIO_PROCESS`, a group for `PRIO_PGRP`, a uid for `PRIO_USER`.
pub fn priority(which: c_uint, who: id_t, real: impl FnOnce(id_t) -> c_int) -> c_int {
    let k = match which {
        libc::PRIO_PROCESS => process(who as pid_t),
        libc::PRIO_PGRP => group(who as pid_t),
        _ => return real(who),
    };
    match k {
        Ok(k) => real(k as id_t),
        Err(e) => fail(e),
    }
}

/// A call whose first argument is a process (the `sched_*` family,
/// `prlimit`, `process_vm_readv`/`writev`, `tgkill`'s thread group).
#[inline]
pub fn on_process<R: From<i8>>(pid: pid_t, real: impl FnOnce(pid_t) -> R) -> R {
    match process(pid) {
        Ok(k) => real(k),
        Err(e) => failed(e),
    }
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CapHeader {
    pub version: u32,
    pub pid: c_int,
}

/// `capget`/`capset(hdr, data)`: the header (`hdr`, viewed as `h`) names
/// a process.
fn capabilities_of(
    hdr: *mut c_void,
    h: Option<PtrMut<'_, CapHeader>>,
    real: impl FnOnce(*mut c_void) -> c_int,
) -> c_int {
    let Some(h) = h else {
        return real(hdr);
    };
    let mut local = h.read();
    let k = match process(local.pid) {
        Ok(k) if k == local.pid => return real(hdr),
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    local.pid = k;
    let r = real((&mut local as *mut CapHeader).cast());
    // The kernel writes the version it prefers back (a probe with an
    // unknown version): the caller sees it, with its own pid left alone.
    let mut back = h.read();
    back.version = local.version;
    h.write(back);
    r
}

// ---------------------------------------------------------------------------
// Credentials on UNIX sockets

/// Whether a `getsockopt` option carries a pid (`SO_PEERCRED`).
#[inline(always)]
pub fn is_peercred(level: c_int, name: c_int) -> bool {
    name == libc::SO_PEERCRED && level == libc::SOL_SOCKET
}

/// The gpid that credentials the kernel gave with pid `k` show, if not
/// `k`.
fn received_pid(k: pid_t) -> Option<pid_t> {
    let g = if k > 0 { processes::to_global(k) } else { k };
    (g != k).then_some(g)
}

/// Translate the pid of credentials the kernel gave, in place.
fn received(c: PtrMut<'_, libc::ucred>) {
    let mut u = c.read();
    if let Some(g) = received_pid(u.pid) {
        u.pid = g;
        c.write(u);
    }
}

const UCRED: usize = size_of::<libc::ucred>();

/// Whether control message `c` is credentials whose `ucred` is whole
/// within the buffer.
fn is_creds(c: &Cmsg) -> bool {
    c.level == libc::SOL_SOCKET
        && c.kind == libc::SCM_CREDENTIALS
        && c.len >= sock::CMSG_HDR + UCRED
        && c.data.len() >= UCRED
}

/// The pid of the `ucred` at the start of `data` (at least its size).
fn creds_pid(data: &[u8]) -> pid_t {
    pid_t::from_ne_bytes(data[..4].try_into().expect("a pid"))
}

fn set_creds_pid(data: &mut [u8], pid: pid_t) {
    data[..4].copy_from_slice(&pid.to_ne_bytes());
}

/// The pids of the credentials in `control`.
fn creds_pids(control: &[u8]) -> impl Iterator<Item = pid_t> + '_ {
    sock::cmsgs(control)
        .filter(is_creds)
        .map(|c| creds_pid(&control[c.data]))
}

/// Whether `h` has a control buffer (where credentials may be sent or
/// received).
#[inline(always)]
fn has_control_data(h: &msghdr) -> bool {
    h.msg_controllen != 0 && !h.msg_control.is_null()
}

/// Whether `m` sends credentials with a gpid (which the kernel refuses:
/// it checks the pid against the sender's kernel pid).
#[inline]
fn sends_gpid(m: Msg<'_>) -> bool {
    has_control_data(&m.header()) && creds_pids(m.control()).any(is_gpid)
}

/// The largest control buffer translated (on the stack): more than any
/// message a UNIX socket takes (253 descriptors and credentials need
/// 1064 bytes).
const CONTROL_MAX: usize = 2048;

/// A control buffer aligned as `cmsghdr` wants.
#[repr(C, align(8))]
struct ControlBuf([u8; CONTROL_MAX]);

/// `f` with a copy of `m` whose credentials carry kernel pids; `Err` with
/// the errno when a pid does not run here, or when the control data is
/// larger than any UNIX socket accepts (`EINVAL`).
fn with_kernel_creds<R>(m: Msg<'_>, f: impl FnOnce(&msghdr) -> R) -> Result<R, c_int> {
    let mut h = m.header();
    if !has_control_data(&h) {
        return Ok(f(&h));
    }
    let len = h.msg_controllen;
    if len > CONTROL_MAX {
        return Err(libc::EINVAL);
    }
    // The copy holds the whole control data, and the copied header points
    // at it instead of the caller's buffer (which is left as it was).
    let mut buf = ControlBuf([0; CONTROL_MAX]);
    let control = &mut buf.0[..len];
    control.copy_from_slice(m.control());
    let mut err = 0;
    sock::cmsgs_mut(control, |c, data| {
        if err == 0 && is_creds(c) && is_gpid(creds_pid(data)) {
            match process(creds_pid(data)) {
                Ok(k) => set_creds_pid(data, k),
                Err(e) => err = e,
            }
        }
    });
    if err != 0 {
        return Err(err);
    }
    h.msg_control = buf.0.as_mut_ptr().cast();
    Ok(f(&h))
}

/// `sendmsg(fd, msg, flags)` of `m` (the caller's `msg`): credentials the
/// program fills in with its `getpid()` reach the kernel with its kernel
/// pid (the receiver's `recvmsg` gives the gpid back). `real` sends `msg`
/// or a copy.
#[inline]
fn send_one(
    msg: *const msghdr,
    m: Option<Msg<'_>>,
    real: impl FnOnce(*const msghdr) -> ssize_t,
) -> ssize_t {
    match m {
        Some(m) if sends_gpid(m) => match with_kernel_creds(m, |h| real(h)) {
            Ok(r) => r,
            Err(e) => failed(e),
        },
        _ => real(msg),
    }
}

/// `sendmmsg(fd, msgs, n, flags)` of `ms` (the caller's `msgs`): as
/// `sendmsg`. A batch with credentials to translate is sent one message
/// at a time (`real` with a count of 1), which sendmmsg's own semantics
/// allow (it stops at the first error and counts what went).
fn send_many(
    msgs: *mut libc::mmsghdr,
    n: c_uint,
    ms: Option<Msgs<'_>>,
    mut real: impl FnMut(*mut libc::mmsghdr, c_uint) -> c_int,
) -> c_int {
    let Some(ms) = ms.filter(|ms| (0..ms.len()).any(|i| ms.get(i).is_some_and(sends_gpid))) else {
        return real(msgs, n);
    };
    for (i, m) in (0..ms.len()).map_while(|i| Some((i, ms.get(i)?))) {
        // Its msghdr (or a translated copy) is sent alone and its length
        // stored back in the caller's entry.
        let r = with_kernel_creds(m, |h| {
            let mut one = libc::mmsghdr {
                msg_hdr: *h,
                msg_len: 0,
            };
            let r = real(&mut one, 1);
            if r == 1 {
                ms.set_sent(i, one.msg_len);
            }
            r
        });
        match r {
            Ok(1) => {}
            Ok(r) if i == 0 => return r,
            Err(errno) if i == 0 => return fail(errno),
            _ => return i as c_int,
        }
    }
    n as c_int
}

/// Credentials in `m`'s control data as received: their pids become
/// gpids.
#[inline]
fn received_msg(m: &mut MsgMut<'_>) {
    sock::cmsgs_mut(m.control_mut(), |c, data| {
        if is_creds(c) {
            if let Some(g) = received_pid(creds_pid(data)) {
                set_creds_pid(data, g);
            }
        }
    });
}

pub use abi::{
    capabilities, fcntl, getsockopt, has_control, ioctl, recvmmsg, recvmsg, sendmmsg, sendmsg,
    sends_gpid_creds,
};

/// The fence of this module: its entry points that take the application's
/// raw pointers (allowed `unsafe`: their contract is the C call's). Each
/// makes typed views of them, as the call defines its arguments, and hands
/// them to the safe code above.
#[allow(unsafe_code)]
mod abi {
    use super::*;

    /// `fcntl(fd, cmd, arg)`; `real` is the real fcntl on the caller's fd.
    ///
    /// # Safety
    /// `arg` is what the caller passed for `cmd`, per fcntl(2): for
    /// `F_SETOWN_EX`, `F_GETOWN_EX` and `F_GETLK` a null pointer or a valid
    /// pointer to the command's structure.
    #[inline]
    pub unsafe fn fcntl(cmd: c_int, arg: usize, real: impl FnOnce(c_int, usize) -> c_int) -> c_int {
        if !fcntl_may_carry_pid(cmd) {
            return real(cmd, arg);
        }
        // SAFETY: the function's contract, for the duration of the call.
        let view = unsafe {
            match cmd {
                F_SETOWN_EX => FcntlArg::OwnerIn(Ptr::new(arg as *const OwnerEx)),
                F_GETOWN_EX => FcntlArg::OwnerOut(PtrMut::new(arg as *mut OwnerEx)),
                libc::F_GETLK => FcntlArg::Lock(PtrMut::new(arg as *mut libc::flock)),
                _ => FcntlArg::Value,
            }
        };
        fcntl_pid(cmd, arg, view, real)
    }

    /// `ioctl(fd, req, arg)`; `real` is the real ioctl on the caller's fd
    /// and request.
    ///
    /// # Safety
    /// `arg` is what the caller passed for `req`, per ioctl(2): for the pid
    /// requests a null pointer or a valid pointer to a `pid_t`.
    #[inline]
    pub unsafe fn ioctl(req: c_ulong, arg: usize, real: impl FnOnce(usize) -> c_int) -> c_int {
        if !ioctl_may_carry_pid(req) {
            return real(arg);
        }
        let p = arg as *mut pid_t;
        // SAFETY: the function's contract, for the duration of the call.
        let view = unsafe {
            match req as u32 as c_ulong {
                TIOCSPGRP | FIOSETOWN | SIOCSPGRP => Ptr::new(p).map(PidArg::In),
                TIOCGPGRP | TIOCGSID | FIOGETOWN | SIOCGPGRP => PtrMut::new(p).map(PidArg::Out),
                _ => None,
            }
        };
        match view {
            Some(view) => ioctl_pid(req, arg, view, real),
            None => real(arg),
        }
    }

    /// `capget`/`capset(hdr, data)`: the header names a process.
    ///
    /// # Safety
    /// `hdr` is null or points to a valid, writable `CapHeader`, per
    /// capget(2).
    pub unsafe fn capabilities(hdr: *mut c_void, real: impl FnOnce(*mut c_void) -> c_int) -> c_int {
        // SAFETY: the function's contract, for the duration of the call.
        capabilities_of(hdr, unsafe { PtrMut::new(hdr.cast()) }, real)
    }

    /// `getsockopt(fd, level, name, val, len)`: `SO_PEERCRED`'s pid
    /// becomes a gpid.
    ///
    /// # Safety
    /// `val` and `len` are null or valid as getsockopt(2) says.
    #[inline]
    pub unsafe fn getsockopt(
        level: c_int,
        name: c_int,
        val: *mut c_void,
        len: *mut libc::socklen_t,
        real: impl FnOnce() -> c_int,
    ) -> c_int {
        if !is_peercred(level, name) {
            return real();
        }
        let r = real();
        // SAFETY: the function's contract; the kernel just filled `len`
        // and as many bytes of `val`, which then hold a `ucred`.
        unsafe {
            let whole = Ptr::new(len).is_some_and(|l| l.read() as usize >= UCRED);
            if r == 0 && whole {
                if let Some(c) = PtrMut::new(val.cast::<libc::ucred>()) {
                    received(c);
                }
            }
        }
        r
    }

    /// Whether `msg` has a control buffer (where credentials may be sent
    /// or received).
    ///
    /// # Safety
    /// `msg` is null or valid.
    #[inline(always)]
    pub unsafe fn has_control(msg: *const msghdr) -> bool {
        // SAFETY: the function's contract (only the header is read).
        unsafe { Ptr::new(msg) }.is_some_and(|m| has_control_data(&m.read()))
    }

    /// Whether `msg` sends credentials with a gpid (which the kernel
    /// refuses: it checks the pid against the sender's kernel pid).
    ///
    /// # Safety
    /// `msg` is null or valid per sendmsg(2).
    #[inline]
    pub unsafe fn sends_gpid_creds(msg: *const msghdr) -> bool {
        // SAFETY: the function's contract, for the duration of the call.
        unsafe { Msg::new(msg) }.is_some_and(sends_gpid)
    }

    /// `sendmsg(fd, msg, flags)`: see [`send_one`].
    ///
    /// # Safety
    /// `msg` is null or valid per sendmsg(2).
    #[inline]
    pub unsafe fn sendmsg(
        msg: *const msghdr,
        real: impl FnOnce(*const msghdr) -> ssize_t,
    ) -> ssize_t {
        // SAFETY: the function's contract, for the duration of the call.
        send_one(msg, unsafe { Msg::new(msg) }, real)
    }

    /// `sendmmsg(fd, msgs, n, flags)`: see [`send_many`].
    ///
    /// # Safety
    /// `msgs` is null or valid for `n` entries per sendmmsg(2).
    pub unsafe fn sendmmsg(
        msgs: *mut libc::mmsghdr,
        n: c_uint,
        real: impl FnMut(*mut libc::mmsghdr, c_uint) -> c_int,
    ) -> c_int {
        // SAFETY: the function's contract, for the duration of the call.
        send_many(msgs, n, unsafe { Msgs::new(msgs, n as usize) }, real)
    }

    /// `recvmsg(fd, msg, flags)`: received credentials (`SO_PASSCRED`, or
    /// the sender's `SCM_CREDENTIALS`) show gpids. `real` receives into
    /// `msg`.
    ///
    /// # Safety
    /// `msg` is null or valid per recvmsg(2).
    #[inline]
    pub unsafe fn recvmsg(msg: *mut msghdr, real: impl FnOnce() -> ssize_t) -> ssize_t {
        let r = real();
        if r >= 0 {
            // SAFETY: the function's contract; the kernel filled it.
            if let Some(mut m) = unsafe { MsgMut::new(msg) } {
                received_msg(&mut m);
            }
        }
        r
    }

    /// `recvmmsg(fd, msgs, n, flags, timeout)`: as `recvmsg`, for each
    /// message received.
    ///
    /// # Safety
    /// `msgs` is null or valid for `n` entries per recvmmsg(2).
    pub unsafe fn recvmmsg(msgs: *mut libc::mmsghdr, real: impl FnOnce() -> c_int) -> c_int {
        let r = real();
        if r > 0 && !msgs.is_null() {
            for i in 0..r as usize {
                // SAFETY: the kernel filled the first r entries.
                let m = unsafe { MsgMut::new(std::ptr::addr_of_mut!((*msgs.add(i)).msg_hdr)) };
                if let Some(mut m) = m {
                    received_msg(&mut m);
                }
            }
        }
        r
    }
}

#[cfg(test)]
// The entry points under test take raw pointers.
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use crate::processes::{init_identity, my_kpid, set_identity};
    use std::cell::Cell;

    /// This test process as an SSI process without an agent: its own gpid
    /// is known (gpid, kernel pid), no other gpid can be resolved.
    fn me() -> (pid_t, pid_t) {
        init_identity();
        let k = my_kpid();
        let g = crate::gpid::make(1, k as u32).unwrap();
        set_identity(g, 1, 0);
        (g, k)
    }

    /// A gpid of a node that does not exist.
    const ELSEWHERE: pid_t = 400 << 22 | 12345;

    fn errno() -> c_int {
        crate::rt::errno()
    }

    fn socketpair(kind: c_int) -> [c_int; 2] {
        let mut sv = [0; 2];
        // SAFETY: writes two fds into sv.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, sv.as_mut_ptr()) };
        assert_eq!(r, 0);
        sv
    }

    fn close(sv: [c_int; 2]) {
        for fd in sv {
            // SAFETY: our own fds.
            unsafe { libc::close(fd) };
        }
    }

    #[test]
    fn the_filters_let_only_pid_commands_in() {
        for cmd in [
            libc::F_GETLK,
            libc::F_SETOWN,
            libc::F_GETOWN,
            F_SETOWN_EX,
            F_GETOWN_EX,
        ] {
            assert!(fcntl_may_carry_pid(cmd), "{cmd}");
        }
        for cmd in [
            libc::F_DUPFD,
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_GETFL,
            libc::F_SETFL,
            libc::F_SETLK,
            libc::F_SETLKW,
            10, // F_SETSIG
            11, // F_GETSIG
            libc::F_OFD_GETLK,
            libc::F_OFD_SETLK,
            libc::F_OFD_SETLKW,
            libc::F_DUPFD_CLOEXEC,
            libc::F_SETPIPE_SZ,
            libc::F_GET_SEALS,
        ] {
            assert!(!fcntl_may_carry_pid(cmd), "{cmd}");
        }
        for req in [
            FIOSETOWN, SIOCSPGRP, FIOGETOWN, SIOCGPGRP, TIOCGPGRP, TIOCSPGRP, TIOCGSID,
        ] {
            assert!(ioctl_may_carry_pid(req), "{req:#x}");
        }
        for req in [
            libc::FIONBIO,
            libc::FIONREAD,
            libc::FIOCLEX,
            libc::FIONCLEX,
            libc::FIOASYNC,
            libc::TIOCGWINSZ,
            libc::TIOCSWINSZ,
            libc::TIOCSCTTY,
            libc::TIOCOUTQ,
            libc::TCGETS,
            libc::TCSETS,
            libc::TCSETSW,
            libc::TCSETSF,
            libc::SIOCGIFINDEX,
            libc::SIOCGIFFLAGS,
            libc::SIOCGIFNAME,
        ] {
            assert!(!ioctl_may_carry_pid(req), "{req:#x}");
        }
        // Of the tty and socket requests, three share a bucket.
        let passing: Vec<c_ulong> = (0x5401..=0x5460)
            .chain(0x8905..=0x898f)
            .filter(|r| ioctl_may_carry_pid(*r))
            .filter(|r| ![TIOCGPGRP, TIOCSPGRP, TIOCGSID].contains(r))
            .collect();
        assert_eq!(passing, [0x540c, 0x891b, 0x891e]);
    }

    #[test]
    fn other_commands_and_requests_pass_untouched() {
        let (g, _) = me();
        // F_GETPIPE_SZ, F_ADD_SEALS and TCGETS share a bit with a pid
        // command.
        for cmd in [
            libc::F_GETFL,
            libc::F_SETFL,
            libc::F_DUPFD_CLOEXEC,
            libc::F_GETPIPE_SZ,
            libc::F_ADD_SEALS,
        ] {
            let got = Cell::new((0, 0));
            // SAFETY: the closure does not dereference arg.
            let r = unsafe {
                fcntl(cmd, g as usize, |c, a| {
                    got.set((c, a));
                    42
                })
            };
            assert_eq!((r, got.get()), (42, (cmd, g as usize)), "{cmd}");
        }
        // TIOCEXCL shares a bucket with a pid request.
        for req in [libc::FIONBIO, libc::TIOCEXCL, 0x891b] {
            let v = g;
            let arg = &v as *const pid_t as usize;
            let got = Cell::new(0);
            // SAFETY: arg points to a pid_t.
            let r = unsafe {
                ioctl(req, arg, |a| {
                    got.set(a);
                    7
                })
            };
            assert_eq!((r, got.get(), v), (7, arg, g), "{req:#x}");
        }
    }

    /// `fcntl` with a closure that records the int argument it got.
    fn setown(v: c_int) -> (c_int, Option<c_int>) {
        let got = Cell::new(None);
        // SAFETY: F_SETOWN takes an int.
        let r = unsafe {
            fcntl(libc::F_SETOWN, v as usize, |_, a| {
                got.set(Some(a as c_int));
                0
            })
        };
        (r, got.get())
    }

    #[test]
    fn f_setown_takes_the_own_gpid_and_group() {
        let (g, k) = me();
        assert_eq!(setown(g), (0, Some(k)));
        assert_eq!(setown(-g), (0, Some(-k)), "the group the caller leads");
        assert_eq!(setown(123), (0, Some(123)), "kernel pids pass");
        assert_eq!(setown(-123), (0, Some(-123)));
        assert_eq!(setown(0), (0, Some(0)));
        assert_eq!(setown(i32::MIN), (0, Some(i32::MIN)));
        assert_eq!(setown(ELSEWHERE), (-1, None), "not called");
        assert_ne!(errno(), 0);
        assert_eq!(setown(-ELSEWHERE), (-1, None));
    }

    #[test]
    fn f_getown_gives_gpids() {
        let (g, k) = me();
        for (kernel, shown) in [(k, g), (0, 0), (-1, -1), (77, 77)] {
            // SAFETY: the closure does not dereference arg.
            let r = unsafe { fcntl(libc::F_GETOWN, 0, |_, _| kernel) };
            assert_eq!(r, shown);
        }
    }

    #[test]
    fn f_setown_ex_translates_a_copy() {
        let (g, k) = me();
        for (kind, pid, want) in [
            (F_OWNER_PID, g, k),
            (F_OWNER_TID, g, k),
            (F_OWNER_PGRP, g, k),
            (F_OWNER_PID, 55, 55),
            (9, g, g), // not a kind: the kernel says EINVAL
        ] {
            let o = OwnerEx { kind, pid };
            let got = Cell::new(None);
            // SAFETY: arg points to an OwnerEx; so does what real gets.
            let r = unsafe {
                fcntl(F_SETOWN_EX, &o as *const OwnerEx as usize, |_, a| {
                    got.set(Some((a as *const OwnerEx).read()));
                    0
                })
            };
            assert_eq!(r, 0);
            assert_eq!(got.get(), Some(OwnerEx { kind, pid: want }));
            assert_eq!(o, OwnerEx { kind, pid }, "the caller's is left alone");
        }
        let o = OwnerEx {
            kind: F_OWNER_PID,
            pid: ELSEWHERE,
        };
        // SAFETY: as above.
        let r = unsafe { fcntl(F_SETOWN_EX, &o as *const OwnerEx as usize, |_, _| 0) };
        assert_eq!(r, -1);
        // SAFETY: null goes to the real call (EFAULT).
        assert_eq!(unsafe { fcntl(F_SETOWN_EX, 0, |_, _| -2) }, -2);
    }

    #[test]
    fn f_getown_ex_and_f_getlk_give_gpids() {
        let (g, k) = me();
        for (kind, kernel, shown) in [
            (F_OWNER_PID, k, g),
            (F_OWNER_PGRP, 5, 5),
            (F_OWNER_TID, k, k),
        ] {
            let mut o = OwnerEx { kind: 0, pid: 0 };
            // SAFETY: arg points to our OwnerEx.
            let r = unsafe {
                fcntl(F_GETOWN_EX, &mut o as *mut OwnerEx as usize, |_, a| {
                    (a as *mut OwnerEx).write(OwnerEx { kind, pid: kernel });
                    0
                })
            };
            assert_eq!((r, o), (0, OwnerEx { kind, pid: shown }));
        }
        for (ty, kernel, shown) in [
            (libc::F_WRLCK, k, g),
            (libc::F_UNLCK, k, k),
            (libc::F_RDLCK, -1, -1),
        ] {
            // SAFETY: all-zero is a valid flock.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            // SAFETY: arg points to our flock.
            let r = unsafe {
                fcntl(
                    libc::F_GETLK,
                    &mut fl as *mut libc::flock as usize,
                    |_, a| {
                        let p = a as *mut libc::flock;
                        (*p).l_type = ty as c_short;
                        (*p).l_pid = kernel;
                        0
                    },
                )
            };
            assert_eq!((r, fl.l_pid), (0, shown));
        }
    }

    #[test]
    fn the_kernel_takes_the_owner_and_gives_it_back_as_a_gpid() {
        let (g, k) = me();
        let sv = socketpair(libc::SOCK_STREAM);
        // SAFETY: F_SETOWN/F_GETOWN with ints on our socket.
        let real = |c: c_int, a: usize| unsafe { libc::fcntl(sv[0], c, a) };
        // SAFETY: the commands take ints.
        unsafe {
            assert_eq!(
                fcntl(libc::F_SETOWN, g as usize, real),
                0,
                "errno {}",
                errno()
            );
            assert_eq!(
                libc::fcntl(sv[0], libc::F_GETOWN),
                k,
                "the kernel has the kernel pid"
            );
            assert_eq!(fcntl(libc::F_GETOWN, 0, real), g);
        }
        // SAFETY: the requests take an int pointer, ours.
        let ioc = |r: c_ulong, a: usize| unsafe { libc::ioctl(sv[1], r, a) };
        let mut v = g;
        // SAFETY: as above.
        unsafe {
            assert_eq!(
                ioctl(FIOSETOWN, &v as *const pid_t as usize, |a| ioc(
                    FIOSETOWN, a
                )),
                0
            );
            v = 0;
            assert_eq!(
                ioctl(FIOGETOWN, &mut v as *mut pid_t as usize, |a| ioc(
                    FIOGETOWN, a
                )),
                0
            );
            assert_eq!(v, g);
            v = 0;
            assert_eq!(libc::ioctl(sv[1], SIOCGPGRP, &mut v as *mut pid_t), 0);
            assert_eq!(v, k);
        }
        close(sv);
    }

    #[test]
    fn socket_owner_ioctls_translate() {
        let (g, k) = me();
        for req in [FIOSETOWN, SIOCSPGRP] {
            for (v, want) in [(g, k), (-g, -k), (9, 9)] {
                let got = Cell::new(0);
                // SAFETY: arg points to our int, as what real gets does.
                let r = unsafe {
                    ioctl(req, &v as *const pid_t as usize, |a| {
                        got.set((a as *const pid_t).read());
                        0
                    })
                };
                assert_eq!((r, got.get()), (0, want), "{req:#x} {v}");
            }
            let v = ELSEWHERE;
            // SAFETY: as above.
            let r = unsafe { ioctl(req, &v as *const pid_t as usize, |_| 0) };
            assert_eq!(r, -1);
        }
        for req in [FIOGETOWN, SIOCGPGRP] {
            let mut v = 0;
            // SAFETY: as above.
            let r = unsafe {
                ioctl(req, &mut v as *mut pid_t as usize, |a| {
                    (a as *mut pid_t).write(k);
                    0
                })
            };
            assert_eq!((r, v), (0, g));
        }
        // SAFETY: null goes to the real call.
        assert_eq!(unsafe { ioctl(FIOSETOWN, 0, |_| -3) }, -3);
    }

    #[test]
    fn terminal_ioctls_translate_the_group() {
        let (g, k) = me();
        let got = Cell::new(0);
        let v = g;
        // SAFETY: arg points to our pid.
        let r = unsafe {
            ioctl(TIOCSPGRP, &v as *const pid_t as usize, |a| {
                got.set((a as *const pid_t).read());
                0
            })
        };
        assert_eq!((r, got.get(), v), (0, k, g));
        let v = ELSEWHERE;
        // SAFETY: as above.
        let r = unsafe { ioctl(TIOCSPGRP, &v as *const pid_t as usize, |_| 0) };
        assert_eq!((r, errno()), (-1, libc::EPERM), "as tcsetpgrp");
    }

    #[test]
    fn priorities_name_processes_and_groups_not_users() {
        let (g, k) = me();
        let call = |which, who: pid_t| {
            let got = Cell::new(None);
            let r = priority(which, who as id_t, |w| {
                got.set(Some(w as pid_t));
                0
            });
            (r, got.get())
        };
        assert_eq!(call(libc::PRIO_PROCESS, g), (0, Some(k)));
        assert_eq!(call(libc::PRIO_PGRP, g), (0, Some(k)));
        assert_eq!(call(libc::PRIO_PROCESS, 0), (0, Some(0)));
        // A uid may be 2^22 or more (user namespaces).
        assert_eq!(call(libc::PRIO_USER, g), (0, Some(g)));
        assert_eq!(call(libc::PRIO_PROCESS, ELSEWHERE), (-1, None));
        // The real call: the own gpid is the caller.
        // SAFETY: getpriority takes integers.
        let real = |w: id_t| unsafe { libc::getpriority(libc::PRIO_PROCESS, w) };
        crate::rt::set_errno(0);
        assert_eq!(priority(libc::PRIO_PROCESS, g as id_t, real), real(0));
        assert_eq!(errno(), 0);
    }

    #[test]
    fn calls_on_a_process_take_its_kernel_pid() {
        let (g, k) = me();
        assert_eq!(on_process(g, |p| p), k);
        assert_eq!(on_process(0, |p| p), 0);
        assert_eq!(on_process(-5, |p| p), -5);
        assert_eq!(on_process(4321, |p| p), 4321);
        crate::rt::set_errno(0);
        let r: ssize_t = on_process(ELSEWHERE, |_| 99);
        assert_eq!(r, -1);
        assert_ne!(errno(), 0);
        // SAFETY: a cpu_set_t of ours.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let r = on_process(g, |p| {
            // SAFETY: as above.
            unsafe { libc::sched_getaffinity(p, size_of::<libc::cpu_set_t>(), &mut set) }
        });
        assert_eq!(r, 0);
        // SAFETY: tgkill of our own thread with signal 0 checks, sends nothing.
        let r = on_process(g, |p| unsafe {
            libc::syscall(libc::SYS_tgkill, p, libc::gettid(), 0) as c_int
        });
        assert_eq!(r, 0);
    }

    #[test]
    fn capabilities_translate_a_copy_and_give_the_version_back() {
        let (g, k) = me();
        let mut h = CapHeader { version: 0, pid: g };
        let got = Cell::new(0);
        // SAFETY: hdr is ours; real writes the version into its copy, as
        // the kernel does on a version probe.
        let r = unsafe {
            capabilities((&mut h as *mut CapHeader).cast(), |p| {
                let c = p.cast::<CapHeader>();
                got.set((*c).pid);
                (*c).version = 0x2008_0522;
                -1
            })
        };
        assert_eq!((r, got.get(), h.pid, h.version), (-1, k, g, 0x2008_0522));
        let mut h = CapHeader {
            version: 0x2008_0522,
            pid: ELSEWHERE,
        };
        // SAFETY: as above.
        let r = unsafe { capabilities((&mut h as *mut CapHeader).cast(), |_| 0) };
        assert_eq!(r, -1);
    }

    #[test]
    fn so_peercred_shows_the_gpid() {
        let (g, k) = me();
        let sv = socketpair(libc::SOCK_STREAM);
        // SAFETY: all-zero is a valid ucred.
        let mut c: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::ucred>() as libc::socklen_t;
        let (val, lenp) = (
            (&mut c as *mut libc::ucred).cast::<c_void>(),
            &mut len as *mut _,
        );
        // SAFETY: val and len are ours and large enough.
        let real =
            || unsafe { libc::getsockopt(sv[0], libc::SOL_SOCKET, libc::SO_PEERCRED, val, lenp) };
        // SAFETY: as above.
        let r = unsafe { getsockopt(libc::SOL_SOCKET, libc::SO_PEERCRED, val, lenp, real) };
        assert_eq!(r, 0);
        assert_eq!(c.pid, g);
        // Other options are not looked at.
        c.pid = k;
        // SAFETY: as above; real does nothing.
        let r = unsafe { getsockopt(libc::SOL_SOCKET, libc::SO_TYPE, val, lenp, || 0) };
        assert_eq!(r, 0);
        assert_eq!(c.pid, k);
        close(sv);
    }

    /// A message of one byte with credentials `pid`, its control buffer
    /// in `cbuf`.
    fn creds_msg(cbuf: &mut [u64; 8], iov: &mut libc::iovec, pid: pid_t) -> msghdr {
        // SAFETY: all-zero is a valid msghdr; the CMSG macros write within
        // cbuf, which has room for one ucred.
        unsafe {
            let mut m: msghdr = std::mem::zeroed();
            m.msg_iov = iov;
            m.msg_iovlen = 1;
            m.msg_control = cbuf.as_mut_ptr().cast();
            m.msg_controllen = libc::CMSG_SPACE(size_of::<libc::ucred>() as c_uint) as usize;
            let c = libc::CMSG_FIRSTHDR(&m);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_CREDENTIALS;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::ucred>() as c_uint) as usize;
            let u = libc::ucred {
                pid,
                uid: libc::getuid(),
                gid: libc::getgid(),
            };
            libc::CMSG_DATA(c).cast::<libc::ucred>().write_unaligned(u);
            m
        }
    }

    /// The pid of the first credentials in `m`.
    fn first_creds(m: &msghdr) -> Option<pid_t> {
        // SAFETY: m and its control buffer are ours.
        let m = unsafe { Msg::new(m) }.unwrap();
        creds_pids(m.control()).next()
    }

    #[test]
    fn credentials_cross_a_socket_with_the_kernel_pid_and_come_back_as_gpids() {
        let (g, _) = me();
        let sv = socketpair(libc::SOCK_DGRAM);
        let on: c_int = 1;
        // SAFETY: an int option on our socket.
        unsafe {
            libc::setsockopt(
                sv[0],
                libc::SOL_SOCKET,
                libc::SO_PASSCRED,
                (&on as *const c_int).cast(),
                size_of::<c_int>() as libc::socklen_t,
            )
        };
        let mut byte = *b"c";
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u64; 8];
        let m = creds_msg(&mut cbuf, &mut iov, g);
        // SAFETY: m is a valid message of ours.
        let send = |p: *const msghdr| unsafe { libc::sendmsg(sv[1], p, 0) };
        // SAFETY: as above.
        assert_eq!(unsafe { sendmsg(&m, send) }, 1, "errno {}", errno());
        assert_eq!(
            first_creds(&m),
            Some(g),
            "the caller's buffer is left alone"
        );
        // With the gpid as it is, the kernel refuses (EPERM, or ESRCH for
        // a privileged sender).
        assert_eq!(send(&m), -1);
        // Received: the kernel pid becomes the gpid again.
        let mut rbuf = [0u64; 8];
        let mut rm = creds_msg(&mut rbuf, &mut iov, 0);
        // SAFETY: rm is ours, its buffers live.
        let r = unsafe {
            recvmsg(&mut rm, || {
                libc::recvmsg(sv[0], &mut rm, libc::MSG_DONTWAIT)
            })
        };
        assert_eq!(r, 1);
        assert_eq!(first_creds(&rm), Some(g));
        // Credentials of a process that cannot be resolved: refused here.
        let m = creds_msg(&mut cbuf, &mut iov, ELSEWHERE);
        // SAFETY: as above.
        assert_eq!(unsafe { sendmsg(&m, |_| 0) }, -1);
        close(sv);
    }

    #[test]
    fn sendmmsg_with_credentials_sends_one_at_a_time() {
        let (g, k) = me();
        let mut byte = *b"c";
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let (mut b1, mut b2) = ([0u64; 8], [0u64; 8]);
        let mut msgs = [
            libc::mmsghdr {
                msg_hdr: creds_msg(&mut b1, &mut iov, 77),
                msg_len: 0,
            },
            libc::mmsghdr {
                msg_hdr: creds_msg(&mut b2, &mut iov, g),
                msg_len: 0,
            },
        ];
        let seen = Cell::new([0; 2]);
        let calls = Cell::new(0);
        // SAFETY: msgs is ours; real reads the one message it is given.
        let r = unsafe {
            sendmmsg(msgs.as_mut_ptr(), 2, |m, n| {
                assert_eq!(n, 1);
                let mut s = seen.get();
                s[calls.get()] = first_creds(&(*m).msg_hdr).unwrap();
                seen.set(s);
                calls.set(calls.get() + 1);
                (*m).msg_len = 1;
                1
            })
        };
        assert_eq!((r, seen.get()), (2, [77, k]));
        assert_eq!((msgs[0].msg_len, msgs[1].msg_len), (1, 1));
        // Without credentials to translate: one call with the whole batch.
        msgs[1].msg_hdr = creds_msg(&mut b2, &mut iov, 78);
        // SAFETY: as above.
        let r = unsafe { sendmmsg(msgs.as_mut_ptr(), 2, |_, n| n as c_int) };
        assert_eq!(r, 2);
    }

    #[test]
    fn waitid_of_the_own_group_takes_its_kernel_id() {
        let (g, k) = me();
        let got = Cell::new(None);
        let r = processes::waitid(libc::P_PGID, g as id_t, libc::WEXITED, |t, id| {
            got.set(Some((t, id)));
            (-1, None)
        });
        assert_eq!((r, got.get()), (-1, Some((libc::P_PGID, k as id_t))));
    }
}
