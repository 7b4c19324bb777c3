//! Restore, in libkrg's constructor of a fresh instance of the image's
//! executable (started with `KRG_RESTORE=<image>` by an agent).
//!
//! [`run`] first does everything that can still fail cleanly, in ordinary
//! Rust: read and validate the metadata, check that the layout matches
//! (libkrg and the vDSO where the image expects them), reopen the fds, the
//! cwd, umask and rlimits, open the files to map. It lays out a *plan* in a
//! private area (free in both address spaces) and switches to a stack in
//! that area. [`restore_core`] then works with raw system calls only and
//! touches nothing but the plan: unmap what the image does not have, map
//! the image's regions, read the saved pages straight from the image into
//! place, put protections and signal actions back, clone the threads and
//! resume each in its saved context. A failure there can only end the
//! process (exit status 127, message on stderr).

use super::arch::{self, Ctx};
use super::capture::{self, MapLine};
use super::fds::{fstat, high, open_path};
use super::image::{self, Meta, RegionKind};
use super::postcopy;
use super::{ThreadRaw, ANCHOR, RESTORE_AREA, RESUMED};
use crate::error::{Error, ResultExt};
use crate::sys::sock;
use std::ffi::OsStr;
use std::os::fd::{IntoRawFd, RawFd};

/// `KRG_RESTORE=<path of the image>`: restore instead of running main.
pub const RESTORE_ENV: &str = "KRG_RESTORE";
/// `KRG_UFFD=<fd>`: an fd of `/dev/userfaultfd` the agent opened for a
/// migration's restorer (post-copy).
pub const UFFD_ENV: &str = "KRG_UFFD";

const CORE_STACK: usize = 256 * 1024;
const THREAD_STACK: usize = 64 * 1024;

/// One region to put in place.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MapOp {
    start: u64,
    len: u64,
    prot: u32,
    /// mmap flags (0: the mapping already there is kept).
    flags: u32,
    fd: i32,
    /// 1 once writable for the page copy.
    writable: u32,
    offset: u64,
    /// 1: a shared file mapping (mapped with its final protection, never
    /// written by the restore).
    shared_file: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct KSig {
    sig: u64,
    handler: u64,
    flags: u64,
    restorer: u64,
    mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Timer {
    which: u64,
    v: [i64; 4],
}

/// `struct prctl_mm_map` (linux/prctl.h), for `PR_SET_MM_MAP`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MmMap {
    start_code: u64,
    end_code: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    brk: u64,
    start_stack: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
    auxv: u64,
    auxv_size: u32,
    exe_fd: u32,
}

const PR_SET_MM: usize = 35;
const PR_SET_MM_MAP: usize = 14;

/// The plan, at the start of the area; arrays follow it.
#[repr(C)]
struct Plan {
    image_fd: i64,
    brk: u64,
    /// The image's memory layout for the kernel (`start_code` 0: none).
    mm: MmMap,
    unmap: *const Range,
    n_unmap: usize,
    ops: *mut MapOp,
    n_ops: usize,
    threads: *const ThreadRaw,
    n_threads: usize,
    sigs: *const KSig,
    n_sigs: usize,
    timers: *const Timer,
    n_timers: usize,
    close: *const i32,
    n_close: usize,
    /// A migration without post-copy: the stream to tell the source that
    /// the process runs here (-1: a file image, or post-copy, whose
    /// thread tells it).
    tell: i64,
    /// Post-copy: the userfaultfd (-1: none), the lazy regions to register
    /// with it, the post-copy thread's argument and stack.
    uffd: i64,
    lazy: *const Range,
    n_lazy: usize,
    pc: usize,
    pc_stack: usize,
    stacks: usize,
    cur_rseq: u64,
    cur_rseq_len: u64,
    area: usize,
    area_len: usize,
}

/// What a restorer that gives up writes back on a migration stream,
/// before its reason.
pub const REFUSAL: &str = "KRGERR ";

