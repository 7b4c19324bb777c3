//! Descriptor kinds: what a process's fds become in an image, how they
//! move and how they are made again. One file per kind, each implementing
//! [`Kind`], all registered in one list (`kinds!`): the capture asks them
//! in its order ([`KINDS`]), and an image entry reaches its kind by its
//! variant ([`of`]). The capture, the migration and the restore ask the
//! kinds, so that adding a kind of descriptor is one variant of
//! [`FdKind`], one file and one row here.
//!
//! The image format stays one enum ([`FdKind`], in `image.rs`) because the
//! image is one rkyv archive validated as a whole; each kind's file is the
//! only code that looks inside its own variant.

#![deny(unsafe_code)]

mod device;
mod dgram;
mod epoll;
mod eventfd;
mod fifo;
mod file;
mod parked;
mod pipe;
mod relay;
mod signalfd;
mod tcp;
mod tcp_listen;
mod timerfd;
mod unix_listen;
mod unix_pair;
mod unix_stream;

pub use parked::entry as parked_entry;
pub use tcp::{connection, is_pipe as is_moved_pipe};

use super::image::{FdKind, FdState, Meta};
use crate::error::{Error, ResultExt};
use crate::sys::fd as sysfd;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};

/// Every kind, in the order the capture asks them about an fd (the first
/// that recognises it describes it), with the image variant it makes
/// again: one list for both [`KINDS`] and [`of`].
macro_rules! kinds {
    ($($variant:ident => $kind:path,)*) => {
        /// Every kind, in the order the capture asks them.
        static KINDS: &[&dyn Kind] = &[$(&$kind),*];

        /// The kind of image entry `k`: the one place where a variant
        /// meets the code of its kind (each kind's methods may take their
        /// own variant's fields for granted).
        pub fn of(k: &FdKind) -> &'static dyn Kind {
            match k {
                $(FdKind::$variant { .. } => &$kind,)*
            }
        }
    };
}

kinds! {
    File => file::File,
    Device => device::Device,
    Pipe => pipe::Pipe,
    Fifo => fifo::Fifo,
    UnixListen => unix_listen::UnixListen,
    TcpListen => tcp_listen::TcpListen,
    Dgram => dgram::Dgram,
    UnixStream => unix_stream::UnixStream,
    Tcp => tcp::Tcp,
    Relay => relay::Relay,
    EventFd => eventfd::EventFd,
    TimerFd => timerfd::TimerFd,
    SignalFd => signalfd::SignalFd,
    Epoll => epoll::Epoll,
    // Made by the passes below, never recognised as such.
    UnixPair => unix_pair::UnixPair,
    Parked => parked::Parked,
}

/// What an image is for: some kinds are treated differently by a
/// migration (the shadow stays behind and relays) and a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Migration,
    Checkpoint,
}

/// What the capture knows of an fd before asking the kinds.
pub struct Probe {
    pub fd: RawFd,
    /// Its `/proc/self/fd` link.
    pub link: Vec<u8>,
    pub link_s: String,
    /// `F_GETFL` flags.
    pub flags: i32,
    pub st: libc::stat,
}

impl Probe {
    /// The file type bits of its mode.
    pub fn ty(&self) -> libc::mode_t {
        self.st.st_mode & libc::S_IFMT
    }

    /// Whether it is an anonymous inode of kind `name` (`eventfd`, ...).
    fn anon(&self, name: &str) -> bool {
        self.link_s
            .strip_prefix("anon_inode:[")
            .and_then(|s| s.strip_suffix(']'))
            == Some(name)
    }

    /// Field `name` of its fdinfo, hexadecimal (`sigmask:`, ...).
    fn fdinfo_hex(&self, name: &str) -> Option<u64> {
        status_field(&fdinfo(self.fd), name).and_then(|v| u64::from_str_radix(v, 16).ok())
    }
}

/// Why an fd could be shared with another process ([`refuse_shared`] asks
/// the agent whether it is).
pub enum Sharing {
    /// A link (`pipe:[N]`) both of whose ends are the process's.
    Link(String),
    /// A UNIX stream socket (its inode): shared if its peer is the
    /// process's too.
    Socket(u64),
    /// A regular file reopened on the target (its fd and path).
    File(i32, String),
}

