//! Tests of the pid translations in calls (`super`).

use super::*;
use crate::processes::{init_identity, my_kpid, set_identity};
use std::cell::Cell;

/// This test process as an SSI process without an agent: its own gpid
/// is known (gpid, kernel pid), no other gpid can be resolved.
fn me() -> (pid_t, pid_t) {
    init_identity();
    let k = my_kpid();
    let g = crate::gpid::make(1, k as u32).unwrap();
    set_identity(g, 1, 0);
    (g, k)
}

/// A gpid of a node that does not exist.
const ELSEWHERE: pid_t = 400 << 22 | 12345;

fn errno() -> c_int {
    crate::rt::errno()
}

fn socketpair(kind: c_int) -> [c_int; 2] {
    let mut sv = [0; 2];
    // SAFETY: writes two fds into sv.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, sv.as_mut_ptr()) };
    assert_eq!(r, 0);
    sv
}

fn close(sv: [c_int; 2]) {
    for fd in sv {
        // SAFETY: our own fds.
        unsafe { libc::close(fd) };
    }
}

#[test]
fn the_filters_let_only_pid_commands_in() {
    for cmd in [
        libc::F_GETLK,
        libc::F_SETOWN,
        libc::F_GETOWN,
        F_SETOWN_EX,
        F_GETOWN_EX,
    ] {
        assert!(fcntl_may_carry_pid(cmd), "{cmd}");
    }
    for cmd in [
        libc::F_DUPFD,
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_SETLK,
        libc::F_SETLKW,
        10, // F_SETSIG
        11, // F_GETSIG
        libc::F_OFD_GETLK,
        libc::F_OFD_SETLK,
        libc::F_OFD_SETLKW,
        libc::F_DUPFD_CLOEXEC,
        libc::F_SETPIPE_SZ,
        libc::F_GET_SEALS,
    ] {
        assert!(!fcntl_may_carry_pid(cmd), "{cmd}");
    }
    for req in [
        FIOSETOWN, SIOCSPGRP, FIOGETOWN, SIOCGPGRP, TIOCGPGRP, TIOCSPGRP, TIOCGSID,
    ] {
        assert!(ioctl_may_carry_pid(req), "{req:#x}");
    }
    for req in [
        libc::FIONBIO,
        libc::FIONREAD,
        libc::FIOCLEX,
        libc::FIONCLEX,
        libc::FIOASYNC,
        libc::TIOCGWINSZ,
        libc::TIOCSWINSZ,
        libc::TIOCSCTTY,
        libc::TIOCOUTQ,
        libc::TCGETS,
        libc::TCSETS,
        libc::TCSETSW,
        libc::TCSETSF,
        libc::SIOCGIFINDEX,
        libc::SIOCGIFFLAGS,
        libc::SIOCGIFNAME,
    ] {
        assert!(!ioctl_may_carry_pid(req), "{req:#x}");
    }
    // Of the tty and socket requests, three share a bucket.
    let passing: Vec<c_ulong> = (0x5401..=0x5460)
        .chain(0x8905..=0x898f)
        .filter(|r| ioctl_may_carry_pid(*r))
        .filter(|r| ![TIOCGPGRP, TIOCSPGRP, TIOCGSID].contains(r))
        .collect();
    assert_eq!(passing, [0x540c, 0x891b, 0x891e]);
}

#[test]
fn other_commands_and_requests_pass_untouched() {
    let (g, _) = me();
    // F_GETPIPE_SZ, F_ADD_SEALS and TCGETS share a bit with a pid
    // command.
    for cmd in [
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
        libc::F_GETPIPE_SZ,
        libc::F_ADD_SEALS,
    ] {
        let got = Cell::new((0, 0));
        // SAFETY: the closure does not dereference arg.
        let r = unsafe {
            fcntl(cmd, g as usize, |c, a| {
                got.set((c, a));
                42
            })
        };
        assert_eq!((r, got.get()), (42, (cmd, g as usize)), "{cmd}");
    }
    // TIOCEXCL shares a bucket with a pid request.
    for req in [libc::FIONBIO, libc::TIOCEXCL, 0x891b] {
        let v = g;
        let arg = &v as *const pid_t as usize;
        let got = Cell::new(0);
        // SAFETY: arg points to a pid_t.
        let r = unsafe {
            ioctl(req, arg, |a| {
                got.set(a);
                7
            })
        };
        assert_eq!((r, got.get(), v), (7, arg, g), "{req:#x}");
    }
}

