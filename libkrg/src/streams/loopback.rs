//! The cluster-wide loopback: `127.0.0.1:P` means the same server on every
//! node.
//!
//! - `bind` of a TCP socket to a loopback or wildcard address first reserves
//!   the port with the agent (the port home says `EADDRINUSE` when a process
//!   on another node holds it). A socket bound to the loopback is bound to
//!   the wildcard address instead, so that the other nodes can reach it; its
//!   `accept` then hands over only connections from the loopback or from a
//!   cluster node (others are closed unseen), and `getsockname` shows the
//!   address the program asked for. Port 0 (and `listen` on an unbound
//!   socket) picks a free port from the ephemeral range that is free in the
//!   whole cluster.
//! - `connect` to a loopback or wildcard address asks the agent where the
//!   port is held, and connects straight to that node's address: one
//!   ordinary TCP connection between the two nodes, no relay; a port held
//!   on this node, or by nobody, stays a local connection.
//!
//! The agent calls run under the re-entrancy guard; the application's own
//! (possibly blocking) `accept` and `connect` run outside it, so signals
//! interrupt them as usual.
//!
//! The hooks' entry points are in `streams`' `abi` fence, which hands
//! this module the application's addresses as views, and the real call
//! as closures: `pass` with the application's own arguments, `to` or
//! `into` with an address buffer of ours.

#![deny(unsafe_code)]

use crate::client::{self, CallError};
use crate::krg_log;
use crate::log::Level;
use crate::proto::{Request, Response};
use crate::sys::user::AddrOut;
use crate::sys::{fd as sysfd, raw, sock};
use libc::{c_int, socklen_t};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `sizeof(struct sockaddr_in)`.
const V4_LEN: usize = 16;
/// `sizeof(struct sockaddr_in6)`.
const V6_LEN: usize = 28;
const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// An IPv4 or IPv6 socket address, as the kernel lays it out.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Addr {
    b: [u8; V6_LEN],
    len: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Loopback,
    Wildcard,
    Other,
}

impl Addr {
    /// The address `p` (the caller's, or one the kernel gave), if it is
    /// an `AF_INET` or `AF_INET6` one of the right length.
    fn read(p: &[u8]) -> Option<Addr> {
        if p.len() < 2 {
            return None;
        }
        let need = match u16::from_ne_bytes([p[0], p[1]]) as c_int {
            libc::AF_INET => V4_LEN,
            libc::AF_INET6 => V6_LEN,
            _ => return None,
        };
        if p.len() < need {
            return None;
        }
        let mut a = Addr {
            b: [0; V6_LEN],
            len: need,
        };
        a.b[..need].copy_from_slice(&p[..need]);
        Some(a)
    }

    /// An address the kernel wrote into `sa`, `len` bytes long.
    fn given(sa: &libc::sockaddr_in6, len: socklen_t) -> Option<Addr> {
        let b = sock::addr_bytes(sa);
        Addr::read(&b[..(len as usize).min(b.len())])
    }

    fn v6(&self) -> bool {
        self.len == V6_LEN
    }

    fn port(&self) -> u16 {
        u16::from_be_bytes([self.b[2], self.b[3]])
    }

    fn set_port(&mut self, p: u16) {
        self.b[2..4].copy_from_slice(&p.to_be_bytes());
    }

    /// The IPv4 address: of an IPv4 address, or of an IPv4-mapped IPv6 one.
    fn ipv4(&self) -> Option<[u8; 4]> {
        if !self.v6() {
            return Some([self.b[4], self.b[5], self.b[6], self.b[7]]);
        }
        let ip = &self.b[8..24];
        (ip[..10] == [0; 10] && ip[10..12] == [0xff, 0xff])
            .then(|| [ip[12], ip[13], ip[14], ip[15]])
    }

