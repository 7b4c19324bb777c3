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
#include "echopair.h"
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

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
    pid_t child;
    int s = echo_child(argc, argv, SOCK_STREAM, echo, &child);
    printf("pids %d %d\n", (int)getpid(), (int)child);
    fflush(stdout);
    FILE *in = fdopen(dup(s), "r");
    char line[128], want[128];
    long i;
    for (i = 0; !stop; i++) {
        int n = snprintf(want, sizeof want, "line %ld\n", i);
        if (write(s, want, n) != n) {
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
    shutdown(s, SHUT_WR);
    if (fgets(line, sizeof line, in)) {
        printf("FAIL extra data after the last echo\n");
        return 1;
    }
    return echo_child_done(child, i);
}
