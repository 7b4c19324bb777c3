/*
 * pidcalls.c - the calls that take or return a pid, beside fork/kill/wait:
 * the owner of a descriptor's signals (fcntl F_SETOWN..., ioctl
 * FIOSETOWN/SIOCSPGRP...), a terminal's groups through ioctl, a lock's
 * holder (F_GETLK), priorities, scheduling, limits, another process's
 * memory, capabilities, tgkill, and credentials on UNIX sockets
 * (SO_PEERCRED, SCM_CREDENTIALS), each with getpid() or a child's pid as
 * fork gave it. Under krg those are gpids; without it, kernel pids: both
 * must behave the same.
 *
 *   make -C examples
 *   LD_PRELOAD=$PWD/target/debug/libkrg.so examples/bin/pidcalls [PID...]
 *
 * Each PID given is a process the calls cannot reach from here (under krg:
 * one that runs on another node): every call on it must fail with ESRCH,
 * while kill(PID, 0) succeeds. A made-up gpid of a node that does not
 * exist is always tried too. One line per check; the last one says
 * "ok: 0 failure(s)" (exit status 0) or how many failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/sockios.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/pidfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

int capget(cap_user_header_t hdrp, cap_user_data_t datap);

static int failures;

#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        int ok_ = (cond), errno_ = errno;                                                \
        if (!ok_)                                                                        \
            failures++;                                                                  \
        printf(ok_ ? "ok   " : "FAIL ");                                                 \
        printf(__VA_ARGS__);                                                             \
        if (!ok_)                                                                        \
            printf(" [errno: %s]", strerror(errno_));                                    \
        printf("\n");                                                                    \
        fflush(stdout);                                                                  \
    } while (0)

static volatile sig_atomic_t got_sigio;
static void on_sigio(int sig) { (void)sig; got_sigio = 1; }

/* A value the child sets after fork, read through process_vm_readv. */
static volatile long child_word;

/* A child that waits to be killed, with child_word set and a write lock
 * on the first byte of lockfd's file. */
static pid_t sleeper(int lockfd)
{
    int p[2];
    if (pipe(p) != 0)
        exit(2);
    pid_t c = fork();
    if (c == 0) {
        child_word = 0x5eed;
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
        if (fcntl(lockfd, F_SETLK, &fl) != 0)
            _exit(3);
        if (write(p[1], "r", 1) != 1)
            _exit(4);
        for (;;)
            pause();
    }
    char b;
    if (read(p[0], &b, 1) != 1)
        exit(2);
    close(p[0]);
    close(p[1]);
    return c;
}

