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
