//! `vfork`, as a trampoline.
//!
//! A vfork child borrows its parent's stack until it execs or exits. If the
//! real vfork were called from a hook frame, the child would return through
//! that frame and then overwrite it with its own calls (to execve, say), and
//! the parent, resuming inside the same frame, would find its locals and its
//! return address clobbered. So `vfork` is a naked trampoline that leaves no
//! frame of its own: it asks [`target`] where to go (an ordinary call that
//! returns before anything is created) and *jumps* there with the caller's
//! return address still on top of the stack.
//!
//! * Pass-through (disabled, standalone, re-entered): the jump goes to the
//!   real vfork, which then returns straight to the application: exact vfork
//!   semantics.
//! * SSI process: the jump goes to [`vfork_as_fork`], a fork. The parent needs
//!   the child's gpid, which means running code after the child exists, and
//!   only a real fork gives the child its own stack to run the application
//!   on. POSIX allows vfork to be fork; the cost is the copy-on-write set-up
//!   of the parent's page tables.

use crate::hook;
use libc::pid_t;
use libkrg::rt::{self, Entry};
use std::ffi::c_void;
use std::sync::atomic::AtomicPtr;

static NEXT_VFORK: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

fn real_vfork() -> *mut c_void {
    hook::next(&NEXT_VFORK, c"vfork")
}

fn real_fork() -> *mut c_void {
    hook::next(&crate::next::fork, c"fork")
}

/// Resolve the real vfork (from the constructor).
pub fn resolve() {
    let _ = real_vfork();
}

/// Where `vfork` jumps.
extern "C" fn target() -> *const c_void {
    match rt::enter() {
        Entry::Krg => vfork_as_fork as *const c_void,
        Entry::PassThrough(_) => {
            let v = real_vfork();
            if !v.is_null() {
                return v;
            }
            let f = real_fork();
            if !f.is_null() {
                return f;
            }
            no_fork as *const c_void
        }
    }
}

/// The SSI vfork: a fork that returns the child's gpid.
extern "C" fn vfork_as_fork() -> pid_t {
    let p = real_fork();
    if p.is_null() {
        return no_fork();
    }
    // SAFETY: p is the address of libc's fork (dlsym RTLD_NEXT), of type
    // `pid_t fork(void)`.
    let fork = unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> pid_t>(p) };
    // SAFETY: fork has no preconditions.
    libkrg::processes::fork(|| unsafe { fork() })
}

extern "C" fn no_fork() -> pid_t {
    hook::enosys()
}

/// `vfork()`. See the module documentation.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn vfork() -> pid_t {
    core::arch::naked_asm!(
        // On entry rsp is 8 mod 16 (the return address); re-align for the
        // call, undo, and jump with the caller's return address on top.
        "sub rsp, 8",
        "call {target}",
        "add rsp, 8",
        "jmp rax",
        target = sym target,
    )
}

/// `vfork()`. See the module documentation.
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn vfork() -> pid_t {
    core::arch::naked_asm!(
        // Save and restore the link register around the call, then branch
        // (not call) so that the target returns to our caller.
        "stp x29, x30, [sp, #-16]!",
        "mov x29, sp",
        "bl {target}",
        "ldp x29, x30, [sp], #16",
        "br x0",
        target = sym target,
    )
}

/// `vfork()` as a plain fork where no trampoline is written (see above).
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[no_mangle]
pub unsafe extern "C" fn vfork() -> pid_t {
    let p = real_fork();
    if p.is_null() {
        return no_fork();
    }
    // SAFETY: p is libc's fork, of type `pid_t fork(void)`.
    let fork = unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> pid_t>(p) };
    match rt::enter() {
        // SAFETY: fork has no preconditions.
        Entry::Krg => libkrg::processes::fork(|| unsafe { fork() }),
        // SAFETY: as above.
        Entry::PassThrough(_) => unsafe { fork() },
    }
}
