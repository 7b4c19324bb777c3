//! Sockets: creation, addresses, shutdown, messages with control data
//! (descriptors and credentials), and a safe reader of control data.

use super::check;
use libc::{c_int, socklen_t};
use std::io;
use std::mem::size_of;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

mod sealed {
    pub trait Sealed {}
}

/// A socket address structure: plain data without padding, every bit
/// pattern valid, so the kernel may write any bytes into one and its bytes
/// may be read as such.
pub trait SockAddr: sealed::Sealed + Copy {}

macro_rules! sock_addrs {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl SockAddr for $t {}
    )*};
}
sock_addrs!(
    libc::sockaddr_in,
    libc::sockaddr_in6,
    libc::sockaddr_un,
    libc::sockaddr_storage
);

// No padding: each one's size is the sum of its fields'.
const _: () = {
    assert!(size_of::<libc::sockaddr_in>() == 16);
    assert!(size_of::<libc::sockaddr_in6>() == 28);
    assert!(size_of::<libc::sockaddr_un>() == 110);
    assert!(size_of::<libc::sockaddr_storage>() == 128);
};

/// An all-zero address (family `AF_UNSPEC`), to be filled.
pub fn zeroed<A: SockAddr>() -> A {
    // SAFETY: every bit pattern is a valid A (SockAddr).
    unsafe { std::mem::zeroed() }
}

/// The bytes of `addr`.
pub fn addr_bytes<A: SockAddr>(addr: &A) -> &[u8] {
    // SAFETY: A is plain data without padding (SockAddr): all of its
    // bytes are initialised; u8 needs no alignment.
    unsafe { std::slice::from_raw_parts((addr as *const A).cast::<u8>(), size_of::<A>()) }
}

/// An address made of `bytes` (cut to its size, zeroes after them).
pub fn addr_from<A: SockAddr>(bytes: &[u8]) -> A {
    let mut a = zeroed::<A>();
    let n = bytes.len().min(size_of::<A>());
    // SAFETY: at most size_of::<A>() bytes into our own A, which any bytes
    // leave valid (SockAddr).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut a as *mut A).cast::<u8>(), n) };
    a
}

/// `len`, checked to fit `addr` (`EINVAL` otherwise).
pub(super) fn addr_len<A: SockAddr>(_: &A, len: socklen_t) -> io::Result<socklen_t> {
    if len as usize > size_of::<A>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(len)
}

/// `socket(2)`.
pub fn socket(domain: c_int, ty: c_int, protocol: c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket takes plain integers.
    let fd = check(unsafe { libc::socket(domain, ty, protocol) })?;
    // SAFETY: the kernel just returned this new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bind(2)` to the first `len` bytes of `addr` (at most its size).
pub fn bind<A: SockAddr>(fd: RawFd, addr: &A, len: socklen_t) -> io::Result<()> {
    let len = addr_len(addr, len)?;
    // SAFETY: addr is live for len bytes (checked above).
    check(unsafe { libc::bind(fd, (addr as *const A).cast(), len) }).map(drop)
}

/// `listen(2)`.
pub fn listen(fd: RawFd, backlog: c_int) -> io::Result<()> {
    // SAFETY: listen takes plain integers.
    check(unsafe { libc::listen(fd, backlog) }).map(drop)
}

/// `accept4(2)`, the peer's address not wanted.
pub fn accept(fd: RawFd, flags: c_int) -> io::Result<OwnedFd> {
    // SAFETY: null address and length: the kernel writes none.
    let c = check(unsafe { libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), flags) })?;
    // SAFETY: the kernel just returned this new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(c) })
}

/// `getsockname(2)` into `addr`; the address's length.
pub fn getsockname<A: SockAddr>(fd: RawFd, addr: &mut A) -> io::Result<socklen_t> {
    let mut len = size_of::<A>() as socklen_t;
    // SAFETY: the kernel writes at most len bytes into addr, which any
    // bytes leave valid (SockAddr).
    check(unsafe { libc::getsockname(fd, (addr as *mut A).cast(), &mut len) })?;
    Ok(len)
}

