//! The hook machinery: symbol resolution and the `hooks!` macro.
//!
//! Every hook is written as
//!
//! ```ignore
//! hooks! {
//!     /// doc
//!     fn kill(pid: pid_t, sig: c_int) -> c_int {
//!         missing => enosys(),
//!         krg(real) => processes::kill(pid, sig, real),
//!     }
//! }
//! ```
//!
//! A C-variadic function takes its variadic argument after `; ...`:
//!
//! ```ignore
//!     fn open(path: *const c_char, flags: c_int; ...mode: mode_t) -> c_int {
//! ```
//!
//! The exported hook then takes it as an ordinary last parameter (on x86_64
//! and aarch64 Linux a variadic integer argument travels in the same
//! register as a fixed one, so a hook reads what the caller passed, or
//! garbage that the real function ignores just as it would), and `real`
//! calls the real function through its variadic C type.
//!
//! A hook expands to an exported `unsafe extern "C" fn kill` that
//!
//! 1. takes the next definition of `kill` (resolved by the constructor with
//!    `dlsym(RTLD_NEXT)`, or now if a hook runs before our constructor); if
//!    there is none it returns the `missing` expression, never a guess;
//! 2. wraps it as `real`, a closure with the same parameters;
//! 3. asks [`libkrg::rt::enter`] what to do: `Entry::Krg` evaluates the
//!    `krg` expression (all logic lives in libkrg), `Entry::PassThrough(why)`
//!    calls `real` with the original arguments. Both arms are spelled out in
//!    the expansion: there is no silent fallback. `enter` initialises the
//!    library first if needed, so no hook decides before the mode is known.
//!
//! A hot function most of whose calls are none of krg's business (`fcntl`,
//! `ioctl`, `getsockopt`, `sendmsg`, `recvmsg`) names those it may act on
//! with `only_if => <test of its arguments>` before its `krg` arm: a call
//! that fails the test goes to `real` at once, before step 3. There is no
//! decision to make for it (every mode would call `real` with the same
//! arguments), so it costs the test and nothing else: no thread-local
//! read (a `__tls_get_addr` call in a shared library), no mode, no trace
//! line.
//!
//! Nothing here allocates; the profile aborts on panic and no code path here
//! can panic, so nothing unwinds into C.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicPtr, Ordering};

/// Marker stored for a symbol that no later object defines.
const MISSING: *mut c_void = usize::MAX as *mut c_void;

/// The next definition of `name` after libkrg.so, cached in `slot`; null if
/// there is none.
#[inline]
pub fn next(slot: &AtomicPtr<c_void>, name: &CStr) -> *mut c_void {
    let p = slot.load(Ordering::Acquire);
    if p == MISSING {
        return std::ptr::null_mut();
    }
    if !p.is_null() {
        return p;
    }
    resolve(slot, name)
}

#[cold]
#[inline(never)]
fn resolve(slot: &AtomicPtr<c_void>, name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with the RTLD_NEXT pseudo-handle and a NUL-terminated
    // name. It is called from code inside libkrg.so, so "next" means the
    // objects after us in the lookup order (libc). Two threads racing here
    // store the same value.
    let mut p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    // The condition variables applications link against are the
    // GLIBC_2.3.2 ones; a plain lookup may give the 2.2.5 compatibility
    // versions (another struct layout).
    if name.to_bytes().starts_with(b"pthread_cond_") {
        // SAFETY: dlvsym with RTLD_NEXT and NUL-terminated name and version.
        let v = unsafe { libc::dlvsym(libc::RTLD_NEXT, name.as_ptr(), c"GLIBC_2.3.2".as_ptr()) };
        if !v.is_null() {
            p = v;
        }
    }
    slot.store(if p.is_null() { MISSING } else { p }, Ordering::Release);
    p
}

/// `-1` with errno `ENOSYS`: the value of a hook whose real function does
/// not exist in this libc.
pub fn enosys<T: From<i8>>() -> T {
    libkrg::rt::set_errno(libc::ENOSYS);
    T::from(-1)
}

/// One trace line per hook call (`KRG_LOG=trace`).
#[cold]
pub fn trace(name: &str, entry: libkrg::rt::Entry, args: std::fmt::Arguments<'_>) {
    libkrg::log::log(
        libkrg::log::Level::Trace,
        format_args!("hook {name}{args}: {entry:?}"),
    );
}