    fn kind(&self) -> Kind {
        match self.ipv4() {
            Some([127, ..]) => Kind::Loopback,
            Some([0, 0, 0, 0]) => Kind::Wildcard,
            Some(_) => Kind::Other,
            None if self.b[8..24] == LOOPBACK6 => Kind::Loopback,
            None if self.b[8..24] == [0; 16] => Kind::Wildcard,
            None => Kind::Other,
        }
    }

    /// Put an IPv4 address in (IPv4-mapped in an IPv6 address).
    fn set_ipv4(&mut self, ip: [u8; 4]) {
        if self.v6() {
            self.b[8..18].fill(0);
            self.b[18..20].copy_from_slice(&[0xff, 0xff]);
            self.b[20..24].copy_from_slice(&ip);
        } else {
            self.b[4..8].copy_from_slice(&ip);
        }
    }

    /// The wildcard address of the same kind (an IPv4-mapped loopback gives
    /// the IPv4-mapped wildcard, which stays IPv4-only like the original).
    fn wildcard(&self) -> Addr {
        let mut a = *self;
        if self.ipv4().is_some() {
            a.set_ipv4([0; 4]);
        } else {
            a.b[8..24].fill(0);
        }
        a
    }

    /// Its bytes.
    fn bytes(&self) -> &[u8] {
        &self.b[..self.len]
    }

    /// As a `sockaddr_in6` (room for either family), for `sys`.
    fn sockaddr(&self) -> libc::sockaddr_in6 {
        sock::addr_from(self.bytes())
    }
}

// --- the sockets bound to the wildcard in place of the loopback ----------

/// How many such ports are remembered; past that the oldest are forgotten
/// (their `accept` is then unfiltered).
const SLOTS: usize = 256;
/// Keyed by local port and family (`KEY_BIT | v6 << 16 | port`), not by
/// socket: the key survives a migration (the listener is bound to the same
/// port on its new node, and this table is part of the process's memory).
static KEYS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
const KEY_BIT: u64 = 1 << 17;
/// The address the program asked for: `1 << 32 | IPv4` (an IPv4 or
/// IPv4-mapped loopback) or `2 << 32` (`::1`).
static ORIG: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
static NEXT: AtomicUsize = AtomicUsize::new(0);
/// Whether any is remembered: `accept` and `getsockname` of every other
/// socket cost one atomic load.
static ANY: AtomicUsize = AtomicUsize::new(0);

fn key_of(a: &Addr) -> u64 {
    KEY_BIT | (a.v6() as u64) << 16 | a.port() as u64
}

/// This socket's own address, without going through our hook.
fn local_addr(fd: c_int) -> Option<Addr> {
    let mut me = sock::zeroed::<libc::sockaddr_in6>();
    // The raw system call (not the hooked libc symbol).
    let l = raw::getsockname(fd, &mut me).ok()?;
    Addr::given(&me, l)
}

/// `ORIG` of a socket bound to the wildcard address (its connections are
/// not filtered, its name is the kernel's).
const WILDCARD: u64 = 3 << 32;

/// Remember the port of `fd`, bound for the program to `asked` (a loopback
/// or wildcard address).
fn remember(fd: c_int, asked: &Addr) {
    let Some(me) = local_addr(fd) else { return };
    let orig = match (asked.kind(), asked.ipv4()) {
        (Kind::Wildcard, _) => WILDCARD,
        (_, Some(v4)) => 1 << 32 | u32::from_be_bytes(v4) as u64,
        (_, None) => 2 << 32,
    };
    forget(&me);
    let i = NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS;
    // A reader may see the new key with the previous slot's address for
    // an instant: both are loopback addresses of listeners of ours.
    KEYS[i].store(key_of(&me), Ordering::Release);
    ORIG[i].store(orig, Ordering::Release);
    ANY.store(1, Ordering::Release);
}