/// `fcntl` with a closure that records the int argument it got.
fn setown(v: c_int) -> (c_int, Option<c_int>) {
    let got = Cell::new(None);
    // SAFETY: F_SETOWN takes an int.
    let r = unsafe {
        fcntl(libc::F_SETOWN, v as usize, |_, a| {
            got.set(Some(a as c_int));
            0
        })
    };
    (r, got.get())
}

#[test]
fn f_setown_takes_the_own_gpid_and_group() {
    let (g, k) = me();
    assert_eq!(setown(g), (0, Some(k)));
    assert_eq!(setown(-g), (0, Some(-k)), "the group the caller leads");
    assert_eq!(setown(123), (0, Some(123)), "kernel pids pass");
    assert_eq!(setown(-123), (0, Some(-123)));
    assert_eq!(setown(0), (0, Some(0)));
    assert_eq!(setown(i32::MIN), (0, Some(i32::MIN)));
    assert_eq!(setown(ELSEWHERE), (-1, None), "not called");
    assert_ne!(errno(), 0);
    assert_eq!(setown(-ELSEWHERE), (-1, None));
}

#[test]
fn f_getown_gives_gpids() {
    let (g, k) = me();
    for (kernel, shown) in [(k, g), (0, 0), (-1, -1), (77, 77)] {
        // SAFETY: the closure does not dereference arg.
        let r = unsafe { fcntl(libc::F_GETOWN, 0, |_, _| kernel) };
        assert_eq!(r, shown);
    }
}

#[test]
fn f_setown_ex_translates_a_copy() {
    let (g, k) = me();
    for (kind, pid, want) in [
        (F_OWNER_PID, g, k),
        (F_OWNER_TID, g, k),
        (F_OWNER_PGRP, g, k),
        (F_OWNER_PID, 55, 55),
        (9, g, g), // not a kind: the kernel says EINVAL
    ] {
        let o = OwnerEx { kind, pid };
        let got = Cell::new(None);
        // SAFETY: arg points to an OwnerEx; so does what real gets.
        let r = unsafe {
            fcntl(F_SETOWN_EX, &o as *const OwnerEx as usize, |_, a| {
                got.set(Some((a as *const OwnerEx).read()));
                0
            })
        };
        assert_eq!(r, 0);
        assert_eq!(got.get(), Some(OwnerEx { kind, pid: want }));
        assert_eq!(o, OwnerEx { kind, pid }, "the caller's is left alone");
    }
    let o = OwnerEx {
        kind: F_OWNER_PID,
        pid: ELSEWHERE,
    };
    // SAFETY: as above.
    let r = unsafe { fcntl(F_SETOWN_EX, &o as *const OwnerEx as usize, |_, _| 0) };
    assert_eq!(r, -1);
    // SAFETY: null goes to the real call (EFAULT).
    assert_eq!(unsafe { fcntl(F_SETOWN_EX, 0, |_, _| -2) }, -2);
}

#[test]
fn f_getown_ex_and_f_getlk_give_gpids() {
    let (g, k) = me();
    for (kind, kernel, shown) in [
        (F_OWNER_PID, k, g),
        (F_OWNER_PGRP, 5, 5),
        (F_OWNER_TID, k, k),
    ] {
        let mut o = OwnerEx { kind: 0, pid: 0 };
        // SAFETY: arg points to our OwnerEx.
        let r = unsafe {
            fcntl(F_GETOWN_EX, &mut o as *mut OwnerEx as usize, |_, a| {
                (a as *mut OwnerEx).write(OwnerEx { kind, pid: kernel });
                0
            })
        };
        assert_eq!((r, o), (0, OwnerEx { kind, pid: shown }));
    }
    for (ty, kernel, shown) in [
        (libc::F_WRLCK, k, g),
        (libc::F_UNLCK, k, k),
        (libc::F_RDLCK, -1, -1),
    ] {
        // SAFETY: all-zero is a valid flock.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        // SAFETY: arg points to our flock.
        let r = unsafe {
            fcntl(
                libc::F_GETLK,
                &mut fl as *mut libc::flock as usize,
                |_, a| {
                    let p = a as *mut libc::flock;
                    (*p).l_type = ty as c_short;
                    (*p).l_pid = kernel;
                    0
                },
            )
        };
        assert_eq!((r, fl.l_pid), (0, shown));
    }
}