/// The stream an fd belongs to, for the freeze of a migration: the agents
/// find the peer by TCP ends, by pipe or FIFO link, or by UNIX socket inode.
pub enum Stream {
    /// A TCP connection: its (local, remote) ends and its socket inode
    /// (copies of one connection share the inode).
    Tcp((String, String), Option<u64>),
    Pipe(String),
    Unix(u64),
}

/// How a stream's new connection behaves, from the fd it replaces.
#[derive(Debug, Clone, Copy)]
pub struct ConnOpts {
    pub opts: crate::streams::moving::Opts,
    /// A seqpacket socket's new end is one too.
    pub seqpacket: bool,
}

impl ConnOpts {
    /// What a pipe or FIFO end becomes: a connection that sends at once,
    /// as pipes do.
    fn pipe(flags: i32) -> Self {
        ConnOpts::at_once(flags, true, false, false)
    }

    /// A connection that sends at once (`TCP_NODELAY`) without keepalive,
    /// as pipes and UNIX sockets do; it stands for a pipe (`pipe`) or a
    /// UNIX socket passing credentials (`passcred`, `seqpacket`).
    fn at_once(flags: i32, pipe: bool, passcred: bool, seqpacket: bool) -> Self {
        ConnOpts {
            opts: crate::streams::moving::Opts {
                flags,
                nodelay: true,
                keepalive: false,
                pipe,
                passcred,
            },
            seqpacket,
        }
    }
}

/// What the freeze of a migration found at the other end of a stream.
pub struct HandOver<'a> {
    /// Connections the agent keeps and relays (nobody drains the other end).
    pub kept: &'a [u64],
    /// Connections whose other end was a shadow's relay.
    pub relayed: &'a [u64],
}

/// One kind of descriptor. Every method but `restore` has a default
/// meaning "nothing to do for this kind".
pub trait Kind: Sync {
    /// Capture: the image entry of the fd `p` if it is of this kind,
    /// `Some(Err)` if it is but cannot be captured.
    fn describe(&self, _p: &Probe) -> Option<Result<FdKind, Error>> {
        None
    }

    /// Once every fd is described: what needs the whole set (self-pipes,
    /// socketpairs both of whose ends are here, ...).
    fn settle(&self, _fds: &mut [FdState], _why: Purpose) -> Result<(), Error> {
        Ok(())
    }

    /// As fd 0, 1 or 2, whether it is relayed (the shadow's, after a
    /// migration; the restarting command's, after a checkpoint) rather
    /// than taken into the image.
    fn relayed_as_stdio(&self, why: Purpose) -> bool {
        why == Purpose::Migration
    }

    /// Why another process might share it with this one.
    fn sharing(&self, _f: &FdState, _fds: &[FdState], _moving: bool) -> Option<Sharing> {
        None
    }

    /// A checkpoint: whether it leads out of the process (parked for the
    /// restart with `--kill`, refused without), and as what.
    fn leads_out(&self, _f: &FdState, _fds: &[FdState]) -> Option<String> {
        None
    }

    /// A migration: the stream it belongs to, whose peer is frozen and
    /// drained.
    fn stream(&self, _f: &FdState, _fds: &[FdState]) -> Option<Result<Stream, Error>> {
        None
    }

    /// What its stream's new connection keeps of it.
    fn conn_opts(&self, _k: &FdKind) -> Option<ConnOpts> {
        None
    }

    /// Its stream has nobody at the other end: `Some(Ok)` if it moves
    /// anyway (made again as it is), `None` if it cannot.
    fn no_peer(&self, _f: &mut FdState) -> Option<Result<(), Error>> {
        None
    }

    /// Every peer is frozen: take what is in flight for the process.
    fn hand_over(&self, _f: &mut FdState, _h: &HandOver) -> Result<(), Error> {
        Ok(())
    }

