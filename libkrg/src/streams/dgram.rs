//! Datagram sockets that only send (see docs/architecture/streams.md,
//! "Datagram senders"): a UNIX datagram socket connected to a name (glibc's
//! `syslog` keeps one to `/dev/log`) or never connected, and a UDP socket
//! connected to an address or not bound to a port. Such a socket holds no
//! state a receiver depends on: after a move it is made again on the new
//! node and connected to the same name or address there, which on that
//! node is that node's service (its syslog daemon, say). A socket bound to
//! a name or port is a receiver, and does not move.

#![deny(unsafe_code)]

use crate::error::Error;
use crate::sys::{fd as sysfd, sock};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

/// Room for any socket address.
type Storage = libc::sockaddr_storage;

/// The address `get` (getsockname or getpeername) gives for `fd`, as bytes;
/// `None` if it fails (not connected, for getpeername).
fn addr_of(
    fd: RawFd,
    get: fn(RawFd, &mut Storage) -> std::io::Result<libc::socklen_t>,
) -> Option<Vec<u8>> {
    let mut ss = sock::zeroed::<Storage>();
    let len = get(fd, &mut ss).ok()?;
    let len = (len as usize).min(std::mem::size_of::<Storage>());
    Some(sock::addr_bytes(&ss)[..len].to_vec())
}

/// A UNIX address's name (path, or NUL and the abstract name), if any.
fn unix_name(a: &[u8]) -> &[u8] {
    let off = std::mem::size_of::<libc::sa_family_t>();
    let n = a.get(off..).unwrap_or_default();
    // A path ends at its NUL; an abstract name is all of it.
    if n.first() == Some(&0) {
        n
    } else {
        n.split(|b| *b == 0).next().unwrap_or_default()
    }
}

/// Whether UNIX name `n` is one the kernel gave (autobind: NUL and five
/// hex digits), not one the program bound.
fn autobound(n: &[u8]) -> bool {
    n.len() == 6 && n[0] == 0 && n[1..].iter().all(|c| c.is_ascii_hexdigit())
}

/// An IPv4 or IPv6 address's port.
fn port(a: &[u8]) -> u16 {
    // Both sockaddr_in and sockaddr_in6 have the port, big-endian, at 2.
    a.get(2..4)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .unwrap_or(0)
}

/// Whether `p` is in this node's ephemeral port range.
fn ephemeral(p: u16) -> bool {
    let r = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut w = r.split_whitespace().filter_map(|x| x.parse::<u16>().ok());
    match (w.next(), w.next()) {
        (Some(lo), Some(hi)) => (lo..=hi).contains(&p),
        _ => false,
    }
}

/// The peer a datagram socket of family `domain` sends to (a raw socket
/// address, empty when not connected), or why it is not a sender and
/// cannot move.
pub fn sender_peer(fd: RawFd, domain: i32) -> Result<Vec<u8>, Error> {
    let peer = addr_of(fd, sock::getpeername);
    let local = addr_of(fd, sock::getsockname).unwrap_or_default();
    let what = |w: &str| Error::refused(w).fd(fd);
    match domain {
        libc::AF_UNIX => {
            let name = unix_name(&local);
            if !name.is_empty() && !autobound(name) {
                return Err(what(&format!(
                    "UNIX datagram socket bound to {} (a receiver) is not migratable; senders are",
                    String::from_utf8_lossy(name).replace('\0', "@")
                )));
            }
            if peer.as_deref().is_some_and(|p| unix_name(p).is_empty()) {
                return Err(what(
                    "UNIX datagram socket connected to an unnamed one (a socketpair) is not migratable",
                ));
            }
            // A receive queue would be lost (UNIX datagrams are reliable).
            if sysfd::readable_bytes(fd).is_ok_and(|queued| queued > 0) {
                return Err(what(
                    "UNIX datagram socket has datagrams waiting to be read: not migratable now",
                ));
            }
        }
        libc::AF_INET | libc::AF_INET6 => {
            // Replies queued for a UDP client are left behind, as UDP may
            // lose any datagram. A port in the ephemeral range is taken to
            // be the kernel's (a first `sendto` binds one), not a service's.
            let p = port(&local);
            if peer.is_none() && p != 0 && !ephemeral(p) {
                return Err(what(&format!(
                    "UDP socket bound to port {p} (a receiver) is not migratable; senders are"
                )));
            }
        }
        _ => return Err(what("datagram socket of this family is not migratable")),
    }
    Ok(peer.unwrap_or_default())
}

