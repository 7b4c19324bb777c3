//! The global allocator of `libkrg.so`: malloc, except during a capture.
//!
//! A capture runs in a signal handler while every other thread of the
//! process is parked, possibly inside malloc with an arena lock held, so
//! the capturing thread must not call malloc. While a capture runs, Rust
//! allocations of libkrg come from a private bump arena (one anonymous
//! mapping, left out of the image); freeing into it is a no-op and it is
//! unmapped whole at the end. Outside captures the cost is one relaxed
//! atomic load per allocation.
//!
//! Nothing allocated during a capture may outlive it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Virtual size of the arena (reserved, touched on demand).
const ARENA_SIZE: usize = 1 << 30;

static ON: AtomicBool = AtomicBool::new(false);
static BASE: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);
static NEXT: AtomicUsize = AtomicUsize::new(0);
/// The arena of the capture an image was taken in: after a restore its
/// addresses are not mapped, but blocks from it may still be freed.
static DEAD_BASE: AtomicUsize = AtomicUsize::new(0);
static DEAD_END: AtomicUsize = AtomicUsize::new(0);

/// The allocator; `krg-preload` installs it as the global allocator.
pub struct KrgAlloc;

fn in_arena(p: *mut u8) -> bool {
    let a = p as usize;
    (a >= BASE.load(Ordering::Relaxed) && a < END.load(Ordering::Relaxed))
        || (a >= DEAD_BASE.load(Ordering::Relaxed) && a < DEAD_END.load(Ordering::Relaxed))
}

fn bump(layout: Layout) -> *mut u8 {
    let align = layout.align().max(16);
    loop {
        let cur = NEXT.load(Ordering::Relaxed);
        let start = (cur + align - 1) & !(align - 1);
        let end = start + layout.size();
        if end > END.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        if NEXT
            .compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            return start as *mut u8;
        }
    }
}

// SAFETY: alloc returns suitably aligned memory of the requested size from
// either malloc (System) or the arena; dealloc/realloc send each pointer
// back to where it came from (arena pointers are recognised by address).
unsafe impl GlobalAlloc for KrgAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            return bump(layout);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            // Fresh arena memory is zero (anonymous mapping, never reused).
            return bump(layout);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_arena(ptr) {
            return;
        }
        // SAFETY: ptr came from System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if in_arena(ptr) || ON.load(Ordering::Relaxed) {
            // SAFETY: the caller guarantees a valid layout for new_size.
            let nl = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            let n = bump(nl);
            if !n.is_null() {
                // SAFETY: both blocks hold at least min(old, new) bytes and
                // do not overlap (bump memory is always fresh).
                unsafe { std::ptr::copy_nonoverlapping(ptr, n, layout.size().min(new_size)) };
            }
            // A malloc'd block is leaked rather than freed: free could
            // need a lock that a parked thread holds.
            return n;
        }
        // SAFETY: ptr came from System with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Start serving allocations from a fresh arena. Returns its address range
/// (to leave out of the image), or `None` if it could not be mapped.
pub fn begin() -> Option<(usize, usize)> {
    // SAFETY: a new private anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ARENA_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let base = p as usize;
    BASE.store(base, Ordering::Relaxed);
    NEXT.store(base, Ordering::Relaxed);
    END.store(base + ARENA_SIZE, Ordering::Relaxed);
    ON.store(true, Ordering::SeqCst);
    Some((base, base + ARENA_SIZE))
}

/// The current arena's address range (0, 0 when none).
pub fn range() -> (u64, u64) {
    (
        BASE.load(Ordering::Relaxed) as u64,
        END.load(Ordering::Relaxed) as u64,
    )
}

/// Whether allocations currently come from the arena.
pub fn active() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Go back to malloc and unmap the arena.
pub fn end() {
    ON.store(false, Ordering::SeqCst);
    let base = BASE.swap(0, Ordering::SeqCst);
    let end = END.swap(0, Ordering::SeqCst);
    // A late free of a capture block (a local dropped after the end) must
    // stay a no-op that never reads the unmapped memory.
    DEAD_BASE.store(base, Ordering::SeqCst);
    DEAD_END.store(end, Ordering::SeqCst);
    if base != 0 {
        // SAFETY: unmaps the arena mapped by `begin`; nothing points into
        // it any more (documented contract of the arena).
        unsafe { libc::munmap(base as *mut libc::c_void, ARENA_SIZE) };
    }
}

/// After a restore the image's arena was not carried over: remember its
/// range (blocks from it may still be freed, never read) and start a new
/// arena.
pub fn restart_after_restore() -> Option<(usize, usize)> {
    ON.store(false, Ordering::SeqCst);
    DEAD_BASE.store(BASE.swap(0, Ordering::SeqCst), Ordering::SeqCst);
    DEAD_END.store(END.swap(0, Ordering::SeqCst), Ordering::SeqCst);
    begin()
}
