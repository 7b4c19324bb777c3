//! The global allocator of `libkrg.so`: malloc, except in the thread that
//! leads a capture.
//!
//! A capture runs in a signal handler that may have interrupted malloc in
//! the same thread (glibc takes no lock at all in a single-threaded
//! process), while every other thread is parked, possibly inside malloc
//! with an arena lock held. So the leader must not call malloc or free:
//! its Rust allocations come from a private bump arena, and a malloc'd
//! block it frees or grows is left alone (leaked). Every other thread
//! keeps malloc: a thread that did not park (signal 62 blocked), or one
//! released before the arena ends, must not get memory that the next
//! capture reuses.
//!
//! The arena is one anonymous mapping per process, reserved at the first
//! capture and never unmapped, so that a block from any capture is known
//! by its address alone: a late free is a no-op, and nothing malloc hands
//! out can lie there. (An arena unmapped at the end of each capture, with
//! only the last one remembered, let a block of an older one reach glibc's
//! free, and a big malloc'd block that landed where an arena had been was
//! taken for an arena block: its realloc failed, "memory allocation of N
//! bytes failed".) Its pages are given back at the end of each capture. A
//! restored process maps it again at the same address, before it
//! allocates anything.
//!
//! Outside captures, an allocation costs one relaxed atomic load more than
//! malloc, a free three.
//!
//! Nothing allocated during a capture may outlive it (debug builds make
//! the arena inaccessible between captures, so such a use faults at once).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Virtual size of the arena (reserved, touched on demand).
const ARENA_SIZE: usize = 1 << 30;

/// The arena's address, 0 until the first capture.
static BASE: AtomicUsize = AtomicUsize::new(0);
/// Its next free byte (only the leader bumps it).
static NEXT: AtomicUsize = AtomicUsize::new(0);
/// An arena a restored process could not map again at its address
/// (something else is there): its blocks are still recognised, so that a
/// late free of one never reaches malloc.
static RETIRED: AtomicUsize = AtomicUsize::new(0);
/// A thread leads a capture: the cheap test before the thread-local one.
static LEADING: AtomicBool = AtomicBool::new(false);
/// The kernel pid that mapped the arena (debug builds: an allocation in a
/// restored process before [`restart_after_restore`] is caught).
#[cfg(debug_assertions)]
static OWNER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

thread_local! {
    /// This thread leads the capture. Const-initialised without a
    /// destructor: no allocation or registration, readable in a handler.
    static MINE: Cell<bool> = const { Cell::new(false) };
}

/// The allocator; `krg-preload` installs it as the global allocator.
pub struct KrgAlloc;

#[inline]
fn mine() -> bool {
    LEADING.load(Ordering::Relaxed) && MINE.get()
}

#[inline]
fn within(a: usize, base: usize) -> bool {
    base != 0 && a.wrapping_sub(base) < ARENA_SIZE
}

#[inline]
fn in_arena(p: *mut u8) -> bool {
    let a = p as usize;
    within(a, BASE.load(Ordering::Relaxed)) || within(a, RETIRED.load(Ordering::Relaxed))
}

fn bump(layout: Layout) -> *mut u8 {
    #[cfg(debug_assertions)]
    if OWNER.load(Ordering::Relaxed) != super::getpid_raw() {
        crate::log::emit(format_args!(
            "krg: an allocation from the capture arena before it was mapped in this process (pid {}, mapped by {})",
            super::getpid_raw(),
            OWNER.load(Ordering::Relaxed)
        ));
        std::process::abort();
    }
    let base = BASE.load(Ordering::Relaxed);
    let align = layout.align().max(16);
    let cur = NEXT.load(Ordering::Relaxed);
    let start = (cur + align - 1) & !(align - 1);
    let end = start + layout.size();
    if end > base + ARENA_SIZE {
        return std::ptr::null_mut();
    }
    NEXT.store(end, Ordering::Relaxed);
    start as *mut u8
}