/// The migration stream's fd while `prepare` runs (-1: a file image).
static STREAM_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Restore the image at `path` into this process. Never returns: the
/// process continues as the image, or exits with status 127.
pub fn run(path: &OsStr) -> ! {
    match prepare(path) {
        Ok((plan, top)) => {
            // SAFETY: `top` ends the restorer's own stack in the area, and
            // restore_core never returns.
            unsafe { arch::switch_stack(top, restore_core, plan) }
        }
        Err(e) => {
            crate::log::emit(format_args!(
                "krg: cannot restore {}: {e}",
                std::path::Path::new(path).display()
            ));
            let fd = STREAM_FD.load(std::sync::atomic::Ordering::Relaxed);
            if fd >= 0 {
                let msg = format!("{REFUSAL}{e}");
                // SAFETY: writes our message to the migration stream (the
                // source reads it to say why the migration failed).
                unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
            }
            // SAFETY: ends this process.
            unsafe { libc::_exit(127) }
        }
    }
}

fn set_process_state(meta: &Meta) -> Result<(), Error> {
    let cwd = std::ffi::CString::new(meta.cwd.clone()).map_err(|_| "cwd with a NUL byte")?;
    // SAFETY: valid C string.
    if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
        return Err(Error::last_os(format!(
            "working directory {}",
            String::from_utf8_lossy(&meta.cwd)
        )));
    }
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(meta.umask as libc::mode_t) };
    for (r, cur, max) in &meta.rlimits {
        let l = libc::rlimit {
            rlim_cur: *cur,
            rlim_max: *max,
        };
        // SAFETY: plain struct; failure (raising a hard limit without
        // privilege) leaves the limit as it is.
        unsafe { libc::setrlimit(*r, &l) };
    }
    Ok(())
}

/// Bump layout of the area.
struct Layout {
    size: usize,
}

impl Layout {
    fn take(&mut self, bytes: usize) -> usize {
        let off = (self.size + 63) & !63;
        self.size = off + bytes;
        off
    }
}

fn overlaps(a: u64, b: u64, c: u64, d: u64) -> bool {
    a < d && c < b
}

