//! The home of a segment: its metadata and page directory, and the
//! protocol that serialises the requests for each page (acquire, read,
//! invalidate, downgrade); then what a node does when its home asks.

use super::*;
use crate::agent::common::lock;

impl Dsm {
    pub async fn home_op(self: &Arc<Self>, op: HomeOp) -> Result<HomeReply, ErrorReply> {
        match op {
            HomeOp::Get {
                key,
                size,
                flags,
                cred,
                pid,
            } => self.home_get(key, size, flags, &cred, pid),
            HomeOp::Open {
                name,
                oflag,
                mode,
                size,
                init,
                cred,
                pid,
            } => self.home_open(name, oflag, mode, size, init, &cred, pid),
            HomeOp::Check { shmid, want, cred } => {
                let h = self.home(shmid)?;
                let m = lock(&h.meta);
                if !cred.allowed(&m.info, want) {
                    return Err(err(
                        libc::EACCES,
                        format!("object {shmid}: permission denied"),
                    ));
                }
                Ok(HomeReply::Info(m.info.clone()))
            }
            HomeOp::Resize { shmid, size, cred } => {
                let h = self.home(shmid)?;
                let mut m = lock(&h.meta);
                if m.info.name.is_empty() {
                    return Err(err(
                        libc::EINVAL,
                        format!("segment {shmid} is not a POSIX object"),
                    ));
                }
                if !cred.allowed(&m.info, 0o2) {
                    return Err(err(
                        libc::EACCES,
                        format!("object {shmid}: permission denied"),
                    ));
                }
                if size < m.info.size {
                    return Err(err(
                        libc::EINVAL,
                        format!("object {shmid}: shrinking a shared memory object ({} to {size} bytes) is not supported", m.info.size),
                    ));
                }
                if size > SHM_MAX {
                    return Err(err(libc::EFBIG, format!("object {shmid}: {size} bytes")));
                }
                m.info.size = size;
                m.info.ctime = now();
                Ok(HomeReply::Info(m.info.clone()))
            }
            HomeOp::Unlink { name, cred } => {
                let id = lock(&self.names)
                    .get(&name)
                    .copied()
                    .ok_or_else(|| err(libc::ENOENT, format!("no object named {name}")))?;
                let h = self.home(id)?;
                let gone = {
                    let mut m = lock(&h.meta);
                    // /dev/shm is sticky: only the owner (or root) unlinks.
                    if !cred.owns(&m.info) {
                        return Err(err(libc::EACCES, format!("{name}: not its owner")));
                    }
                    m.removed = true;
                    m.info.mode |= SHM_DEST;
                    m.info.ctime = now();
                    m.info.attached.is_empty()
                };
                lock(&self.names).remove(&name);
                if gone {
                    self.destroy(id);
                }
                Ok(HomeReply::Done)
            }
            HomeOp::Attach {
                shmid,
                rdonly,
                cred,
                pid,
                node,
            } => {
                let h = self.home(shmid)?;
                let mut m = lock(&h.meta);
                let want = if rdonly { 0o4 } else { 0o6 };
                if !cred.allowed(&m.info, want) {
                    return Err(err(
                        libc::EACCES,
                        format!("segment {shmid}: permission denied"),
                    ));
                }
                m.info.attached.push((pid, node));
                m.nodes.insert(node);
                m.info.atime = now();
                m.info.lpid = pid;
                Ok(HomeReply::Info(m.info.clone()))
            }
            HomeOp::Detach { shmid, pid, node } => {
                let h = self.home(shmid)?;
                let gone = {
                    let mut m = lock(&h.meta);
                    if let Some(i) = m.info.attached.iter().position(|x| *x == (pid, node)) {
                        m.info.attached.remove(i);
                    }
                    m.info.dtime = now();
                    m.info.lpid = pid;
                    m.removed && m.info.attached.is_empty()
                };
                if gone {
                    self.destroy(shmid);
                }
                Ok(HomeReply::Done)
            }
            HomeOp::Ctl {
                shmid,
                cmd,
                set,
                cred,
            } => self.home_ctl(shmid, cmd, set, &cred),
            HomeOp::AcquireRead { shmid, pages, node } => {
                if node > MAX_NODE || pages.len() > READ_AHEAD as usize {
                    return Err(err(
                        libc::EINVAL,
                        format!("read of {} pages by node {node}", pages.len()),
                    ));
                }
                Ok(HomeReply::Grants(
                    self.acquire_read(shmid, &pages, node).await?,
                ))
            }
            HomeOp::Acquire {
                shmid,
                page,
                node,
                write,
            } => {
                if node > MAX_NODE {
                    return Err(err(libc::EINVAL, format!("node {node}")));
                }
                Ok(HomeReply::Grant(
                    self.acquire(shmid, page, node, write).await?,
                ))
            }
            HomeOp::List => Ok(HomeReply::List(self.list())),
        }
    }

