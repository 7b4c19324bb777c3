//! UNIX seqpacket sockets that move (see docs/architecture/streams.md,
//! "Moving UNIX seqpacket sockets").
//!
//! A TCP connection would lose a seqpacket socket's message boundaries,
//! so a moved seqpacket socket stays a seqpacket socket: the process
//! makes a new `socketpair` itself (so `SO_PEERCRED` shows its own
//! credentials, never the agent's) and its agent takes the other end
//! (`pidfd_getfd`). Ends on one node are one socketpair; ends on two nodes
//! each get a pair whose other end their agent relays, message by
//! message, over one TCP connection between the two nodes.
//!
//! Messages in flight are carried as *frames*: a little-endian `u32`
//! length, then the message. A zero-length message is a message: it is
//! told from the end of stream by the credentials every message carries
//! (`SO_PASSCRED`), which the end of stream has not.

#![deny(unsafe_code)]

use super::sock::{int_opt, readable_before, set_int_opt, shrink_sndbuf};
use crate::error::Error;
use crate::sys::sock::{self, Control};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Longest a drain may wait for the other side's end of stream.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message carried (a seqpacket message is bounded by the
/// sender's send buffer, at most `wmem_max` without privileges).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Whether `fd` is a connected UNIX seqpacket socket.
pub fn is_seqpacket(fd: RawFd) -> bool {
    if int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE) != Some(libc::SOCK_SEQPACKET)
        || int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1)
    {
        return false;
    }
    sock::getpeername(fd, &mut sock::zeroed::<libc::sockaddr_un>()).is_ok()
}

/// Append `msg` to `out` as one frame.
pub fn frame(out: &mut Vec<u8>, msg: &[u8]) {
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg);
}

/// The messages of `framed`, in order.
pub fn messages(framed: &[u8]) -> Result<Vec<&[u8]>, Error> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < framed.len() {
        let Some(h) = framed.get(at..at + 4) else {
            return Err("pending messages: a cut frame header".into());
        };
        let n = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let Some(m) = framed.get(at + 4..at + 4 + n) else {
            return Err(format!("pending messages: a {n}-byte frame is cut").into());
        };
        out.push(m);
        at += 4 + n;
    }
    Ok(out)
}

/// A new seqpacket socketpair, close-on-exec.
pub fn new_pair() -> Result<(OwnedFd, OwnedFd), Error> {
    sock::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)
        .map_err(|e| Error::io("seqpacket socketpair", &e))
}

/// Tell every message received on `fd` from its end of stream from now on
/// (see the module's comment).
pub fn pass_credentials(fd: RawFd) {
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_PASSCRED, 1);
}

/// What one receive gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    Message(Vec<u8>),
    /// The other end shut down writing or closed, everything read.
    End,
    /// Nothing there (`MSG_DONTWAIT`).
    Nothing,
}

/// Receive the next message of `fd` (credentials passed: see
/// [`pass_credentials`]) whole, whatever its size.
pub fn recv(fd: RawFd, dontwait: bool) -> std::io::Result<Got> {
    let nb = if dontwait { libc::MSG_DONTWAIT } else { 0 };
    // Its size first (MSG_TRUNC gives the whole length of the message).
    let mut one = [0u8; 1];
    let n = match sock::recv(fd, &mut one, libc::MSG_PEEK | libc::MSG_TRUNC | nb) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(Got::Nothing),
        Err(e) => return Err(e),
    };
    if n > MAX_MESSAGE {
        return Err(std::io::Error::other(format!("a {n}-byte message")));
    }
    let mut buf = vec![0u8; n.max(1)];
    // Room for credentials (and for descriptors, closed with it: they
    // cannot cross nodes).
    let mut control = Control::<16>::default();
    let r = match sock::recvmsg(fd, &mut buf, &mut control, libc::MSG_CMSG_CLOEXEC | nb) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(Got::Nothing),
        Err(e) => return Err(e),
    };
    let creds = control
        .cmsgs()
        .any(|c| c.level == libc::SOL_SOCKET && c.kind == libc::SCM_CREDENTIALS);
    drop(control);
    if r == 0 && !creds {
        return Ok(Got::End);
    }
    buf.truncate(r);
    Ok(Got::Message(buf))
}

