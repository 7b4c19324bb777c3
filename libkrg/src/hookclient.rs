//! The agent client used from hooks: no allocation, no lock, no libc
//! cancellation point, async-signal-safe.
//!
//! Hooks such as `kill` and `waitpid` are async-signal-safe in libc and are
//! called from signal handlers (shells reap children in their SIGCHLD handler,
//! supervisors forward signals to their children). A handler may have
//! interrupted `malloc`, so the path from such a hook to the agent must not
//! allocate or take a lock. [`crate::client`] (std sockets, `Vec` frames) is
//! the right tool for the `krg` command; this module is the one for hooks.
//!
//! It speaks the same frames as [`crate::frame`]: the request is serialised
//! with rkyv's low-level API into a stack buffer, the answer is read into an
//! aligned stack buffer and *validated* (bytecheck) before anything is read
//! from it; strings in the answer are never copied to the heap. Each call
//! opens its own connection (`SOCK_CLOEXEC`), so there is nothing to share
//! between threads and nothing a fork can catch half-held. The socket calls
//! are raw system calls: invisible to any krg hook, and not cancellation
//! points, so `pthread_cancel` never unwinds through Rust frames here.

#![deny(unsafe_code)]

use crate::proto::{ArchivedErrorKind, ArchivedResponse, ErrorKind, Request};
use crate::sys::raw::{self, Fd};
use rkyv::api::low::{access, to_bytes_in_with_alloc};
use rkyv::rancor::Failure;
use rkyv::ser::allocator::SubAllocator;
use rkyv::ser::writer::Buffer;
use rkyv::util::Align;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::time::Duration;

/// Largest request frame the hooks send (Hello with a long `KRG_CAPS`).
const SEND_MAX: usize = 1024;
/// Largest answer a hook accepts; longer answers are drained and refused.
const RECV_MAX: usize = 2048;

/// The agent's Unix socket address, prepared once.
#[derive(Clone, Copy)]
pub struct AgentAddr {
    addr: libc::sockaddr_un,
    len: libc::socklen_t,
    path_len: usize,
}

impl fmt::Debug for AgentAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentAddr({})", self.display())
    }
}

impl AgentAddr {
    /// An address for `path`; `None` if it does not fit `sun_path` or
    /// contains a NUL byte.
    pub fn new(path: &[u8]) -> Option<AgentAddr> {
        let mut addr = libc::sockaddr_un {
            sun_family: 0,
            sun_path: [0; 108],
        };
        if path.is_empty() || path.len() >= addr.sun_path.len() || path.contains(&0) {
            return None;
        }
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + path.len() + 1;
        Some(AgentAddr {
            addr,
            len: len as libc::socklen_t,
            path_len: path.len(),
        })
    }

    /// The socket path, for messages.
    pub fn display(&self) -> impl fmt::Display + '_ {
        struct D<'a>(&'a AgentAddr);
        impl fmt::Display for D<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for &c in &self.0.addr.sun_path[..self.0.path_len] {
                    let b = c as u8;
                    if b.is_ascii_graphic() || b == b' ' {
                        fmt::Write::write_char(f, b as char)?;
                    } else {
                        write!(f, "\\x{b:02x}")?;
                    }
                }
                Ok(())
            }
        }
        D(self)
    }
}

/// The useful content of an answer, copied out of the validated archive.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reply {
    Hello {
        gpid: i32,
        node: u32,
        caps: u32,
        place: u32,
        spread: bool,
    },
    Pid(i32),
    Ok,
    Caps {
        gpid: i32,
        effective: u32,
        inheritable: u32,
    },
    /// A valid answer of a kind hooks never ask for (`Ps`, `Status`).
    Other,
}

