//! `execl`, `execle`, `execlp`: glibc's own call `execve` (or its
//! internal `execvpe`) inside libc, where no hook sees it: the program was
//! not placed before the exec, and the capture signal was not held across
//! it, so a stream hand-over arriving during the exec killed the new
//! image. Here they gather their argument list into an array and call the
//! hooks `execv`, `execve` and `execvp`, which decide everything (with
//! `KRG_DISABLE=1` those pass through: the same as glibc's).
//!
//! The list is variadic and of any length, which stable Rust cannot take
//! as a C-variadic function: a naked trampoline stores the argument
//! registers next to each other on the stack and calls [`gather`] with
//! where they are and where the caller's stack arguments start. Nothing
//! allocates through malloc (a vfork child may call these): a list longer
//! than [`ON_STACK`] gets an array of its own from mmap.

use libc::{c_char, c_int};

/// How many integer arguments travel in registers.
#[cfg(target_arch = "x86_64")]
const REGS: usize = 6;
#[cfg(target_arch = "aarch64")]
const REGS: usize = 8;

/// Arguments (with the final null) kept in an array on the stack; more
/// take an mmap'd one.
const ON_STACK: usize = 256;

/// Which exec the list is for (an integer: the trampolines pass it in a
/// register). `execl(path, arg0, ..., NULL)`: `execv`.
const L: usize = 0;
/// `execle(path, arg0, ..., NULL, envp)`: `execve`.
const LE: usize = 1;
/// `execlp(file, arg0, ..., NULL)`: `execvp`.
const LP: usize = 2;

/// The caller's arguments: the first [`REGS`] as the trampoline stored
/// them, the others where the caller put them on its stack.
struct Args {
    regs: *const usize,
    stack: *const usize,
}

impl Args {
    /// Argument `i` (0 is the path).
    ///
    /// # Safety
    /// The caller passed at least `i + 1` arguments (the exec contract: the
    /// list ends with a null pointer, and `execle` has one more after it).
    unsafe fn get(&self, i: usize) -> usize {
        // SAFETY: the trampoline stored REGS registers at `regs`; stack
        // arguments follow one another from `stack` (both ABIs give each an
        // 8-byte slot); the caller passed argument i.
        unsafe {
            if i < REGS {
                *self.regs.add(i)
            } else {
                *self.stack.add(i - REGS)
            }
        }
    }
}

/// Build the argument array and call the hook. Reached only from the
/// trampolines, with the layout [`Args`] describes.
extern "C" fn gather(regs: *const usize, stack: *const usize, which: usize) -> c_int {
    let a = Args { regs, stack };
    // SAFETY: the exec contract: argument 0 is the path, the list that
    // starts at argument 1 ends with a null pointer.
    let n = unsafe {
        let mut n = 0;
        while a.get(1 + n) != 0 {
            n += 1;
        }
        n
    };
    let len = n + 1;
    let mut small = [std::ptr::null::<c_char>(); ON_STACK];
    let (argv, mapped) = if len <= ON_STACK {
        (small.as_mut_ptr(), None)
    } else {
        let bytes = len * std::mem::size_of::<*const c_char>();
        // SAFETY: an anonymous private mapping, no address asked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            // The kernel would refuse such a list anyway.
            libkrg::rt::set_errno(libc::E2BIG);
            return -1;
        }
        (p.cast::<*const c_char>(), Some((p, bytes)))
    };
    // SAFETY: argv has room for len pointers; arguments 1..=len exist (the
    // last is the null one counted above); for execle the environment
    // follows the null.
    let r = unsafe {
        for i in 0..len {
            *argv.add(i) = a.get(1 + i) as *const c_char;
        }
        let path = a.get(0) as *const c_char;
        match which {
            LE => {
                let envp = a.get(1 + len) as *const *const c_char;
                crate::execve(path, argv.cast_const(), envp)
            }
            LP => crate::execvp(path, argv.cast_const()),
            _ => crate::execv(path, argv.cast_const()),
        }
    };
    // Only a failed exec comes back.
    if let Some((p, bytes)) = mapped {
        let e = libkrg::rt::errno();
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, bytes) };
        libkrg::rt::set_errno(e);
    }
    r
}

/// The code of a trampoline: store the argument registers, call
/// [`gather`] with where they are, where the stack arguments start and
/// which exec (`{which}`), return what it returns. One string, as
/// `naked_asm!` takes it.
#[cfg(target_arch = "x86_64")]
macro_rules! gather_asm {
    () => {
        concat!(
            // On entry rsp points to the return address and the
            // seventh argument is at rsp + 8. After six pushes the
            // registers lie in argument order from rsp, and the
            // stack arguments start at rsp + 56.
            "push r9\n",
            "push r8\n",
            "push rcx\n",
            "push rdx\n",
            "push rsi\n",
            "push rdi\n",
            "mov rdi, rsp\n",
            "lea rsi, [rsp + 56]\n",
            "mov edx, {which}\n",
            // rsp is 8 mod 16 (entry) + 48: re-align for the call.
            "sub rsp, 8\n",
            "call {gather}\n",
            "add rsp, 56\n",
            "ret",
        )
    };
}

#[cfg(target_arch = "aarch64")]
macro_rules! gather_asm {
    () => {
        concat!(
            // The ninth argument is at sp on entry. Save the frame
            // pointer and link register (16 bytes), then x0-x7 (64
            // bytes) in argument order: the stack arguments start at
            // sp + 80.
            "stp x29, x30, [sp, #-16]!\n",
            "mov x29, sp\n",
            "sub sp, sp, #64\n",
            "stp x0, x1, [sp]\n",
            "stp x2, x3, [sp, #16]\n",
            "stp x4, x5, [sp, #32]\n",
            "stp x6, x7, [sp, #48]\n",
            "mov x0, sp\n",
            "add x1, sp, #80\n",
            "mov x2, #{which}\n",
            "bl {gather}\n",
            "add sp, sp, #64\n",
            "ldp x29, x30, [sp], #16\n",
            "ret",
        )
    };
}

/// A trampoline: an exported naked function running `gather_asm!` for
/// `$which`.
macro_rules! trampoline {
    ($(#[$doc:meta])* $name:ident, $which:expr) => {
        $(#[$doc])*
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, arg: *const c_char) -> c_int {
            core::arch::naked_asm!(gather_asm!(), which = const $which, gather = sym gather)
        }
    };
}

trampoline!(
    /// `execl(path, arg0, ..., NULL)`: the `execv` hook.
    execl,
    L
);
trampoline!(
    /// `execle(path, arg0, ..., NULL, envp)`: the `execve` hook.
    execle,
    LE
);
trampoline!(
    /// `execlp(file, arg0, ..., NULL)`: the `execvp` hook.
    execlp,
    LP
);
