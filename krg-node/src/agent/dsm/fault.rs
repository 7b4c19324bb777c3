//! The fault thread: the userfaultfds of the processes with segments
//! attached, and what a fault asks of a segment's home.

use super::*;
use crate::agent::common::lock;

impl Dsm {
    /// Have the fault thread serve a process's page faults.
    pub(super) fn serve_faults(self: &Arc<Self>, mem: &ProcMem) -> Result<(), ErrorReply> {
        let ep = self.fault_thread()?;
        ep.add(
            mem.uffd.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, mem.kpid as u32 as u64),
        )
        .map_err(|e| io_err(format!("pid {}: userfaultfd", mem.kpid), e.into()))
    }

    /// A process's userfaultfd is no longer served.
    pub(super) fn unwatch(&self, mem: &ProcMem) {
        if let Some(ep) = lock(&self.faults).as_ref() {
            let _ = ep.delete(mem.uffd.as_fd());
        }
    }

    /// The fault thread's epoll set (the thread is started with it).
    pub(super) fn fault_thread(self: &Arc<Self>) -> Result<Arc<Epoll>, ErrorReply> {
        let mut g = lock(&self.faults);
        if let Some(ep) = g.as_ref() {
            return Ok(ep.clone());
        }
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| io_err("epoll for the fault thread".into(), e.into()))?;
        let ep = Arc::new(ep);
        let (a, e, rt) = (self.clone(), ep.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name("krg-dsm-faults".into())
            .spawn(move || a.fault_loop(&rt, &e))
            .map_err(|e| io_err("the fault thread".into(), e))?;
        *g = Some(ep.clone());
        Ok(ep)
    }

    /// The fault thread: every local process's page faults, one at a time,
    /// outside tokio. After each it polls for the next for a while instead
    /// of sleeping (see `link::SPIN_IDLE`), and it waits for a home's
    /// answer the same way: a fault then costs the application's wake-up
    /// and the network, not three more wake-ups of idle vCPUs.
    pub(super) fn fault_loop(self: Arc<Self>, rt: &tokio::runtime::Handle, ep: &Epoll) {
        let _rt = rt.enter();
        let mut links: HashMap<u32, FaultLink> = HashMap::new();
        let mut evs = [EpollEvent::empty(); 16];
        let mut buf = [0u8; uffd::MSG_SIZE * 16];
        let mut pace = Pace::default();
        loop {
            let spin = pace.spinning();
            let timeout = if spin {
                EpollTimeout::ZERO
            } else {
                EpollTimeout::NONE
            };
            let n = match ep.wait(&mut evs, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("the fault thread stops: epoll: {e}");
                    return;
                }
            };
            if n == 0 {
                std::thread::yield_now();
                continue;
            }
            for ev in &evs[..n] {
                let kpid = ev.data() as u32 as i32;
                let Some(mem) = lock(&self.mems).get(&kpid).cloned() else {
                    continue;
                };
                loop {
                    // Whole uffd_msg records.
                    let n = match nix::unistd::read(mem.uffd.as_raw_fd(), &mut buf) {
                        Ok(n) if n > 0 => n,
                        // EAGAIN: all read; anything else: the process is
                        // going (its exit unwatches it).
                        _ => break,
                    };
                    for f in uffd::faults(&buf[..n]) {
                        if self.fault(rt, &mut links, &mem, f, spin) {
                            pace.note();
                        }
                    }
                }
            }
        }
    }

    /// A home's answer to `op`, through this thread's fault connection to
    /// it (made at the first call, dropped at an error).
    pub(super) fn fault_call(
        &self,
        rt: &tokio::runtime::Handle,
        links: &mut HashMap<u32, FaultLink>,
        home: u32,
        op: HomeOp,
        poll: bool,
    ) -> Result<HomeReply, ErrorReply> {
        if !self.node.is_up(home) {
            return Err(err(
                libc::EIO,
                format!("the home node {home} of the segment is down"),
            ));
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = links.entry(home) {
            let addr = self.node.addr_of(home)?;
            let l = rt
                .block_on(FaultLink::connect(
                    addr,
                    &self.node.cfg.key,
                    self.node.cfg.node_id,
                    home,
                ))
                .map_err(|e| err(libc::EHOSTUNREACH, format!("node {home} at {addr}: {e}")))?;
            slot.insert(l);
        }
        let link = links.get_mut(&home).expect("inserted above");
        match link.call(home, &Req::Home(op), poll) {
            Ok(Resp::Home(r)) => r,
            Ok(other) => Err(err(libc::EIO, format!("node {home}: unexpected {other:?}"))),
            Err(e) => {
                links.remove(&home);
                Err(e)
            }
        }
    }

    /// Serve one fault; whether it asked the home (faults served from
    /// pages already here, as a sequential read's, start no polling: the
    /// read-ahead that brought them needs the CPU).
    pub(super) fn fault(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        links: &mut HashMap<u32, FaultLink>,
        mem: &Arc<ProcMem>,
        f: uffd::Fault,
        poll: bool,
    ) -> bool {
        let addr = f.addr & !(PAGE - 1);
        let Some((shmid, seg, base)) = self.find(mem.kpid, addr) else {
            debug!("pid {}: fault at {addr:#x} outside its segments", mem.kpid);
            let _ = uffd::wake(mem.uffd.as_fd(), addr, PAGE);
            return false;
        };
        let page = (addr.wrapping_sub(base) / PAGE) as u32;
        if page as usize >= seg.npages() {
            let _ = uffd::wake(mem.uffd.as_fd(), addr, PAGE);
            return false;
        }
        let write = f.flags & uffd::FLAG_WRITE != 0;
        let wp = f.flags & uffd::FLAG_WP != 0;
        let mut asked = false;
        loop {
            // Made before the check: a grant applied meanwhile wakes it.
            let applied = seg.applied.notified();
            {
                let Ok(m) = seg.page(page) else {
                    let _ = uffd::wake(mem.uffd.as_fd(), addr, PAGE);
                    return asked;
                };
                let p = rt.block_on(m.lock_owned());
                if p.st == PState::Write || (p.st == PState::Read && !write) {
                    resolve(mem, addr, p.st, wp);
                    drop(p);
                    if !write {
                        self.read_ahead(&seg, shmid, mem, base, page);
                    }
                    return asked;
                }
            }
            let op = HomeOp::Acquire {
                shmid,
                page,
                node: self.node.node_id(),
                write,
            };
            let home = home_of(shmid);
            if write && home == self.node.node_id() {
                let gs = self.acquire_fresh(shmid, page, self.node.node_id());
                if !gs.is_empty() {
                    rt.block_on(seg.apply_mapped(gs, mem, base, None));
                    asked = true;
                    continue;
                }
            }
            let got = if home == self.node.node_id() {
                rt.block_on(self.home_op(op))
            } else {
                self.fault_call(rt, links, home, op, poll)
            };
            asked = true;
            let r = match got {
                // The home counts this node a holder already: a read-ahead
                // window with the page is on its way. Wait for it rather
                // than ask again at once.
                Ok(HomeReply::Grant(g)) if g.ver == 0 => {
                    rt.block_on(async {
                        let _ = tokio::time::timeout(WAIT_IN_FLIGHT, applied).await;
                    });
                    Ok(())
                }
                Ok(HomeReply::Grant(g)) => rt.block_on(seg.apply(page, g)),
                Ok(r) => Err(err(libc::EIO, format!("acquire: unexpected {r:?}"))),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                // The page cannot be had (its only copy was on a node that
                // is gone, or the home is): the access fails loudly.
                warn!(
                    "pid {}: segment {shmid} page {page}: {}; sending SIGBUS",
                    mem.kpid, e.msg
                );
                if let Ok(p) = pidfd_open(mem.kpid) {
                    let _ = sys::pidfd_send_signal(p.as_fd(), libc::SIGBUS);
                }
                let _ = uffd::wake(mem.uffd.as_fd(), addr, PAGE);
                return asked;
            }
        }
    }

    /// Sequential reads: fetch the next window of pages in the background
    /// (one message per holder) and map them into the reader, so that it
    /// finds them in place instead of faulting on each.
    pub(super) fn read_ahead(
        self: &Arc<Self>,
        seg: &Arc<LocalSeg>,
        shmid: i32,
        mem: &Arc<ProcMem>,
        base: u64,
        page: u32,
    ) {
        let Some(pages) = seg.next_window(page) else {
            return;
        };
        if pages.is_empty() {
            return;
        }
        let (a, seg, mem) = (self.clone(), seg.clone(), mem.clone());
        tokio::spawn(async move {
            let op = HomeOp::AcquireRead {
                shmid,
                pages,
                node: a.node.node_id(),
            };
            if let Ok(HomeReply::Grants(gs)) = a.dsm_home(home_of(shmid), op).await {
                // The middle page stays unmapped: the reader's (cheap,
                // local) fault there asks for the next window in time.
                let marker = gs.get(gs.len() / 2).map(|g| g.0);
                seg.apply_mapped(gs, &mem, base, marker).await;
            }
        });
    }
}
