//! Post-copy migration, target side: the process resumes before the pages
//! of its big private anonymous regions (the *lazy* regions, `Meta::lazy`)
//! have arrived. Those regions are mapped empty and registered with a
//! userfaultfd (missing mode). A hidden thread, created by the restorer
//! with a raw `clone` (no libc, no TLS, every signal blocked, its own
//! mapping for stack and buffers), then
//!
//! - reads the records the source keeps pushing on the migration stream
//!   and installs them with `UFFDIO_COPY` (zero records with
//!   `UFFDIO_ZEROPAGE`), skipping pages already handled;
//! - reads the fault events of the application's threads and sends the
//!   source the (source) address of each missing page, which the source
//!   sends ahead of its background push;
//! - follows the address space: `munmap` and `madvise(DONTNEED)` of a lazy
//!   range (`UFFD_EVENT_UNMAP` / `REMOVE`) mark its pages handled (a later
//!   fault there gets a zero page, as it would without krg), `mremap`
//!   (`UFFD_EVENT_REMAP`) moves the translation from source addresses to
//!   the pages' current place.
//!
//! After the end marker every page the source had is in: the thread closes
//! the userfaultfd (faults on pages the source never had then get zero
//! pages from the kernel, as they would have there), closes the stream,
//! unmaps its own mapping and exits; the kernel clears [`THREAD_TID`]
//! (`CLONE_CHILD_CLEARTID`), which [`wait_done`] waits for.
//!
//! If the stream breaks before the end the process cannot go on (pages are
//! missing and the source never resumes it): the thread kills it with
//! SIGKILL and says why on its stderr. The source, seeing the same break,
//! kills its frozen copy too, so the process never runs twice.

use super::arch;
use crate::error::Error;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

pub const PAGE: u64 = 4096;
/// Largest memory record of the post-copy phase.
pub const CHUNK: usize = 256 * 1024;
/// The source's unit: a fault asks for the aligned block around it.
pub const BLOCK: u64 = 64 * 1024;
/// Flag in a record's length: zero-fill, no bytes follow.
pub const ZERO: u64 = 1 << 63;
/// Most lazy regions in one migration.
pub const MAX_RANGES: usize = 256;
/// Most pieces the translation may be split into by `mremap`.
const MAX_SEGS: usize = 512;
/// A private anonymous region at least this long goes by post-copy
/// (smaller ones cost little to copy while frozen).
pub const LAZY_MIN: u64 = 256 * 1024;
const STACK: usize = 256 * 1024;
const MAX_FAULTS: usize = 1024;
/// Longest silence of the source before the process is given up (the
/// stream also has this receive timeout, for a record cut short).
pub const SILENCE_S: i64 = 60;

/// Kernel tid of the post-copy thread while it runs; the kernel clears it
/// (and wakes a futex waiter) when the thread exits.
pub(crate) static THREAD_TID: AtomicI32 = AtomicI32::new(0);

/// Wait until no post-copy thread runs in this process.
pub(crate) fn wait_done() {
    loop {
        let t = THREAD_TID.load(Ordering::Acquire);
        if t == 0 {
            return;
        }
        // Shared: the kernel's wake at thread exit is not private.
        crate::sys::futex::wait(&THREAD_TID, t as u32, Duration::from_millis(50), false);
    }
}

// <linux/userfaultfd.h>
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const FEATURE_EVENT_REMAP: u64 = 1 << 2;
const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const FEATURES: u64 = FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP;
const REGISTER_MODE_MISSING: u64 = 1;
const EV_PAGEFAULT: u8 = 0x12;
const EV_REMAP: u8 = 0x14;
const EV_REMOVE: u8 = 0x15;
const EV_UNMAP: u8 = 0x16;