    /// Once the streams are taken: close what must be free on the target
    /// (a listening port) while keeping its number taken.
    fn vacate(&self, _f: &FdState) -> Result<(), Error> {
        Ok(())
    }

    /// The migration failed: put it back as it was.
    fn take_back(&self, _f: &FdState) {}

    /// The migration succeeded: whether the shadow closes it (it moved;
    /// the rest the shadow keeps or relays).
    fn moved_away(&self) -> bool {
        false
    }

    /// The migration succeeded to `node` (once per kind, not per fd).
    fn moved_to(&self, _node: u32) {}

    /// Restore: the fd made again (`None`: keep what is under its number,
    /// the restarting command's).
    fn restore(&self, f: &FdState, cx: &mut Restoring) -> Result<Option<RawFd>, Error>;

    /// Restore, once every fd is under its number.
    fn finish(&self, _f: &FdState) -> Result<(), Error> {
        Ok(())
    }
}

/// Whether `k` is a relayed standard fd.
pub fn is_relay(k: &FdKind) -> bool {
    matches!(k, FdKind::Relay)
}

pub(super) fn fstat(fd: RawFd) -> Option<libc::stat> {
    sysfd::fstat(fd).ok()
}

fn fdinfo(fd: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default()
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .map(|l| l[name.len()..].trim())
}

/// Capture the fds of the process, except `skip`.
pub fn capture(skip: &[RawFd]) -> Result<Vec<FdState>, Error> {
    let mut out = Vec::new();
    for fd in crate::dirs::open_fds()? {
        if skip.contains(&fd) {
            continue;
        }
        if let Some(s) = capture_one(fd)? {
            out.push(s);
        }
    }
    Ok(out)
}

fn capture_one(fd: i32) -> Result<Option<FdState>, Error> {
    // The fd that listed the directory is gone already: skip what vanished.
    let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
        return Ok(None);
    };
    let link = link.into_os_string().into_encoded_bytes();
    let link_s = String::from_utf8_lossy(&link).into_owned();
    if let Some(why) = refusal(fd, &link_s) {
        return Err(Error::refused(why));
    }
    let (Ok(fdflags), Ok(flags)) = (sysfd::fd_flags(fd), sysfd::status_flags(fd)) else {
        return Ok(None);
    };
    let st = fstat(fd).ok_or_else(|| Error::last_os("fstat").fd(fd))?;
    let p = Probe {
        fd,
        link,
        link_s,
        flags,
        st,
    };
    let kind = KINDS
        .iter()
        .find_map(|k| k.describe(&p))
        .unwrap_or_else(|| Err(not_movable(&p)))?;
    Ok(Some(FdState {
        fd,
        cloexec: fdflags & libc::FD_CLOEXEC != 0,
        kind,
    }))
}

/// Why no kind took `p`, by what it is.
fn not_movable(p: &Probe) -> Error {
    let link = &p.link_s;
    let why = match p.ty() {
        libc::S_IFCHR => format!("device {link} is not migratable"),
        libc::S_IFIFO => format!("FIFO {link} opened for reading and writing is not migratable (pipes are, and FIFOs opened one way; both ways only as stdin, stdout or stderr)"),
        libc::S_IFSOCK => format!("{link} is not migratable (TCP connections, connected UNIX stream and seqpacket sockets and datagram senders move, and stdin, stdout and stderr)"),
        _ => format!("{link} is not migratable"),
    };
    Error::refused(why).fd(p.fd)
}

/// Every kind's [`Kind::settle`], in table order.
pub fn settle(fds: &mut [FdState], why: Purpose) -> Result<(), Error> {
    KINDS.iter().try_for_each(|k| k.settle(fds, why))
}

/// Fds 0-2 that are relayed instead of taken become `Relay` entries.
pub fn relay_stdio(fds: &mut [FdState], why: Purpose) {
    for f in fds.iter_mut().filter(|f| f.fd <= 2) {
        if of(&f.kind).relayed_as_stdio(why) {
            f.kind = FdKind::Relay;
        }
    }
}

