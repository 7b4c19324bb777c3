//! A segment as this node holds it: its memfd, the state of each page here,
//! the local processes' mappings (write protection, read ahead).

use super::*;
use crate::agent::common::lock;

impl LocalSeg {
    pub(super) fn new(shmid: i32, size: u64) -> Result<LocalSeg, ErrorReply> {
        let name = std::ffi::CString::new(format!("{}{shmid}", libkrg::dsm::MEMFD_PREFIX))
            .expect("no NUL");
        let mem = sys::memfd(&name).map_err(super::super::common::os_err)?;
        // The exact size: a POSIX object's fstat shows it. The tail of the
        // last page reads as zeros, as for any file.
        mem.set_len(size)
            .map_err(|e| io_err(format!("segment {shmid}: size {size}"), e))?;
        Ok(LocalSeg {
            size: AtomicU64::new(size),
            mem,
            pages: Mutex::new(HashMap::new()),
            applied: Notify::new(),
            last_read: AtomicU32::new(u32::MAX),
            ahead_until: AtomicU32::new(0),
            atts: Mutex::new(Vec::new()),
            futex: Mutex::new(BTreeSet::new()),
            map: Mutex::new(None),
        })
    }

    pub(super) fn npages(&self) -> usize {
        pages_of(self.size.load(Ordering::Acquire))
    }

    /// Grow to `size` bytes (the memfd too, so that mappings and fstat
    /// see it).
    pub(super) fn grow(&self, size: u64) -> Result<(), ErrorReply> {
        if size > self.size.load(Ordering::Acquire) {
            if size > self.mem.metadata().map(|m| m.len()).unwrap_or(0) {
                self.mem
                    .set_len(size)
                    .map_err(|e| io_err(format!("grow to {size}"), e))?;
            }
            self.size.fetch_max(size, Ordering::AcqRel);
        }
        Ok(())
    }

    /// A page's state (invalid until the first grant).
    pub(super) fn page(&self, page: u32) -> Result<Arc<AsyncMutex<LPage>>, ErrorReply> {
        if page as usize >= self.npages() {
            return Err(err(libc::EINVAL, format!("page {page} out of range")));
        }
        Ok(lock(&self.pages)
            .entry(page)
            .or_insert_with(|| {
                Arc::new(AsyncMutex::new(LPage {
                    st: PState::Invalid,
                    ver: 0,
                }))
            })
            .clone())
    }

    /// Whether a page is known invalid here without waiting.
    pub(super) fn idle_invalid(&self, page: u32) -> bool {
        lock(&self.pages)
            .get(&page)
            .is_none_or(|m| m.try_lock().is_ok_and(|l| l.st == PState::Invalid))
    }

    /// Apply a grant from the home (unless a later one was applied).
    pub(super) async fn apply(&self, page: u32, g: Grant) -> Result<(), ErrorReply> {
        let mut p = self.page(page)?.lock_owned().await;
        if g.ver > p.ver {
            match g.data {
                Some(d) => self.write_page(page, &d)?,
                None if p.st == PState::Invalid => self.write_page(page, &[0u8; PAGE as usize])?,
                None => {}
            }
            p.st = if g.write { PState::Write } else { PState::Read };
            p.ver = g.ver;
        }
        drop(p);
        self.applied.notify_waiters();
        Ok(())
    }

