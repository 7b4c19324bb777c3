//! Taking the image, from inside: runs in the capturing thread while every
//! other thread is parked in the checkpoint handler. Allocations come from
//! the capture arena ([`super::alloc`]); nothing here may call malloc,
//! `opendir` or take a lock another thread could hold.

#![deny(unsafe_code)]

use super::image::{self, FdState, FileId, Meta, Region, RegionKind, SigAction, ThreadState};
use crate::error::{Error, ResultExt};
use crate::proc_self::{read_file, read_link, rlimits, split_nul};
use crate::sys::{mem, raw};
use std::os::fd::RawFd;

const PAGE: u64 = 4096;

fn errno() -> i32 {
    crate::rt::errno()
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq)]
pub struct MapLine {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    /// The device of the mapped file (`makedev(major, minor)`).
    pub dev: u64,
    pub inode: u64,
    pub path: String,
}

impl MapLine {
    pub fn prot(&self) -> u32 {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ as u32;
        }
        if self.write {
            p |= libc::PROT_WRITE as u32;
        }
        if self.exec {
            p |= libc::PROT_EXEC as u32;
        }
        p
    }

    /// Kernel-provided mappings that are never saved or restored.
    pub fn is_special(&self) -> bool {
        matches!(
            self.path.as_str(),
            "[vsyscall]" | "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[uprobes]"
        )
    }
}

/// Parse `/proc/self/maps` text.
pub fn parse_maps(text: &str) -> Vec<MapLine> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(off), Some(dev), Some(ino)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let dev = dev
            .split_once(':')
            .and_then(|(a, b)| {
                Some(libc::makedev(
                    u32::from_str_radix(a, 16).ok()?,
                    u32::from_str_radix(b, 16).ok()?,
                ))
            })
            .unwrap_or(0);
        let path = it.next().unwrap_or("").trim_start().to_string();
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset), Ok(inode)) = (
            u64::from_str_radix(a, 16),
            u64::from_str_radix(b, 16),
            u64::from_str_radix(off, 16),
            ino.parse::<u64>(),
        ) else {
            continue;
        };
        let p = perms.as_bytes();
        if p.len() < 4 {
            continue;
        }
        out.push(MapLine {
            start,
            end,
            read: p[0] == b'r',
            write: p[1] == b'w',
            exec: p[2] == b'x',
            shared: p[3] == b's',
            offset,
            dev,
            inode,
            path,
        });
    }
    out
}

/// `maps` without the addresses in `[hole.0, hole.1)`. The kernel merges
/// the capture arena with an adjacent anonymous mapping of the same flags
/// (a glibc thread arena is `MAP_NORESERVE` too), so the arena may be part
/// of a longer line: only the arena's own addresses are left out, the
/// program's memory on either side stays.
pub fn without(maps: Vec<MapLine>, hole: (u64, u64)) -> Vec<MapLine> {
    if hole.0 >= hole.1 {
        return maps;
    }
    let mut out = Vec::with_capacity(maps.len() + 1);
    for m in maps {
        if m.end <= hole.0 || hole.1 <= m.start {
            out.push(m);
            continue;
        }
        if m.start < hole.0 {
            out.push(MapLine {
                end: hole.0,
                ..m.clone()
            });
        }
        if hole.1 < m.end {
            let offset = if m.inode == 0 {
                m.offset
            } else {
                m.offset + (hole.1 - m.start)
            };
            out.push(MapLine {
                start: hole.1,
                offset,
                ..m
            });
        }
    }
    out
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .map(|l| l[name.len()..].trim())
}

fn sigactions() -> Vec<SigAction> {
    let mut v = Vec::new();
    for sig in 1..=64u32 {
        if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 {
            continue;
        }
        let Ok(k) = raw::sigaction_of(sig as i32) else {
            continue;
        };
        if k[0] != 0 {
            v.push(SigAction {
                sig,
                handler: k[0],
                flags: k[1],
                restorer: k[2],
                mask: k[3],
            });
        }
    }
    v
}

fn itimers() -> Vec<(u32, i64, i64, i64, i64)> {
    let mut v = Vec::new();
    for which in 0..3u32 {
        let Ok(t) = raw::getitimer(which as i32) else {
            continue;
        };
        if t.it_value.tv_sec != 0 || t.it_value.tv_usec != 0 {
            v.push((
                which,
                t.it_interval.tv_sec,
                t.it_interval.tv_usec,
                t.it_value.tv_sec,
                t.it_value.tv_usec,
            ));
        }
    }
    v
}

