//! krg-bench's system calls that std and nix do not wrap safely: the only
//! module of this binary allowed `unsafe`. Every function here is safe to
//! call with any argument; its `SAFETY` comment says why.

use anyhow::{bail, Result};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::AtomicU64;

/// This process's kernel pid, by the raw system call: under krg, libc's
/// `getpid` answers the gpid.
pub fn kernel_pid() -> i32 {
    // SAFETY: the getpid system call takes nothing and cannot fail.
    unsafe { libc::syscall(libc::SYS_getpid) as i32 }
}

/// A File for descriptor `fd`, which this process inherited and keeps
/// open for its whole life (stdin, stdout, a socket passed as fd 3):
/// never closed, not even when dropped.
pub fn inherited(fd: RawFd) -> io::Result<ManuallyDrop<File>> {
    // SAFETY: F_GETFD takes no argument beyond the descriptor number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above), nothing else in the
    // process owns it (std's stdio handles only borrow 0, 1 and 2), and
    // the File never closes it (ManuallyDrop), so no other owner can see
    // it closed or reused.
    Ok(ManuallyDrop::new(unsafe { File::from_raw_fd(fd) }))
}

/// In the program `cmd` starts, this process's descriptor `fd` as number
/// `target` (without close-on-exec). `fd` must stay open until `cmd` is
/// spawned.
pub fn fd_at_exec(cmd: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: the step runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: one dup2, and an error built
    // from errno (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, target) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A NULL-terminated array of C strings, built before a fork so that the
/// child only hands a pointer to execve.
#[derive(Debug)]
pub struct CArray {
    _owned: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl CArray {
    pub fn new(items: Vec<CString>) -> CArray {
        let mut ptrs: Vec<*const libc::c_char> = items.iter().map(|c| c.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CArray {
            _owned: items,
            ptrs,
        }
    }
}

/// fork, then exec `path` with `argv` and `envp` in the child (which
/// exits 127 if the exec fails): the child's pid.
pub fn fork_exec(path: &CStr, argv: &CArray, envp: &CArray) -> io::Result<i32> {
    // SAFETY: the child calls only execve and _exit, both
    // async-signal-safe, on memory prepared before the fork and borrowed
    // for the call, so it is sound whatever threads this process runs.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: as above: NUL-terminated path, NULL-terminated arrays.
        unsafe {
            libc::execve(path.as_ptr(), argv.ptrs.as_ptr(), envp.ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    Ok(pid)
}

/// Wait for child `pid` to end and reap it: its raw wait status.
pub fn wait(pid: i32) -> io::Result<i32> {
    let mut st = 0;
    // SAFETY: waitpid writes the status into our int.
    if unsafe { libc::waitpid(pid, &mut st, 0) } != pid {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

const PAGE: usize = 4096;

/// A System V segment attached in this process (never detached: the
/// benchmark's processes end soon).
pub struct Seg {
    id: i32,
    p: *mut u8,
    len: usize,
}

impl Seg {
    pub fn create(key: i32, len: usize) -> Result<Seg> {
        // SAFETY: shmget takes plain integers.
        let id = unsafe { libc::shmget(key, len, libc::IPC_CREAT | 0o600) };
        if id < 0 {
            bail!("shmget {key:#x}: {}", io::Error::last_os_error());
        }
        Seg::attach_id(id, len)
    }

    pub fn attach(key: i32) -> Result<Seg> {
        // SAFETY: shmget takes plain integers.
        let id = unsafe { libc::shmget(key, 0, 0) };
        if id < 0 {
            bail!("shmget {key:#x}: {}", io::Error::last_os_error());
        }
        // SAFETY: all-zero is a valid shmid_ds for IPC_STAT to fill.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT fills our struct.
        if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } < 0 {
            bail!("shmctl {id}: {}", io::Error::last_os_error());
        }
        Seg::attach_id(id, ds.shm_segsz)
    }

    fn attach_id(id: i32, len: usize) -> Result<Seg> {
        // SAFETY: shmat maps a new segment where the system chooses.
        let p = unsafe { libc::shmat(id, std::ptr::null(), 0) };
        if p as isize == -1 {
            bail!("shmat {id}: {}", io::Error::last_os_error());
        }
        Ok(Seg {
            id,
            p: p.cast(),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn pages(&self) -> usize {
        self.len / PAGE
    }

    /// Page `i` (volatile access: the point is the fault).
    pub fn touch(&self, i: usize, write: bool) {
        assert!(
            i < self.pages(),
            "page {i} of a {}-page segment",
            self.pages()
        );
        // SAFETY: i < pages() (checked), so the byte is inside our mapping,
        // which stays mapped as long as `self`.
        unsafe {
            let q = self.p.add(i * PAGE);
            if write {
                std::ptr::write_volatile(q, i as u8);
            } else {
                std::hint::black_box(std::ptr::read_volatile(q));
            }
        }
    }

    /// The first 8 bytes, as a counter shared by every process attached.
    pub fn counter(&self) -> &AtomicU64 {
        assert!(self.len >= PAGE, "a {}-byte segment", self.len);
        // SAFETY: the segment is page aligned and at least a page long
        // (checked); an AtomicU64 has the layout of a u64, and every access
        // to the word goes through atomics.
        unsafe { &*(self.p as *const AtomicU64) }
    }

    pub fn remove(&self) {
        // SAFETY: IPC_RMID with a null buffer.
        unsafe { libc::shmctl(self.id, libc::IPC_RMID, std::ptr::null_mut()) };
    }
}