/// Map `len` bytes read-write where neither this process nor the image
/// has anything.
fn map_free(len: usize, maps: &[MapLine], meta: &Meta) -> Option<usize> {
    let mut cand: u64 = 0x2000_0000_0000;
    while cand < 0x7f00_0000_0000 {
        let end = cand + len as u64;
        let clash = maps.iter().any(|m| overlaps(cand, end, m.start, m.end))
            || meta
                .regions
                .iter()
                .any(|r| overlaps(cand, end, r.start, r.end));
        if !clash {
            // SAFETY: maps fresh memory at an address we checked is free
            // (NOREPLACE: fails if something is there after all).
            let p = unsafe {
                libc::mmap(
                    cand as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p as usize == cand as usize {
                return Some(cand as usize);
            }
        }
        cand += 0x100_0000_0000;
    }
    None
}

/// For a post-copy migration: the userfaultfd made from the device fd the
/// agent passed (`KRG_UFFD`), or why there is none (the source then sends
/// everything before the process resumes). The device fd is closed either
/// way.
fn lazy_uffd(meta: &Meta) -> Result<RawFd, Error> {
    let dev = std::env::var(UFFD_ENV)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
        .filter(|fd| fstat(*fd).is_some());
    let Some(dev) = dev else {
        return Err("no /dev/userfaultfd from the agent".into());
    };
    if meta.lazy.is_empty() {
        // SAFETY: the device fd was handed to us; not needed.
        unsafe { libc::close(dev) };
        return Err("no lazy region".into());
    }
    if meta.lazy.len() > super::postcopy::MAX_RANGES {
        // SAFETY: as above.
        unsafe { libc::close(dev) };
        return Err("too many lazy regions".into());
    }
    for (a, b) in &meta.lazy {
        let ok = meta
            .regions
            .iter()
            .any(|r| r.start == *a && r.end == *b && r.kind == RegionKind::Anon);
        if !ok {
            // SAFETY: as above.
            unsafe { libc::close(dev) };
            return Err(Error::other(format!(
                "lazy range {a:#x}-{b:#x} is not a private anonymous region of the image"
            )));
        }
    }
    super::postcopy::open_uffd(dev)
}

fn prepare(path: &OsStr) -> Result<(usize, usize), Error> {
    // `fd:N`: the image streams in on fd N (a migration); else a file.
    let mut file = match path.to_str().and_then(|p| p.strip_prefix("fd:")) {
        Some(n) => {
            let fd: RawFd = n
                .parse()
                .map_err(|_| Error::other(format!("bad image fd {n}")))?;
            if fstat(fd).is_none() {
                return Err(Error::other(format!("image fd {fd} is not open")));
            }
            STREAM_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
            // SAFETY: the agent left this fd open for us; nothing else owns it.
            unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        }
        None => std::fs::File::open(path).map_err(|e| e.to_string())?,
    };
    let meta = image::read_meta(&mut file).map_err(|e| e.to_string())?;
    // Post-copy (a migration with lazy regions, and a userfaultfd here),
    // settled before the image's fds take their numbers.
    let streaming = STREAM_FD.load(std::sync::atomic::Ordering::Relaxed) >= 0;
    let uffd = if streaming {
        match lazy_uffd(&meta) {
            Ok(u) => Some(u),
            Err(why) => {
                if !meta.lazy.is_empty() {
                    crate::krg_log!(
                        crate::log::Level::Warn,
                        "no post-copy ({why}): the whole memory comes before the process resumes"
                    );
                }
                None
            }
        }
    } else {
        None
    };
    // A file image is checked whole before the point of no return: its end
    // marker is there and it is long enough for the memory it announces.
    if STREAM_FD.load(std::sync::atomic::Ordering::Relaxed) < 0 {
        use std::io::{Read, Seek, SeekFrom};
        let here = file.stream_position().map_err(|e| e.to_string())?;
        let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
        let mut end = [0u8; 8];
        let ok = len >= here + meta.mem_bytes + 24
            && file.seek(SeekFrom::End(-8)).is_ok()
            && file.read_exact(&mut end).is_ok()
            && &end == image::END_MAGIC;
        if !ok {
            return Err(Error::other(format!(
                "the image is truncated ({len} bytes, no end marker or less than the {} bytes of memory it announces)",
                meta.mem_bytes
            )));
        }
        file.seek(SeekFrom::Start(here))
            .map_err(|e| e.to_string())?;
    }
    let anchor = &ANCHOR as *const _ as u64;
    if meta.krg_anchor != anchor {
        return Err(Error::other(format!(
            "libkrg is at another address than when the image was taken ({:#x} vs {:#x}): \
             the program must start with the same libraries and without address randomisation",
            anchor, meta.krg_anchor
        )));
    }
    let maps = capture::parse_maps(&String::from_utf8_lossy(&crate::proc_self::read_file(
        "/proc/self/maps",
    )?));
    let vdso = maps.iter().find(|m| m.path == "[vdso]");
    match vdso {
        Some(v) if v.start == meta.vdso_start && (v.end - v.start) as usize == meta.vdso.len() => {
            // SAFETY: the vDSO is readable over its whole range.
            let cur = unsafe {
                std::slice::from_raw_parts(v.start as *const u8, (v.end - v.start) as usize)
            };
            if cur != meta.vdso.as_slice() {
                return Err("the vDSO differs from the one of the image (another kernel build)".into());
            }
        }
        _ if meta.vdso_start == 0 => {}
        _ => {
            return Err(Error::other(format!(
                "the vDSO is not where the image has it ({:#x}): another kernel, or address randomisation",
                meta.vdso_start
            )))
        }
    }
    // Regions: sorted, aligned, user space, clear of the kernel's mappings.
    let mut prev_end = 0u64;
    for r in &meta.regions {
        if r.start % 4096 != 0 || r.end % 4096 != 0 || r.start >= r.end || r.start < prev_end {
            return Err(Error::other(format!(
                "bad region {:#x}-{:#x} in the image",
                r.start, r.end
            )));
        }
        if r.end > 0x7fff_ffff_f000 {
            return Err(Error::other(format!(
                "region {:#x}-{:#x} is not user space",
                r.start, r.end
            )));
        }
        if maps
            .iter()
            .filter(|m| m.is_special())
            .any(|m| overlaps(r.start, r.end, m.start, m.end))
        {
            return Err(Error::other(format!(
                "region {:#x}-{:#x} overlaps the kernel's vDSO here",
                r.start, r.end
            )));
        }
        prev_end = r.end;
    }
    // The restorer's area: free here and in the image.
    let mut layout = Layout { size: 0 };
    let plan_off = layout.take(std::mem::size_of::<Plan>());
    let n_threads = meta.threads.len();
    let stacks_off = layout.take(CORE_STACK + n_threads * THREAD_STACK);
    let unmap_off = layout.take(maps.len() * std::mem::size_of::<Range>());
    let ops_off = layout.take(meta.regions.len() * std::mem::size_of::<MapOp>());
    let threads_off = layout.take(n_threads * std::mem::size_of::<ThreadRaw>());
    let sigs_off = layout.take(meta.sigactions.len() * std::mem::size_of::<KSig>());
    let timers_off = layout.take(meta.itimers.len() * std::mem::size_of::<Timer>());
    let close_off = layout.take((meta.regions.len() + 1) * 4);
    let lazy_off = layout.take(meta.lazy.len() * std::mem::size_of::<Range>());
    let area_len = (layout.size + 4095) & !4095;
    let area = map_free(area_len, &maps, &meta)
        .ok_or("no room for the restorer between this process and the image")?;
    // Fds: the restorer's own go above every fd number of the image.
    let floor = meta.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) + 1;
    let is_stream = STREAM_FD.load(std::sync::atomic::Ordering::Relaxed) >= 0;
    let image_fd = high(file.into_raw_fd(), floor)?;
    if is_stream {
        STREAM_FD.store(image_fd, std::sync::atomic::Ordering::Relaxed);
    }
    let uffd = match uffd {
        Some(u) => Some(high(u, floor)?),
        None => None,
    };
    if uffd.is_some() {
        // Small receive buffer: a page the process faults on waits behind
        // less of the background push.
        let buf: libc::c_int = 512 * 1024;
        let _ = sock::setsockopt(image_fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &buf);
        // A record cut short by a source that vanished without a FIN or
        // RST must not block the post-copy thread forever.
        let tv = libc::timeval {
            tv_sec: postcopy::SILENCE_S,
            tv_usec: 0,
        };
        let _ = sock::setsockopt(image_fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv);
    }
    // The post-copy thread's own mapping (stack, buffers), apart from the
    // restorer's area, which goes once the threads are back.
    let (pc, pc_stack) = match uffd {
        Some(u) => {
            let len = super::postcopy::area_len(&meta.lazy);
            let a = map_free(len, &maps, &meta)
                .ok_or("no room for the post-copy thread between this process and the image")?;
            // SAFETY: a fresh zeroed mapping of that length, ours alone.
            unsafe { super::postcopy::lay_out(a, &meta.lazy, u, image_fd) }
        }
        None => (0, 0),
    };
    // Files to map again (those not already mapped identically here).
    let mut ops: Vec<MapOp> = Vec::new();
    // With post-copy the stream and the userfaultfd stay open for the
    // post-copy thread (which closes them when the last page is in).
    let mut close: Vec<i32> = if uffd.is_some() {
        Vec::new()
    } else {
        vec![image_fd]
    };
    let mut own_fds: Vec<i32> = vec![image_fd];
    own_fds.extend(uffd);
    let mut kept: Vec<(u64, u64)> = Vec::new();
    let mut files: Vec<(Vec<u8>, RawFd)> = Vec::new();
    for r in &meta.regions {
        let len = r.end - r.start;
        let mut op = MapOp {
            start: r.start,
            len,
            prot: r.prot,
            flags: 0,
            fd: -1,
            writable: 0,
            offset: 0,
            shared_file: 0,
            _pad: 0,
        };
        match &r.kind {
            RegionKind::Anon => {
                op.flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32;
            }
            RegionKind::Stack => {
                op.flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN) as u32;
            }
            RegionKind::SharedAnon => {
                op.flags = (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u32;
            }
            RegionKind::FilePrivate(f) | RegionKind::FileShared(f) => {
                let shared = matches!(r.kind, RegionKind::FileShared(_));
                let same_here = maps.iter().any(|m| {
                    m.start == r.start
                        && m.end == r.end
                        && m.prot() == r.prot
                        && m.inode == f.ino
                        && m.offset == f.offset
                        && !m.shared
                        && !m.write
                });
                // The same file mapped the same way here (the executable and
                // the libraries, libkrg among them) stays mapped: the pages
                // the image saved are copied over it in place. The code of
                // the swap itself and its GOT live there.
                if !shared && same_here {
                    kept.push((r.start, r.end));
                    ops.push(op);
                    continue;
                }
                let fd = match files.iter().find(|(p, _)| *p == f.path) {
                    Some((_, fd)) => *fd,
                    None => {
                        let writable = shared && r.prot & libc::PROT_WRITE as u32 != 0;
                        let fl = if writable {
                            libc::O_RDWR
                        } else {
                            libc::O_RDONLY
                        };
                        let fd = open_path(&f.path, fl | libc::O_CLOEXEC).during("mapping")?;
                        let st = fstat(fd).ok_or_else(|| Error::last_os("fstat"))?;
                        let mtime = st.st_mtime * 1_000_000_000 + st.st_mtime_nsec;
                        if st.st_dev != f.dev
                            || st.st_ino != f.ino
                            || (!shared && (st.st_size as u64 != f.size || mtime != f.mtime_ns))
                        {
                            return Err(Error::other(format!(
                                "mapping of {}: the file on this node is not the one the image mapped",
                                String::from_utf8_lossy(&f.path)
                            )));
                        }
                        let fd = high(fd, floor)?;
                        files.push((f.path.clone(), fd));
                        close.push(fd);
                        fd
                    }
                };
                op.fd = fd;
                op.offset = f.offset;
                op.flags = if shared {
                    libc::MAP_SHARED as u32
                } else {
                    libc::MAP_PRIVATE as u32
                };
                op.shared_file = u32::from(shared);
            }
        }
        ops.push(op);
    }
    // The code that runs during the swap must stay mapped throughout.
    for f in [
        restore_core as *const () as usize,
        arch::ctx_resume as *const () as usize,
    ] {
        let f = f as u64;
        if !kept.iter().any(|(a, b)| *a <= f && f < *b) {
            return Err(Error::other(format!(
                "libkrg's code at {f:#x} is not mapped as in the image (different libkrg build?)"
            )));
        }
    }
    let mut keep_fds = close.clone();
    keep_fds.extend(&own_fds);
    keep_fds.sort_unstable();
    super::fds::restore(&meta, floor, &keep_fds)?;
    set_process_state(&meta)?;
    // Everything here the image does not have identically goes.
    let unmap: Vec<Range> = maps
        .iter()
        .filter(|m: &&MapLine| !m.is_special())
        .filter(|m| !kept.iter().any(|(a, b)| *a == m.start && *b == m.end))
        .map(|m| Range {
            start: m.start,
            len: m.end - m.start,
        })
        .collect();
    let threads: Vec<ThreadRaw> = meta
        .threads
        .iter()
        .map(|t| {
            let w = |i: usize| t.ctx.get(i).copied().unwrap_or(0);
            ThreadRaw {
                tid: t.tid,
                main: u32::from(t.main),
                ctx: Ctx {
                    rbx: w(0),
                    rbp: w(1),
                    r12: w(2),
                    r13: w(3),
                    r14: w(4),
                    r15: w(5),
                    rsp: w(6),
                    rip: w(7),
                    mxcsr: w(8) as u32,
                    fcw: (w(8) >> 32) as u16,
                    _pad: 0,
                },
                fs: t.fs,
                tid_addr: t.tid_addr,
                robust_head: t.robust_head,
                robust_len: t.robust_len,
                rseq: t.rseq,
                rseq_len: t.rseq_len,
                _pad: 0,
                sigmask: t.sigmask,
            }
        })
        .collect();
    if threads.iter().filter(|t| t.main != 0).count() != 1 {
        return Err("the image has no main thread".into());
    }
    for t in &threads {
        if t.ctx.rsp == 0 || t.ctx.rip == 0 {
            return Err(Error::other(format!(
                "thread {} has no saved context",
                t.tid
            )));
        }
    }
    let sigs: Vec<KSig> = meta
        .sigactions
        .iter()
        .filter(|s| (1..=64).contains(&s.sig) && s.sig != 9 && s.sig != 19)
        .map(|s| KSig {
            sig: u64::from(s.sig),
            handler: s.handler,
            flags: s.flags,
            restorer: s.restorer,
            mask: s.mask,
        })
        .collect();
    let timers: Vec<Timer> = meta
        .itimers
        .iter()
        .filter(|t| t.0 < 3)
        .map(|t| Timer {
            which: u64::from(t.0),
            v: [t.1, t.2, t.3, t.4],
        })
        .collect();
    let (cur_rseq, cur_rseq_len) = super::rseq_of(arch::fs_base() as u64);
    let lazy: Vec<Range> = meta
        .lazy
        .iter()
        .map(|(a, b)| Range {
            start: *a,
            len: b - a,
        })
        .collect();
    if !meta.lazy.is_empty() {
        // The post-copy handshake: the source waits for this before it
        // sends the memory.
        let answer = if uffd.is_some() {
            image::LAZY_OK
        } else {
            image::LAZY_NO
        };
        // SAFETY: writes 8 bytes of a static to the migration stream.
        if unsafe { libc::write(image_fd, answer.as_ptr().cast(), 8) } != 8 {
            return Err(Error::last_os("answering the source"));
        }
    }
    // SAFETY: every offset was laid out above inside the area, which is
    // mapped read-write and ours alone; the element types are plain data.
    unsafe {
        let put = |off: usize| area + off;
        copy_to(put(unmap_off), &unmap);
        copy_to(put(ops_off), &ops);
        copy_to(put(threads_off), &threads);
        copy_to(put(sigs_off), &sigs);
        copy_to(put(timers_off), &timers);
        copy_to(put(close_off), &close);
        if uffd.is_some() {
            copy_to(put(lazy_off), &lazy);
        }
        let plan = put(plan_off) as *mut Plan;
        plan.write(Plan {
            image_fd: i64::from(image_fd),
            brk: meta.brk,
            mm: mm_map(&meta),
            unmap: put(unmap_off) as *const Range,
            n_unmap: unmap.len(),
            ops: put(ops_off) as *mut MapOp,
            n_ops: ops.len(),
            threads: put(threads_off) as *const ThreadRaw,
            n_threads: threads.len(),
            sigs: put(sigs_off) as *const KSig,
            n_sigs: sigs.len(),
            timers: put(timers_off) as *const Timer,
            n_timers: timers.len(),
            close: put(close_off) as *const i32,
            n_close: close.len(),
            tell: if is_stream && uffd.is_none() {
                i64::from(image_fd)
            } else {
                -1
            },
            uffd: uffd.map(i64::from).unwrap_or(-1),
            lazy: put(lazy_off) as *const Range,
            n_lazy: if uffd.is_some() { lazy.len() } else { 0 },
            pc,
            pc_stack,
            stacks: put(stacks_off),
            cur_rseq,
            cur_rseq_len: u64::from(cur_rseq_len),
            area,
            area_len,
        });
    }
    let top = (area + stacks_off + CORE_STACK) & !15;
    Ok((area + plan_off, top))
}

/// The image's memory layout as `PR_SET_MM_MAP` takes it (auxv and the
/// executable left as they are: the restorer runs the same executable).
fn mm_map(meta: &Meta) -> MmMap {
    let [start_code, end_code, start_data, end_data, start_brk, start_stack, arg_start, arg_end, env_start, env_end] =
        meta.mm[..]
    else {
        return MmMap::default();
    };
    MmMap {
        start_code,
        end_code,
        start_data,
        end_data,
        start_brk,
        brk: meta.brk.max(start_brk),
        start_stack,
        arg_start,
        arg_end,
        env_start,
        env_end,
        auxv: 0,
        auxv_size: 0,
        exe_fd: u32::MAX,
    }
}

/// # Safety
/// `dst` must have room for `src.len()` elements of `T`, suitably aligned.
unsafe fn copy_to<T: Copy>(dst: usize, src: &[T]) {
    // SAFETY: guaranteed by the caller; the source is a live slice.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut T, src.len()) };
}

// ---------------------------------------------------------------------------
// The swap: raw system calls only, no libc, no allocation, no panics.

use libc::{
    SYS_brk, SYS_close, SYS_exit_group, SYS_mmap, SYS_mprotect, SYS_munmap, SYS_read,
    SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_setitimer, SYS_write,
};

fn die(msg: &[u8]) -> ! {
    let pre = b"krg: restore failed after the address space was replaced: ";
    // SAFETY: writes static bytes to stderr, then ends the process.
    unsafe {
        arch::sys(SYS_write, 2, pre.as_ptr() as usize, pre.len(), 0);
        arch::sys(SYS_write, 2, msg.as_ptr() as usize, msg.len(), 0);
        arch::sys(SYS_write, 2, b"\n".as_ptr() as usize, 1, 0);
        arch::sys(SYS_exit_group, 127, 0, 0, 0);
    }
    #[allow(clippy::empty_loop)]
    loop {}
}

/// Tell the source, on the migration stream `fd`, that the process runs
/// here now; a source that is gone means it may run there: end.
fn tell_running(fd: i64) {
    // SAFETY: writes 8 static bytes to our own stream.
    let w = unsafe {
        arch::sys(
            SYS_write,
            fd as usize,
            image::RUNNING.as_ptr() as usize,
            8,
            0,
        )
    };
    if w != 8 {
        die(b"the source is gone");
    }
}

/// Read exactly `len` bytes from `fd` to `addr`.
fn read_to(fd: usize, addr: usize, len: usize) -> bool {
    let mut got = 0usize;
    while got < len {
        // SAFETY: [addr, addr+len) was mapped writable by the caller.
        let n = unsafe { arch::sys(SYS_read, fd, addr + got, len - got, 0) };
        if n == -(libc::EINTR as i64) {
            continue;
        }
        if n <= 0 {
            return false;
        }
        got += n as usize;
    }
    true
}

extern "C" fn restore_core(plan: usize) -> ! {
    // SAFETY: `plan` points at the Plan prepare() wrote in the area, whose
    // arrays it describes; everything below is raw system calls on those
    // addresses, as the plan (validated in prepare) says.
    unsafe {
        let p = &*(plan as *const Plan);
        let all: u64 = !0;
        arch::sys(
            SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &all as *const u64 as usize,
            0,
            8,
        );
        // The kernel writes into a registered rseq area: leave the one
        // glibc registered for this process before its memory changes.
        if p.cur_rseq != 0 {
            arch::sys(
                libc::SYS_rseq,
                p.cur_rseq as usize,
                p.cur_rseq_len as usize,
                1, // RSEQ_FLAG_UNREGISTER
                arch::RSEQ_SIG as usize,
            );
        }
        for i in 0..p.n_unmap {
            let r = &*p.unmap.add(i);
            arch::sys(SYS_munmap, r.start as usize, r.len as usize, 0, 0);
        }
        arch::sys(SYS_brk, p.brk as usize, 0, 0, 0);
        // The kernel's idea of the layout becomes the image's, so that
        // /proc/PID/cmdline and environ show the program's strings, not
        // whatever of the image now lies where the restorer's were. Needs
        // no privilege; an old kernel without it leaves them as they were.
        if p.mm.start_code != 0 {
            arch::sys(
                libc::SYS_prctl,
                PR_SET_MM,
                PR_SET_MM_MAP,
                &p.mm as *const MmMap as usize,
                std::mem::size_of::<MmMap>(),
            );
        }
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as usize;
        for i in 0..p.n_ops {
            let op = &mut *p.ops.add(i);
            if op.flags == 0 {
                continue;
            }
            let prot = if op.shared_file != 0 {
                op.prot as usize
            } else {
                rw
            };
            let r = arch::sys6(
                SYS_mmap,
                op.start as usize,
                op.len as usize,
                prot,
                (op.flags | libc::MAP_FIXED as u32) as usize,
                op.fd as usize,
                op.offset as usize,
            );
            if r != op.start as i64 {
                die(b"mapping a region of the image");
            }
            op.writable = u32::from(op.shared_file == 0);
        }
        // The saved pages, straight from the image into place.
        let fd = p.image_fd as usize;
        let mut head = [0u64; 2];
        loop {
            if !read_to(fd, head.as_mut_ptr() as usize, 16) {
                die(b"the image ends early");
            }
            let (addr, len) = (u64::from_le(head[0]), u64::from_le(head[1]));
            if addr == 0 && len == 0 {
                break;
            }
            let mut ok = false;
            for i in 0..p.n_ops {
                let op = &mut *p.ops.add(i);
                if op.start <= addr && addr < op.start + op.len {
                    if len > op.start + op.len - addr || op.shared_file != 0 {
                        break;
                    }
                    if op.writable == 0 {
                        arch::sys(SYS_mprotect, op.start as usize, op.len as usize, rw, 0);
                        op.writable = 1;
                    }
                    ok = true;
                    break;
                }
            }
            if !ok {
                die(b"a memory record of the image is outside its regions");
            }
            if !read_to(fd, addr as usize, len as usize) {
                die(b"the image ends early");
            }
        }
        let mut end = [0u8; 8];
        if !read_to(fd, end.as_mut_ptr() as usize, 8) || &end != image::END_MAGIC {
            die(b"the image has no end marker (truncated?)");
        }
        for i in 0..p.n_ops {
            let op = &*p.ops.add(i);
            if op.writable != 0 {
                arch::sys(
                    SYS_mprotect,
                    op.start as usize,
                    op.len as usize,
                    op.prot as usize,
                    0,
                );
            }
        }
        if p.tell >= 0 {
            // From here on the process exists here only; the source waits
            // for this before it goes (and resumes itself without it).
            tell_running(p.tell);
        }
        for i in 0..p.n_close {
            arch::sys(SYS_close, *p.close.add(i) as usize, 0, 0, 0);
        }
        // Post-copy: the lazy regions (mapped empty above) fault to the
        // userfaultfd from now on.
        for i in 0..p.n_lazy {
            let r = &*p.lazy.add(i);
            if postcopy::register(p.uffd as usize, r.start, r.len) < 0 {
                die(b"registering a lazy region with the userfaultfd");
            }
        }
        for i in 0..p.n_sigs {
            let s = &*p.sigs.add(i);
            let k = [s.handler, s.flags, s.restorer, s.mask];
            arch::sys(SYS_rt_sigaction, s.sig as usize, k.as_ptr() as usize, 0, 8);
        }
        for i in 0..p.n_timers {
            let t = &*p.timers.add(i);
            let v = t.v;
            arch::sys(SYS_setitimer, t.which as usize, v.as_ptr() as usize, 0, 0);
        }
        // libkrg's statics are the image's now: tell the leader where the
        // area is, and that no thread has left it yet.
        RESUMED.store(0, std::sync::atomic::Ordering::SeqCst);
        RESTORE_AREA[0].store(p.area, std::sync::atomic::Ordering::SeqCst);
        RESTORE_AREA[1].store(p.area_len, std::sync::atomic::Ordering::SeqCst);
        let flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        if p.pc != 0 {
            // From here on the process exists here only: tell the source,
            // then start the thread that brings the rest of the memory in
            // (before any application thread can fault on it).
            tell_running(p.image_fd);
            let tid = postcopy::THREAD_TID.as_ptr() as usize;
            let r = arch::clone_thread(
                (libc::CLONE_VM
                    | libc::CLONE_FS
                    | libc::CLONE_FILES
                    | libc::CLONE_SIGHAND
                    | libc::CLONE_THREAD
                    | libc::CLONE_SYSVSEM
                    | libc::CLONE_PARENT_SETTID
                    | libc::CLONE_CHILD_CLEARTID) as u64,
                p.pc_stack,
                tid,
                tid,
                0,
                postcopy::thread_main,
                p.pc,
            );
            if r < 0 {
                die(b"clone of the post-copy thread");
            }
        }
        let mut main: *const ThreadRaw = std::ptr::null();
        let mut k = 0usize;
        for i in 0..p.n_threads {
            let t = p.threads.add(i);
            if (*t).main != 0 {
                main = t;
                continue;
            }
            k += 1;
            let top = (p.stacks + CORE_STACK + k * THREAD_STACK) & !15;
            let r = arch::clone_thread(
                flags,
                top,
                (*t).tid_addr as usize,
                (*t).tid_addr as usize,
                (*t).fs as usize,
                thread_entry,
                t as usize,
            );
            if r < 0 {
                die(b"clone of a thread");
            }
        }
        thread_entry(main as usize)
    }
}

/// Last steps of one thread, then into its saved context.
extern "C" fn thread_entry(t: usize) -> ! {
    // SAFETY: `t` is a ThreadRaw of the plan; raw system calls on the
    // thread's own registrations, then the jump into its context.
    unsafe {
        let t = &*(t as *const ThreadRaw);
        if t.main != 0 {
            arch::sys(libc::SYS_arch_prctl, 0x1002, t.fs as usize, 0, 0); // ARCH_SET_FS
            if t.tid_addr != 0 {
                arch::sys(libc::SYS_set_tid_address, t.tid_addr as usize, 0, 0, 0);
                let tid = arch::sys(libc::SYS_gettid, 0, 0, 0, 0);
                *(t.tid_addr as *mut i32) = tid as i32;
            }
        }
        if t.robust_head != 0 {
            arch::sys(
                libc::SYS_set_robust_list,
                t.robust_head as usize,
                t.robust_len as usize,
                0,
                0,
            );
        }
        if t.rseq != 0 {
            arch::sys(
                libc::SYS_rseq,
                t.rseq as usize,
                t.rseq_len as usize,
                0,
                arch::RSEQ_SIG as usize,
            );
        }
        let mask = t.sigmask;
        arch::sys(
            SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &mask as *const u64 as usize,
            0,
            8,
        );
        arch::ctx_resume(&t.ctx)
    }
}