#[test]
fn the_kernel_takes_the_owner_and_gives_it_back_as_a_gpid() {
    let (g, k) = me();
    let sv = socketpair(libc::SOCK_STREAM);
    // SAFETY: F_SETOWN/F_GETOWN with ints on our socket.
    let real = |c: c_int, a: usize| unsafe { libc::fcntl(sv[0], c, a) };
    // SAFETY: the commands take ints.
    unsafe {
        assert_eq!(
            fcntl(libc::F_SETOWN, g as usize, real),
            0,
            "errno {}",
            errno()
        );
        assert_eq!(
            libc::fcntl(sv[0], libc::F_GETOWN),
            k,
            "the kernel has the kernel pid"
        );
        assert_eq!(fcntl(libc::F_GETOWN, 0, real), g);
    }
    // SAFETY: the requests take an int pointer, ours.
    let ioc = |r: c_ulong, a: usize| unsafe { libc::ioctl(sv[1], r, a) };
    let mut v = g;
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            ioctl(FIOSETOWN, &v as *const pid_t as usize, |a| ioc(
                FIOSETOWN, a
            )),
            0
        );
        v = 0;
        assert_eq!(
            ioctl(FIOGETOWN, &mut v as *mut pid_t as usize, |a| ioc(
                FIOGETOWN, a
            )),
            0
        );
        assert_eq!(v, g);
        v = 0;
        assert_eq!(libc::ioctl(sv[1], SIOCGPGRP, &mut v as *mut pid_t), 0);
        assert_eq!(v, k);
    }
    close(sv);
}

#[test]
fn socket_owner_ioctls_translate() {
    let (g, k) = me();
    for req in [FIOSETOWN, SIOCSPGRP] {
        for (v, want) in [(g, k), (-g, -k), (9, 9)] {
            let got = Cell::new(0);
            // SAFETY: arg points to our int, as what real gets does.
            let r = unsafe {
                ioctl(req, &v as *const pid_t as usize, |a| {
                    got.set((a as *const pid_t).read());
                    0
                })
            };
            assert_eq!((r, got.get()), (0, want), "{req:#x} {v}");
        }
        let v = ELSEWHERE;
        // SAFETY: as above.
        let r = unsafe { ioctl(req, &v as *const pid_t as usize, |_| 0) };
        assert_eq!(r, -1);
    }
    for req in [FIOGETOWN, SIOCGPGRP] {
        let mut v = 0;
        // SAFETY: as above.
        let r = unsafe {
            ioctl(req, &mut v as *mut pid_t as usize, |a| {
                (a as *mut pid_t).write(k);
                0
            })
        };
        assert_eq!((r, v), (0, g));
    }
    // SAFETY: null goes to the real call.
    assert_eq!(unsafe { ioctl(FIOSETOWN, 0, |_| -3) }, -3);
}

#[test]
fn terminal_ioctls_translate_the_group() {
    let (g, k) = me();
    let got = Cell::new(0);
    let v = g;
    // SAFETY: arg points to our pid.
    let r = unsafe {
        ioctl(TIOCSPGRP, &v as *const pid_t as usize, |a| {
            got.set((a as *const pid_t).read());
            0
        })
    };
    assert_eq!((r, got.get(), v), (0, k, g));
    let v = ELSEWHERE;
    // SAFETY: as above.
    let r = unsafe { ioctl(TIOCSPGRP, &v as *const pid_t as usize, |_| 0) };
    assert_eq!((r, errno()), (-1, libc::EPERM), "as tcsetpgrp");
}

#[test]
fn priorities_name_processes_and_groups_not_users() {
    let (g, k) = me();
    let call = |which, who: pid_t| {
        let got = Cell::new(None);
        let r = priority(which, who as id_t, |w| {
            got.set(Some(w as pid_t));
            0
        });
        (r, got.get())
    };
    assert_eq!(call(libc::PRIO_PROCESS, g), (0, Some(k)));
    assert_eq!(call(libc::PRIO_PGRP, g), (0, Some(k)));
    assert_eq!(call(libc::PRIO_PROCESS, 0), (0, Some(0)));
    // A uid may be 2^22 or more (user namespaces).
    assert_eq!(call(libc::PRIO_USER, g), (0, Some(g)));
    assert_eq!(call(libc::PRIO_PROCESS, ELSEWHERE), (-1, None));
    // The real call: the own gpid is the caller.
    // SAFETY: getpriority takes integers.
    let real = |w: id_t| unsafe { libc::getpriority(libc::PRIO_PROCESS, w) };
    crate::rt::set_errno(0);
    assert_eq!(priority(libc::PRIO_PROCESS, g as id_t, real), real(0));
    assert_eq!(errno(), 0);
}