/// `getpeername(2)` into `addr` (through libc: krg's own hook sees it);
/// the address's length.
pub fn getpeername<A: SockAddr>(fd: RawFd, addr: &mut A) -> io::Result<socklen_t> {
    let mut len = size_of::<A>() as socklen_t;
    // SAFETY: the kernel writes at most len bytes into addr, which any
    // bytes leave valid (SockAddr).
    check(unsafe { libc::getpeername(fd, (addr as *mut A).cast(), &mut len) })?;
    Ok(len)
}

/// `connect(2)` to the first `len` bytes of `addr` (at most its size;
/// through libc: krg's own hook sees it).
pub fn connect<A: SockAddr>(fd: RawFd, addr: &A, len: socklen_t) -> io::Result<()> {
    let len = addr_len(addr, len)?;
    // SAFETY: addr is live for len bytes (checked above).
    check(unsafe { libc::connect(fd, (addr as *const A).cast(), len) }).map(drop)
}

/// `socketpair(2)`.
pub fn socketpair(domain: c_int, ty: c_int, protocol: c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut sv = [0; 2];
    // SAFETY: socketpair writes two descriptors into our array.
    check(unsafe { libc::socketpair(domain, ty, protocol, sv.as_mut_ptr()) })?;
    // SAFETY: the kernel just returned these new descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

/// An int socket option (`getsockopt(2)`, through libc: krg's own hook
/// sees it).
pub fn getsockopt_int(fd: RawFd, level: c_int, opt: c_int) -> io::Result<c_int> {
    let mut v: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: an int-sized buffer of ours and its length.
    check(unsafe { libc::getsockopt(fd, level, opt, (&mut v as *mut c_int).cast(), &mut len) })?;
    Ok(v)
}

/// A socket option as bytes (`struct tcp_info`...) into `buf`; how many
/// the kernel wrote.
pub fn getsockopt_bytes(fd: RawFd, level: c_int, opt: c_int, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = buf.len() as socklen_t;
    // SAFETY: our buffer and its length; the kernel writes at most that.
    check(unsafe { libc::getsockopt(fd, level, opt, buf.as_mut_ptr().cast(), &mut len) })?;
    Ok(len as usize)
}

/// `setsockopt(2)` with a value of type `T` (an int, a `timeval`...; its
/// size is passed).
pub fn setsockopt<T: Copy>(fd: RawFd, level: c_int, opt: c_int, v: &T) -> io::Result<()> {
    // SAFETY: v is live and its exact size is passed; the kernel only
    // reads it.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (v as *const T).cast(),
            size_of::<T>() as socklen_t,
        )
    })
    .map(drop)
}

/// `send(2)` of `buf`; how much went.
pub fn send(fd: RawFd, buf: &[u8], flags: c_int) -> io::Result<usize> {
    // SAFETY: a live byte slice of the given length.
    check(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) }).map(|n| n as usize)
}

/// `recv(2)` into `buf` (`MSG_PEEK`, `MSG_TRUNC`... as `flags` say); how
/// much came (with `MSG_TRUNC`, the message's whole length).
pub fn recv(fd: RawFd, buf: &mut [u8], flags: c_int) -> io::Result<usize> {
    // SAFETY: a live, writable byte slice of the given length.
    check(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) }).map(|n| n as usize)
}

/// `shutdown(2)`.
pub fn shutdown(fd: RawFd, how: c_int) -> io::Result<()> {
    // SAFETY: shutdown takes plain integers.
    check(unsafe { libc::shutdown(fd, how) }).map(drop)
}

// ---------------------------------------------------------------------------
// Control data

/// `CMSG_ALIGN`: lengths in control data are rounded up to a `size_t`
/// (`None` past the address space).
const fn cmsg_align(n: usize) -> Option<usize> {
    match n.checked_add(size_of::<usize>() - 1) {
        Some(v) => Some(v & !(size_of::<usize>() - 1)),
        None => None,
    }
}

/// Bytes of a `cmsghdr` (`CMSG_LEN(0)`): where its data starts.
pub const CMSG_HDR: usize = match cmsg_align(size_of::<libc::cmsghdr>()) {
    Some(n) => n,
    None => unreachable!(),
};

/// One control message: its level, type, length as its header says, and
/// its data (cut to what the buffer holds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmsg {
    pub level: c_int,
    pub kind: c_int,
    /// `cmsg_len`, header included.
    pub len: usize,
    /// Where its data is in the buffer.
    pub data: std::ops::Range<usize>,
}