fn file_id(m: &MapLine) -> Result<FileId, Error> {
    let md = std::fs::metadata(&m.path).map_err(|e| format!("mapping of {}: {e}", m.path))?;
    use std::os::unix::fs::MetadataExt;
    if md.ino() != m.inode {
        return Err(Error::refused(format!(
            "mapping of {}: the file at that path was replaced",
            m.path
        )));
    }
    Ok(FileId {
        path: m.path.clone().into_bytes(),
        offset: m.offset,
        dev: md.dev(),
        ino: md.ino(),
        size: md.size(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
    })
}

/// Which pages of a region to save.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Save {
    /// Pages that exist (present or swapped).
    Present,
    /// Pages a private file mapping has copied (present and not file
    /// pages, or swapped).
    Modified,
    /// Every page.
    All,
    Nothing,
}

/// Runs of memory to save: (address, length).
pub type Runs = Vec<(u64, u64)>;

/// The regions of the image and the runs of memory to save.
pub fn regions(maps: &[MapLine]) -> Result<(Vec<Region>, Runs), Error> {
    regions_deferring(maps, &[])
}

/// [`regions`], except that the pages of the regions `(start, end)` in
/// `defer` are not looked up (a post-copy migration scans them once the
/// process runs on the target: [`present_runs`]).
pub fn regions_deferring(
    maps: &[MapLine],
    defer: &[(u64, u64)],
) -> Result<(Vec<Region>, Runs), Error> {
    let pagemap = std::fs::File::open("/proc/self/pagemap").during("/proc/self/pagemap")?;
    let mut regions = Vec::new();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for m in maps {
        if m.is_special() {
            continue;
        }
        let deleted = m.path.ends_with(" (deleted)");
        let anon_name = m.inode == 0;
        let (kind, save) = if m.shared && crate::dsm::is_segment_path(&m.path) {
            // Cluster shared memory: a placeholder; the restored process
            // attaches the segment again (`dsm::after_restore`).
            (RegionKind::SharedAnon, Save::Nothing)
        } else if m.path == "[stack]" {
            (RegionKind::Stack, Save::Present)
        } else if anon_name {
            if m.shared {
                (RegionKind::SharedAnon, Save::All)
            } else {
                (RegionKind::Anon, Save::Present)
            }
        } else if deleted || m.path.starts_with("/SYSV") || m.path.starts_with("/memfd:") {
            if m.shared {
                (RegionKind::SharedAnon, Save::All)
            } else {
                (RegionKind::Anon, Save::All)
            }
        } else if m.shared {
            (RegionKind::FileShared(file_id(m)?), Save::Nothing)
        } else {
            (RegionKind::FilePrivate(file_id(m)?), Save::Modified)
        };
        // Runs never span two regions: the restore checks each against one.
        let floor = runs.len();
        match save {
            _ if defer.contains(&(m.start, m.end)) => {}
            Save::Nothing => {}
            Save::All => push_run(&mut runs, floor, m.start, m.end - m.start),
            Save::Present | Save::Modified => scan_pagemap(
                &pagemap,
                m.start,
                m.end,
                save == Save::Modified,
                &mut runs,
                floor,
            )?,
        }
        regions.push(Region {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            saved: runs[floor..].iter().map(|r| r.1).sum(),
            kind,
        });
    }
    Ok((regions, runs))
}

/// The runs of present or swapped pages of `[start, end)`.
pub fn present_runs(start: u64, end: u64) -> Result<Runs, Error> {
    let pagemap = std::fs::File::open("/proc/self/pagemap").during("/proc/self/pagemap")?;
    let mut runs = Vec::new();
    scan_pagemap(&pagemap, start, end, false, &mut runs, 0)?;
    Ok(runs)
}

fn push_run(runs: &mut Vec<(u64, u64)>, floor: usize, addr: u64, len: u64) {
    if runs.len() > floor {
        let last = runs.last_mut().expect("non-empty");
        if last.0 + last.1 == addr {
            last.1 += len;
            return;
        }
    }
    runs.push((addr, len));
}