#[test]
fn calls_on_a_process_take_its_kernel_pid() {
    let (g, k) = me();
    assert_eq!(on_process(g, |p| p), k);
    assert_eq!(on_process(0, |p| p), 0);
    assert_eq!(on_process(-5, |p| p), -5);
    assert_eq!(on_process(4321, |p| p), 4321);
    crate::rt::set_errno(0);
    let r: ssize_t = on_process(ELSEWHERE, |_| 99);
    assert_eq!(r, -1);
    assert_ne!(errno(), 0);
    // SAFETY: a cpu_set_t of ours.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let r = on_process(g, |p| {
        // SAFETY: as above.
        unsafe { libc::sched_getaffinity(p, size_of::<libc::cpu_set_t>(), &mut set) }
    });
    assert_eq!(r, 0);
    // SAFETY: tgkill of our own thread with signal 0 checks, sends nothing.
    let r = on_process(g, |p| unsafe {
        libc::syscall(libc::SYS_tgkill, p, libc::gettid(), 0) as c_int
    });
    assert_eq!(r, 0);
}

#[test]
fn capabilities_translate_a_copy_and_give_the_version_back() {
    let (g, k) = me();
    let mut h = CapHeader { version: 0, pid: g };
    let got = Cell::new(0);
    // SAFETY: hdr is ours; real writes the version into its copy, as
    // the kernel does on a version probe.
    let r = unsafe {
        capabilities((&mut h as *mut CapHeader).cast(), |p| {
            let c = p.cast::<CapHeader>();
            got.set((*c).pid);
            (*c).version = 0x2008_0522;
            -1
        })
    };
    assert_eq!((r, got.get(), h.pid, h.version), (-1, k, g, 0x2008_0522));
    let mut h = CapHeader {
        version: 0x2008_0522,
        pid: ELSEWHERE,
    };
    // SAFETY: as above.
    let r = unsafe { capabilities((&mut h as *mut CapHeader).cast(), |_| 0) };
    assert_eq!(r, -1);
}

#[test]
fn so_peercred_shows_the_gpid() {
    let (g, k) = me();
    let sv = socketpair(libc::SOCK_STREAM);
    // SAFETY: all-zero is a valid ucred.
    let mut c: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    let (val, lenp) = (
        (&mut c as *mut libc::ucred).cast::<c_void>(),
        &mut len as *mut _,
    );
    // SAFETY: val and len are ours and large enough.
    let real =
        || unsafe { libc::getsockopt(sv[0], libc::SOL_SOCKET, libc::SO_PEERCRED, val, lenp) };
    // SAFETY: as above.
    let r = unsafe { getsockopt(libc::SOL_SOCKET, libc::SO_PEERCRED, val, lenp, real) };
    assert_eq!(r, 0);
    assert_eq!(c.pid, g);
    // Other options are not looked at.
    c.pid = k;
    // SAFETY: as above; real does nothing.
    let r = unsafe { getsockopt(libc::SOL_SOCKET, libc::SO_TYPE, val, lenp, || 0) };
    assert_eq!(r, 0);
    assert_eq!(c.pid, k);
    close(sv);
}

/// A message of one byte with credentials `pid`, its control buffer
/// in `cbuf`.
fn creds_msg(cbuf: &mut [u64; 8], iov: &mut libc::iovec, pid: pid_t) -> msghdr {
    // SAFETY: all-zero is a valid msghdr; the CMSG macros write within
    // cbuf, which has room for one ucred.
    unsafe {
        let mut m: msghdr = std::mem::zeroed();
        m.msg_iov = iov;
        m.msg_iovlen = 1;
        m.msg_control = cbuf.as_mut_ptr().cast();
        m.msg_controllen = libc::CMSG_SPACE(size_of::<libc::ucred>() as c_uint) as usize;
        let c = libc::CMSG_FIRSTHDR(&m);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_CREDENTIALS;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::ucred>() as c_uint) as usize;
        let u = libc::ucred {
            pid,
            uid: libc::getuid(),
            gid: libc::getgid(),
        };
        libc::CMSG_DATA(c).cast::<libc::ucred>().write_unaligned(u);
        m
    }
}