    pub(super) fn home_get(
        &self,
        key: i32,
        size: u64,
        flags: i32,
        cred: &Cred,
        pid: i32,
    ) -> Result<HomeReply, ErrorReply> {
        let mut keys = lock(&self.keys);
        if let Some(id) = keyed(&keys, key, flags, "segment")? {
            let h = self.home(id)?;
            let m = lock(&h.meta);
            if size > m.info.size {
                return Err(err(
                    libc::EINVAL,
                    format!(
                        "key {key:#x}: segment {id} is {} bytes, {size} asked",
                        m.info.size
                    ),
                ));
            }
            if !cred.allowed(&m.info, access_of(flags)) {
                return Err(err(
                    libc::EACCES,
                    format!("key {key:#x}: segment {id}: permission denied"),
                ));
            }
            return Ok(HomeReply::Id(id));
        }
        let id = self.create(key, String::new(), size, flags as u32 & 0o777, cred, pid)?;
        if key != libc::IPC_PRIVATE {
            keys.insert(key, id);
        }
        Ok(HomeReply::Id(id))
    }

    /// A named object (POSIX semaphore): open it, or create it with its
    /// first bytes (`init`) already in place, so that no other node can
    /// see it uninitialised.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn home_open(
        &self,
        name: String,
        oflag: i32,
        mode: u32,
        size: u64,
        init: Option<ByteBuf>,
        cred: &Cred,
        pid: i32,
    ) -> Result<HomeReply, ErrorReply> {
        let mut names = lock(&self.names);
        if let Some(&id) = names.get(&name) {
            if oflag & libc::O_CREAT != 0 && oflag & libc::O_EXCL != 0 {
                return Err(err(libc::EEXIST, format!("{name} exists")));
            }
            let h = self.home(id)?;
            if !cred.allowed(&lock(&h.meta).info, 0o6) {
                return Err(err(libc::EACCES, format!("{name}: permission denied")));
            }
            return Ok(HomeReply::Id(id));
        }
        if oflag & libc::O_CREAT == 0 {
            return Err(err(libc::ENOENT, format!("no object named {name}")));
        }
        let id = self.create(
            libc::IPC_PRIVATE,
            name.clone(),
            size,
            mode & 0o777,
            cred,
            pid,
        )?;
        if let Some(bytes) = init {
            let h = self.home(id)?;
            let seg = self.local_or_new(id, size)?;
            let mut page = vec![0u8; PAGE as usize];
            let n = bytes.len().min(page.len());
            page[..n].copy_from_slice(&bytes[..n]);
            seg.write_page(0, &page)?;
            let me = self.node.node_id();
            // Fresh objects: nobody else can hold these locks yet.
            let (sp, hp) = (seg.page(0)?, h.dir(id, 0)?);
            if let (Ok(mut p), Ok(mut d)) = (sp.try_lock_owned(), hp.try_lock_owned()) {
                d.ver = 1;
                d.writer = Some(me);
                d.holders = vec![(me, 1)];
                *p = LPage {
                    st: PState::Write,
                    ver: 1,
                };
            }
            lock(&h.meta).nodes.insert(me);
        }
        names.insert(name, id);
        Ok(HomeReply::Id(id))
    }

    /// A new segment homed here.
    pub(super) fn create(
        &self,
        key: i32,
        name: String,
        size: u64,
        mode: u32,
        cred: &Cred,
        pid: i32,
    ) -> Result<i32, ErrorReply> {
        // POSIX objects start empty (ftruncate sizes them).
        if (size == 0 && name.is_empty()) || size > SHM_MAX {
            return Err(err(libc::EINVAL, format!("segment size {size}")));
        }
        let me = self.node.node_id();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) & ((1 << SEQ_BITS) - 1);
        let id = ((me << SEQ_BITS) | seq) as i32;
        let t = now();
        let info = ShmInfo {
            shmid: id,
            key,
            name,
            home: me,
            size,
            uid: cred.uid,
            gid: cred.gid,
            cuid: cred.uid,
            cgid: cred.gid,
            mode,
            atime: 0,
            dtime: 0,
            ctime: t,
            cpid: pid,
            lpid: 0,
            attached: Vec::new(),
        };
        let h = Arc::new(Home {
            meta: Mutex::new(Meta {
                info,
                removed: false,
                nodes: BTreeSet::new(),
            }),
            pages: Mutex::new(HashMap::new()),
        });
        lock(&self.homes).insert(id, h);
        debug!("segment {id} (key {key:#x}, {size} bytes) created by pid {pid}");
        Ok(id)
    }

    pub(super) fn home_ctl(
        self: &Arc<Self>,
        shmid: i32,
        cmd: i32,
        set: Option<(u32, u32, u32)>,
        cred: &Cred,
    ) -> Result<HomeReply, ErrorReply> {
        let h = self.home(shmid)?;
        let mut m = lock(&h.meta);
        match cmd {
            libc::IPC_STAT => {
                if !cred.allowed(&m.info, 0o4) {
                    return Err(err(
                        libc::EACCES,
                        format!("segment {shmid}: permission denied"),
                    ));
                }
                Ok(HomeReply::Info(m.info.clone()))
            }
            libc::IPC_SET | libc::IPC_RMID => {
                if !cred.owns(&m.info) {
                    return Err(err(
                        libc::EPERM,
                        format!("segment {shmid}: not its owner or creator"),
                    ));
                }
                if cmd == libc::IPC_SET {
                    let (uid, gid, mode) = set.ok_or_else(|| err(libc::EINVAL, "IPC_SET"))?;
                    m.info.uid = uid;
                    m.info.gid = gid;
                    m.info.mode = (m.info.mode & !0o777) | (mode & 0o777);
                    m.info.ctime = now();
                    return Ok(HomeReply::Done);
                }
                if !m.removed {
                    m.removed = true;
                    m.info.mode |= SHM_DEST;
                    let mut keys = lock(&self.keys);
                    if keys.get(&m.info.key) == Some(&shmid) {
                        keys.remove(&m.info.key);
                    }
                    m.info.key = libc::IPC_PRIVATE;
                    m.info.ctime = now();
                }
                let gone = m.info.attached.is_empty();
                drop(m);
                if gone {
                    self.destroy(shmid);
                }
                Ok(HomeReply::Done)
            }
            _ => Err(err(libc::EINVAL, format!("shmctl command {cmd}"))),
        }
    }

    /// The last attachment of a removed segment went: free it everywhere.
    pub(super) fn destroy(self: &Arc<Self>, shmid: i32) {
        let Some(h) = lock(&self.homes).remove(&shmid) else {
            return;
        };
        let nodes: Vec<u32> = lock(&h.meta).nodes.iter().copied().collect();
        debug!("segment {shmid} destroyed");
        let a = self.clone();
        tokio::spawn(async move {
            for n in nodes {
                if let Err(e) = a.dsm_node(n, NodeOp::Drop { shmid }).await {
                    debug!("segment {shmid}: drop on node {n}: {}", e.msg);
                }
            }
        });
    }

    /// Give `node` a readable or writable copy of a page, invalidating the
    /// others for a write. One request per page at a time; the answer
    /// carries the page.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        shmid: i32,
        page: u32,
        node: u32,
        write: bool,
    ) -> Result<Grant, ErrorReply> {
        let h = self.home(shmid)?;
        let mut d = h.dir(shmid, page)?.lock_owned().await;
        // Nothing to do (another fault of the same node got it first).
        let noop = Grant {
            ver: 0,
            write,
            data: None,
        };
        let lost = |n: u32, e: ErrorReply| {
            err(
                libc::EIO,
                format!("segment {shmid} page {page}: node {n}: {}", e.msg),
            )
        };
        if d.lost {
            return Err(err(
                libc::EIO,
                format!("segment {shmid} page {page}: lost with the node that held it"),
            ));
        }
        if write {
            if d.writer == Some(node) {
                return Ok(noop);
            }
            let have = d.holds(node).is_some();
            let src = if have {
                None
            } else {
                d.writer.or_else(|| d.holders.first().map(|h| h.0))
            };
            let others: Vec<(u32, u64)> =
                d.holders.iter().copied().filter(|h| h.0 != node).collect();
            let calls = others.iter().map(|&(n, ver)| {
                self.dsm_node(
                    n,
                    NodeOp::Invalidate {
                        shmid,
                        page,
                        want: Some(n) == src,
                        ver,
                    },
                )
            });
            let mut data = None;
            let results = futures::future::join_all(calls).await;
            // Every other copy is gone (or its node is): from here the page
            // is `node`'s alone.
            d.holders.retain(|h| h.0 == node);
            d.writer = None;
            for ((n, _), r) in others.iter().zip(results) {
                match r {
                    Ok(r) if Some(*n) == src => data = r,
                    Ok(_) => {}
                    // A reader's copy dies with its node; the source's
                    // was the page.
                    Err(e) if Some(*n) == src => {
                        d.lost = true;
                        return Err(lost(*n, e));
                    }
                    Err(e) => warn!("segment {shmid} page {page}: node {n}: {}", e.msg),
                }
            }
            if src.is_some() && data.is_none() {
                return Err(err(
                    libc::EIO,
                    format!("segment {shmid} page {page}: no contents from its holder"),
                ));
            }
            d.ver += 1;
            d.writer = Some(node);
            d.holders = vec![(node, d.ver)];
            Ok(Grant {
                ver: d.ver,
                write: true,
                data,
            })
        } else {
            if d.holds(node).is_some() {
                return Ok(noop);
            }
            let data = if let Some(w) = d.writer {
                let ver = d.holds(w).unwrap_or(0);
                match self
                    .dsm_node(w, NodeOp::Downgrade { shmid, page, ver })
                    .await
                {
                    Ok(r) => {
                        d.writer = None;
                        r
                    }
                    Err(e) => {
                        d.lost = true;
                        return Err(lost(w, e));
                    }
                }
            } else if !d.holders.is_empty() {
                // Any reader's copy will do; readers on dead nodes drop out.
                let mut got = None;
                while let Some((n, ver)) = d.holders.first().copied() {
                    match self.dsm_node(n, NodeOp::Fetch { shmid, page, ver }).await {
                        Ok(r) => {
                            got = r;
                            break;
                        }
                        Err(e) => {
                            warn!("segment {shmid} page {page}: node {n}: {}", e.msg);
                            d.holders.remove(0);
                        }
                    }
                }
                if got.is_none() {
                    d.lost = true;
                    return Err(err(
                        libc::EIO,
                        format!("segment {shmid} page {page}: every copy is gone"),
                    ));
                }
                got
            } else {
                None
            };
            d.ver += 1;
            let ver = d.ver;
            d.holders.push((node, ver));
            Ok(Grant {
                ver,
                write: false,
                data,
            })
        }
    }

    /// A first write at the home to a page no node ever had: that page and
    /// the next ones in the same state (up to `FRESH_RUN`, while their
    /// entries are free) go to `node` for writing at once, as zeros. A
    /// program filling fresh memory (a new segment, shared anonymous
    /// memory) then takes one fault per run instead of one per page.
    /// Nothing else changes: another node that wants one of them later
    /// gets it from `node` as from any writer.
    pub(super) fn acquire_fresh(&self, shmid: i32, page: u32, node: u32) -> Vec<(u32, Grant)> {
        let Ok(h) = self.home(shmid) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for p in page..page.saturating_add(FRESH_RUN) {
            let Some(mut d) = h.dir(shmid, p).ok().and_then(|d| d.try_lock_owned().ok()) else {
                break;
            };
            if d.writer.is_some() || !d.holders.is_empty() || d.ver != 0 || d.lost {
                break;
            }
            d.ver = 1;
            d.writer = Some(node);
            d.holders = vec![(node, 1)];
            out.push((
                p,
                Grant {
                    ver: 1,
                    write: true,
                    data: None,
                },
            ));
        }
        out
    }

    /// Read copies of `pages` for a node reading ahead: those the home can
    /// give by asking their holders, one message per holder; pages that
    /// fail are left out (the reader will fault on them).
    pub(super) async fn acquire_read(
        self: &Arc<Self>,
        shmid: i32,
        pages: &[u32],
        node: u32,
    ) -> Result<Vec<(u32, Grant)>, ErrorReply> {
        let h = self.home(shmid)?;
        // Ascending order, as every multi-page lock here (no deadlock).
        let mut sorted = pages.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut dirs = Vec::with_capacity(sorted.len());
        for &p in &sorted {
            dirs.push((p, lock_now(h.dir(shmid, p)?).await));
        }
        // What to ask of whom.
        let mut asks: HashMap<u32, Vec<(u32, u64, bool)>> = HashMap::new();
        let mut zero = Vec::new();
        for (p, d) in dirs.iter() {
            if d.holds(node).is_some() || d.lost {
                continue;
            }
            if let Some(w) = d.writer {
                asks.entry(w)
                    .or_default()
                    .push((*p, d.holds(w).unwrap_or(0), true));
            } else if let Some((n, ver)) = d.holders.first().copied() {
                asks.entry(n).or_default().push((*p, ver, false));
            } else {
                zero.push(*p);
            }
        }
        let calls = asks.iter().map(|(&n, items)| async move {
            (n, self.dsm_read_many(n, shmid, items.clone()).await)
        });
        let mut got: HashMap<u32, ByteBuf> = HashMap::new();
        let mut failed: HashMap<u32, ErrorReply> = HashMap::new();
        for (n, r) in futures::future::join_all(calls).await {
            match r {
                Ok(v) => {
                    for ((p, _, _), d) in asks[&n].iter().zip(v) {
                        if let Some(d) = d {
                            got.insert(*p, d);
                        }
                    }
                }
                Err(e) => {
                    for (p, _, _) in &asks[&n] {
                        failed.insert(*p, e.clone());
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (p, d) in dirs.iter_mut() {
            if d.holds(node).is_some() {
                continue;
            }
            let data = if let Some(b) = got.remove(p) {
                Some(b)
            } else if zero.contains(p) {
                None
            } else {
                if let Some(e) = failed.remove(p) {
                    // As for a single read: the writer's copy was the page.
                    if d.writer.is_some() {
                        d.lost = true;
                    }
                    debug!("segment {shmid} page {p}: read ahead: {}", e.msg);
                }
                continue;
            };
            d.writer = None;
            d.ver += 1;
            let ver = d.ver;
            d.holders.push((node, ver));
            out.push((
                *p,
                Grant {
                    ver,
                    write: false,
                    data,
                },
            ));
        }
        Ok(out)
    }

    pub(super) async fn dsm_read_many(
        self: &Arc<Self>,
        node: u32,
        shmid: i32,
        items: Vec<(u32, u64, bool)>,
    ) -> Result<Vec<Option<ByteBuf>>, ErrorReply> {
        if node == self.node.node_id() {
            return self.read_many(shmid, items).await;
        }
        match self.link_call(node, Req::ReadMany(shmid, items)).await? {
            Resp::Many(r) => r,
            other => Err(unexpected(node, &other)),
        }
    }

    /// `ReadMany` here: read copies of pages for another node.
    pub async fn read_many(
        self: &Arc<Self>,
        shmid: i32,
        items: Vec<(u32, u64, bool)>,
    ) -> Result<Vec<Option<ByteBuf>>, ErrorReply> {
        let seg = self.local(shmid)?;
        let mut locked = Vec::with_capacity(items.len());
        for &(page, ver, downgrade) in &items {
            locked.push((page, downgrade, seg.page_at(page, ver).await?));
        }
        let down: Vec<u32> = locked
            .iter()
            .filter(|(_, d, p)| *d && p.st == PState::Write)
            .map(|x| x.0)
            .collect();
        seg.protect_runs(&down);
        for (_, d, p) in locked.iter_mut() {
            if *d && p.st == PState::Write {
                p.st = PState::Read;
            }
        }
        // One pread per run of consecutive valid pages.
        let mut out: Vec<Option<ByteBuf>> = vec![None; locked.len()];
        let mut i = 0;
        while i < locked.len() {
            if locked[i].2.st == PState::Invalid {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < locked.len()
                && locked[j].2.st != PState::Invalid
                && locked[j].0 == locked[j - 1].0 + 1
            {
                j += 1;
            }
            let first = locked[i].0;
            let n = j - i;
            let mut buf = vec![0u8; n * PAGE as usize];
            let bytes = (0..n).map(|k| seg.in_page(first + k as u32)).sum::<usize>();
            seg.mem
                .read_exact_at(&mut buf[..bytes], first as u64 * PAGE)
                .map_err(|e| io_err(format!("pages {first}+{n}: read"), e))?;
            for (k, chunk) in buf.chunks(PAGE as usize).enumerate() {
                out[i + k] = Some(ByteBuf::from(chunk.to_vec()));
            }
            i = j;
        }
        Ok(out)
    }

    // -- a node holding pages -----------------------------------------------

    pub async fn node_op(self: &Arc<Self>, op: NodeOp) -> Result<Option<ByteBuf>, ErrorReply> {
        match op {
            NodeOp::Invalidate {
                shmid,
                page,
                want,
                ver,
            } => {
                let seg = self.local(shmid)?;
                let mut p = seg.page_at(page, ver).await?;
                if p.st == PState::Write {
                    seg.protect_all(page);
                }
                let data = if want {
                    Some(seg.read_page(page)?)
                } else {
                    None
                };
                seg.punch(page)?;
                // Waiters of this node went to sleep on the value the page
                // had; the writer to come is elsewhere. Wake them *after*
                // the punch, so that one that checks again faults and waits
                // for the new value instead of sleeping on the old one.
                // Naming the futex faults a zero page into the memfd:
                // punch again.
                if seg.wake_futexes(page) {
                    seg.punch(page)?;
                }
                p.st = PState::Invalid;
                Ok(data)
            }
            NodeOp::Downgrade { shmid, page, ver } => {
                let seg = self.local(shmid)?;
                let mut p = seg.page_at(page, ver).await?;
                if p.st == PState::Write {
                    seg.protect_all(page);
                    p.st = PState::Read;
                }
                Ok(Some(seg.read_page(page)?))
            }
            NodeOp::Fetch { shmid, page, ver } => {
                let seg = self.local(shmid)?;
                let p = seg.page_at(page, ver).await?;
                if p.st == PState::Invalid {
                    return Err(err(
                        libc::EIO,
                        format!("segment {shmid} page {page}: no valid copy here"),
                    ));
                }
                Ok(Some(seg.read_page(page)?))
            }
            NodeOp::Drop { shmid } => {
                lock(&self.locals).remove(&shmid);
                Ok(None)
            }
        }
    }
}