/// Shut down writing and read `fd` to its end: the messages that were in
/// flight for this side, framed, and whether it had shut down writing.
pub fn drain(fd: RawFd) -> Result<(Vec<u8>, bool), Error> {
    pass_credentials(fd);
    // The other threads are parked.
    let _ = sock::shutdown(fd, libc::SHUT_WR);
    let mut out = Vec::new();
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        match readable_before(fd, deadline) {
            None => {
                return Err(Error::errno(
                    libc::ETIMEDOUT,
                    format!(
                    "the other end did not finish its side of the seqpacket connection within {}s",
                    DRAIN_TIMEOUT.as_secs()
                ),
                )
                .fd(fd))
            }
            Some(false) => continue,
            Some(true) => {}
        }
        match recv(fd, true) {
            Ok(Got::Message(m)) => frame(&mut out, &m),
            Ok(Got::End) => return Ok((out, false)),
            Ok(Got::Nothing) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(Error::io("reading to its end", &e).fd(fd)),
        }
    }
}

/// Put the messages of `framed` into `fd`'s peer's queue (sent on `fd`,
/// without waiting: its send buffer is made large enough for all of them
/// at once, which takes privileges beyond `wmem_max`: the agent's).
pub fn refill(fd: RawFd, framed: &[u8]) -> Result<(), Error> {
    let msgs = messages(framed)?;
    if msgs.is_empty() {
        return Ok(());
    }
    // Each queued message costs its bytes and a buffer head (~1 KiB).
    let want = (framed.len() + msgs.len() * 2048 + (1 << 20)).min(i32::MAX as usize / 2);
    let before = int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0);
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want as i32);
    let r = resend(fd, &msgs);
    shrink_sndbuf(fd, before);
    r
}

/// Send each of `msgs` on `fd` without waiting; an error if one does not
/// fit.
pub fn resend<M: AsRef<[u8]>>(fd: RawFd, msgs: &[M]) -> Result<(), Error> {
    for m in msgs {
        let m = m.as_ref();
        match sock::send(fd, m, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Ok(r) if r == m.len() => {}
            r => {
                let e = r.err().unwrap_or_else(std::io::Error::last_os_error);
                return Err(Error::io(
                    format!("putting back {} queued messages", msgs.len()),
                    &e,
                ));
            }
        }
    }
    Ok(())
}

/// The raw fd numbers of a pair, for a request (the agent takes them from
/// this process with `pidfd_getfd`).
pub fn numbers(p: &(OwnedFd, OwnedFd)) -> (i32, i32) {
    (p.0.as_raw_fd(), p.1.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_boundaries_and_empty_messages() {
        let mut f = Vec::new();
        for m in [&b"abc"[..], b"", b"z"] {
            frame(&mut f, m);
        }
        assert_eq!(messages(&f).unwrap(), vec![&b"abc"[..], b"", b"z"]);
        assert!(messages(&f[..f.len() - 1]).is_err());
    }

    #[test]
    fn an_empty_message_is_not_the_end_of_stream() {
        let (a, b) = new_pair().unwrap();
        pass_credentials(b.as_raw_fd());
        for m in [&b""[..], b"xy", b""] {
            sock::send(a.as_raw_fd(), m, 0).unwrap();
        }
        sock::shutdown(a.as_raw_fd(), libc::SHUT_WR).unwrap();
        let (got, _) = drain(b.as_raw_fd()).unwrap();
        assert_eq!(messages(&got).unwrap(), vec![&b""[..], b"xy", b""]);
        assert_eq!(recv(b.as_raw_fd(), true).unwrap(), Got::End);
    }

    #[test]
    fn refilled_messages_come_out_whole_and_in_order() {
        let (a, b) = new_pair().unwrap();
        let mut f = Vec::new();
        let big = vec![7u8; 300_000];
        for m in [&b"one"[..], &big, b""] {
            frame(&mut f, m);
        }
        // Without privileges the send buffer stays at wmem_max: the big
        // message may not fit; as root (the agent) it does.
        if refill(b.as_raw_fd(), &f).is_ok() {
            pass_credentials(a.as_raw_fd());
            assert_eq!(
                recv(a.as_raw_fd(), true).unwrap(),
                Got::Message(b"one".to_vec())
            );
            assert_eq!(recv(a.as_raw_fd(), true).unwrap(), Got::Message(big));
            assert_eq!(recv(a.as_raw_fd(), true).unwrap(), Got::Message(Vec::new()));
            assert_eq!(recv(a.as_raw_fd(), true).unwrap(), Got::Nothing);
        }
    }
}
