/* unixpair: a parent and its child talk over a socketpair (a UNIX stream
 * socket); the child (the same program run again, as an echo server on
 * fd 3) can be migrated while they talk.
 *
 *   unixpair [forked]
 *                print "pids PARENT CHILD", then send numbered lines to the
 *                child and check every echo until SIGUSR1; then end the
 *                conversation, wait for the child and print "ok COUNT"
 *                (and the child's exit status if it is not 0). With
 *                "forked" the child echoes in the forked process itself,
 *                without running the program again.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_usr1(int sig)
{
    (void)sig;
    stop = 1;
}

static int echo(int s)
{
    char buf[4096];
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(s, buf + off, n - off);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                return 1;
            }
            off += w;
        }
    }
}

int main(int argc, char **argv)
{
    /* The child runs the program again (a program of its own, as a shell
     * would start it), with its end of the pair as fd 3. */
    if (argc == 2 && !strcmp(argv[1], "echo"))
        return echo(3);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        perror("socketpair");
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        close(sv[0]);
        if (argc == 2 && !strcmp(argv[1], "forked"))
            return echo(sv[1]);
        if (dup2(sv[1], 3) < 0)
            _exit(1);
        execl("/proc/self/exe", argv[0], "echo", (char *)NULL);
        _exit(127);
    }
    close(sv[1]);
    printf("pids %d %d\n", (int)getpid(), (int)child);
    fflush(stdout);
    FILE *in = fdopen(dup(sv[0]), "r");
    char line[128], want[128];
    long i;
    for (i = 0; !stop; i++) {
        int n = snprintf(want, sizeof want, "line %ld\n", i);
        if (write(sv[0], want, n) != n) {
            printf("FAIL write: %s\n", strerror(errno));
            return 1;
        }
        if (!fgets(line, sizeof line, in)) {
            printf("FAIL the child closed after %ld lines\n", i);
            return 1;
        }
        if (strcmp(line, want) != 0) {
            printf("FAIL echo %ld is \"%s\"\n", i, line);
            return 1;
        }
    }
    shutdown(sv[0], SHUT_WR);
    if (fgets(line, sizeof line, in)) {
        printf("FAIL extra data after the last echo\n");
        return 1;
    }
    int st = 0;
    while (waitpid(child, &st, 0) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        printf("child status %d\n", st);
    printf("ok %ld\n", i);
    return 0;
}