/// A userfaultfd for this process from `/dev/userfaultfd` opened (by the
/// agent, as root) on `dev`, which is closed. Non-blocking, close-on-exec,
/// with the unmap, remove and remap events.
pub fn open_uffd(dev: i32) -> Result<i32, Error> {
    use crate::sys::uffd;
    use std::os::fd::{AsFd, IntoRawFd};
    let errno = |e: std::io::Error| crate::rt::Errno(e.raw_os_error().unwrap_or(0));
    // The device fd was handed to us for this call only.
    let dev = crate::sys::fd::adopt(dev);
    let u = uffd::new(dev.as_fd(), libc::O_CLOEXEC | libc::O_NONBLOCK);
    drop(dev);
    let u = u.map_err(|e| format!("USERFAULTFD_IOC_NEW: {}", errno(e)))?;
    // Closed on failure.
    let granted =
        uffd::api(u.as_fd(), FEATURES).map_err(|e| format!("UFFDIO_API: {}", errno(e)))?;
    if granted & FEATURES != FEATURES {
        return Err("the kernel lacks userfaultfd unmap/remove/remap events".into());
    }
    Ok(u.into_raw_fd())
}

/// One lazy region, by source address; `bit` is the index of its first
/// page in the bitmap of handled pages.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Lazy {
    src: u64,
    len: u64,
    bit: u64,
}

/// A piece of the translation: source pages `[src, src+len)` are at
/// `[dst, dst+len)` now.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Seg {
    src: u64,
    dst: u64,
    len: u64,
}

/// Everything the post-copy thread uses, at the start of its own mapping
/// (bitmap, record buffer and stack follow).
#[repr(C)]
pub struct Pc {
    uffd: i64,
    sock: i64,
    n_ranges: usize,
    ranges: [Lazy; MAX_RANGES],
    n_segs: usize,
    segs: [Seg; MAX_SEGS],
    scratch: [Seg; MAX_SEGS],
    n_faults: usize,
    faults: [u64; MAX_FAULTS],
    bitmap: usize,
    buf: usize,
    area: usize,
    area_len: usize,
    last_seg: usize,
}

/// Bytes of the thread's mapping for `ranges` (source start, end).
pub fn area_len(ranges: &[(u64, u64)]) -> usize {
    let pages: u64 = ranges.iter().map(|(a, b)| (b - a) / PAGE).sum();
    let bitmap = (pages.div_ceil(8) as usize + 63) & !63;
    (std::mem::size_of::<Pc>().next_multiple_of(64) + bitmap + CHUNK + STACK).next_multiple_of(4096)
}

/// Lay out the thread's data in `area` (mapped read-write, zeroed, of
/// [`area_len`] bytes). Returns the thread's argument and stack top.
///
/// # Safety
/// `area` must be such a mapping, used by nothing else.
pub unsafe fn lay_out(area: usize, ranges: &[(u64, u64)], uffd: i32, sock: i32) -> (usize, usize) {
    let len = area_len(ranges);
    let pc_len = std::mem::size_of::<Pc>().next_multiple_of(64);
    let pages: u64 = ranges.iter().map(|(a, b)| (b - a) / PAGE).sum();
    let bitmap = area + pc_len;
    let buf = bitmap + ((pages.div_ceil(8) as usize + 63) & !63);
    // SAFETY: the caller gives us the zeroed area; Pc is plain data, for
    // which all-zero is valid, at its (page-aligned) start.
    let pc = unsafe { &mut *(area as *mut Pc) };
    pc.uffd = i64::from(uffd);
    pc.sock = i64::from(sock);
    let mut bit = 0u64;
    for (i, (a, b)) in ranges.iter().take(MAX_RANGES).enumerate() {
        pc.ranges[i] = Lazy {
            src: *a,
            len: b - a,
            bit,
        };
        pc.segs[i] = Seg {
            src: *a,
            dst: *a,
            len: b - a,
        };
        bit += (b - a) / PAGE;
    }
    pc.n_ranges = ranges.len().min(MAX_RANGES);
    pc.n_segs = pc.n_ranges;
    pc.bitmap = bitmap;
    pc.buf = buf;
    pc.area = area;
    pc.area_len = len;
    (area, (area + len) & !15)
}