/// A short copy of an agent's error message (kept small: errors travel by
/// value on the stack, the heap is not an option here, and the whole
/// [`HookCallError`] stays under 128 bytes). Long enough for the agent's
/// usual messages (an unknown `KRG_CAPS` name comes back with the list of
/// known ones); a longer one is cut and ends with `...`, so a cut shows.
#[derive(Clone, Copy)]
pub struct Msg {
    buf: [u8; Msg::MAX],
    len: u8,
}

impl Msg {
    const MAX: usize = 120;
    const CUT: &'static [u8] = b"...";

    fn from_str(s: &str) -> Msg {
        let mut m = Msg {
            buf: [0; Msg::MAX],
            len: 0,
        };
        let cut = s.len() > Msg::MAX;
        // Cut on a character boundary, leaving room for the marker.
        let mut n = if cut {
            Msg::MAX - Msg::CUT.len()
        } else {
            s.len()
        };
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        m.buf[..n].copy_from_slice(&s.as_bytes()[..n]);
        if cut {
            m.buf[n..n + Msg::CUT.len()].copy_from_slice(Msg::CUT);
            n += Msg::CUT.len();
        }
        m.len = n as u8;
        m
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Msg {
    fn from(s: &str) -> Msg {
        Msg::from_str(s)
    }
}

/// Why a hook's call to the agent failed: [`crate::client::CallError`]
/// with the message in a fixed buffer (nothing here allocates).
pub type HookCallError = crate::client::CallError<Msg>;

/// Serialise `req` as a complete frame (length prefix included) into `out`;
/// returns the frame length.
pub fn encode_request(req: &Request, out: &mut [u8; SEND_MAX]) -> Result<usize, HookCallError> {
    let mut arena = [MaybeUninit::<u8>::uninit(); 256];
    let (head, body) = out.split_at_mut(4);
    let n = to_bytes_in_with_alloc::<_, _, Failure>(
        req,
        Buffer::from(body),
        SubAllocator::new(&mut arena),
    )
    .map_err(|_| HookCallError::Protocol(Msg::from_str("request too large for a hook frame")))?
    .len();
    head.copy_from_slice(&(n as u32).to_le_bytes());
    Ok(4 + n)
}

/// Validate an answer body and copy out what hooks need.
pub fn decode_reply(body: &[u8]) -> Result<Reply, HookCallError> {
    let resp = access::<ArchivedResponse, Failure>(body)
        .map_err(|_| HookCallError::Protocol(Msg::from_str("invalid answer from the agent")))?;
    Ok(match resp {
        ArchivedResponse::Hello {
            gpid,
            node,
            caps,
            place,
            spread,
        } => Reply::Hello {
            gpid: gpid.to_native(),
            node: node.to_native(),
            caps: caps.to_native(),
            place: place.to_native(),
            spread: *spread,
        },
        ArchivedResponse::Pid(p) => Reply::Pid(p.to_native()),
        ArchivedResponse::Ok => Reply::Ok,
        ArchivedResponse::Err(e) => {
            return Err(HookCallError::Agent {
                errno: e.errno.to_native(),
                kind: match e.kind {
                    ArchivedErrorKind::Other => ErrorKind::Other,
                    ArchivedErrorKind::CaptureBusy => ErrorKind::CaptureBusy,
                    ArchivedErrorKind::PeerBusy => ErrorKind::PeerBusy,
                    ArchivedErrorKind::PeerPlaced => ErrorKind::PeerPlaced,
                },
                msg: Msg::from_str(e.msg.as_str()),
            })
        }
        ArchivedResponse::Caps(c) => Reply::Caps {
            gpid: c.gpid.to_native(),
            effective: c.effective.to_native(),
            inheritable: c.inheritable.to_native(),
        },
        // Answers hooks never ask for (ps, status, scheduling, ...).
        _ => Reply::Other,
    })
}

/// `Io` for `op`, with the errno of `e`.
fn io_err(op: &'static str) -> impl Fn(io::Error) -> HookCallError {
    move |e| HookCallError::Io {
        op,
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

fn interrupted(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINTR)
}

fn connect(addr: &AgentAddr, timeout: Option<Duration>) -> Result<Fd, HookCallError> {
    loop {
        let fd = raw::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
            .map_err(io_err("socket"))?;
        if let Some(t) = timeout {
            let tv = libc::timeval {
                tv_sec: t.as_secs() as libc::time_t,
                tv_usec: t.subsec_micros() as libc::suseconds_t,
            };
            for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
                let _ = raw::setsockopt(&fd, libc::SOL_SOCKET, opt, &tv);
            }
        }
        match raw::connect(&fd, &addr.addr, addr.len) {
            Ok(()) => return Ok(fd),
            // Interrupted (e.g. by a stop/continue): start over on a new
            // socket.
            Err(e) if interrupted(&e) => {}
            Err(e) => return Err(io_err("connect")(e)),
        }
    }
}

fn send_all(fd: &Fd, mut buf: &[u8]) -> Result<(), HookCallError> {
    while !buf.is_empty() {
        // MSG_NOSIGNAL: a vanished agent gives EPIPE, not a SIGPIPE that
        // would kill the application.
        match raw::send(fd, buf, libc::MSG_NOSIGNAL) {
            Ok(n) => buf = &buf[n..],
            Err(e) if interrupted(&e) => {}
            Err(e) => return Err(io_err("send")(e)),
        }
    }
    Ok(())
}

fn recv_exact(fd: &Fd, buf: &mut [u8]) -> Result<(), HookCallError> {
    let mut got = 0;
    while got < buf.len() {
        match raw::recv(fd, &mut buf[got..], 0) {
            Ok(0) => {
                return Err(HookCallError::Io {
                    op: "receive",
                    errno: libc::ECONNRESET,
                })
            }
            Ok(n) => got += n,
            Err(e) if interrupted(&e) => {}
            Err(e) => return Err(io_err("receive")(e)),
        }
    }
    Ok(())
}

/// Send one request and wait for its answer. `Response::Err` comes back as
/// [`HookCallError::Agent`].
pub fn call(
    addr: &AgentAddr,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Reply, HookCallError> {
    let mut out = [0u8; SEND_MAX];
    let n = encode_request(req, &mut out)?;
    let fd = connect(addr, timeout)?;
    send_all(&fd, &out[..n])?;
    let mut len = [0u8; 4];
    recv_exact(&fd, &mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Err(HookCallError::Protocol(Msg::from_str(
            "empty answer from the agent",
        )));
    }
    if len > RECV_MAX {
        return Err(HookCallError::Protocol(Msg::from_str(
            "answer too large for a hook",
        )));
    }
    let mut body = Align([0u8; RECV_MAX]);
    recv_exact(&fd, &mut body[..len])?;
    decode_reply(&body[..len])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use crate::proto::{ErrorReply, Response};

    #[test]
    fn requests_match_the_std_framing() {
        let reqs = [
            Request::Hello {
                version: 1,
                caps_env: Some("migrate,-dfs".into()),
                pinned: Some(3),
            },
            Request::Hello {
                version: 1,
                caps_env: None,
                pinned: None,
            },
            Request::Ensure { kpid: 1234 },
            Request::Translate { kpid: 77 },
            Request::Resolve { gpid: 1 << 22 | 5 },
            Request::ResolveRunning { gpid: 2 << 22 | 6 },
            Request::Kill {
                pid: -(1 << 22 | 9),
                sig: 15,
            },
            Request::CapGet { gpid: 1 << 22 | 5 },
        ];
        for req in reqs {
            let mut out = [0u8; SEND_MAX];
            let n = encode_request(&req, &mut out).unwrap();
            let back: Request = frame::read_frame(&mut &out[..n], frame::MAX_REQUEST).unwrap();
            assert_eq!(back, req);
        }
    }

    #[test]
    fn oversized_request_is_an_error_not_a_panic() {
        let req = Request::Hello {
            version: 1,
            caps_env: Some("x".repeat(5000)),
            pinned: None,
        };
        let mut out = [0u8; SEND_MAX];
        assert!(encode_request(&req, &mut out).is_err());
    }

    fn body_of(resp: &Response) -> Vec<u8> {
        frame::encode(resp).unwrap()[4..].to_vec()
    }

    fn decode_copy(bytes: &[u8]) -> Result<Reply, HookCallError> {
        let mut b = Align([0u8; RECV_MAX]);
        b[..bytes.len()].copy_from_slice(bytes);
        decode_reply(&b[..bytes.len()])
    }

    #[test]
    fn answers_decode() {
        let r = decode_copy(&body_of(&Response::Hello {
            gpid: 1 << 22 | 3,
            node: 1,
            caps: 7,
            place: 0,
            spread: false,
        }))
        .unwrap();
        assert_eq!(
            r,
            Reply::Hello {
                gpid: 1 << 22 | 3,
                node: 1,
                caps: 7,
                place: 0,
                spread: false
            }
        );
        assert_eq!(
            decode_copy(&body_of(&Response::Pid(42))).unwrap(),
            Reply::Pid(42)
        );
        assert_eq!(decode_copy(&body_of(&Response::Ok)).unwrap(), Reply::Ok);
        match decode_copy(&body_of(&Response::Err(ErrorReply::other(
            libc::EPERM,
            "not yours é".repeat(40),
        )))) {
            Err(HookCallError::Agent { errno, msg, .. }) => {
                assert_eq!(errno, libc::EPERM);
                assert!(msg.as_str().starts_with("not yours"));
                assert!(msg.as_str().ends_with("..."), "{msg:?}");
                assert!(msg.as_str().len() <= Msg::MAX);
            }
            other => panic!("{other:?}"),
        }
        // The agent's answer to an unknown KRG_CAPS name fits whole.
        let long = format!(
            "KRG_CAPS: {}",
            crate::caps::Caps::apply(crate::caps::Caps::ALL, "teleport").unwrap_err()
        );
        match decode_copy(&body_of(&Response::Err(ErrorReply::other(
            libc::EINVAL,
            long.clone(),
        )))) {
            Err(HookCallError::Agent { msg, .. }) => assert_eq!(msg.as_str(), long),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_answers_are_rejected() {
        let good = body_of(&Response::Pid(42));
        // Truncations and noise must fail cleanly (or, by chance, decode
        // to some valid value), never panic or read out of bounds.
        for cut in 0..good.len() {
            let _ = decode_copy(&good[..cut]);
        }
        assert!(decode_copy(&good[..0]).is_err());
        let mut seed = 0x9e37_79b9u32;
        for _ in 0..2000 {
            let n = (seed % 48) as usize + 1;
            let mut noise = vec![0u8; n];
            for b in noise.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                *b = seed as u8;
            }
            let _ = decode_copy(&noise);
        }
    }

    #[test]
    fn addr_limits() {
        assert!(AgentAddr::new(b"/tmp/x.sock").is_some());
        assert!(AgentAddr::new(&[b'a'; 200]).is_none());
        assert!(AgentAddr::new(b"").is_none());
        assert!(AgentAddr::new(b"a\0b").is_none());
        let a = AgentAddr::new(b"/run/krg/krg-node.sock").unwrap();
        assert_eq!(a.display().to_string(), "/run/krg/krg-node.sock");
    }

    #[test]
    fn connect_failure_is_io() {
        let a = AgentAddr::new(b"/nonexistent/krg.sock").unwrap();
        match call(&a, &Request::Ensure { kpid: 1 }, None) {
            Err(HookCallError::Io { op, errno }) => {
                assert_eq!(op, "connect");
                assert_eq!(errno, libc::ENOENT);
            }
            other => panic!("{other:?}"),
        }
    }
}
