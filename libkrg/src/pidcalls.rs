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

use crate::gpid::is_gpid;
use crate::processes::{self, fail};
use libc::{c_int, c_short, c_uint, c_ulong, c_void, cmsghdr, id_t, msghdr, pid_t, ssize_t};
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
    // SAFETY: the function's contract.
    unsafe { fcntl_pid(cmd, arg, real) }
}

/// The pid-carrying commands (and the few others that share their bits).
///
/// # Safety
/// As [`fcntl`].
#[inline(never)]
unsafe fn fcntl_pid(cmd: c_int, arg: usize, real: impl FnOnce(c_int, usize) -> c_int) -> c_int {
    match cmd {
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
        F_SETOWN_EX => {
            let p = arg as *const OwnerEx;
            if p.is_null() {
                return real(cmd, arg);
            }
            // SAFETY: non-null, valid per the contract.
            let mut o = unsafe { p.read_unaligned() };
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
        F_GETOWN_EX => {
            let r = real(cmd, arg);
            let p = arg as *mut OwnerEx;
            if r == 0 && !p.is_null() {
                // SAFETY: the kernel just filled it.
                let mut o = unsafe { p.read_unaligned() };
                let g = match o.kind {
                    F_OWNER_PID => processes::to_global(o.pid),
                    F_OWNER_PGRP => processes::group_to_global(o.pid),
                    _ => o.pid,
                };
                if g != o.pid {
                    o.pid = g;
                    // SAFETY: as above, writable.
                    unsafe { p.write_unaligned(o) };
                }
            }
            r
        }
        libc::F_GETLK => {
            let r = real(cmd, arg);
            let p = arg as *mut libc::flock;
            if r == 0 && !p.is_null() {
                // SAFETY: the kernel just filled it (l_pid is that of the
                // process holding a conflicting lock; -1 for an OFD lock).
                unsafe {
                    let mut fl = p.read_unaligned();
                    if fl.l_type != libc::F_UNLCK as c_short && fl.l_pid > 0 {
                        fl.l_pid = processes::to_global(fl.l_pid);
                        p.write_unaligned(fl);
                    }
                }
            }
            r
        }
        _ => real(cmd, arg),
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

/// `ioctl(fd, req, arg)`; `real` is the real ioctl on the caller's fd and
/// request.
///
/// # Safety
/// `arg` is what the caller passed for `req`, per ioctl(2): for the pid
/// requests a null pointer or a valid pointer to a `pid_t`.
#[inline]
pub unsafe fn ioctl(req: c_ulong, arg: usize, real: impl FnOnce(usize) -> c_int) -> c_int {
    if !ioctl_may_carry_pid(req) {
        return real(arg);
    }
    // SAFETY: the function's contract.
    unsafe { ioctl_pid(req, arg, real) }
}

/// # Safety
/// As [`ioctl`].
#[inline(never)]
unsafe fn ioctl_pid(req: c_ulong, arg: usize, real: impl FnOnce(usize) -> c_int) -> c_int {
    let p = arg as *mut pid_t;
    if p.is_null() {
        return real(arg);
    }
    // The kernel reads the request as an unsigned int.
    match req as u32 as c_ulong {
        TIOCSPGRP => {
            // SAFETY: non-null, valid per the contract.
            let v = unsafe { p.read_unaligned() };
            processes::tcsetpgrp(v, |k| {
                if k == v {
                    real(arg)
                } else {
                    real(&k as *const pid_t as usize)
                }
            })
        }
        FIOSETOWN | SIOCSPGRP => {
            // SAFETY: as above.
            let v = unsafe { p.read_unaligned() };
            match owner_in(v) {
                Ok(k) if k == v => real(arg),
                Ok(k) => real(&k as *const pid_t as usize),
                Err(e) => fail(e),
            }
        }
        // SAFETY: `p` is what the kernel writes to when it answers 0.
        TIOCGPGRP => unsafe { answered(real(arg), p, processes::group_to_global) },
        // SAFETY: as above.
        TIOCGSID => unsafe { answered(real(arg), p, processes::session_to_global) },
        // SAFETY: as above.
        FIOGETOWN | SIOCGPGRP => unsafe { answered(real(arg), p, owner_out) },
        _ => real(arg),
    }
}

/// `r`, the real ioctl's result; when 0, the pid it wrote at `p` is
/// translated in place.
///
/// # Safety
/// `p` is valid for reads and writes when `r` is 0.
unsafe fn answered(r: c_int, p: *mut pid_t, to_global: fn(pid_t) -> pid_t) -> c_int {
    if r == 0 {
        // SAFETY: the function's contract.
        unsafe {
            let v = p.read_unaligned();
            let g = to_global(v);
            if g != v {
                p.write_unaligned(g);
            }
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

/// `capget`/`capset(hdr, data)`: the header names a process.
///
/// # Safety
/// `hdr` is null or points to a valid, writable `CapHeader`, per
/// capget(2).
pub unsafe fn capabilities(hdr: *mut c_void, real: impl FnOnce(*mut c_void) -> c_int) -> c_int {
    let h = hdr.cast::<CapHeader>();
    if h.is_null() {
        return real(hdr);
    }
    // SAFETY: non-null, valid per the contract.
    let mut local = unsafe { h.read_unaligned() };
    let k = match process(local.pid) {
        Ok(k) if k == local.pid => return real(hdr),
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    local.pid = k;
    let r = real((&mut local as *mut CapHeader).cast());
    // The kernel writes the version it prefers back (a probe with an
    // unknown version): the caller sees it, with its own pid left alone.
    // SAFETY: as above, writable.
    unsafe { std::ptr::addr_of_mut!((*h).version).write_unaligned(local.version) };
    r
}

// ---------------------------------------------------------------------------
// Credentials on UNIX sockets

/// Whether a `getsockopt` option carries a pid (`SO_PEERCRED`).
#[inline(always)]
pub fn is_peercred(level: c_int, name: c_int) -> bool {
    name == libc::SO_PEERCRED && level == libc::SOL_SOCKET
}

/// `getsockopt(fd, level, name, val, len)`: `SO_PEERCRED`'s pid becomes a
/// gpid.
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
    // SAFETY: the kernel just filled `val` and `len` (checked non-null).
    unsafe {
        if r == 0 && !val.is_null() && !len.is_null() && *len as usize >= size_of::<libc::ucred>() {
            received(val.cast());
        }
    }
    r
}

/// Translate the pid of credentials the kernel gave, in place.
///
/// # Safety
/// `c` points to a readable and writable `ucred` (perhaps unaligned).
unsafe fn received(c: *mut libc::ucred) {
    // SAFETY: the function's contract.
    unsafe {
        let mut u = c.read_unaligned();
        if u.pid > 0 {
            let g = processes::to_global(u.pid);
            if g != u.pid {
                u.pid = g;
                c.write_unaligned(u);
            }
        }
    }
}

/// Call `f` with each `SCM_CREDENTIALS` of `msg`'s control data (a
/// pointer to its `ucred`, perhaps unaligned), within its length.
///
/// # Safety
/// `msg` is valid and its control buffer holds `msg_controllen` bytes.
unsafe fn each_creds(msg: *const msghdr, mut f: impl FnMut(*mut libc::ucred)) {
    // SAFETY: the CMSG walkers stay within the control buffer's length;
    // each credentials block is checked to end within it too.
    unsafe {
        let end = ((*msg).msg_control as usize).saturating_add((*msg).msg_controllen);
        let need = libc::CMSG_LEN(size_of::<libc::ucred>() as c_uint) as usize;
        let mut c: *const cmsghdr = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET
                && (*c).cmsg_type == libc::SCM_CREDENTIALS
                && (*c).cmsg_len >= need
                && c as usize + need <= end
            {
                f(libc::CMSG_DATA(c).cast());
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
}

/// Whether `msg` has a control buffer (where credentials may be sent or
/// received).
///
/// # Safety
/// `msg` is null or valid.
#[inline(always)]
pub unsafe fn has_control(msg: *const msghdr) -> bool {
    // SAFETY: the function's contract.
    unsafe { !msg.is_null() && (*msg).msg_controllen != 0 && !(*msg).msg_control.is_null() }
}

/// Whether `msg` sends credentials with a gpid (which the kernel refuses:
/// it checks the pid against the sender's kernel pid).
///
/// # Safety
/// As `each_creds`, or `msg` null.
#[inline]
pub unsafe fn sends_gpid_creds(msg: *const msghdr) -> bool {
    // SAFETY: the function's contract.
    unsafe {
        if !has_control(msg) {
            return false;
        }
        let mut found = false;
        // SAFETY: the pointer is within the control buffer.
        each_creds(msg, |c| {
            found |= is_gpid(std::ptr::addr_of!((*c).pid).read_unaligned())
        });
        found
    }
}

/// The largest control buffer translated (on the stack): more than any
/// message a UNIX socket takes (253 descriptors and credentials need
/// 1064 bytes).
const CONTROL_MAX: usize = 2048;

/// `f` with a copy of `msg` whose credentials carry kernel pids; `Err`
/// with the errno when a pid does not run here, or when the control data
/// is larger than any UNIX socket accepts (`EINVAL`).
///
/// # Safety
/// As [`each_creds`].
unsafe fn with_kernel_creds<R>(
    msg: *const msghdr,
    f: impl FnOnce(*const msghdr) -> R,
) -> Result<R, c_int> {
    let mut buf = [0u64; CONTROL_MAX / 8];
    // SAFETY: the function's contract; the copy holds the whole control
    // data, and `m` points at it instead of the caller's buffer (which is
    // left as it was).
    unsafe {
        let len = (*msg).msg_controllen;
        if len > CONTROL_MAX {
            return Err(libc::EINVAL);
        }
        std::ptr::copy_nonoverlapping(
            (*msg).msg_control.cast::<u8>(),
            buf.as_mut_ptr().cast::<u8>(),
            len,
        );
        let mut m = *msg;
        m.msg_control = buf.as_mut_ptr().cast();
        let mut err = 0;
        each_creds(&m, |c| {
            let mut u = c.read_unaligned();
            if err == 0 && is_gpid(u.pid) {
                match process(u.pid) {
                    Ok(k) => {
                        u.pid = k;
                        c.write_unaligned(u);
                    }
                    Err(e) => err = e,
                }
            }
        });
        if err != 0 {
            return Err(err);
        }
        Ok(f(&m))
    }
}

/// `sendmsg(fd, msg, flags)`: credentials the program fills in with its
/// `getpid()` reach the kernel with its kernel pid (the receiver's
/// `recvmsg` gives the gpid back). `real` sends `msg` or a copy.
///
/// # Safety
/// `msg` is null or valid per sendmsg(2).
#[inline]
pub unsafe fn sendmsg(msg: *const msghdr, real: impl FnOnce(*const msghdr) -> ssize_t) -> ssize_t {
    // SAFETY: the function's contract.
    if !unsafe { sends_gpid_creds(msg) } {
        return real(msg);
    }
    // SAFETY: as above; `msg` is not null.
    match unsafe { with_kernel_creds(msg, real) } {
        Ok(r) => r,
        Err(e) => failed(e),
    }
}

/// `sendmmsg(fd, msgs, n, flags)`: as `sendmsg`. A batch with credentials
/// to translate is sent one message at a time (`real` with a count of 1),
/// which sendmmsg's own semantics allow (it stops at the first error and
/// counts what went).
///
/// # Safety
/// `msgs` is null or valid for `n` entries per sendmmsg(2).
pub unsafe fn sendmmsg(
    msgs: *mut libc::mmsghdr,
    n: c_uint,
    mut real: impl FnMut(*mut libc::mmsghdr, c_uint) -> c_int,
) -> c_int {
    // SAFETY: the function's contract.
    let any = !msgs.is_null()
        && (0..n as usize)
            .any(|i| unsafe { sends_gpid_creds(std::ptr::addr_of!((*msgs.add(i)).msg_hdr)) });
    if !any {
        return real(msgs, n);
    }
    for i in 0..n as usize {
        // SAFETY: i < n.
        let e = unsafe { msgs.add(i) };
        // SAFETY: a valid entry; its msghdr (or a translated copy) is sent
        // alone and its length stored back in the caller's entry.
        let r = unsafe {
            with_kernel_creds(std::ptr::addr_of!((*e).msg_hdr), |m| {
                let mut one = libc::mmsghdr {
                    msg_hdr: *m,
                    msg_len: 0,
                };
                let r = real(&mut one, 1);
                if r == 1 {
                    (*e).msg_len = one.msg_len;
                }
                r
            })
        };
        match r {
            Ok(1) => {}
            Ok(r) if i == 0 => return r,
            Err(errno) if i == 0 => return fail(errno),
            _ => return i as c_int,
        }
    }
    n as c_int
}

/// Credentials in `msg`'s control data as received: their pids become
/// gpids.
///
/// # Safety
/// `msg` is null or valid, as the kernel just filled it.
#[inline]
unsafe fn received_msg(msg: *const msghdr) {
    // SAFETY: the function's contract.
    unsafe {
        if has_control(msg) {
            each_creds(msg, |c| received(c));
        }
    }
}

/// `recvmsg(fd, msg, flags)`: received credentials (`SO_PASSCRED`, or the
/// sender's `SCM_CREDENTIALS`) show gpids. `real` receives into `msg`.
///
/// # Safety
/// `msg` is null or valid per recvmsg(2).
#[inline]
pub unsafe fn recvmsg(msg: *mut msghdr, real: impl FnOnce() -> ssize_t) -> ssize_t {
    let r = real();
    if r >= 0 {
        // SAFETY: the function's contract; the kernel filled it.
        unsafe { received_msg(msg) };
    }
    r
}

/// `recvmmsg(fd, msgs, n, flags, timeout)`: as `recvmsg`, for each message
/// received.
///
/// # Safety
/// `msgs` is null or valid for `n` entries per recvmmsg(2).
pub unsafe fn recvmmsg(msgs: *mut libc::mmsghdr, real: impl FnOnce() -> c_int) -> c_int {
    let r = real();
    if r > 0 && !msgs.is_null() {
        for i in 0..r as usize {
            // SAFETY: the kernel filled the first r entries.
            unsafe { received_msg(std::ptr::addr_of!((*msgs.add(i)).msg_hdr)) };
        }
    }
    r
}

#[cfg(test)]
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
    fn creds_pid(m: &msghdr) -> Option<pid_t> {
        let mut pid = None;
        // SAFETY: m and its control buffer are ours.
        unsafe { each_creds(m, |c| pid = pid.or(Some((*c).pid))) };
        pid
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
        assert_eq!(creds_pid(&m), Some(g), "the caller's buffer is left alone");
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
        assert_eq!(creds_pid(&rm), Some(g));
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
                s[calls.get()] = creds_pid(&(*m).msg_hdr).unwrap();
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