static void owners(void)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        exit(2);
    pid_t me = getpid(), pg = getpgrp();

    errno = 0;
    CHECK(fcntl(sv[0], F_SETOWN, me) == 0, "fcntl(F_SETOWN, getpid() %d)", me);
    int o = fcntl(sv[0], F_GETOWN);
    CHECK(o == me, "fcntl(F_GETOWN) = %d", o);
    CHECK(fcntl(sv[0], F_SETOWN, -pg) == 0, "fcntl(F_SETOWN, -getpgrp() %d)", -pg);
    o = fcntl(sv[0], F_GETOWN);
    CHECK(o == -pg, "fcntl(F_GETOWN) = %d for the group", o);

    struct f_owner_ex ex = {.type = F_OWNER_PID, .pid = me};
    CHECK(fcntl(sv[0], F_SETOWN_EX, &ex) == 0 && ex.pid == me, "fcntl(F_SETOWN_EX, PID %d)", me);
    memset(&ex, 0, sizeof ex);
    CHECK(fcntl(sv[0], F_GETOWN_EX, &ex) == 0 && ex.type == F_OWNER_PID && ex.pid == me,
          "fcntl(F_GETOWN_EX) = type %d pid %d", ex.type, ex.pid);
    ex = (struct f_owner_ex){.type = F_OWNER_PGRP, .pid = pg};
    CHECK(fcntl(sv[0], F_SETOWN_EX, &ex) == 0, "fcntl(F_SETOWN_EX, PGRP %d)", pg);
    memset(&ex, 0, sizeof ex);
    CHECK(fcntl(sv[0], F_GETOWN_EX, &ex) == 0 && ex.type == F_OWNER_PGRP && ex.pid == pg,
          "fcntl(F_GETOWN_EX) = type %d pid %d", ex.type, ex.pid);

    int v = me;
    CHECK(ioctl(sv[1], FIOSETOWN, &v) == 0 && v == me, "ioctl(FIOSETOWN, %d)", me);
    v = 0;
    CHECK(ioctl(sv[1], FIOGETOWN, &v) == 0 && v == me, "ioctl(FIOGETOWN) = %d", v);
    v = -pg;
    CHECK(ioctl(sv[1], SIOCSPGRP, &v) == 0, "ioctl(SIOCSPGRP, %d)", -pg);
    v = 0;
    CHECK(ioctl(sv[1], SIOCGPGRP, &v) == 0 && v == -pg, "ioctl(SIOCGPGRP) = %d", v);

    /* The owner really gets SIGIO (nginx's channel to its workers). */
    signal(SIGIO, on_sigio);
    CHECK(fcntl(sv[0], F_SETOWN, me) == 0, "fcntl(F_SETOWN, %d) again", me);
    CHECK(fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_ASYNC) == 0, "O_ASYNC");
    if (write(sv[1], "x", 1) != 1)
        exit(2);
    for (int i = 0; i < 200 && !got_sigio; i++)
        usleep(10000);
    CHECK(got_sigio, "SIGIO delivered to the owner");
    close(sv[0]);
    close(sv[1]);
}

static void on_a_child(pid_t c, int lockfd)
{
    errno = 0;
    CHECK(setpriority(PRIO_PROCESS, c, 5) == 0, "setpriority(PRIO_PROCESS, child %d, 5)", c);
    errno = 0;
    int n = getpriority(PRIO_PROCESS, c);
    CHECK(n == 5 && errno == 0, "getpriority(PRIO_PROCESS, child) = %d", n);
    /* The child is in our group: both get 7. */
    pid_t pg = getpgrp();
    CHECK(setpriority(PRIO_PGRP, pg, 7) == 0, "setpriority(PRIO_PGRP, %d, 7)", pg);
    errno = 0;
    n = getpriority(PRIO_PGRP, pg);
    CHECK(n == 7 && errno == 0, "getpriority(PRIO_PGRP, %d) = %d", pg, n);
    errno = 0;
    n = getpriority(PRIO_PROCESS, c);
    CHECK(n == 7 && errno == 0, "getpriority(PRIO_PROCESS, child) = %d after the group's", n);

    cpu_set_t set;
    CPU_ZERO(&set);
    CHECK(sched_getaffinity(c, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0,
          "sched_getaffinity(child) = %d CPUs", CPU_COUNT(&set));
    CHECK(sched_setaffinity(c, sizeof set, &set) == 0, "sched_setaffinity(child)");
    int pol = sched_getscheduler(c);
    CHECK(pol == SCHED_OTHER, "sched_getscheduler(child) = %d", pol);
    struct sched_param sp = {.sched_priority = 0};
    CHECK(sched_setscheduler(c, SCHED_BATCH, &sp) == 0, "sched_setscheduler(child, SCHED_BATCH)");
    pol = sched_getscheduler(c);
    CHECK(pol == SCHED_BATCH, "sched_getscheduler(child) = %d after", pol);
    CHECK(sched_getparam(c, &sp) == 0 && sp.sched_priority == 0, "sched_getparam(child)");
    CHECK(sched_setparam(c, &sp) == 0, "sched_setparam(child)");
    struct timespec ts;
    CHECK(sched_rr_get_interval(c, &ts) == 0, "sched_rr_get_interval(child)");

    struct rlimit old, lim;
    CHECK(prlimit(c, RLIMIT_NOFILE, NULL, &old) == 0, "prlimit(child, RLIMIT_NOFILE) = %ld",
          (long)old.rlim_cur);
    lim = old;
    lim.rlim_cur = old.rlim_cur > 64 ? 64 : old.rlim_cur;
    CHECK(prlimit(c, RLIMIT_NOFILE, &lim, NULL) == 0, "prlimit(child, set soft %ld)",
          (long)lim.rlim_cur);
    CHECK(prlimit(c, RLIMIT_NOFILE, NULL, &old) == 0 && old.rlim_cur == lim.rlim_cur,
          "prlimit(child) reads %ld back", (long)old.rlim_cur);

    long word = 0;
    struct iovec l = {.iov_base = &word, .iov_len = sizeof word};
    struct iovec r = {.iov_base = (void *)&child_word, .iov_len = sizeof word};
    ssize_t got = process_vm_readv(c, &l, 1, &r, 1, 0);
    CHECK(got == sizeof word && word == 0x5eed, "process_vm_readv(child) = %#lx", word);
    word = 0x1dea;
    got = process_vm_writev(c, &l, 1, &r, 1, 0);
    word = 0;
    CHECK(got == sizeof word && process_vm_readv(c, &l, 1, &r, 1, 0) == sizeof word &&
              word == 0x1dea,
          "process_vm_writev(child) then read = %#lx", word);

    struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = c};
    struct __user_cap_data_struct d[2];
    CHECK(capget(&h, d) == 0 && h.pid == c, "capget(child)");

    /* A pidfd names the kernel process: pidfd_send_signal needs no pid. */
    int pfd = pidfd_open(c, 0);
    CHECK(pfd >= 0 && pidfd_send_signal(pfd, 0, NULL, 0) == 0, "pidfd_open(child), pidfd_send_signal");
    if (pfd >= 0)
        close(pfd);

    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    CHECK(fcntl(lockfd, F_GETLK, &fl) == 0 && fl.l_type == F_WRLCK && fl.l_pid == c,
          "fcntl(F_GETLK): the child %d holds the lock (l_pid %d)", c, fl.l_pid);
}

