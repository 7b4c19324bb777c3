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
mod tests;
