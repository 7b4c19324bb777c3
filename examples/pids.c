/*
 * pids.c - cluster-wide pids under krg.
 *
 * Prints its own pid and parent pid, forks children (one exits, one is
 * killed, one is waited for with waitid, one is started with posix_spawn),
 * and checks that every pid the kernel interfaces hand back is the one the
 * program was given. Under krg those are gpids (>= 1<<22); without it, plain
 * kernel pids. Exit status 0 when everything matched.
 *
 *   make -C examples
 *   LD_PRELOAD=$PWD/target/debug/libkrg.so examples/bin/pids
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static int failures;

#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            failures++;                                                                  \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                  \
            printf(__VA_ARGS__);                                                         \
            printf("\n");                                                                \
        }                                                                                \
    } while (0)

static const char *kind(pid_t p) { return p >= (1 << 22) ? "gpid" : "kernel pid"; }

int main(void)
{
    pid_t me = getpid(), parent = getppid();
    printf("pid %d (%s, node %d), ppid %d\n", me, kind(me), me >> 22, parent);
    fflush(stdout);

    /* 1. A child that exits: it sees us as its parent, we get its status. */
    int pfd[2];
    if (pipe(pfd) != 0)
        return 2;
    pid_t a = fork();
    if (a == 0) {
        pid_t mine = getpid(), pp = getppid();
        if (write(pfd[1], &mine, sizeof mine) != sizeof mine)
            _exit(99);
        _exit(pp == me ? 7 : 8);
    }
    close(pfd[1]);
    pid_t a_said = 0;
    if (read(pfd[0], &a_said, sizeof a_said) != sizeof a_said)
        a_said = -1;
    close(pfd[0]);
    int st = 0;
    pid_t w = waitpid(a, &st, 0);
    printf("child a: fork returned %d, child says getpid %d, waitpid returned %d, exit %d\n", a,
           a_said, w, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    CHECK(a_said == a, "child's getpid %d != fork's %d", a_said, a);
    CHECK(w == a, "waitpid returned %d, expected %d", w, a);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 7, "child did not see us as its parent");

    /* 2. A child killed by kill(gpid): wait() reports it by the same pid. */
    pid_t b = fork();
    if (b == 0) {
        pause();
        _exit(0);
    }
    CHECK(kill(b, 0) == 0, "kill(%d, 0): %s", b, strerror(errno));
    CHECK(kill(b, SIGTERM) == 0, "kill(%d, SIGTERM): %s", b, strerror(errno));
    w = wait(&st);
    printf("child b: %d killed, wait returned %d, signal %d\n", b, w,
           WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    CHECK(w == b && WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM, "wait after kill");
    errno = 0;
    CHECK(kill(b, 0) == -1 && errno == ESRCH, "kill of a reaped child: %s", strerror(errno));

    /* 3. waitid: si_pid is the child's pid too. */
    pid_t c = fork();
    if (c == 0)
        _exit(3);
    siginfo_t si;
    memset(&si, 0, sizeof si);
    CHECK(waitid(P_PID, (id_t)c, &si, WEXITED) == 0, "waitid: %s", strerror(errno));
    printf("child c: %d, waitid si_pid %d, si_status %d\n", c, si.si_pid, si.si_status);
    CHECK(si.si_pid == c && si.si_status == 3, "waitid si_pid/si_status");

    /* 4. posix_spawn: the child (a shell) reports its parent and itself. */
    pid_t d;
    char *argv[] = {"sh", "-c", "exit 5", NULL};
    int rc = posix_spawn(&d, "/bin/sh", NULL, NULL, argv, environ);
    CHECK(rc == 0, "posix_spawn: %s", strerror(rc));
    w = waitpid(d, &st, 0);
    printf("child d: posix_spawn gave %d, waitpid returned %d, exit %d\n", d, w,
           WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    CHECK(w == d && WEXITSTATUS(st) == 5, "posix_spawn + waitpid");

    /* 5. A process group: setpgid with our pids, killpg reaches it. */
    pid_t e = fork();
    if (e == 0) {
        setpgid(0, 0);
        pause();
        _exit(0);
    }
    setpgid(e, e); /* both sides, as shells do */
    pid_t g = getpgid(e);
    printf("child e: %d leads group %d\n", e, g);
    CHECK(g == e, "getpgid(%d) = %d", e, g);
    CHECK(killpg(e, SIGKILL) == 0, "killpg(%d): %s", e, strerror(errno));
    w = waitpid(-e, &st, 0);
    CHECK(w == e && WIFSIGNALED(st), "waitpid(-%d) returned %d", e, w);

    /* 6. Signalling oneself is synchronous. */
    signal(SIGUSR1, SIG_IGN);
    CHECK(kill(getpid(), SIGUSR1) == 0, "kill(self)");
    CHECK(getpid() == me, "getpid changed");

    printf("%s: %d failure(s)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