    /// Lock a page once the grant of version `ver` has been applied (or
    /// after a while: a grant whose answer was lost never comes).
    pub(super) async fn page_at(
        &self,
        page: u32,
        ver: u64,
    ) -> Result<tokio::sync::OwnedMutexGuard<LPage>, ErrorReply> {
        let m = self.page(page)?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let wait = self.applied.notified();
            let p = lock_now(m.clone()).await;
            if p.ver >= ver || tokio::time::Instant::now() >= deadline {
                return Ok(p);
            }
            drop(p);
            let _ = tokio::time::timeout_at(deadline, wait).await;
        }
    }

    /// After a read fault on `page`: the next window of pages to read
    /// ahead, when the faults look sequential and less than a window and a
    /// half is ahead of the reader (so that two windows are in flight; a
    /// window's middle page stays unmapped to tell when the reader gets
    /// there).
    pub(super) fn next_window(&self, page: u32) -> Option<Vec<u32>> {
        let last = self.last_read.swap(page, Ordering::Relaxed);
        if last == u32::MAX || page <= last || page - last > READ_AHEAD {
            return None;
        }
        let until = self.ahead_until.load(Ordering::Relaxed);
        let start = if until <= page {
            page + 1
        } else if page + READ_AHEAD + READ_AHEAD / 2 >= until {
            until
        } else {
            return None;
        };
        let end = (start as usize + READ_AHEAD as usize).min(self.npages());
        if start as usize >= end {
            return None;
        }
        self.ahead_until.store(end as u32, Ordering::Relaxed);
        Some(
            (start as usize..end)
                .filter(|&p| self.idle_invalid(p as u32))
                .map(|p| p as u32)
                .collect(),
        )
    }

    /// Apply read-ahead grants and map the pages into the reader (but
    /// `skip`), so that its accesses do not fault.
    pub(super) async fn apply_mapped(
        &self,
        gs: Vec<(u32, Grant)>,
        mem: &ProcMem,
        base: u64,
        skip: Option<u32>,
    ) {
        // Lock every page first (ascending, as the home sent them), then
        // one pwritev per run of consecutive pages and one UFFDIO_CONTINUE
        // per run to map: a window costs a few system calls, not three per
        // page.
        let mut locked = Vec::with_capacity(gs.len());
        for (page, g) in gs {
            if let Ok(m) = self.page(page) {
                locked.push((page, g, lock_now(m).await));
            }
        }
        let zero = [0u8; PAGE as usize];
        let fresh: Vec<(u32, &[u8])> = locked
            .iter()
            .filter(|(_, g, p)| g.ver > p.ver)
            .map(|(page, g, p)| match &g.data {
                Some(d) => (*page, &d[..]),
                None if p.st == PState::Invalid => (*page, &zero[..]),
                None => (*page, &zero[..0]),
            })
            .collect();
        let failed = self.write_runs(&fresh);
        for (page, g, p) in locked.iter_mut() {
            if g.ver > p.ver && !failed.contains(page) {
                p.st = if g.write { PState::Write } else { PState::Read };
                p.ver = g.ver;
            }
        }
        // Map runs of pages in the same state.
        let mut run: Option<(u32, u32, PState)> = None;
        let fd = mem.uffd.as_fd();
        let flush = |r: Option<(u32, u32, PState)>| {
            if let Some((first, n, st)) = r {
                cont_range(fd, base + first as u64 * PAGE, n, st == PState::Read);
            }
        };
        for (page, _, p) in locked.iter() {
            let mappable = p.st != PState::Invalid && Some(*page) != skip;
            run = match run {
                Some((first, n, st)) if mappable && st == p.st && first + n == *page => {
                    Some((first, n + 1, st))
                }
                r => {
                    flush(r);
                    mappable.then_some((*page, 1, p.st))
                }
            };
        }
        flush(run);
        drop(locked);
        self.applied.notify_waiters();
    }

    /// Write pages (`(page, bytes)`, an empty slice for "keep") with one
    /// pwritev per run of consecutive pages. Returns the pages that failed.
    pub(super) fn write_runs(&self, pages: &[(u32, &[u8])]) -> Vec<u32> {
        let mut failed = Vec::new();
        let mut i = 0;
        while i < pages.len() {
            if pages[i].1.is_empty() {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < pages.len()
                && j - i < 512
                && !pages[j].1.is_empty()
                && pages[j].0 == pages[j - 1].0 + 1
            {
                j += 1;
            }
            let iov: Vec<std::io::IoSlice> = pages[i..j]
                .iter()
                .map(|(page, d)| std::io::IoSlice::new(&d[..self.in_page(*page).min(d.len())]))
                .collect();
            let want: usize = iov.iter().map(|v| v.len()).sum();
            let r = sys::pwritev(&self.mem, &iov, pages[i].0 as u64 * PAGE);
            if r.ok() != Some(want) {
                // Short or failed: fall back to one page at a time.
                for (page, d) in &pages[i..j] {
                    if self.write_page(*page, d).is_err() {
                        failed.push(*page);
                    }
                }
            }
            i = j;
        }
        failed
    }

    /// Remember futex words (`len` bytes at `offset`) to wake on
    /// invalidation.
    pub(super) fn note_futex(&self, offset: u64, len: u64) -> Result<(), ErrorReply> {
        let mapped = self.npages() as u64 * PAGE;
        if len == 0 || len > 256 || offset.checked_add(len).is_none_or(|e| e > mapped) {
            return Err(err(libc::EINVAL, format!("futex range {offset}+{len}")));
        }
        {
            let mut m = lock(&self.map);
            if m.is_none() {
                let v = SharedView::new(&self.mem, mapped as usize)
                    .map_err(|e| io_err("map segment".into(), e))?;
                *m = Some(v);
            }
        }
        let mut f = lock(&self.futex);
        let mut w = offset & !3;
        while w < offset + len {
            f.insert(w);
            w += 4;
        }
        Ok(())
    }

    /// Wake every local waiter on the page's futex words. Returns whether
    /// there were any (the wake itself may have put a page back).
    pub(super) fn wake_futexes(&self, page: u32) -> bool {
        let start = page as u64 * PAGE;
        let words: Vec<u64> = lock(&self.futex)
            .range(start..start + PAGE)
            .copied()
            .collect();
        if words.is_empty() {
            return false;
        }
        let m = lock(&self.map);
        let Some(map) = m.as_ref() else {
            return false;
        };
        for w in words {
            let _ = map.futex_wake(w as usize);
        }
        true
    }

    /// The bytes of page `page` inside the object (the last page may be
    /// partial); the page is always sent whole, the tail as zeros.
    pub(super) fn in_page(&self, page: u32) -> usize {
        let off = page as u64 * PAGE;
        self.size
            .load(Ordering::Acquire)
            .saturating_sub(off)
            .min(PAGE) as usize
    }

    pub(super) fn read_page(&self, page: u32) -> Result<ByteBuf, ErrorReply> {
        let mut b = vec![0u8; PAGE as usize];
        let n = self.in_page(page);
        self.mem
            .read_exact_at(&mut b[..n], page as u64 * PAGE)
            .map_err(|e| io_err(format!("page {page}: read"), e))?;
        Ok(ByteBuf::from(b))
    }

    pub(super) fn write_page(&self, page: u32, data: &[u8]) -> Result<(), ErrorReply> {
        if data.len() != PAGE as usize {
            return Err(err(
                libc::EINVAL,
                format!("page {page}: {} bytes", data.len()),
            ));
        }
        let n = self.in_page(page);
        self.mem
            .write_all_at(&data[..n], page as u64 * PAGE)
            .map_err(|e| io_err(format!("page {page}: write"), e))
    }

    /// Take the page out of the memfd: every local mapping loses it.
    pub(super) fn punch(&self, page: u32) -> Result<(), ErrorReply> {
        sys::punch_hole(&self.mem, page as u64 * PAGE, PAGE)
            .map_err(|e| io_err(format!("page {page}: punch"), e))
    }

    /// Write-protect pages (ascending) in every local mapping, one ioctl
    /// per run of consecutive pages.
    pub(super) fn protect_runs(&self, pages: &[u32]) {
        if pages.is_empty() {
            return;
        }
        for a in lock(&self.atts).iter() {
            let mut i = 0;
            while i < pages.len() {
                let mut j = i + 1;
                while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                    j += 1;
                }
                let start = pages[i] as u64 * PAGE;
                let end = pages[j - 1] as u64 * PAGE + PAGE;
                let lo = start.max(a.off);
                let hi = end.min(a.off + a.len);
                if lo < hi {
                    let at = a.addr + (lo - a.off);
                    if let Err(e) = uffd::write_protect(a.mem.uffd.as_fd(), at, hi - lo, true) {
                        debug!("pid {}: write-protect {at:#x}: {e}", a.kpid);
                    }
                }
                i = j;
            }
        }
    }

    /// Write-protect the page in every local mapping, so that its contents
    /// stay still while they are read for another node.
    pub(super) fn protect_all(&self, page: u32) {
        let at = page as u64 * PAGE;
        for a in lock(&self.atts).iter() {
            let Some(rel) = at.checked_sub(a.off).filter(|r| *r < a.len) else {
                continue;
            };
            if let Err(e) = uffd::write_protect(a.mem.uffd.as_fd(), a.addr + rel, PAGE, true) {
                debug!("pid {}: write-protect {:#x}: {e}", a.kpid, a.addr + rel);
            }
        }
    }
}

/// Map `n` pages from `start` into a process (after read ahead); pages
/// already mapped are skipped.
pub(super) fn cont_range(fd: std::os::fd::BorrowedFd<'_>, start: u64, n: u32, wp: bool) {
    if uffd::cont(fd, start, n as u64 * PAGE, wp).is_ok() {
        return;
    }
    for k in 0..n as u64 {
        let _ = uffd::cont(fd, start + k * PAGE, PAGE, wp);
    }
}

/// Map the page in for a faulting thread, or lift its write protection.
pub(super) fn resolve(mem: &ProcMem, addr: u64, st: PState, wp_fault: bool) {
    let fd = mem.uffd.as_fd();
    let r = if wp_fault {
        uffd::write_protect(fd, addr, PAGE, false)
    } else {
        uffd::cont(fd, addr, PAGE, st == PState::Read)
    };
    if let Err(e) = r {
        // EEXIST: another fault mapped it already; the thread just retries.
        if e.raw_os_error() != Some(libc::EEXIST) {
            debug!("pid {}: resolve {addr:#x}: {e}", mem.kpid);
        }
        let _ = uffd::wake(fd, addr, PAGE);
    }
}