static void on_myself(void)
{
    pid_t me = getpid();
    errno = 0;
    CHECK(tgkill(me, gettid(), 0) == 0, "tgkill(getpid(), gettid(), 0)");
    struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = me};
    struct __user_cap_data_struct d[2];
    CHECK(capget(&h, d) == 0 && h.pid == me, "capget(getpid())");
    h = (struct __user_cap_header_struct){.version = 0, .pid = me};
    /* A version probe: the kernel writes the version it prefers back. */
    CHECK(capget(&h, NULL) == 0 && h.version == _LINUX_CAPABILITY_VERSION_3 && h.pid == me,
          "capget version probe: %#x", h.version);
    errno = 0;
    int n = getpriority(PRIO_PROCESS, me);
    CHECK(errno == 0 && n == getpriority(PRIO_PROCESS, 0), "getpriority(PRIO_PROCESS, getpid())");
}

/* SO_PEERCRED and SCM_CREDENTIALS between us and a child. */
static void credentials(void)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) != 0)
        exit(2);
    int on = 1;
    setsockopt(sv[0], SOL_SOCKET, SO_PASSCRED, &on, sizeof on);
    struct ucred uc;
    socklen_t len = sizeof uc;
    pid_t me = getpid();
    CHECK(getsockopt(sv[0], SOL_SOCKET, SO_PEERCRED, &uc, &len) == 0 && uc.pid == me,
          "SO_PEERCRED of a socketpair = %d", uc.pid);

    /* A listener and a child that connects to it. */
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path + 1, sizeof a.sun_path - 1, "krg-pidcalls-%d", me);
    socklen_t alen = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(a.sun_path + 1);
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, alen) != 0 || listen(ls, 1) != 0)
        exit(2);

    pid_t c = fork();
    if (c == 0) {
        pid_t mine = getpid();
        /* Credentials filled in with our own pid, as on one machine. */
        struct ucred cr = {.pid = mine, .uid = getuid(), .gid = getgid()};
        char cbuf[CMSG_SPACE(sizeof cr)];
        memset(cbuf, 0, sizeof cbuf);
        struct iovec io = {.iov_base = "c", .iov_len = 1};
        struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cbuf,
                           .msg_controllen = sizeof cbuf};
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_CREDENTIALS;
        cm->cmsg_len = CMSG_LEN(sizeof cr);
        memcpy(CMSG_DATA(cm), &cr, sizeof cr);
        int bad = 0;
        if (sendmsg(sv[1], &m, 0) != 1)
            bad |= 1;
        /* The caller's buffer is left as it was. */
        struct ucred after;
        memcpy(&after, CMSG_DATA(cm), sizeof after);
        if (after.pid != mine)
            bad |= 2;
        /* Without credentials: the kernel attaches them (SO_PASSCRED). */
        if (send(sv[1], "p", 1, 0) != 1)
            bad |= 4;
        /* sendmmsg with our credentials. */
        struct mmsghdr mm = {.msg_hdr = m};
        if (sendmmsg(sv[1], &mm, 1, 0) != 1 || mm.msg_len != 1)
            bad |= 8;
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&a, alen) != 0)
            bad |= 16;
        char b;
        if (read(s, &b, 1) != 1)
            bad |= 32;
        _exit(bad);
    }
    /* The child connects once it has sent its three datagrams: none of
     * the receptions below can block, whatever the child managed to send. */
    int s = accept(ls, NULL, NULL);
    for (int i = 0; i < 3; i++) {
        char data;
        union {
            char buf[CMSG_SPACE(sizeof(struct ucred))];
            struct cmsghdr align;
        } cb;
        struct iovec io = {.iov_base = &data, .iov_len = 1};
        struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cb.buf,
                           .msg_controllen = sizeof cb.buf};
        struct ucred got = {0};
        ssize_t r;
        if (i < 2) {
            r = recvmsg(sv[0], &m, MSG_DONTWAIT);
        } else {
            struct mmsghdr mm = {.msg_hdr = m};
            r = recvmmsg(sv[0], &mm, 1, MSG_DONTWAIT, NULL) == 1 ? (ssize_t)mm.msg_len : -1;
            m = mm.msg_hdr;
        }
        struct cmsghdr *cm = r == 1 ? CMSG_FIRSTHDR(&m) : NULL;
        if (cm && cm->cmsg_type == SCM_CREDENTIALS)
            memcpy(&got, CMSG_DATA(cm), sizeof got);
        CHECK(r == 1 && got.pid == c, "%s from the child %d: SCM_CREDENTIALS pid %d",
              i == 0 ? "recvmsg of sendmsg" : i == 1 ? "recvmsg of send (SO_PASSCRED)"
                                                     : "recvmmsg of sendmmsg",
              c, got.pid);
    }
    len = sizeof uc;
    memset(&uc, 0, sizeof uc);
    CHECK(s >= 0 && getsockopt(s, SOL_SOCKET, SO_PEERCRED, &uc, &len) == 0 && uc.pid == c,
          "SO_PEERCRED of the child's connection = %d (child %d)", uc.pid, c);
    if (s >= 0 && write(s, "k", 1) != 1)
        exit(2);
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0,
          "the child's sendmsg, sendmmsg and connect (exit %d)", WEXITSTATUS(st));
    if (s >= 0)
        close(s);
    close(ls);
    close(sv[0]);
    close(sv[1]);
}