/// The pid of the first credentials in `m`.
fn first_creds(m: &msghdr) -> Option<pid_t> {
    // SAFETY: m and its control buffer are ours.
    let m = unsafe { Msg::new(m) }.unwrap();
    creds_pids(m.control()).next()
}

#[test]
fn credentials_cross_a_socket_with_the_kernel_pid_and_come_back_as_gpids() {
    let (g, _) = me();
    let sv = socketpair(libc::SOCK_DGRAM);
    let on: c_int = 1;
    // SAFETY: an int option on our socket.
    unsafe {
        libc::setsockopt(
            sv[0],
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&on as *const c_int).cast(),
            size_of::<c_int>() as libc::socklen_t,
        )
    };
    let mut byte = *b"c";
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; 8];
    let m = creds_msg(&mut cbuf, &mut iov, g);
    // SAFETY: m is a valid message of ours.
    let send = |p: *const msghdr| unsafe { libc::sendmsg(sv[1], p, 0) };
    // SAFETY: as above.
    assert_eq!(unsafe { sendmsg(&m, send) }, 1, "errno {}", errno());
    assert_eq!(
        first_creds(&m),
        Some(g),
        "the caller's buffer is left alone"
    );
    // With the gpid as it is, the kernel refuses (EPERM, or ESRCH for
    // a privileged sender).
    assert_eq!(send(&m), -1);
    // Received: the kernel pid becomes the gpid again.
    let mut rbuf = [0u64; 8];
    let mut rm = creds_msg(&mut rbuf, &mut iov, 0);
    // SAFETY: rm is ours, its buffers live.
    let r = unsafe {
        recvmsg(&mut rm, || {
            libc::recvmsg(sv[0], &mut rm, libc::MSG_DONTWAIT)
        })
    };
    assert_eq!(r, 1);
    assert_eq!(first_creds(&rm), Some(g));
    // Credentials of a process that cannot be resolved: refused here.
    let m = creds_msg(&mut cbuf, &mut iov, ELSEWHERE);
    // SAFETY: as above.
    assert_eq!(unsafe { sendmsg(&m, |_| 0) }, -1);
    close(sv);
}

#[test]
fn sendmmsg_with_credentials_sends_one_at_a_time() {
    let (g, k) = me();
    let mut byte = *b"c";
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let (mut b1, mut b2) = ([0u64; 8], [0u64; 8]);
    let mut msgs = [
        libc::mmsghdr {
            msg_hdr: creds_msg(&mut b1, &mut iov, 77),
            msg_len: 0,
        },
        libc::mmsghdr {
            msg_hdr: creds_msg(&mut b2, &mut iov, g),
            msg_len: 0,
        },
    ];
    let seen = Cell::new([0; 2]);
    let calls = Cell::new(0);
    // SAFETY: msgs is ours; real reads the one message it is given.
    let r = unsafe {
        sendmmsg(msgs.as_mut_ptr(), 2, |m, n| {
            assert_eq!(n, 1);
            let mut s = seen.get();
            s[calls.get()] = first_creds(&(*m).msg_hdr).unwrap();
            seen.set(s);
            calls.set(calls.get() + 1);
            (*m).msg_len = 1;
            1
        })
    };
    assert_eq!((r, seen.get()), (2, [77, k]));
    assert_eq!((msgs[0].msg_len, msgs[1].msg_len), (1, 1));
    // Without credentials to translate: one call with the whole batch.
    msgs[1].msg_hdr = creds_msg(&mut b2, &mut iov, 78);
    // SAFETY: as above.
    let r = unsafe { sendmmsg(msgs.as_mut_ptr(), 2, |_, n| n as c_int) };
    assert_eq!(r, 2);
}

#[test]
fn waitid_of_the_own_group_takes_its_kernel_id() {
    let (g, k) = me();
    let got = Cell::new(None);
    let r = processes::waitid(libc::P_PGID, g as id_t, libc::WEXITED, |t, id| {
        got.set(Some((t, id)));
        (-1, None)
    });
    assert_eq!((r, got.get()), (-1, Some((libc::P_PGID, k as id_t))));
}
