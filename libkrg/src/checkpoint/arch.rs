//! x86_64 specifics of checkpoint/restore: raw system calls (usable while
//! the address space is being rebuilt, when libc's data is not there), a
//! setjmp-like context for threads parked in the checkpoint handler, the
//! jump back into such a context, a stack switch, and a raw thread clone.
//!
//! Why a setjmp-like context and not the interrupted `ucontext`: every thread
//! is captured *inside* the checkpoint signal handler, so the kernel's signal
//! frame (interrupted registers, FPU state, signal mask, alternate stack) is
//! part of the saved stack. Restoring a thread is then only "return once more
//! from the context save": the handler finishes and the kernel's own
//! `rt_sigreturn` puts the interrupted state back exactly.

use core::arch::{asm, naked_asm};

/// Callee-saved state of a thread at [`ctx_save`], as the SysV ABI defines
/// it: what a function call preserves, plus the return point and the
/// control words of the FPU and SSE units.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Ctx {
    pub rbx: u64,
    pub rbp: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    /// Stack pointer after `ctx_save` returns.
    pub rsp: u64,
    /// Where `ctx_save` returns to.
    pub rip: u64,
    pub mxcsr: u32,
    pub fcw: u16,
    pub _pad: u16,
}

/// Save the calling thread's context; returns 0. Resuming the context with
/// [`ctx_resume`] returns from this call a second time, with 1.
///
/// # Safety
/// `ctx` must be valid for writes. The caller's frame must still be intact
/// (same memory contents) when the context is resumed: the caller must not
/// return before then, and must treat the second return as `setjmp` does.
#[unsafe(naked)]
pub unsafe extern "C" fn ctx_save(ctx: *mut Ctx) -> u64 {
    naked_asm!(
        "mov [rdi], rbx",
        "mov [rdi + 8], rbp",
        "mov [rdi + 16], r12",
        "mov [rdi + 24], r13",
        "mov [rdi + 32], r14",
        "mov [rdi + 40], r15",
        "lea rax, [rsp + 8]",
        "mov [rdi + 48], rax",
        "mov rax, [rsp]",
        "mov [rdi + 56], rax",
        "stmxcsr [rdi + 64]",
        "fnstcw [rdi + 68]",
        "xor eax, eax",
        "ret",
    )
}

/// Resume a context saved by [`ctx_save`] (which then returns 1).
///
/// # Safety
/// The context must have been saved in this address space and its stack
/// must hold the frame it was saved from.
#[unsafe(naked)]
pub unsafe extern "C" fn ctx_resume(ctx: *const Ctx) -> ! {
    naked_asm!(
        "ldmxcsr [rdi + 64]",
        "fldcw [rdi + 68]",
        "mov rbx, [rdi]",
        "mov rbp, [rdi + 8]",
        "mov r12, [rdi + 16]",
        "mov r13, [rdi + 24]",
        "mov r14, [rdi + 32]",
        "mov r15, [rdi + 40]",
        "mov rsp, [rdi + 48]",
        "mov eax, 1",
        "jmp qword ptr [rdi + 56]",
    )
}

/// Switch to the stack ending at `top` and call `f(arg)` there; `f` must
/// not return.
///
/// # Safety
/// `top` must be the 16-byte aligned end of a mapped, writable stack that
/// nothing else uses.
#[unsafe(naked)]
pub unsafe extern "C" fn switch_stack(top: usize, f: extern "C" fn(usize) -> !, arg: usize) -> ! {
    naked_asm!(
        "mov rsp, rdi",
        "xor ebp, ebp",
        "mov rdi, rdx",
        "call rsi",
        "ud2",
    )
}

/// `munmap(addr, len)` then end the calling thread (`exit`, not
/// `exit_group`), touching no memory in between: a thread can free the
/// mapping its own stack is in.
///
/// # Safety
/// Nothing else may use the mapping; the thread ends.
#[unsafe(naked)]
pub unsafe extern "C" fn unmap_and_exit(addr: usize, len: usize) -> ! {
    naked_asm!(
        "mov eax, 11", // munmap(rdi, rsi)
        "syscall",
        "xor edi, edi",
        "mov eax, 60", // exit(0)
        "syscall",
        "ud2",
    )
}

/// Raw `clone(2)` of a thread that starts with `entry(arg)` on the stack
/// ending at `top`. Returns the new thread's tid, or `-errno`.
///
/// # Safety
/// `top` must be the 16-byte aligned end of a mapped stack of its own;
/// `entry` must not return and must only make raw system calls until it
/// has set up its thread pointer.
pub unsafe fn clone_thread(
    flags: u64,
    top: usize,
    ptid: usize,
    ctid: usize,
    tls: usize,
    entry: extern "C" fn(usize) -> !,
    arg: usize,
) -> i64 {
    let sp = top - 16;
    // SAFETY: the caller guarantees [top-16, top) is writable stack.
    unsafe {
        *(sp as *mut usize) = entry as usize;
        *((sp + 8) as *mut usize) = arg;
        clone_raw(flags, sp, ptid, ctid, tls)
    }
}

#[unsafe(naked)]
unsafe extern "C" fn clone_raw(flags: u64, sp: usize, ptid: usize, ctid: usize, tls: usize) -> i64 {
    naked_asm!(
        "mov r10, rcx",
        "mov eax, 56",
        "syscall",
        "test rax, rax",
        "jnz 2f",
        // The new thread: its stack holds entry then arg.
        "xor ebp, ebp",
        "pop rax",
        "pop rdi",
        "and rsp, -16",
        "call rax",
        "ud2",
        "2:",
        "ret",
    )
}

/// A raw system call: no libc, no errno (the result is `-errno` on error).
///
/// # Safety
/// Whatever the system call `n` requires of its arguments.
#[inline(always)]
pub unsafe fn sys6(n: i64, a: usize, b: usize, c: usize, d: usize, e: usize, f: usize) -> i64 {
    let r: i64;
    // SAFETY: the caller vouches for the arguments; the kernel clobbers
    // rcx and r11 only.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n => r,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            in("r8") e,
            in("r9") f,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    r
}

/// [`sys6`] with fewer arguments.
///
/// # Safety
/// As for [`sys6`].
#[inline(always)]
pub unsafe fn sys(n: i64, a: usize, b: usize, c: usize, d: usize) -> i64 {
    // SAFETY: forwarded.
    unsafe { sys6(n, a, b, c, d, 0, 0) }
}

/// The thread pointer (FS base) of the calling thread.
pub fn fs_base() -> usize {
    let mut v: usize = 0;
    // SAFETY: ARCH_GET_FS writes the FS base into v.
    unsafe {
        sys(
            libc::SYS_arch_prctl,
            0x1003, // ARCH_GET_FS
            &mut v as *mut usize as usize,
            0,
            0,
        )
    };
    v
}

/// The signature glibc registers its rseq areas with on x86_64.
pub const RSEQ_SIG: u32 = 0x5305_3053;