/// Define hooks. See the module documentation.
macro_rules! hooks {
    // The C type of the real function: fixed parameters only, or fixed
    // parameters and a variadic tail.
    (@fnty ($($ty:ty),*) () $ret:ty) => {
        unsafe extern "C" fn($($ty),*) -> $ret
    };
    (@fnty ($($ty:ty),*) ($($vty:ty),+) $ret:ty) => {
        unsafe extern "C" fn($($ty,)* ...) -> $ret
    };
    // The body of a hook, inlined unless it has an `only_if` test.
    (@apart () $f:item) => {
        #[inline(always)]
        $f
    };
    (@apart ($only:expr) $f:item) => {
        #[inline(never)]
        $f
    };
    ($(
        $(#[doc = $doc:literal])*
        fn $name:ident($($arg:ident: $ty:ty),* $(; ...$($varg:ident: $vty:ty),+)? $(,)?) -> $ret:ty {
            missing => $missing:expr,
            $(only_if => $only:expr,)?
            krg($real:ident) => $body:expr $(,)?
        }
    )*) => {
        /// The next definition of every hooked function.
        #[allow(non_upper_case_globals)]
        pub(crate) mod next {
            use std::ffi::c_void;
            use std::sync::atomic::AtomicPtr;
            $(
                pub static $name: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
            )*
        }

        /// Resolve every hook's next definition (from the constructor, so
        /// that hooks never call dlsym later, e.g. in a forked child).
        pub(crate) fn resolve_all() {
            $(
                let _ = $crate::hook::next(
                    &next::$name,
                    // SAFETY: the literal ends with its only NUL byte.
                    unsafe { std::ffi::CStr::from_bytes_with_nul_unchecked(
                        concat!(stringify!($name), "\0").as_bytes()) },
                );
            )*
        }

        $(
            $(#[doc = $doc])*
            #[no_mangle]
            #[allow(non_snake_case, clippy::missing_safety_doc)]
            pub unsafe extern "C" fn $name($($arg: $ty,)* $($($varg: $vty),+)?) -> $ret {
                let p = $crate::hook::next(
                    &next::$name,
                    // SAFETY: the literal ends with its only NUL byte.
                    unsafe { std::ffi::CStr::from_bytes_with_nul_unchecked(
                        concat!(stringify!($name), "\0").as_bytes()) },
                );
                if p.is_null() {
                    return $missing;
                }
                type Real = $crate::hook::hooks!(@fnty ($($ty),*) ($($($vty),+)?) $ret);
                // SAFETY: p is the address dlsym(RTLD_NEXT) returned for this
                // very libc function, whose C type is this hook's signature.
                let f = unsafe { std::mem::transmute::<*mut std::ffi::c_void, Real>(p) };
                // `only_if`: a call krg has nothing to do with goes to libc
                // before `enter` (constant false without the clause).
                #[allow(clippy::nonminimal_bool)]
                let not_ours = false $(|| !($only))?;
                if not_ours {
                    // SAFETY: the C caller's own arguments, untouched.
                    return unsafe { f($($arg,)* $($($varg),+)?) };
                }
                // The rest of the hook: kept apart (not inlined) when
                // `only_if` may send calls to libc, so that those pay for
                // no stack frame of it.
                $crate::hook::hooks! { @apart ($($only)?)
                fn hooked(f: Real, $($arg: $ty,)* $($($varg: $vty),+)?) -> $ret {
                    #[allow(unused_variables)]
                    let $real = move |$($arg: $ty,)* $($($varg: $vty),+)?| -> $ret {
                        // SAFETY: the real function gets the arguments the C
                        // caller passed to this hook, or kernel pids and paths
                        // translated from them; their validity is the caller's
                        // contract, exactly as for a direct call to libc.
                        unsafe { f($($arg,)* $($($varg),+)?) }
                    };
                    let entry = libkrg::rt::enter();
                    if libkrg::log::enabled(libkrg::log::Level::Trace) {
                        $crate::hook::trace(stringify!($name), entry, format_args!(
                            concat!("(" $(, " ", stringify!($arg), "={", stringify!($arg), ":?}")* $($(, " ", stringify!($varg), "={", stringify!($varg), ":?}")+)?, " )") $(, $arg = $arg)* $($(, $varg = $varg)+)?
                        ));
                    }
                    match entry {
                        libkrg::rt::Entry::Krg => $body,
                        libkrg::rt::Entry::PassThrough(_why) => $real($($arg,)* $($($varg),+)?),
                    }
                }
                }
                hooked(f, $($arg,)* $($($varg),+)?)
            }
        )*
    };
}

pub(crate) use hooks;
