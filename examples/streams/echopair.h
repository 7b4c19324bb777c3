/* What seqpair and unixpair share: a parent and the child that echoes
 * what it sends over a socketpair, told when to stop by SIGUSR1. */
#ifndef KRG_EXAMPLES_ECHOPAIR_H
#define KRG_EXAMPLES_ECHOPAIR_H

#include "../common.h"
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>

static volatile sig_atomic_t stop;

static void on_usr1(int sig)
{
    (void)sig;
    stop = 1;
}

/* The parent's end of a socketpair of TYPE whose other end a child serves
 * with ECHO, the child's pid in *CHILD. The child runs the program again
 * (a program of its own, as a shell would start it) with "echo" and its
 * end as fd 3, or with "forked" echoes in the forked process itself; a
 * program run with "echo" echoes on fd 3 and never returns from here.
 * SIGUSR1 sets `stop`. */
static int echo_child(int argc, char **argv, int type, int (*echo)(int), pid_t *child)
{
    if (argc == 2 && !strcmp(argv[1], "echo"))
        exit(echo(3));
    int sv[2];
    if (socketpair(AF_UNIX, type, 0, sv) != 0)
        die("socketpair");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    *child = xfork();
    if (*child == 0) {
        close(sv[0]);
        if (argc == 2 && !strcmp(argv[1], "forked"))
            exit(echo(sv[1]));
        if (dup2(sv[1], 3) < 0)
            _exit(1);
        execl("/proc/self/exe", argv[0], "echo", (char *)NULL);
        _exit(127);
    }
    close(sv[1]);
    return sv[0];
}

/* Wait for the echoing child, then print its exit status unless it is 0,
 * and "ok COUNT": the end of a conversation of COUNT messages. */
static int echo_child_done(pid_t child, long count)
{
    int st = 0;
    while (waitpid(child, &st, 0) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        printf("child status %d\n", st);
    printf("ok %ld\n", count);
    return 0;
}

#endif