/* A terminal's groups through ioctl, in a child that leads a session. */
static void terminal(void)
{
    pid_t c = fork();
    if (c == 0) {
        int bad = 0;
        if (setsid() < 0)
            _exit(100);
        int m = posix_openpt(O_RDWR | O_NOCTTY);
        if (m < 0 || grantpt(m) != 0 || unlockpt(m) != 0)
            _exit(101);
        int t = open(ptsname(m), O_RDWR); /* our controlling terminal */
        if (t < 0 || ioctl(t, TIOCSCTTY, 0) != 0)
            _exit(102);
        pid_t me = getpid(), pg = getpgrp(), v = pg;
        if (pg != me)
            bad |= 1;
        if (ioctl(t, TIOCSPGRP, &v) != 0 || v != pg)
            bad |= 2;
        v = 0;
        if (ioctl(t, TIOCGPGRP, &v) != 0 || v != pg)
            bad |= 4;
        v = 0;
        if (ioctl(t, TIOCGSID, &v) != 0 || v != getsid(0) || v != me)
            bad |= 8;
        if (tcgetpgrp(t) != pg)
            bad |= 16;
        _exit(bad);
    }
    int st;
    waitpid(c, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0,
          "ioctl TIOCSPGRP, TIOCGPGRP, TIOCGSID with the group and session of child %d (exit %d)",
          c, WEXITSTATUS(st));
}