/// A two-ended object of the restore: its kind's name and its key there
/// (keys of different kinds may be equal: pipe and socket inodes).
pub type MadeKey = (&'static str, u64);

/// What the restore keeps while it makes the fds again.
pub struct Restoring<'a> {
    pub meta: &'a Meta,
    /// The restorer's own fds are above this; new fds go there too until
    /// they are put under their numbers.
    pub floor: RawFd,
    /// (temporary fd, image fd, close-on-exec) of each fd made so far.
    pub placed: Vec<(RawFd, RawFd, bool)>,
    /// Two-ended objects made once for several fds (a pipe, a socketpair),
    /// by (kind, key): their two ends.
    made: Vec<(MadeKey, (OwnedFd, OwnedFd))>,
}

impl Restoring<'_> {
    /// For the image's fd `f` (status flags `flags`): a copy of the
    /// `first` or second end of the two ends made for `key` by `make`
    /// (from the image, above the floor) the first time, found after.
    pub fn copy_of_end(
        &mut self,
        f: &FdState,
        key: MadeKey,
        first: bool,
        flags: i32,
        make: impl FnOnce(&Meta, RawFd) -> Result<(OwnedFd, OwnedFd), Error>,
    ) -> Result<RawFd, Error> {
        let i = match self.made.iter().position(|m| m.0 == key) {
            Some(i) => i,
            None => {
                let ends = make(self.meta, self.floor).fd(f.fd)?;
                self.made.push((key, ends));
                self.made.len() - 1
            }
        };
        let ends = &self.made[i].1;
        copy_end(if first { &ends.0 } else { &ends.1 }, flags, f.fd)
    }
}

/// Move an fd to a number at or above `floor` (close-on-exec).
pub(super) fn high(fd: RawFd, floor: RawFd) -> Result<RawFd, Error> {
    let h =
        sysfd::dup_above(fd, floor).map_err(|e| Error::io("moving an fd out of the way", &e))?;
    // fd is ours and replaced by h.
    let _ = sysfd::close(fd);
    Ok(h.into_raw_fd())
}

/// Two new ends above `floor`, owned.
fn high_pair(a: OwnedFd, b: OwnedFd, floor: RawFd) -> Result<(OwnedFd, OwnedFd), Error> {
    let (a, b) = (high(a.into_raw_fd(), floor)?, high(b.into_raw_fd(), floor)?);
    // Just moved, ours alone.
    Ok((sysfd::adopt(a), sysfd::adopt(b)))
}

/// A copy of a made-again pipe end or socket for the image's fd `fd`,
/// with its `O_NONBLOCK` status flag.
fn copy_end(end: &OwnedFd, flags: i32, fd: RawFd) -> Result<RawFd, Error> {
    let copy = sysfd::dup(end.as_raw_fd())
        .map_err(|e| Error::io("dup", &e).fd(fd))?
        .into_raw_fd();
    // The status flags are the shared open file's.
    let _ = sysfd::set_status_flags(copy, flags & libc::O_NONBLOCK);
    Ok(copy)
}

pub(super) fn open_path(path: &[u8], flags: i32) -> Result<RawFd, Error> {
    let c = std::ffi::CString::new(path.to_vec())
        .map_err(|_| Error::errno(libc::EINVAL, "path with a NUL byte"))?;
    let fd = sysfd::open(&c, flags, 0).map_err(|e| Error::io(String::from_utf8_lossy(path), &e))?;
    Ok(fd.into_raw_fd())
}