/// `UFFDIO_REGISTER` (missing mode) of `[start, start+len)`, raw.
///
/// # Safety
/// Raw system call; `uffd` is a userfaultfd.
pub unsafe fn register(uffd: usize, start: u64, len: u64) -> i64 {
    let reg = [start, len, REGISTER_MODE_MISSING, 0u64];
    // SAFETY: UFFDIO_REGISTER reads and writes a struct uffdio_register.
    unsafe {
        arch::sys(
            libc::SYS_ioctl,
            uffd,
            UFFDIO_REGISTER as usize,
            reg.as_ptr() as usize,
            0,
        )
    }
}

// ---------------------------------------------------------------------------
// The thread: raw system calls only, no libc state, no TLS, no allocation.

type Res<T> = Result<T, &'static [u8]>;

fn lost(msg: &[u8]) -> ! {
    let pre = b"krg: post-copy migration broke, the process cannot go on: ";
    // SAFETY: writes static bytes to stderr, then kills this process.
    unsafe {
        arch::sys(libc::SYS_write, 2, pre.as_ptr() as usize, pre.len(), 0);
        arch::sys(libc::SYS_write, 2, msg.as_ptr() as usize, msg.len(), 0);
        arch::sys(libc::SYS_write, 2, b"\n".as_ptr() as usize, 1, 0);
        let pid = arch::sys(libc::SYS_getpid, 0, 0, 0, 0);
        arch::sys(libc::SYS_kill, pid as usize, libc::SIGKILL as usize, 0, 0);
        arch::sys(libc::SYS_exit_group, 137, 0, 0, 0);
    }
    #[allow(clippy::empty_loop)]
    loop {}
}