/* waitid(P_PGID) of a child leading its own group. */
static void wait_group(void)
{
    pid_t c = fork();
    if (c == 0) {
        setpgid(0, 0);
        _exit(6);
    }
    setpgid(c, c);
    siginfo_t si;
    memset(&si, 0, sizeof si);
    CHECK(waitid(P_PGID, (id_t)c, &si, WEXITED) == 0 && si.si_pid == c && si.si_status == 6,
          "waitid(P_PGID, child %d): si_pid %d", c, si.si_pid);
}

/* Every call on a process that cannot be reached from here. */
static void unreachable(pid_t p)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        exit(2);
    errno = 0;
    CHECK(fcntl(sv[0], F_SETOWN, p) == -1 && errno == ESRCH, "fcntl(F_SETOWN, %d): ESRCH", p);
    int v = p;
    errno = 0;
    CHECK(ioctl(sv[0], FIOSETOWN, &v) == -1 && errno == ESRCH, "ioctl(FIOSETOWN, %d): ESRCH", p);
    errno = 0;
    CHECK(getpriority(PRIO_PROCESS, p) == -1 && errno == ESRCH, "getpriority(%d): ESRCH", p);
    errno = 0;
    CHECK(setpriority(PRIO_PROCESS, p, 10) == -1 && errno == ESRCH, "setpriority(%d): ESRCH", p);
    cpu_set_t set;
    errno = 0;
    CHECK(sched_getaffinity(p, sizeof set, &set) == -1 && errno == ESRCH,
          "sched_getaffinity(%d): ESRCH", p);
    errno = 0;
    CHECK(sched_getscheduler(p) == -1 && errno == ESRCH, "sched_getscheduler(%d): ESRCH", p);
    struct rlimit lim;
    errno = 0;
    CHECK(prlimit(p, RLIMIT_NOFILE, NULL, &lim) == -1 && errno == ESRCH, "prlimit(%d): ESRCH", p);
    long word;
    struct iovec l = {.iov_base = &word, .iov_len = sizeof word};
    errno = 0;
    CHECK(process_vm_readv(p, &l, 1, &l, 1, 0) == -1 && errno == ESRCH,
          "process_vm_readv(%d): ESRCH", p);
    struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = p};
    struct __user_cap_data_struct d[2];
    errno = 0;
    CHECK(capget(&h, d) == -1 && errno == ESRCH, "capget(%d): ESRCH", p);
    close(sv[0]);
    close(sv[1]);
}

int main(int argc, char **argv)
{
    /* Lead our own group, so that getpgrp() is our own pid. */
    setpgid(0, 0);
    pid_t me = getpid();
    printf("pid %d group %d\n", me, getpgrp());

    char path[] = "/tmp/krg-pidcalls-XXXXXX"; /* mkstemp fills in the X */
    int lockfd = mkstemp(path);
    if (lockfd < 0 || write(lockfd, "l", 1) != 1)
        return 2;
    unlink(path);

    owners();
    on_myself();
    pid_t c = sleeper(lockfd);
    on_a_child(c, lockfd);
    kill(c, SIGKILL);
    waitpid(c, NULL, 0);
    credentials();
    terminal();
    wait_group();

    /* A gpid of node 400, which does not exist (a kernel pid never gets
     * that high either). */
    unreachable((400 << 22) | 12345);
    for (int i = 1; i < argc; i++) {
        pid_t p = atoi(argv[i]);
        errno = 0;
        CHECK(kill(p, 0) == 0, "kill(%d, 0) reaches it", p);
        unreachable(p);
    }

    printf("%s: %d failure(s)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