/// The control message at offset `at` of `control`, and the offset of the
/// next one: glibc's `CMSG_FIRSTHDR`/`CMSG_NXTHDR` on a byte buffer (no
/// alignment needed, never past its end).
fn cmsg_at(control: &[u8], at: usize) -> Option<(Cmsg, Option<usize>)> {
    let end = at.checked_add(size_of::<libc::cmsghdr>())?;
    let h = control.get(at..end)?;
    let word = |o: usize, n: usize| &h[o..o + n];
    let len = usize::from_ne_bytes(word(0, size_of::<usize>()).try_into().ok()?);
    let int = |o| c_int::from_ne_bytes(word(o, 4).try_into().expect("4 bytes"));
    let (level, kind) = (int(size_of::<usize>()), int(size_of::<usize>() + 4));
    let data_end = at.saturating_add(len).min(control.len());
    let data = (at + CMSG_HDR).min(data_end)..data_end;
    let next = if len < size_of::<libc::cmsghdr>() {
        None
    } else {
        cmsg_align(len)
            .and_then(|l| at.checked_add(l))
            .filter(|n| n.saturating_add(size_of::<libc::cmsghdr>()) <= control.len())
    };
    Some((
        Cmsg {
            level,
            kind,
            len,
            data,
        },
        next,
    ))
}

/// The control messages of `control` (as the kernel or a program laid
/// them out), in order.
pub fn cmsgs(control: &[u8]) -> impl Iterator<Item = Cmsg> + '_ {
    let mut at = Some(0);
    std::iter::from_fn(move || {
        let (c, next) = cmsg_at(control, at?)?;
        at = next;
        Some(c)
    })
}

/// Call `f` with each control message of `control` and its data, which
/// `f` may change (the headers stay as they are).
pub fn cmsgs_mut(control: &mut [u8], mut f: impl FnMut(&Cmsg, &mut [u8])) {
    let mut at = Some(0);
    while let Some((c, next)) = at.and_then(|a| cmsg_at(control, a)) {
        f(&c, &mut control[c.data.clone()]);
        at = next;
    }
}

/// Room for the control data of one received message (`W` words, aligned
/// as `cmsghdr` wants). Owns the descriptors that came in it: those not
/// taken with [`Control::take_fds`] are closed when it is dropped.
pub struct Control<const W: usize> {
    buf: [u64; W],
    len: usize,
}

impl<const W: usize> Default for Control<W> {
    fn default() -> Self {
        Control {
            buf: [0; W],
            len: 0,
        }
    }
}

/// The first `len` bytes of `buf`.
fn bytes_of<const W: usize>(buf: &[u64; W], len: usize) -> &[u8] {
    // SAFETY: the words are initialised and u8 has no alignment; len is
    // cut to their size.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len.min(size_of::<[u64; W]>())) }
}

impl<const W: usize> Control<W> {
    /// The control messages received.
    pub fn cmsgs(&self) -> impl Iterator<Item = Cmsg> + '_ {
        cmsgs(bytes_of(&self.buf, self.len))
    }

    /// The descriptors received (`SCM_RIGHTS`), now the caller's (those
    /// the iterator does not reach are closed with it).
    pub fn take_fds(&mut self) -> Fds<W> {
        let len = std::mem::take(&mut self.len);
        Fds {
            buf: self.buf,
            len,
            at: Some(0),
            i: 0,
        }
    }
}

impl<const W: usize> Drop for Control<W> {
    fn drop(&mut self) {
        drop(self.take_fds());
    }
}

/// The descriptors of received control data, each handed out once.
pub struct Fds<const W: usize> {
    buf: [u64; W],
    len: usize,
    /// The control message being read, and the next int of its data.
    at: Option<usize>,
    i: usize,
}

impl<const W: usize> Iterator for Fds<W> {
    type Item = OwnedFd;

