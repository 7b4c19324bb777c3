//! Memory: mappings, and the bytes of libc objects placed in shared memory.
//!
//! Mapping over (`MAP_FIXED`) or unmapping an address range is unsafe
//! whatever the wrapper: Rust objects may live there. So [`map`] and
//! [`unmap`] stay `unsafe fn`s and their callers say why the range is
//! theirs to change.

use libc::{c_int, c_void};
use std::io;
use std::os::fd::RawFd;

/// `mmap(2)`; the address of the new mapping.
///
/// # Safety
/// With `MAP_FIXED`, `[addr, addr+len)` holds nothing that Rust code still
/// uses (what was there is replaced).
pub unsafe fn map(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: RawFd,
    off: libc::off_t,
) -> io::Result<*mut c_void> {
    // SAFETY: the function's contract; without MAP_FIXED the kernel never
    // replaces a mapping.
    let p = unsafe { libc::mmap(addr, len, prot, flags, fd, off) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p)
}

/// `munmap(2)`.
///
/// # Safety
/// `[addr, addr+len)` holds nothing that Rust code still uses.
pub unsafe fn unmap(addr: *mut c_void, len: usize) -> io::Result<()> {
    // SAFETY: the function's contract.
    super::check(unsafe { libc::munmap(addr, len) }).map(drop)
}

/// `mprotect(2)`.
///
/// # Safety
/// `[addr, addr+len)` holds nothing whose use the new protection breaks
/// (taking a permission away makes Rust code fault; giving one, to a
/// guard page say, may let an overflow through).
pub unsafe fn protect(addr: *mut c_void, len: usize, prot: c_int) -> io::Result<()> {
    // SAFETY: the function's contract.
    super::check(unsafe { libc::mprotect(addr, len, prot) }).map(drop)
}

/// `write(2)` of `len` bytes of this process's memory from address `addr`
/// to `fd`; how many went. The kernel reads the memory (an address not
/// mapped readable is `EFAULT`) and no Rust reference to it is made, so
/// any address is sound; what another thread changes meanwhile is written
/// as the kernel finds it.
pub fn write_mem(fd: RawFd, addr: usize, len: usize) -> io::Result<usize> {
    // SAFETY: the kernel only reads [addr, addr+len), checking it.
    super::check(unsafe { libc::write(fd, addr as *const c_void, len) }).map(|n| n as usize)
}

/// `sendmsg(2)` of `head`, then `len` bytes of this process's memory from
/// `addr` (read by the kernel, as [`write_mem`] reads it); how many bytes
/// went. An empty `head` is left out of the message.
pub fn send_mem(
    fd: RawFd,
    head: &[u8],
    addr: usize,
    len: usize,
    flags: c_int,
) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut c_void,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: addr as *mut c_void,
            iov_len: len,
        },
    ];
    let first = usize::from(head.is_empty());
    // SAFETY: msghdr is plain data; all-zero is valid before we fill it.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov[first..].as_mut_ptr();
    msg.msg_iovlen = 2 - first;
    // SAFETY: the kernel reads our header's bytes and checks the memory
    // range (see above); msg points at our iovecs.
    super::check(unsafe { libc::sendmsg(fd, &msg, flags) }).map(|n| n as usize)
}

/// The kernel's vDSO of this process: its address and a copy of its
/// bytes, as `/proc/self/maps` shows it (the file is read: allocates).
pub fn vdso() -> io::Result<Option<(u64, Vec<u8>)>> {
    let maps = std::fs::read("/proc/self/maps")?;
    let line = maps
        .split(|b| *b == b'\n')
        .find(|l| l.ends_with(b" [vdso]"));
    let range = line.and_then(|l| {
        let l = std::str::from_utf8(l).ok()?;
        let (start, end) = l.split_whitespace().next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        (start < end).then_some((start, end))
    });
    Ok(range.map(|(start, end)| {
        // SAFETY: the kernel maps the vDSO readable over this range and
        // never writes it; the copy is made at once.
        let b = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
        (start as u64, b.to_vec())
    }))
}

/// The bytes of a process-shared `sem_t` of value `value`
/// (`sem_init(sem, 1, value)`), to be placed in shared memory.
pub fn shared_sem(value: u32) -> io::Result<[u8; std::mem::size_of::<libc::sem_t>()]> {
    // SAFETY: sem_t is plain data; sem_init fills the local copy.
    let mut sem: libc::sem_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid sem_t to initialise, process-shared.
    super::check(unsafe { libc::sem_init(&mut sem, 1, value) })?;
    // SAFETY: glibc's sem_t is an array of bytes (no padding): every byte
    // is initialised.
    Ok(
        unsafe {
            std::mem::transmute::<libc::sem_t, [u8; std::mem::size_of::<libc::sem_t>()]>(sem)
        },
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_vdso_is_an_elf_image_where_the_aux_vector_says() {
        let (start, bytes) = super::vdso().unwrap().expect("a vDSO");
        // SAFETY: getauxval has no preconditions.
        let ehdr = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
        assert_eq!(start, ehdr);
        assert_eq!(&bytes[..4], b"\x7fELF");
        assert_eq!(bytes.len() % 4096, 0);
    }
}