/// Entry of the post-copy thread (`arg`: its [`Pc`]).
pub extern "C" fn thread_main(arg: usize) -> ! {
    // SAFETY: `arg` is the Pc laid out by `lay_out` in the thread's own
    // mapping; nothing else touches it.
    let pc = unsafe { &mut *(arg as *mut Pc) };
    // Named, so that the agent can tell that pages are still coming (a
    // process may have other userfaultfds, krg's DSM ones for instance).
    let mut name = [0u8; 16];
    let n = super::POSTCOPY_THREAD_NAME.len().min(15);
    name[..n].copy_from_slice(&super::POSTCOPY_THREAD_NAME.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated name of at most 16 bytes
    // from our stack; it names the calling thread only.
    unsafe {
        arch::sys(
            libc::SYS_prctl,
            libc::PR_SET_NAME as usize,
            name.as_ptr() as usize,
            0,
            0,
        )
    };
    match run(pc) {
        Ok(()) => {
            // SAFETY: our fds; then the mapping we run on goes and the
            // thread ends without touching it again.
            unsafe {
                arch::sys(libc::SYS_close, pc.uffd as usize, 0, 0, 0);
                arch::sys(libc::SYS_close, pc.sock as usize, 0, 0, 0);
                arch::unmap_and_exit(pc.area, pc.area_len)
            }
        }
        Err(msg) => lost(msg),
    }
}

/// Seconds of `CLOCK_MONOTONIC`.
fn now_s() -> i64 {
    let mut ts = [0i64; 2];
    // SAFETY: clock_gettime writes a struct timespec (two i64) into ours.
    unsafe {
        arch::sys(
            libc::SYS_clock_gettime,
            libc::CLOCK_MONOTONIC as usize,
            ts.as_mut_ptr() as usize,
            0,
            0,
        )
    };
    ts[0]
}

fn run(pc: &mut Pc) -> Res<()> {
    // The source pushes without pause until its end marker: a stream
    // silent this long means it is gone even if no FIN or RST ever
    // arrives (a host that lost power), and waiting longer only keeps
    // the process's faulting threads blocked.
    let mut heard = now_s();
    loop {
        if now_s() - heard > SILENCE_S {
            return Err(b"the source sent nothing for 60 s");
        }
        let mut fds = [
            libc::pollfd {
                fd: pc.uffd as i32,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pc.sock as i32,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds on our stack.
        let r = unsafe { arch::sys(libc::SYS_poll, fds.as_mut_ptr() as usize, 2, 1000, 0) };
        if r == -(libc::EINTR as i64) {
            continue;
        }
        if r < 0 {
            return Err(b"poll failed");
        }
        if fds[0].revents != 0 {
            pump(pc)?;
            serve_faults(pc)?;
        }
        if fds[1].revents != 0 {
            heard = now_s();
            if record(pc)? {
                return Ok(());
            }
        }
        if pc.n_faults > 0 {
            // Queued while an event was taken in the middle of a copy.
            serve_faults(pc)?;
        }
    }
}

fn read_exact(fd: i64, addr: usize, len: usize) -> Res<()> {
    let mut got = 0usize;
    while got < len {
        // SAFETY: [addr, addr+len) is our own buffer.
        let n = unsafe { arch::sys(libc::SYS_read, fd as usize, addr + got, len - got, 0) };
        if n == -(libc::EINTR as i64) {
            continue;
        }
        if n == 0 {
            return Err(b"the source closed the migration stream before the last page");
        }
        if n == -(libc::EAGAIN as i64) {
            return Err(b"the source sent nothing for 60 s");
        }
        if n < 0 {
            return Err(b"reading the migration stream failed");
        }
        got += n as usize;
    }
    Ok(())
}

/// One record from the stream; true at the end.
fn record(pc: &mut Pc) -> Res<bool> {
    let mut head = [0u64; 2];
    read_exact(pc.sock, head.as_mut_ptr() as usize, 16)?;
    let (addr, len) = (u64::from_le(head[0]), u64::from_le(head[1]));
    if addr == 0 && len == 0 {
        let mut end = [0u8; 8];
        read_exact(pc.sock, end.as_mut_ptr() as usize, 8)?;
        if &end != super::image::END_MAGIC {
            return Err(b"the post-copy stream has no end marker");
        }
        return Ok(true);
    }
    let zero = len & ZERO != 0;
    let len = len & !ZERO;
    if !addr.is_multiple_of(PAGE)
        || !len.is_multiple_of(PAGE)
        || len == 0
        || (!zero && len > CHUNK as u64)
    {
        return Err(b"a bad record in the post-copy stream");
    }
    if bit_of(pc, addr).is_none() || bit_of(pc, addr + len - PAGE).is_none() {
        return Err(b"a post-copy record outside the lazy regions");
    }
    if !zero {
        read_exact(pc.sock, pc.buf, len as usize)?;
    }
    install(pc, addr, len, zero)?;
    Ok(false)
}

fn bit_of(pc: &Pc, src: u64) -> Option<u64> {
    pc.ranges[..pc.n_ranges]
        .iter()
        .find(|r| r.src <= src && src < r.src + r.len)
        .map(|r| r.bit + (src - r.src) / PAGE)
}

fn done(pc: &Pc, src: u64) -> bool {
    match bit_of(pc, src) {
        // SAFETY: the bitmap has a bit for every page of every range.
        Some(b) => unsafe { *((pc.bitmap + (b / 8) as usize) as *const u8) & (1 << (b % 8)) != 0 },
        None => true,
    }
}

fn mark(pc: &Pc, src: u64, len: u64) {
    let mut p = src;
    while p < src + len {
        if let Some(b) = bit_of(pc, p) {
            // SAFETY: as in `done`.
            unsafe { *((pc.bitmap + (b / 8) as usize) as *mut u8) |= 1 << (b % 8) };
        }
        p += PAGE;
    }
}

/// Where source page `src` is now (0: nowhere, it was unmapped).
fn to_dst(pc: &mut Pc, src: u64) -> u64 {
    let hit = |s: &Seg| s.src <= src && src < s.src + s.len;
    if pc.last_seg < pc.n_segs && hit(&pc.segs[pc.last_seg]) {
        let s = pc.segs[pc.last_seg];
        return s.dst + (src - s.src);
    }
    for i in 0..pc.n_segs {
        let s = pc.segs[i];
        if hit(&s) {
            pc.last_seg = i;
            return s.dst + (src - s.src);
        }
    }
    0
}

/// Which source page is at `dst` now, if any.
fn to_src(pc: &Pc, dst: u64) -> Option<u64> {
    pc.segs[..pc.n_segs]
        .iter()
        .find(|s| s.dst <= dst && dst < s.dst + s.len)
        .map(|s| s.src + (dst - s.dst))
}

/// `[a, b)` left its place: unmapped (`to` None) or moved to `to`.
fn cut(pc: &mut Pc, a: u64, b: u64, to: Option<u64>) -> Res<()> {
    let mut n = 0usize;
    let mut push = |pc: &mut Pc, s: Seg| -> Res<()> {
        if n >= MAX_SEGS {
            return Err(b"the process remapped its memory in too many pieces during post-copy");
        }
        pc.scratch[n] = s;
        n += 1;
        Ok(())
    };
    for i in 0..pc.n_segs {
        let s = pc.segs[i];
        let (s0, s1) = (s.dst, s.dst + s.len);
        if s1 <= a || s0 >= b {
            push(pc, s)?;
            continue;
        }
        let (lo, hi) = (s0.max(a), s1.min(b));
        if lo > s0 {
            push(
                pc,
                Seg {
                    src: s.src,
                    dst: s0,
                    len: lo - s0,
                },
            )?;
        }
        if let Some(to) = to {
            push(
                pc,
                Seg {
                    src: s.src + (lo - s0),
                    dst: to + (lo - a),
                    len: hi - lo,
                },
            )?;
        } else {
            mark(pc, s.src + (lo - s0), hi - lo);
        }
        if hi < s1 {
            push(
                pc,
                Seg {
                    src: s.src + (hi - s0),
                    dst: hi,
                    len: s1 - hi,
                },
            )?;
        }
    }
    pc.segs[..n].copy_from_slice(&pc.scratch[..n]);
    pc.n_segs = n;
    pc.last_seg = 0;
    Ok(())
}

/// Pages `[a, b)` (current addresses) were dropped: handled (zero if
/// touched again).
fn removed(pc: &mut Pc, a: u64, b: u64) {
    for i in 0..pc.n_segs {
        let s = pc.segs[i];
        let (lo, hi) = (s.dst.max(a), (s.dst + s.len).min(b));
        if lo < hi {
            mark(pc, s.src + (lo - s.dst), hi - lo);
        }
    }
}

/// Read every pending userfaultfd message: events are handled at once,
/// faults queued.
fn pump(pc: &mut Pc) -> Res<()> {
    let mut msgs = [[0u64; 4]; 16];
    loop {
        if pc.n_faults + msgs.len() > MAX_FAULTS {
            return Ok(());
        }
        // SAFETY: reads whole uffd_msg structs (32 bytes) into our buffer.
        let n = unsafe {
            arch::sys(
                libc::SYS_read,
                pc.uffd as usize,
                msgs.as_mut_ptr() as usize,
                std::mem::size_of_val(&msgs),
                0,
            )
        };
        if n == -(libc::EAGAIN as i64) {
            return Ok(());
        }
        if n == -(libc::EINTR as i64) {
            continue;
        }
        if n < 0 {
            return Err(b"reading the userfaultfd failed");
        }
        for m in &msgs[..n as usize / 32] {
            let event = (m[0] & 0xff) as u8;
            match event {
                EV_PAGEFAULT => {
                    pc.faults[pc.n_faults] = m[2] & !(PAGE - 1);
                    pc.n_faults += 1;
                }
                EV_REMAP => {
                    let (from, to, len) = (m[1], m[2], m[3]);
                    cut(pc, from, from + len, Some(to))?;
                }
                EV_REMOVE => removed(pc, m[1], m[2]),
                EV_UNMAP => cut(pc, m[1], m[2], None)?,
                _ => {}
            }
        }
    }
}

fn ioctl(pc: &Pc, req: u64, arg: usize) -> i64 {
    // SAFETY: `arg` points at the struct `req` expects, on our stack.
    unsafe { arch::sys(libc::SYS_ioctl, pc.uffd as usize, req as usize, arg, 0) }
}

fn yield_now() {
    // SAFETY: no arguments.
    unsafe { arch::sys(libc::SYS_sched_yield, 0, 0, 0, 0) };
}

/// Zero-fill the page at `dst` (source page `src`, if any) and wake who
/// waits on it.
fn zero_page(pc: &mut Pc, dst: u64, src: Option<u64>) -> Res<()> {
    loop {
        let mut z = [dst, PAGE, 0u64, 0u64];
        let r = ioctl(pc, UFFDIO_ZEROPAGE, z.as_mut_ptr() as usize);
        if r == -(libc::EAGAIN as i64) {
            // The address space is changing: read its event first.
            pump(pc)?;
            yield_now();
            continue;
        }
        if r == -(libc::EEXIST as i64) {
            let w = [dst, PAGE];
            ioctl(pc, UFFDIO_WAKE, w.as_ptr() as usize);
        }
        if let Some(s) = src {
            mark(pc, s, PAGE);
        }
        return Ok(());
    }
}

/// Answer the queued faults: a page still to come is asked of the source
/// (first), a page already handled (dropped since) or outside what the
/// source has gets a zero page.
fn serve_faults(pc: &mut Pc) -> Res<()> {
    let mut asks = [0u64; 64];
    let mut n_asks = 0usize;
    let mut i = 0usize;
    while i < pc.n_faults {
        let dst = pc.faults[i];
        i += 1;
        match to_src(pc, dst) {
            Some(src) if !done(pc, src) => {
                if !asks[..n_asks].contains(&src.to_le()) {
                    if n_asks == asks.len() {
                        ask(pc, &asks[..n_asks]);
                        n_asks = 0;
                    }
                    asks[n_asks] = src.to_le();
                    n_asks += 1;
                }
            }
            src => zero_page(pc, dst, src)?,
        }
    }
    pc.n_faults = 0;
    ask(pc, &asks[..n_asks]);
    Ok(())
}

/// Ask the source for pages. Never blocks: a request that does not fit
/// is dropped, the page comes with the background push anyway.
fn ask(pc: &Pc, pages: &[u64]) {
    if pages.is_empty() {
        return;
    }
    // SAFETY: sends our own buffer.
    unsafe {
        arch::sys6(
            libc::SYS_sendto,
            pc.sock as usize,
            pages.as_ptr() as usize,
            pages.len() * 8,
            (libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as usize,
            0,
            0,
        )
    };
}

/// Install the record at source `[src, src+len)` (bytes in the buffer, or
/// zeros) into the pages not handled yet, wherever they are now.
fn install(pc: &mut Pc, src: u64, len: u64, zero: bool) -> Res<()> {
    let end = src + len;
    let mut p = src;
    while p < end {
        if done(pc, p) {
            p += PAGE;
            continue;
        }
        let dst = to_dst(pc, p);
        if dst == 0 {
            mark(pc, p, PAGE);
            p += PAGE;
            continue;
        }
        // The stretch of pages still to do that stay contiguous.
        let mut q = p + PAGE;
        while q < end && !done(pc, q) && to_dst(pc, q) == dst + (q - p) {
            q += PAGE;
        }
        let n = q - p;
        let (r, copied) = if zero {
            let mut z = [dst, n, 0u64, 0u64];
            let r = ioctl(pc, UFFDIO_ZEROPAGE, z.as_mut_ptr() as usize);
            (r, z[3] as i64)
        } else {
            let from = pc.buf as u64 + (p - src);
            let mut c = [dst, from, n, 0u64, 0u64];
            let r = ioctl(pc, UFFDIO_COPY, c.as_mut_ptr() as usize);
            (r, c[4] as i64)
        };
        if r == 0 {
            mark(pc, p, n);
            p = q;
            continue;
        }
        // Partly done: those pages are in.
        let ok = if copied > 0 {
            copied as u64 & !(PAGE - 1)
        } else {
            0
        };
        mark(pc, p, ok);
        p += ok;
        if r == -(libc::EAGAIN as i64) {
            // The address space is changing (munmap, mremap, madvise):
            // take its event, then go on with the new layout.
            pump(pc)?;
            yield_now();
            continue;
        }
        // EEXIST: that page is there already; ENOENT/EFAULT: its mapping
        // went away. Either way it is handled.
        mark(pc, p, PAGE);
        p += PAGE;
    }
    Ok(())
}