    fn next(&mut self) -> Option<OwnedFd> {
        loop {
            let bytes = bytes_of(&self.buf, self.len);
            let (c, next) = cmsg_at(bytes, self.at?)?;
            let int = c.data.start + self.i * size_of::<c_int>();
            if c.level == libc::SOL_SOCKET
                && c.kind == libc::SCM_RIGHTS
                && int + size_of::<c_int>() <= c.data.end
            {
                self.i += 1;
                let fd = c_int::from_ne_bytes(bytes[int..int + 4].try_into().expect("an int"));
                // SAFETY: the kernel installed this descriptor for the
                // message; the cursor moved past it, so it is handed out
                // once.
                return Some(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            (self.at, self.i) = (next, 0);
        }
    }
}

impl<const W: usize> Drop for Fds<W> {
    fn drop(&mut self) {
        self.for_each(drop);
    }
}

/// `recvmsg(2)` of one message into `buf`, its control data into
/// `control`; the bytes received.
pub fn recvmsg<const W: usize>(
    fd: RawFd,
    buf: &mut [u8],
    control: &mut Control<W>,
    flags: c_int,
) -> io::Result<usize> {
    drop(control.take_fds());
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid before we fill it.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; W]>();
    // SAFETY: msg points at our iovec and control buffer, both live and
    // of the sizes given.
    let n = check(unsafe { libc::recvmsg(fd, &mut msg, flags) })?;
    control.len = msg.msg_controllen.min(size_of::<[u64; W]>());
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control message laid out as CMSG_* would.
    fn cmsg(level: c_int, kind: c_int, data: &[u8]) -> Vec<u8> {
        let mut v = (CMSG_HDR + data.len()).to_ne_bytes().to_vec();
        v.extend(level.to_ne_bytes());
        v.extend(kind.to_ne_bytes());
        v.resize(CMSG_HDR, 0);
        v.extend(data);
        v.resize(cmsg_align(v.len()).unwrap(), 0);
        v
    }

    #[test]
    fn control_messages_are_walked_as_glibc_walks_them() {
        let mut b = cmsg(1, 2, &[7; 12]);
        let second = b.len();
        b.extend(cmsg(3, 4, &[9; 4]));
        let got: Vec<Cmsg> = cmsgs(&b).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].level, got[0].kind, got[0].len),
            (1, 2, CMSG_HDR + 12)
        );
        assert_eq!(&b[got[0].data.clone()], &[7; 12]);
        assert_eq!((got[1].level, got[1].kind), (3, 4));
        assert_eq!(got[1].data, second + CMSG_HDR..second + CMSG_HDR + 4);
        // Cut short: the header that does not fit is not read; data is cut
        // to the buffer.
        assert_eq!(cmsgs(&b[..second + 8]).count(), 1);
        let cut: Vec<Cmsg> = cmsgs(&b[..CMSG_HDR + 5]).collect();
        assert_eq!(cut[0].data, CMSG_HDR..CMSG_HDR + 5);
        // A length below a header ends the walk; so does one that wraps.
        let mut bad = cmsg(1, 2, &[]);
        bad[..8].copy_from_slice(&4usize.to_ne_bytes());
        bad.extend(cmsg(1, 2, &[]));
        assert_eq!(cmsgs(&bad).count(), 1);
        bad[..8].copy_from_slice(&usize::MAX.to_ne_bytes());
        assert_eq!(cmsgs(&bad).count(), 1);
        assert_eq!(cmsgs(&[]).count(), 0);
    }

    #[test]
    fn descriptors_received_are_owned() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let sent = std::fs::File::open("/dev/null").unwrap();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&sent);
        let mut c = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &raw.to_ne_bytes());
        let iov = libc::iovec {
            iov_base: b"x".as_ptr() as *mut _,
            iov_len: 1,
        };
        // SAFETY: all-zero is a valid msghdr; it points at live buffers.
        let r = unsafe {
            let mut m: libc::msghdr = std::mem::zeroed();
            m.msg_iov = &iov as *const _ as *mut _;
            m.msg_iovlen = 1;
            m.msg_control = c.as_mut_ptr().cast();
            m.msg_controllen = c.len();
            libc::sendmsg(std::os::fd::AsRawFd::as_raw_fd(&a), &m, 0)
        };
        assert_eq!(r, 1);
        let mut buf = [0u8; 4];
        let mut control = Control::<8>::default();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&b);
        assert_eq!(recvmsg(fd, &mut buf, &mut control, 0).unwrap(), 1);
        let fds: Vec<OwnedFd> = control.take_fds().collect();
        assert_eq!(fds.len(), 1);
        assert!(super::super::fd::fstat(std::os::fd::AsRawFd::as_raw_fd(&fds[0])).is_ok());
        assert_eq!(control.take_fds().count(), 0, "taken once");
    }
}
