/* spawnkit: the ways small C programs start other programs and talk to
 * them, for the differential tester (krg-node/tests/difftest). Every mode
 * prints the same bytes on every run on one machine, so a run under krg
 * can be compared with a native one byte for byte.
 *
 *   spawnkit system CMD...          system(CMD) for each; "[system N]"
 *   spawnkit popen-r CMD            popen(CMD, "re"), copy its output;
 *                                   "[pclose N]"
 *   spawnkit popen-w CMD            popen(CMD, "we"), feed it our stdin;
 *                                   "[pclose N]"
 *   spawnkit run fork|vfork|spawn CMD [ARG...]
 *                                   run CMD with our stdio, wait; "[exit N]"
 *   spawnkit chain CMD1 CMD2        git's start_command, twice: CMD1 reads a
 *                                   close-on-exec pipe fed with our stdin,
 *                                   CMD2 (started before CMD1's pipe is
 *                                   closed) reads another fed with "CMD1
 *                                   done" once CMD1 ended; each child tells
 *                                   an exec failure through a close-on-exec
 *                                   error pipe the parent reads to EOF. A
 *                                   close-on-exec fd that stays open in a
 *                                   child hangs it (git's symptom).
 *   spawnkit slow LINES MS          LINES numbered lines, MS ms apart, one
 *                                   write(2) each (a slow producer)
 *
 * CMD strings run with /bin/sh -c. "[... N]" is the exit status, or 128+S
 * for death by signal S.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static int status_code(int st)
{
    if (st == -1)
        return -1;
    if (WIFEXITED(st))
        return WEXITSTATUS(st);
    if (WIFSIGNALED(st))
        return 128 + WTERMSIG(st);
    return -2;
}

static void die(const char *what)
{
    fprintf(stderr, "spawnkit: %s: %s\n", what, strerror(errno));
    exit(111);
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        p += w;
        n -= (size_t)w;
    }
}

static int do_system(int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        fflush(stdout);
        int st = system(argv[i]);
        printf("[system %d]\n", status_code(st));
    }
    return 0;
}

/* popen(CMD, MODE), then copy its output to ours ("re") or our stdin to
 * its input ("we"); "[pclose N]". */
static int do_popen(const char *cmd, const char *mode)
{
    int reading = mode[0] == 'r';
    /* Writing, our output so far goes out before the child's. */
    if (!reading)
        fflush(stdout);
    FILE *f = popen(cmd, mode);
    if (!f)
        die("popen");
    FILE *from = reading ? f : stdin, *to = reading ? stdout : f;
    char buf[8192];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, from)) > 0)
        fwrite(buf, 1, n, to);
    printf("[pclose %d]\n", status_code(pclose(f)));
    return 0;
}

static int do_run(const char *how, char **argv)
{
    pid_t p;
    int st;
    fflush(stdout);
    if (!strcmp(how, "spawn")) {
        int e = posix_spawnp(&p, argv[0], NULL, NULL, argv, environ);
        if (e) {
            errno = e;
            die("posix_spawnp");
        }
    } else if (!strcmp(how, "vfork")) {
        p = vfork();
        if (p == 0) {
            execvp(argv[0], argv);
            _exit(127);
        }
    } else {
        p = fork();
        if (p == 0) {
            execvp(argv[0], argv);
            _exit(127);
        }
    }
    if (p < 0)
        die("fork");
    if (waitpid(p, &st, 0) < 0)
        die("waitpid");
    printf("[exit %d]\n", status_code(st));
    return 0;
}

/* git's start_command: a child whose stdin is the read end of a pipe the
 * parent keeps the write end of (close-on-exec), and an error pipe
 * (close-on-exec) through which the child reports a failed exec; the
 * parent reads the error pipe to EOF, which comes when the exec succeeds. */
static pid_t start(const char *cmd, int *to_child)
{
    int in[2], err[2];
    if (pipe2(in, O_CLOEXEC) || pipe2(err, O_CLOEXEC))
        die("pipe2");
    fflush(stdout);
    pid_t p = fork();
    if (p < 0)
        die("fork");
    if (p == 0) {
        dup2(in[0], 0);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        int e = errno;
        write_all(err[1], (char *)&e, sizeof e);
        _exit(127);
    }
    close(in[0]);
    close(err[1]);
    int e;
    ssize_t n;
    while ((n = read(err[0], &e, sizeof e)) < 0 && errno == EINTR)
        ;
    if (n > 0) {
        errno = e;
        die("exec");
    }
    close(err[0]);
    *to_child = in[1];
    return p;
}

static int do_chain(const char *cmd1, const char *cmd2)
{
    int to1, to2, st;
    pid_t p1 = start(cmd1, &to1);
    pid_t p2 = start(cmd2, &to2);
    char buf[8192];
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0)
        write_all(to1, buf, (size_t)n);
    close(to1);
    if (waitpid(p1, &st, 0) < 0)
        die("waitpid");
    printf("[chain 1: %d]\n", status_code(st));
    fflush(stdout);
    write_all(to2, "CMD1 done\n", 10);
    close(to2);
    if (waitpid(p2, &st, 0) < 0)
        die("waitpid");
    printf("[chain 2: %d]\n", status_code(st));
    return 0;
}

static int do_slow(long lines, long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    char line[64];
    for (long i = 1; i <= lines; i++) {
        int n = snprintf(line, sizeof line, "slow %ld %08lx\n", i,
                         (unsigned long)(i * 2654435761UL) & 0xffffffffUL);
        write_all(1, line, (size_t)n);
        if (i < lines)
            nanosleep(&ts, NULL);
    }
    return 0;
}

static int usage(void)
{
    fprintf(stderr, "usage: spawnkit system|popen-r|popen-w|run|chain|slow ...\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return usage();
    const char *m = argv[1];
    if (!strcmp(m, "system"))
        return do_system(argc - 2, argv + 2);
    if (!strcmp(m, "popen-r"))
        return do_popen(argv[2], "re");
    if (!strcmp(m, "popen-w"))
        return do_popen(argv[2], "we");
    if (!strcmp(m, "run") && argc >= 4)
        return do_run(argv[2], argv + 3);
    if (!strcmp(m, "chain") && argc == 4)
        return do_chain(argv[2], argv[3]);
    if (!strcmp(m, "slow") && argc == 4)
        return do_slow(atol(argv[2]), atol(argv[3]));
    return usage();
}