/// The socket of a `Dgram` image entry made again here, connected to the
/// same name or address (this node's).
pub fn restore(domain: i32, peer: &[u8], flags: i32) -> Result<RawFd, Error> {
    let ty = libc::SOCK_DGRAM | (flags & libc::O_NONBLOCK);
    let s = sock::socket(domain, ty, 0).map_err(|e| Error::io("datagram socket", &e))?;
    if peer.is_empty() {
        return Ok(s.into_raw_fd());
    }
    let ss = sock::addr_from::<Storage>(peer);
    let len = peer.len().min(std::mem::size_of::<Storage>());
    if let Err(e) = sock::connect(s.as_raw_fd(), &ss, len as libc::socklen_t) {
        drop(s);
        let to = if domain == libc::AF_UNIX {
            String::from_utf8_lossy(unix_name(peer)).replace('\0', "@")
        } else {
            format!("port {}", port(peer))
        };
        return Err(Error::io(
            format!("datagram socket connected to {to}: not reachable on this node"),
            &e,
        ));
    }
    Ok(s.into_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autobound_names_are_told_from_bound_ones() {
        assert!(autobound(b"\x0000a1f"));
        assert!(!autobound(b"\x00my-service"));
        assert!(!autobound(b"/dev/log"));
    }

    #[test]
    fn a_connected_unix_sender_is_made_again_connected_to_the_same_name() {
        let dir = std::env::temp_dir().join(format!("krg-dgram-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("log");
        let _ = std::fs::remove_file(&path);
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
        tx.connect(&path).unwrap();
        use std::os::fd::AsRawFd;
        let peer = sender_peer(tx.as_raw_fd(), libc::AF_UNIX).unwrap();
        let fd = restore(libc::AF_UNIX, &peer, libc::O_RDWR).unwrap();
        assert_eq!(sock::send(fd, b"hello", 0).unwrap(), 5);
        let mut buf = [0u8; 16];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        // The receiver itself is bound: it does not move.
        let e = sender_peer(rx.as_raw_fd(), libc::AF_UNIX)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a receiver"), "{e}");
        sysfd::close(fd).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_datagram_socketpair_and_a_udp_receiver_stay() {
        use std::os::fd::AsRawFd;
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let e = sender_peer(a.as_raw_fd(), libc::AF_UNIX)
            .unwrap_err()
            .to_string();
        assert!(e.contains("socketpair"), "{e}");
        // A service's port (below the ephemeral range).
        let server = (1024..32768)
            .find_map(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).ok())
            .unwrap();
        let e = sender_peer(server.as_raw_fd(), libc::AF_INET)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a receiver"), "{e}");
        // One the kernel bound for a first sendto: a sender.
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"x", server.local_addr().unwrap()).unwrap();
        assert!(sender_peer(sender.as_raw_fd(), libc::AF_INET).is_ok());
        let mut buf = [0u8; 8];
        assert_eq!(server.recv(&mut buf).unwrap(), 1);
        // A client connected to it moves, to the same address.
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let peer = sender_peer(client.as_raw_fd(), libc::AF_INET).unwrap();
        let fd = restore(libc::AF_INET, &peer, libc::O_RDWR).unwrap();
        assert_eq!(sock::send(fd, b"hi", 0).unwrap(), 2);
        assert_eq!(server.recv(&mut buf).unwrap(), 2);
        sysfd::close(fd).unwrap();
    }
}