/// Reopen the image's fds under their numbers. Fds 0-2 marked `Relay`
/// keep what the agent gave this process (the restarting command's
/// streams). `keep` are the restorer's own fds (already above `floor`).
pub fn restore(meta: &Meta, floor: RawFd, keep: &[RawFd]) -> Result<(), Error> {
    let mut cx = Restoring {
        meta,
        floor,
        placed: Vec::new(),
        made: Vec::new(),
    };
    for f in &meta.fds {
        if let Some(tmp) = of(&f.kind).restore(f, &mut cx)? {
            let tmp = high(tmp, floor)?;
            cx.placed.push((tmp, f.fd, f.cloexec));
        }
    }
    for (tmp, target, cloexec) in &cx.placed {
        let fl = if *cloexec { libc::O_CLOEXEC } else { 0 };
        // Under the image's number (closing whatever the agent had there).
        sysfd::dup3(*tmp, *target, fl).map_err(|e| Error::from(e).fd(*target))?;
        // The temporary is ours.
        let _ = sysfd::close(*tmp);
    }
    for f in &meta.fds {
        of(&f.kind).finish(f)?;
    }
    // The pipes' and socketpairs' own ends (the placed copies stay).
    drop(cx);
    // Whatever else is open and not in the image goes (fds 0-2 the image
    // did not have included).
    for fd in crate::dirs::open_fds()? {
        if !meta.fds.iter().any(|f| f.fd == fd) && !keep.contains(&fd) {
            // An fd the image does not have.
            let _ = sysfd::close(fd);
        }
    }
    Ok(())
}

/// Close what listening socket `f.fd` holds but keep the number taken (by
/// `/dev/null`), so that nothing the capture opens lands there before a
/// rollback.
fn vacate_listener(f: &FdState) -> Result<(), Error> {
    let fd = f.fd;
    sysfd::open(c"/dev/null", libc::O_RDONLY | libc::O_CLOEXEC, 0)
        .map(IntoRawFd::into_raw_fd)
        .and_then(|n| {
            sysfd::dup3(n, fd, libc::O_CLOEXEC)?;
            sysfd::close(n)
        })
        .map_err(|e| Error::from(e).fd(fd))
}

/// Restore of listening socket `f`: `l`, read from its image entry, made
/// again by `relisten`.
fn relistened<L>(
    f: &FdState,
    l: Option<L>,
    relisten: impl FnOnce(&L) -> Result<OwnedFd, Error>,
) -> Result<Option<RawFd>, Error> {
    let l = l.ok_or_else(|| Error::other("bad listening socket").fd(f.fd))?;
    Ok(Some(relisten(&l).fd(f.fd)?.into_raw_fd()))
}

/// A failed migration: listening socket `f` made again here by `listen`,
/// if the move closed it.
fn listen_again_here(f: &FdState, listen: impl FnOnce() -> Result<OwnedFd, Error>) {
    let vacated = std::fs::read_link(format!("/proc/self/fd/{}", f.fd))
        .is_ok_and(|p| p.as_os_str() == "/dev/null");
    if !vacated {
        return;
    }
    let r = listen().and_then(|s| {
        let fl = if f.cloexec { libc::O_CLOEXEC } else { 0 };
        // Our new socket under the old number.
        sysfd::dup3(s.as_raw_fd(), f.fd, fl).map_err(|e| Error::io("dup3", &e))
    });
    if let Err(e) = r {
        crate::krg_log!(
            crate::log::Level::Warn,
            "fd {}: listening again after a failed migration: {e}",
            f.fd
        );
    }
}

/// A migration succeeded to `node`: every kind's [`Kind::moved_to`].
pub fn moved_to(node: u32) {
    KINDS.iter().for_each(|k| k.moved_to(node));
}

/// Why an fd can never be captured, from its `/proc/<pid>/fd` link and
/// number: `None` if it may be (the agent asks this before it disturbs the
/// process; the capture asks again from inside).
pub fn refusal(fd: i32, link: &str) -> Option<String> {
    if let Some(kind) = link.strip_prefix("anon_inode:") {
        let kind = kind.trim_matches(|c| c == '[' || c == ']');
        return match kind {
            "eventfd" | "timerfd" | "signalfd" | "eventpoll" => None,
            "io_uring" => Some(format!("fd {fd}: io_uring is not migratable")),
            other => Some(format!("fd {fd}: {other} is not migratable")),
        };
    }
    if link.ends_with(" (deleted)") {
        return Some(format!("fd {fd}: {link} is not migratable (deleted file)"));
    }
    if link.starts_with("/dev/pts/") || link.starts_with("/dev/tty") || link == "/dev/console" {
        return (fd > 2).then(|| format!("fd {fd}: terminal {link} is not migratable"));
    }
    None
}