fn scan_pagemap(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    modified_only: bool,
    runs: &mut Vec<(u64, u64)>,
    floor: usize,
) -> Result<(), Error> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = start / PAGE;
    let last = end / PAGE;
    while page < last {
        let n = ((last - page) as usize).min(buf.len() / 8);
        let got = pagemap
            .read_at(&mut buf[..n * 8], page * 8)
            .during("/proc/self/pagemap")?;
        if got < 8 {
            return Err("/proc/self/pagemap: short read".into());
        }
        for i in 0..got / 8 {
            let e = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            let keep = if modified_only {
                e & SWAPPED != 0 || (e & PRESENT != 0 && e & FILE == 0)
            } else {
                e & (PRESENT | SWAPPED) != 0
            };
            if keep {
                push_run(runs, floor, (page + i as u64) * PAGE, PAGE);
            }
        }
        page += (got / 8) as u64;
    }
    Ok(())
}

/// Everything but memory contents: the memory announced is that of `runs`,
/// libkrg's address is that of its anchor.
pub fn meta(
    maps: &[MapLine],
    regions: Vec<Region>,
    runs: &[(u64, u64)],
    threads: Vec<ThreadState>,
    fds: Vec<FdState>,
) -> Result<Meta, Error> {
    let mem_bytes = runs.iter().map(|r| r.1).sum();
    let anchor = &super::ANCHOR as *const _ as u64;
    let status = String::from_utf8_lossy(&read_file("/proc/self/status")?).into_owned();
    let ids = |name: &str| -> Vec<u32> {
        status_field(&status, name)
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let umask = crate::proc_self::umask();
    let vdso = maps
        .iter()
        .any(|m| m.path == "[vdso]")
        .then(mem::vdso)
        .transpose()
        .during("/proc/self/maps")?
        .flatten();
    let (vdso_start, vdso_bytes) = vdso.unwrap_or((0, Vec::new()));
    let ident = super::exec_ident()?;
    let brk = raw::brk_now();
    Ok(Meta {
        gpid: crate::processes::my_gpid(),
        node: crate::processes::node_id(),
        caps: crate::processes::hello_caps(),
        taken_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        exe: read_link("/proc/self/exe")?,
        argv: split_nul(&ident.0),
        env: split_nul(&ident.1),
        cwd: read_link("/proc/self/cwd")?,
        umask,
        rlimits: rlimits(),
        uid: ids("Uid:").get(1).copied().unwrap_or(0),
        gid: ids("Gid:").get(1).copied().unwrap_or(0),
        groups: ids("Groups:"),
        brk,
        regions,
        threads,
        sigactions: sigactions(),
        fds,
        itimers: itimers(),
        vdso_start,
        vdso: vdso_bytes,
        mem_bytes,
        krg_anchor: anchor,
        lazy: Vec::new(),
        mm: read_file("/proc/self/stat")
            .map(|t| mm_layout(&String::from_utf8_lossy(&t)))
            .unwrap_or_default(),
    })
}

/// The memory layout fields of a `/proc/PID/stat` line (see
/// [`Meta::mm`]), or nothing if the line is not as expected.
pub fn mm_layout(stat: &str) -> Vec<u64> {
    // Fields after the command (which may hold spaces and parentheses):
    // the first is field 3 (state); field N is at N - 3.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Vec::new();
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let out: Vec<u64> = [26, 27, 45, 46, 47, 28, 48, 49, 50, 51]
        .iter()
        .filter_map(|n| f.get(n - 3).and_then(|v| v.parse().ok()))
        .collect();
    if out.len() == 10 && out.iter().all(|v| *v != 0) {
        out
    } else {
        Vec::new()
    }
}

/// Write all of `buf` to `fd`.
pub fn write_all(fd: RawFd, buf: &[u8]) -> Result<(), Error> {
    write_mem_all(fd, buf.as_ptr() as usize, buf.len())
}

/// Write the `len` bytes of this process's memory at `addr` to `fd` (the
/// kernel reads them: see `sys::mem::write_mem`).
fn write_mem_all(fd: RawFd, mut addr: usize, mut len: usize) -> Result<(), Error> {
    while len > 0 {
        let n = match mem::write_mem(fd, addr, len) {
            Ok(n) => n,
            Err(_) if errno() == libc::EINTR => continue,
            Err(_) => return Err(Error::last_os("writing the image")),
        };
        if n == 0 {
            return Err("writing the image: no progress".into());
        }
        addr += n;
        len -= n;
    }
    Ok(())
}

/// Write the image: metadata, memory runs, end marker. Returns its size.
pub fn write_image(
    fd: RawFd,
    meta: &Meta,
    regions: &[Region],
    runs: &[(u64, u64)],
) -> Result<u64, Error> {
    let head = image::encode_meta(meta).map_err(|e| e.to_string())?;
    write_all(fd, &head)?;
    let total = head.len() as u64 + write_runs(fd, regions, runs)?;
    write_end(fd)?;
    Ok(total + 24)
}

/// Write the memory records of `runs`; returns the bytes written.
pub fn write_runs(fd: RawFd, regions: &[Region], runs: &[(u64, u64)]) -> Result<u64, Error> {
    let mut total = 0u64;
    for (addr, len) in runs {
        // A run in a region the process cannot read (PROT_NONE after use)
        // is made readable for the copy, then put back.
        let unreadable = regions
            .iter()
            .find(|r| r.start <= *addr && *addr < r.end)
            .filter(|r| r.prot & libc::PROT_READ as u32 == 0);
        if let Some(r) = unreadable {
            super::handler::set_protection(r.start, r.end, libc::PROT_READ);
        }
        let h = image::record(*addr, *len);
        // A run of the process's own mapped memory (made readable above if
        // it was not).
        write_all(fd, &h)?;
        write_mem_all(fd, *addr as usize, *len as usize)?;
        if let Some(r) = unreadable {
            // Back to the original protection.
            super::handler::set_protection(r.start, r.end, r.prot as i32);
        }
        total += 16 + len;
    }
    Ok(total)
}

/// Write the end record and the end marker (24 bytes).
pub fn write_end(fd: RawFd) -> Result<(), Error> {
    let end = image::record(0, 0);
    write_all(fd, &end)?;
    write_all(fd, &image::END_MAGIC[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_parse() {
        let t = "55555555-55556000 r-xp 00001000 fe:00 123    /usr/bin/with space\n\
                 7ffff000-7ffff100 rw-s 00000000 00:00 0 \n\
                 ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n";
        let m = parse_maps(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].path, "/usr/bin/with space");
        assert!(m[0].exec && !m[0].write && !m[0].shared);
        assert_eq!(m[0].offset, 0x1000);
        assert!(m[1].shared && m[1].path.is_empty());
        assert!(m[2].is_special());
    }

    #[test]
    fn the_arena_is_cut_out_of_a_line_it_was_merged_into() {
        let t = "7fffb0000000-7ffff0021000 rw-p 00000000 00:00 0 \n\
                 7ffff0021000-7ffff4000000 ---p 00000000 00:00 0 \n\
                 7ffff5000000-7ffff5004000 rw-p 00010000 fe:00 9    /lib/x\n";
        let arena = (0x7fffb0000000, 0x7ffff0000000);
        let m = without(parse_maps(t), arena);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].start, m[0].end), (0x7ffff0000000, 0x7ffff0021000));
        assert!(m[0].write && m[0].inode == 0);
        assert_eq!(m[1].start, 0x7ffff0021000);
        // A hole in the middle of a file mapping keeps both sides' offsets.
        let m = without(parse_maps(t), (0x7ffff5001000, 0x7ffff5002000));
        assert_eq!(m.len(), 4);
        assert_eq!(
            (m[2].start, m[2].end, m[2].offset),
            (0x7ffff5000000, 0x7ffff5001000, 0x10000)
        );
        assert_eq!(
            (m[3].start, m[3].end, m[3].offset),
            (0x7ffff5002000, 0x7ffff5004000, 0x12000)
        );
        // No arena: nothing changes.
        assert_eq!(without(parse_maps(t), (0, 0)), parse_maps(t));
    }

    #[test]
    fn the_memory_layout_is_read_off_our_own_stat() {
        let t = String::from_utf8(read_file("/proc/self/stat").unwrap()).unwrap();
        let mm = mm_layout(&t);
        assert_eq!(mm.len(), 10, "{t}");
        // start_code < end_code, start_data < end_data, arg and env areas
        // ordered and on the stack side of the data.
        assert!(mm[0] < mm[1] && mm[2] < mm[3] && mm[6] < mm[7] && mm[8] < mm[9]);
        assert!(mm[7] <= mm[8] && mm[6] > mm[3]);
        assert!(mm_layout("12 (a) b) S 1").is_empty());
    }

    #[test]
    fn own_fds_and_regions() {
        let fds = crate::dirs::open_fds().unwrap();
        assert!(fds.contains(&0) || fds.contains(&1) || fds.contains(&2));
        let maps = parse_maps(&String::from_utf8(read_file("/proc/self/maps").unwrap()).unwrap());
        let (regions, runs) = regions(&maps).unwrap();
        assert!(regions.iter().any(|r| r.kind == RegionKind::Stack));
        assert!(!runs.is_empty());
        assert!(runs.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    }
}