// SAFETY: alloc returns suitably aligned memory of the requested size from
// malloc (System) or the arena; dealloc and realloc never hand an arena
// block to malloc (recognised by address), and the leader never hands a
// block to free.
unsafe impl GlobalAlloc for KrgAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mine() {
            return bump(layout);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mine() {
            let p = bump(layout);
            if !p.is_null() {
                // Zero already unless a block was used after its capture.
                // SAFETY: a fresh block of layout.size() bytes.
                unsafe { p.write_bytes(0, layout.size()) };
            }
            return p;
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_arena(ptr) || mine() {
            return;
        }
        // SAFETY: ptr came from System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let leader = mine();
        if leader || in_arena(ptr) {
            // SAFETY: the caller guarantees a valid layout for new_size.
            let nl = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            // An arena block outside its capture (it outlived it) goes to
            // malloc: never a null for want of an arena.
            let n = if leader {
                bump(nl)
            } else {
                // SAFETY: forwarded with a valid layout.
                unsafe { System.alloc(nl) }
            };
            if !n.is_null() {
                // SAFETY: both blocks hold at least min(old, new) bytes and
                // do not overlap (the new one is fresh).
                unsafe { std::ptr::copy_nonoverlapping(ptr, n, layout.size().min(new_size)) };
            }
            // The old block: nothing to do for an arena block; a malloc'd
            // one is leaked rather than freed by the leader.
            return n;
        }
        // SAFETY: ptr came from System with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Map the arena, at `at` if given (and only there).
fn map(at: Option<usize>) -> Option<usize> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if at.is_some() {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    // SAFETY: a new private anonymous mapping; NOREPLACE never replaces
    // anything mapped there.
    let p = unsafe {
        libc::mmap(
            at.unwrap_or(0) as *mut libc::c_void,
            ARENA_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    if at.is_some_and(|a| a != p as usize) {
        // A kernel without MAP_FIXED_NOREPLACE took it as a hint.
        // SAFETY: the mapping just made, ours alone.
        unsafe { libc::munmap(p, ARENA_SIZE) };
        return None;
    }
    #[cfg(debug_assertions)]
    OWNER.store(super::getpid_raw(), Ordering::Relaxed);
    Some(p as usize)
}

/// Debug builds: the arena is inaccessible between captures.
fn protect(base: usize, prot: libc::c_int) {
    if cfg!(debug_assertions) {
        // SAFETY: changes the protection of our own arena mapping.
        unsafe { libc::mprotect(base as *mut libc::c_void, ARENA_SIZE, prot) };
    }
}

fn lead_from(base: usize) -> (usize, usize) {
    NEXT.store(base, Ordering::Relaxed);
    MINE.set(true);
    LEADING.store(true, Ordering::SeqCst);
    (base, base + ARENA_SIZE)
}

/// The calling thread leads a capture: its allocations come from the
/// arena until [`end`]. Returns the arena's address range (to leave out of
/// the image), or `None` if it could not be mapped.
pub fn begin() -> Option<(usize, usize)> {
    let mut base = BASE.load(Ordering::Acquire);
    if base == 0 {
        base = map(None)?;
        BASE.store(base, Ordering::Release);
    } else {
        protect(base, libc::PROT_READ | libc::PROT_WRITE);
    }
    Some(lead_from(base))
}

/// In a forked child: the arena's mapping was copied with the address
/// space, so it is this process's own (a subshell that leads a stream swap
/// aborted before: the arena taken for a restored process's stale one).
pub fn after_fork_child() {
    #[cfg(debug_assertions)]
    if BASE.load(Ordering::Relaxed) != 0 {
        OWNER.store(super::getpid_raw(), Ordering::Relaxed);
    }
}

/// The arena's address range (0, 0 when none).
pub fn range() -> (u64, u64) {
    let b = BASE.load(Ordering::Relaxed) as u64;
    (b, if b == 0 { 0 } else { b + ARENA_SIZE as u64 })
}

/// Back to malloc: the capture's blocks are dead, their pages given back
/// (they read zero again).
pub fn end() {
    MINE.set(false);
    LEADING.store(false, Ordering::SeqCst);
    let base = BASE.load(Ordering::Relaxed);
    if base == 0 {
        return;
    }
    let used = NEXT.swap(base, Ordering::Relaxed).saturating_sub(base);
    if used > 0 {
        let len = (used + 4095) & !4095;
        // SAFETY: drops the pages of our own arena; nothing in it is live.
        unsafe { libc::madvise(base as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    }
    protect(base, libc::PROT_NONE);
}

/// In the leader of a restored process, before it allocates anything: the
/// statics are the image's (this thread leading, the arena of the process
/// the image was taken from, left out of the image and so free here). Map
/// it again at that address, so that its blocks (still referenced by the
/// leader's frames) stay recognised; if something else is there, retire
/// that range and take a new one.
pub fn restart_after_restore() -> Option<(usize, usize)> {
    let old = BASE.load(Ordering::Acquire);
    if old != 0 && map(Some(old)).is_some() {
        return Some(lead_from(old));
    }
    RETIRED.store(old, Ordering::Release);
    BASE.store(0, Ordering::Release);
    begin()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test at a time: they share the process's arena.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lay(n: usize) -> Layout {
        Layout::from_size_align(n, 8).unwrap()
    }

    fn get(n: usize) -> *mut u8 {
        // SAFETY: a valid, non-zero layout.
        unsafe { KrgAlloc.alloc(lay(n)) }
    }

    fn get_zeroed(n: usize) -> *mut u8 {
        // SAFETY: a valid, non-zero layout.
        unsafe { KrgAlloc.alloc_zeroed(lay(n)) }
    }

    fn put(p: *mut u8, n: usize) {
        // SAFETY: the tests pass blocks of `n` bytes they got here (or
        // memory malloc never gave, which the allocator must not free).
        unsafe { KrgAlloc.dealloc(p, lay(n)) }
    }

    fn grow(p: *mut u8, n: usize, to: usize) -> *mut u8 {
        // SAFETY: as for `put`, with a valid new size.
        unsafe { KrgAlloc.realloc(p, lay(n), to) }
    }

    fn fill(p: *mut u8, v: u8, n: usize) {
        // SAFETY: the tests fill blocks of at least `n` bytes.
        unsafe { p.write_bytes(v, n) }
    }

    fn byte(p: *mut u8, i: usize) -> u8 {
        // SAFETY: the tests read within blocks they filled.
        unsafe { *p.add(i) }
    }

    fn probe(at: usize) -> *mut libc::c_void {
        // SAFETY: a one-page mapping only where nothing is (NOREPLACE).
        unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        }
    }

    fn unmap(p: *mut libc::c_void, len: usize) {
        // SAFETY: the tests unmap their own probes and arenas.
        unsafe { libc::munmap(p, len) };
    }

    /// The leader hands nothing to free or realloc: its handler may have
    /// interrupted malloc. A pointer malloc never gave shows it (free
    /// would abort: "free(): invalid pointer").
    #[test]
    fn the_leader_allocates_from_the_arena_and_frees_nothing() {
        let _s = serial();
        let (a, b) = begin().unwrap();
        let p = get(1000);
        assert!((a..b).contains(&(p as usize)));
        fill(p, 1, 1000);
        let z = get_zeroed(4096);
        assert!((0..4096).all(|i| byte(z, i) == 0));
        let g = grow(p, 1000, 5000);
        assert!(in_arena(g));
        assert_eq!(byte(g, 999), 1);
        let mut not_malloc = [2u8; 64];
        let x = not_malloc.as_mut_ptr();
        let y = grow(x, 64, 128);
        assert!(in_arena(y));
        assert_eq!(byte(y, 63), 2);
        put(x, 64);
        end();
        put(g, 5000);
    }

    /// An older arena's block freed after a second capture reached free()
    /// (the second arena elsewhere, only the last one remembered): SIGSEGV
    /// or "free(): invalid pointer" before.
    #[test]
    fn a_block_of_an_older_capture_freed_late_never_reaches_malloc() {
        let _s = serial();
        begin().unwrap();
        let p = get(64);
        end();
        // Something maps memory right after that block: the old arena's
        // room is no longer free, a new one would go elsewhere.
        let pr = probe(p as usize + (1 << 20));
        begin().unwrap();
        end();
        put(p, 64);
        if pr != libc::MAP_FAILED {
            unmap(pr, 4096);
        }
    }

    /// After a capture, a big malloc'd block could land where the arena
    /// had been and was then taken for an arena block: its realloc gave
    /// null ("memory allocation of N bytes failed").
    #[test]
    fn a_big_block_malloc_gives_after_a_capture_can_grow() {
        let _s = serial();
        begin().unwrap();
        end();
        for i in 0..16 {
            let p = get(64 << 20);
            assert!(!p.is_null());
            let q = grow(p, 64 << 20, 128 << 20);
            assert!(!q.is_null(), "realloc {i} of {p:?} gave null");
            put(q, 128 << 20);
        }
    }

    /// A block of the arena grown after its capture (it outlived it): the
    /// arena had no end any more, the realloc gave null.
    #[test]
    fn an_arena_block_grown_after_its_capture_goes_to_malloc() {
        let _s = serial();
        let (a, _) = begin().unwrap();
        let p = get(16);
        end();
        // Debug builds make the arena inaccessible between captures.
        protect(a, libc::PROT_READ);
        let q = grow(p, 16, 32);
        protect(a, libc::PROT_NONE);
        assert!(!q.is_null() && !in_arena(q));
        put(q, 32);
    }

    /// Another thread allocating while a capture runs (one that did not
    /// park, one released before the arena ends) got arena memory,
    /// unmapped or reused after the capture: SIGSEGV before.
    #[test]
    fn another_thread_keeps_malloc_during_a_capture() {
        let _s = serial();
        begin().unwrap();
        let p = std::thread::spawn(|| get(4096) as usize).join().unwrap() as *mut u8;
        let mine = get(64);
        end();
        assert!(in_arena(mine));
        assert!(!in_arena(p));
        fill(p, 7, 4096);
        put(p, 4096);
    }

    /// A restored process maps the arena again where the image's was, so
    /// the image's blocks stay the arena's.
    #[test]
    fn a_restored_process_maps_the_arena_at_the_same_address() {
        let _s = serial();
        let (a, _) = begin().unwrap();
        let p = get(64);
        // What a restore leaves: the statics of the capture, no mapping.
        unmap(a as *mut libc::c_void, ARENA_SIZE);
        let (b, _) = restart_after_restore().unwrap();
        assert_eq!(a, b);
        let q = get(64);
        assert!(in_arena(q));
        end();
        put(p, 64);
        put(q, 64);
    }

    /// If the image's arena cannot be mapped again where it was, its
    /// blocks are still not malloc's (before: only the last arena was
    /// remembered, and the image's block reached free(): SIGSEGV).
    #[test]
    fn a_restored_process_whose_arena_room_is_taken_still_knows_the_images_blocks() {
        let _s = serial();
        let (a, _) = begin().unwrap();
        let p = get(64);
        unmap(a as *mut libc::c_void, ARENA_SIZE);
        let pr = probe(a + (1 << 20));
        assert_ne!(pr, libc::MAP_FAILED);
        let (b, _) = restart_after_restore().unwrap();
        assert_ne!(a, b);
        end();
        begin().unwrap();
        end();
        put(p, 64);
        unmap(pr, 4096);
        // The other tests expect no retired range.
        RETIRED.store(0, Ordering::Relaxed);
    }
}