/// A port of this family bound again by the program for another address.
fn forget(a: &Addr) {
    let k = key_of(a);
    for slot in &KEYS {
        let _ = slot.compare_exchange(k, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// The address the program bound `fd`'s port to, if it asked for the
/// loopback.
fn remembered(fd: c_int) -> Option<u64> {
    if ANY.load(Ordering::Acquire) == 0 {
        return None;
    }
    let k = key_of(&local_addr(fd)?);
    (0..SLOTS)
        .find(|&i| KEYS[i].load(Ordering::Acquire) == k)
        .map(|i| ORIG[i].load(Ordering::Acquire))
}

// --- helpers -------------------------------------------------------------

use super::sock::int_opt as sockopt;

fn is_tcp(fd: c_int) -> bool {
    sockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

fn call(req: &Request) -> Result<Response, CallError> {
    crate::rt::guarded(|| client::call(req))
}

fn fail(errno: i32) -> c_int {
    crate::rt::set_errno(errno);
    -1
}

/// The ephemeral port range (`net.ipv4.ip_local_port_range`).
fn ephemeral_range() -> (u16, u16) {
    let s = crate::rt::guarded(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default()
    });
    let mut it = s.split_whitespace().filter_map(|w| w.parse::<u16>().ok());
    match (it.next(), it.next()) {
        (Some(lo), Some(hi)) if lo > 0 && lo <= hi => (lo, hi),
        _ => (32768, 60999),
    }
}

fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    if crate::sys::getrandom(&mut b).ok() != Some(2) {
        // Not random, but still spreads the attempts.
        return (Instant::now().elapsed().as_nanos() as u16) ^ (std::process::id() as u16);
    }
    u16::from_ne_bytes(b)
}

/// Outcome of a reservation.
pub(crate) enum Reserved {
    Yes,
    /// Refused, with this errno (`EADDRINUSE`).
    No(i32),
    /// The agent could not be asked: the port stays node-local.
    Unknown,
}

pub(crate) fn reserve(port: u16, reuse: bool) -> Reserved {
    match call(&Request::PortBind { port, reuse }) {
        Ok(_) => Reserved::Yes,
        Err(CallError::Agent { errno, msg, .. }) => {
            krg_log!(Level::Debug, "bind of TCP port {port}: {msg}");
            Reserved::No(errno)
        }
        Err(e) => {
            krg_log!(
                Level::Warn,
                "bind of TCP port {port}: the agent cannot reserve it ({e}); it is local to this node"
            );
            Reserved::Unknown
        }
    }
}

// --- the hooks' logic ----------------------------------------------------

/// The address a `bind` or `connect` of `fd` gives, if krg handles it: a
/// loopback or wildcard address, on a TCP socket of an SSI process.
fn ours(fd: c_int, addr: Option<&[u8]>) -> Option<Addr> {
    let a = addr.and_then(Addr::read)?;
    (a.kind() != Kind::Other && super::active() && is_tcp(fd)).then_some(a)
}

/// `bind(fd, addr)`: `pass` binds to the caller's address, `to` to one
/// of ours.
pub(super) fn bind(
    fd: c_int,
    addr: Option<&[u8]>,
    pass: impl Fn() -> c_int,
    to: impl Fn(&[u8]) -> c_int,
) -> c_int {
    let Some(a) = ours(fd, addr) else {
        return pass();
    };
    let kind = a.kind();
    let reuse = sockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap_or(0) != 0;
    let target = if kind == Kind::Loopback {
        a.wildcard()
    } else {
        a
    };
    let port = a.port();
    let bound = if port != 0 {
        match reserve(port, reuse) {
            Reserved::Yes => to(target.bytes()),
            Reserved::No(e) => return fail(e),
            Reserved::Unknown => return pass(),
        }
    } else {
        match bind_ephemeral(target, reuse, &to) {
            Some(Ok(())) => 0,
            Some(Err(e)) => return fail(e),
            None => return pass(),
        }
    };
    if bound == 0 {
        remember(fd, &a);
    }
    bound
}

/// Bind to `target` (with `bind`) with a port from the ephemeral range
/// that is free in the cluster and here; `Err(errno)` if none could be
/// bound. `None`: the agent cannot be asked.
fn bind_ephemeral(
    mut target: Addr,
    reuse: bool,
    bind: &impl Fn(&[u8]) -> c_int,
) -> Option<Result<(), i32>> {
    let (lo, hi) = ephemeral_range();
    let span = u32::from(hi - lo) + 1;
    for _ in 0..64 {
        let port = lo + (u32::from(random_u16()) % span) as u16;
        match reserve(port, reuse) {
            Reserved::Yes => {}
            Reserved::No(_) => continue,
            Reserved::Unknown => return None,
        }
        target.set_port(port);
        if bind(target.bytes()) == 0 {
            return Some(Ok(()));
        }
        let e = crate::rt::errno();
        if e != libc::EADDRINUSE {
            return Some(Err(e));
        }
    }
    Some(Err(libc::EADDRINUSE))
}

/// `listen(fd, backlog)`: a TCP socket not bound yet would get a port the
/// kernel picks on this node only; give it one free in the whole cluster
/// first (on the wildcard address, where the kernel would put it).
pub fn listen(fd: c_int, backlog: c_int, real: impl Fn(c_int, c_int) -> c_int) -> c_int {
    if !super::active() || !is_tcp(fd) {
        return real(fd, backlog);
    }
    // Guarded: libc's getsockname and bind are our own hooks.
    let pre = crate::rt::guarded(|| {
        let mut st = sock::zeroed::<libc::sockaddr_in6>();
        let a = match sock::getsockname(fd, &mut st).map(|l| Addr::given(&st, l)) {
            Ok(Some(a)) if a.port() == 0 => a,
            _ => return Ok(()),
        };
        let reuse = sockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap_or(0) != 0;
        let real_bind = |b: &[u8]| {
            let to = sock::addr_from::<libc::sockaddr_in6>(b);
            sock::bind(fd, &to, b.len() as socklen_t).map_or(-1, |()| 0)
        };
        match bind_ephemeral(a.wildcard(), reuse, &real_bind) {
            Some(Ok(())) => {
                remember(fd, &a.wildcard());
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Ok(()),
        }
    });
    match pre {
        Ok(()) => real(fd, backlog),
        Err(e) => fail(e),
    }
}

/// `connect(fd, addr)`: `pass` connects to the caller's address, `to` to
/// one of ours.
pub(super) fn connect(
    fd: c_int,
    addr: Option<&[u8]>,
    pass: impl Fn() -> c_int,
    to: impl Fn(&[u8]) -> c_int,
) -> c_int {
    let Some(a) = ours(fd, addr) else {
        return pass();
    };
    // Bound first (as connect would, to a port the kernel picks), so that
    // the server's node can be told where it comes from and show the
    // loopback as its peer. No port left to bind: the connection is made
    // all the same, and its server sees this node's address.
    let from = bound_port(fd, &a);
    let form = Form::of(&a);
    let req = Request::PortOwner {
        port: a.port(),
        from,
        v6: form == Form::V6,
    };
    match call(&req) {
        Ok(Response::PortOwner(Some((node, ip)))) => {
            let mut there = a;
            there.set_ipv4(ip);
            krg_log!(
                Level::Debug,
                "connect to loopback port {}: held on node {node}",
                a.port()
            );
            let r = to(there.bytes());
            if r == 0 || crate::rt::errno() == libc::EINPROGRESS {
                // Its own names show the loopback too, as on one machine.
                mark(fd, form);
            }
            r
        }
        Ok(_) => pass(),
        Err(e) => {
            krg_log!(
                Level::Debug,
                "connect to loopback port {}: {e}; staying on this node",
                a.port()
            );
            pass()
        }
    }
}

/// The cluster's node addresses, refreshed when an unknown peer shows up
/// (at most once a second).
static NODES: Mutex<(Option<Instant>, Vec<[u8; 4]>)> = Mutex::new((None, Vec::new()));

fn is_node(ip: [u8; 4]) -> bool {
    crate::rt::guarded(|| {
        let mut g = NODES.lock().unwrap_or_else(|e| e.into_inner());
        if g.1.contains(&ip) {
            return true;
        }
        if g.0.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return false;
        }
        if let Ok(Response::NodeAddrs(v)) = client::call(&Request::NodeAddrs) {
            g.1 = v.into_iter().map(|(_, a)| a).collect();
        }
        g.0 = Some(Instant::now());
        g.1.contains(&ip)
    })
}

/// Whether a connection from `peer` may reach a server that asked for the
/// loopback: from this machine or from a node of the cluster.
fn allowed(peer: &Addr) -> bool {
    match (peer.kind(), peer.ipv4()) {
        (Kind::Loopback, _) => true,
        (_, Some(ip)) => is_node(ip),
        _ => false,
    }
}

/// Give the caller an address the way the kernel does: at most `*len`
/// bytes, and `*len` set to the full size.
fn give(a: &Addr, out: Option<&AddrOut<'_>>) {
    if let Some(out) = out {
        out.give(a.bytes());
    }
}

/// `accept`/`accept4` on `fd`: `pass` accepts with the caller's address
/// buffer, `into` with one of ours (the connection and the address's
/// length).
pub(super) fn accept(
    fd: c_int,
    out: Option<&AddrOut<'_>>,
    pass: impl Fn() -> c_int,
    into: impl Fn(&mut [u8]) -> (c_int, socklen_t),
) -> c_int {
    let Some(orig) = remembered(fd) else {
        return pass();
    };
    let filtered = orig != WILDCARD;
    loop {
        let mut peer = Addr {
            b: [0; V6_LEN],
            len: V6_LEN,
        };
        let (c, l) = into(&mut peer.b);
        if c < 0 {
            return c;
        }
        match Addr::read(&peer.b[..(l as usize).min(V6_LEN)]) {
            Some(mut p) if !filtered || allowed(&p) => {
                if let Some(form) = loopback_client(c, &p) {
                    form.put(&mut p);
                    mark(c, form);
                }
                give(&p, out);
                return c;
            }
            Some(p) => {
                krg_log!(
                    Level::Info,
                    "refused a connection from {:?} to a loopback server (not a cluster node)",
                    p.ipv4()
                );
                // The descriptor accept just gave us, not the app.
                crate::rt::guarded(|| sysfd::close(c).ok());
            }
            // Not an IP peer: nothing to filter.
            None => {
                let n = (l as usize).min(V6_LEN);
                let mut a = peer;
                a.len = n;
                give(&a, out);
                return c;
            }
        }
    }
}

/// `getsockname(fd, addr, len)`: a listener bound for the program to the
/// loopback shows the loopback. `pass` is the real call with the
/// caller's buffer, `into` with one of ours.
pub(super) fn getsockname(
    fd: c_int,
    out: Option<&AddrOut<'_>>,
    pass: impl Fn() -> c_int,
    into: impl Fn(&mut [u8]) -> (c_int, socklen_t),
) -> c_int {
    if let Some(form) = marked(fd) {
        return named_as(form, out, pass, into);
    }
    let Some(orig) = remembered(fd).filter(|o| *o != WILDCARD) else {
        return pass();
    };
    let mut me = [0u8; V6_LEN];
    let (r, l) = into(&mut me);
    if r != 0 {
        return r;
    }
    let Some(mut a) = Addr::read(&me[..(l as usize).min(V6_LEN)]) else {
        return pass();
    };
    if orig >> 32 == 1 {
        a.set_ipv4((orig as u32).to_be_bytes());
    } else if a.v6() {
        a.b[8..24].copy_from_slice(&LOOPBACK6);
    }
    give(&a, out);
    0
}

/// `getpeername(fd, addr, len)`: a connection made through the
/// cluster-wide loopback shows the loopback at both ends.
pub(super) fn getpeername(
    fd: c_int,
    out: Option<&AddrOut<'_>>,
    pass: impl Fn() -> c_int,
    into: impl Fn(&mut [u8]) -> (c_int, socklen_t),
) -> c_int {
    match marked(fd) {
        Some(form) => named_as(form, out, pass, into),
        None => pass(),
    }
}

/// The real getsockname or getpeername (`into` our buffer) with the
/// address's IP replaced by the loopback of `form` (its port kept).
fn named_as(
    form: Form,
    out: Option<&AddrOut<'_>>,
    pass: impl Fn() -> c_int,
    into: impl Fn(&mut [u8]) -> (c_int, socklen_t),
) -> c_int {
    let mut got = [0u8; V6_LEN];
    let (r, l) = into(&mut got);
    if r != 0 {
        return r;
    }
    let Some(mut a) = Addr::read(&got[..(l as usize).min(V6_LEN)]) else {
        return pass();
    };
    form.put(&mut a);
    give(&a, out);
    0
}

// --- connections made through the cluster-wide loopback -------------------

/// Which loopback address a connection made through the cluster-wide
/// loopback shows: what its client asked for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Form {
    /// `127.0.0.1` (or the IPv4-mapped one on an IPv6 socket).
    V4,
    /// `::1`.
    V6,
}

impl Form {
    /// The form of a loopback or wildcard address asked for.
    fn of(a: &Addr) -> Form {
        if a.v6() && a.ipv4().is_none() {
            Form::V6
        } else {
            Form::V4
        }
    }

    /// Put this form's loopback address into `a` (its family and port
    /// kept).
    fn put(self, a: &mut Addr) {
        match self {
            Form::V6 if a.v6() => a.b[8..24].copy_from_slice(&LOOPBACK6),
            _ => a.set_ipv4([127, 0, 0, 1]),
        }
    }
}

/// Connections made through the cluster-wide loopback, at either end:
/// `fd << 44 | socket inode << 1 | v6` (an fd whose socket changed is no
/// longer one). Past the last slot the oldest are forgotten (their names
/// are then the nodes').
const LOOPED_SLOTS: usize = 256;
static LOOPED: [AtomicU64; LOOPED_SLOTS] = [const { AtomicU64::new(0) }; LOOPED_SLOTS];
static LOOPED_NEXT: AtomicUsize = AtomicUsize::new(0);
/// Whether any is marked: every other `getpeername` costs one atomic load.
static LOOPED_ANY: AtomicUsize = AtomicUsize::new(0);

fn socket_ino(fd: c_int) -> Option<u64> {
    sysfd::fstat(fd).ok().map(|st| st.st_ino)
}

fn looped_key(fd: c_int, ino: u64) -> u64 {
    ((fd as u64) << 44) | ((ino & ((1 << 43) - 1)) << 1)
}

fn mark(fd: c_int, form: Form) {
    let Some(ino) = socket_ino(fd) else { return };
    let k = looped_key(fd, ino) | (form == Form::V6) as u64;
    let i = LOOPED_NEXT.fetch_add(1, Ordering::Relaxed) % LOOPED_SLOTS;
    LOOPED[i].store(k, Ordering::Release);
    LOOPED_ANY.store(1, Ordering::Release);
}

fn marked(fd: c_int) -> Option<Form> {
    if LOOPED_ANY.load(Ordering::Acquire) == 0 || fd < 0 {
        return None;
    }
    let k = looped_key(fd, socket_ino(fd)?);
    LOOPED.iter().find_map(|s| {
        let v = s.load(Ordering::Acquire);
        (v & !1 == k).then_some(if v & 1 == 1 { Form::V6 } else { Form::V4 })
    })
}

/// The local port of unbound TCP socket `fd` once bound to the wildcard
/// address of `to`'s family, as connect would (the port bound already
/// when the program bound it); 0 when it cannot be (no port left).
fn bound_port(fd: c_int, to: &Addr) -> u16 {
    if let Some(me) = local_addr(fd).filter(|m| m.port() != 0) {
        return me.port();
    }
    let mut any = Addr {
        b: [0; V6_LEN],
        len: to.len,
    };
    any.b[..2].copy_from_slice(&to.b[..2]);
    // The raw system call (the port is the kernel's to pick, as in
    // connect; not our hook).
    if raw::bind(fd, &any.sockaddr(), any.len as socklen_t).is_err() {
        return 0;
    }
    local_addr(fd).map_or(0, |m| m.port())
}

/// Whether connection `c`, accepted from `peer`, came from a client on
/// another node that connected to the loopback (its agent told ours
/// first): the loopback it shows then.
fn loopback_client(c: c_int, peer: &Addr) -> Option<Form> {
    let ip = peer.ipv4()?;
    if peer.kind() != Kind::Other || !is_node(ip) {
        return None;
    }
    let port = local_addr(c)?.port();
    match call(&Request::LoopbackPeer {
        ip,
        from: peer.port(),
        port,
    }) {
        Ok(Response::LoopbackPeer(Some(v6))) => Some(if v6 { Form::V6 } else { Form::V4 }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn addr_of(s: &str) -> Addr {
        let sa: SocketAddr = s.parse().unwrap();
        let sa2 = socket_bytes(&sa);
        Addr::read(&sa2.0[..sa2.1 as usize]).unwrap()
    }

    fn socket_bytes(sa: &SocketAddr) -> ([u8; 28], socklen_t) {
        let mut b = [0u8; 28];
        match sa {
            SocketAddr::V4(v) => {
                b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
                b[2..4].copy_from_slice(&v.port().to_be_bytes());
                b[4..8].copy_from_slice(&v.ip().octets());
                (b, 16)
            }
            SocketAddr::V6(v) => {
                b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
                b[2..4].copy_from_slice(&v.port().to_be_bytes());
                b[8..24].copy_from_slice(&v.ip().octets());
                (b, 28)
            }
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(addr_of("127.0.0.1:80").kind(), Kind::Loopback);
        assert_eq!(addr_of("127.3.2.1:80").kind(), Kind::Loopback);
        assert_eq!(addr_of("0.0.0.0:80").kind(), Kind::Wildcard);
        assert_eq!(addr_of("10.0.0.1:80").kind(), Kind::Other);
        assert_eq!(addr_of("[::1]:80").kind(), Kind::Loopback);
        assert_eq!(addr_of("[::]:80").kind(), Kind::Wildcard);
        assert_eq!(addr_of("[::ffff:127.0.0.1]:80").kind(), Kind::Loopback);
        assert_eq!(addr_of("[::ffff:0.0.0.0]:80").kind(), Kind::Wildcard);
        assert_eq!(addr_of("[fe80::1]:80").kind(), Kind::Other);
        assert_eq!(addr_of("[::1]:8080").port(), 8080);
    }

    #[test]
    fn rewrites_keep_family_and_port() {
        let mut a = addr_of("[::1]:4000");
        a.set_ipv4([10, 77, 0, 3]);
        assert_eq!(a.ipv4(), Some([10, 77, 0, 3]));
        assert_eq!(a.port(), 4000);
        assert_eq!(a.len, V6_LEN);
        let w = addr_of("127.0.0.1:5").wildcard();
        assert_eq!((w.kind(), w.port(), w.len), (Kind::Wildcard, 5, V4_LEN));
        let w = addr_of("[::1]:5").wildcard();
        assert_eq!((w.kind(), w.ipv4()), (Kind::Wildcard, None));
        let w = addr_of("[::ffff:127.0.0.1]:5").wildcard();
        assert_eq!((w.kind(), w.ipv4()), (Kind::Wildcard, Some([0; 4])));
    }

    #[test]
    fn other_families_and_short_lengths_are_not_read() {
        let (b, _) = socket_bytes(&"1.2.3.4:5".parse().unwrap());
        assert!(Addr::read(&b[..8]).is_none());
        let un = [libc::AF_UNIX as u16 as u8, 0, b'/', b'x'];
        assert!(Addr::read(&un).is_none());
        assert!(Addr::read(&[]).is_none());
    }
}