/// Memory and streams the image would turn into the process's own: shared
/// memory mappings that are copied (anonymous `MAP_SHARED` memory without
/// the `dsm-anon` capability, System V segments and memfds that are not
/// cluster segments), pipes and socketpairs both of whose ends are its
/// fds. That is exact only if no other process shares them: a server
/// whose children watch a pipe it holds both ends of (PostgreSQL's
/// postmaster death watch) and share its anonymous memory would be cut
/// off from them. Refused, naming what is shared and with whom.
///
/// When `moving` (a migration), also the regular files above the standard
/// fds, which the target opens again: one open file description held by
/// another process too (`exec 3>f; cmd >&3`: a shell and its children)
/// shares its offset with it, which a file opened again on another node
/// cannot do (their writes would overwrite each other). Refused until the
/// sharer is gone. (Fds 0-2 stay with the shadow, which keeps sharing.)
pub(super) fn refuse_shared(
    maps: &[super::capture::MapLine],
    fds: &[FdState],
    moving: bool,
) -> Result<(), Error> {
    let mut mems: Vec<(u64, u64)> = Vec::new();
    for m in maps.iter().filter(|m| copied_shared(m)) {
        if !mems.contains(&(m.dev, m.inode)) {
            mems.push((m.dev, m.inode));
        }
    }
    let mut links: Vec<String> = Vec::new();
    let mut socks: Vec<u64> = Vec::new();
    let mut files: Vec<(i32, String)> = Vec::new();
    for f in fds {
        match of(&f.kind).sharing(f, fds, moving) {
            Some(Sharing::Link(l)) if !links.contains(&l) => links.push(l),
            Some(Sharing::Socket(ino)) => socks.push(ino),
            Some(Sharing::File(fd, path)) => files.push((fd, path)),
            _ => {}
        }
    }
    if socks.len() >= 2 {
        let peers =
            crate::streams::unix::peers().map_err(|e| Error::io("UNIX socket peers", &e))?;
        for ino in &socks {
            if peers.get(ino).is_some_and(|p| socks.contains(p)) {
                links.push(format!("socket:[{ino}]"));
            }
        }
    }
    if mems.is_empty() && links.is_empty() && files.is_empty() {
        return Ok(());
    }
    match crate::client::call(&crate::proto::Request::SharedWith { links, mems, files }) {
        Ok(crate::proto::Response::Shared(v)) if v.is_empty() => Ok(()),
        Ok(crate::proto::Response::Shared(v)) => Err(Error::refused(v.join("; "))),
        Ok(other) => {
            Err(Error::other(format!("unexpected answer {other:?}"))
                .during("asking what is shared"))
        }
        Err(e) => Err(Error::from(e).during("asking what is shared")),
    }
}

/// Whether `m` is shared memory that an image holds a copy of (made again
/// as the process's own on restore), not a cluster segment.
fn copied_shared(m: &super::capture::MapLine) -> bool {
    m.shared
        && !crate::dsm::is_segment_path(&m.path)
        && (m.inode == 0
            || m.path.ends_with(" (deleted)")
            || m.path.starts_with("/SYSV")
            || m.path.starts_with("/memfd:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_resource() {
        assert_eq!(
            refusal(7, "anon_inode:[io_uring]").unwrap(),
            "fd 7: io_uring is not migratable"
        );
        assert!(refusal(3, "anon_inode:[eventfd]").is_none());
        assert!(refusal(1, "pipe:[123]").is_none());
        assert!(refusal(5, "pipe:[9]").is_none());
        // Sockets: the capture decides (a TCP connection or listener moves).
        assert!(refusal(5, "socket:[9]").is_none());
        assert!(refusal(3, "anon_inode:[timerfd]").is_none());
        assert!(refusal(3, "anon_inode:[eventpoll]").is_none());
        assert!(refusal(3, "anon_inode:inotify")
            .unwrap()
            .contains("not migratable"));
        assert!(refusal(4, "/tmp/x (deleted)").is_some());
        assert!(refusal(4, "/tmp/x").is_none());
    }
}
