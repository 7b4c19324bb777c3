/* A process forks a child just as its pipe is handed over to the next
 * stage, placed on another node. It holds off krg's signal 62 (the order
 * to swap its pipe for a connection) until the order is there, forks,
 * then lets the order in: the agent found it alone holding the pipe, and
 * now its child holds it too. The child writes after the swap.
 *
 *   forkswap | NEXT-STAGE
 * prints "parent", "child" on stdout; "ordered" or "not ordered" on
 * stderr (whether a swap order came within 3 s); exits 1 if the child
 * did not end well (killed by SIGPIPE: its pipe had no reader left). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SWAP_SIGNAL 62

static void say(const char *s)
{
    if (write(1, s, strlen(s)) < 0)
        _exit(3);
}

int main(void)
{
    sigset_t s, old, pend;
    sigemptyset(&s);
    sigaddset(&s, SWAP_SIGNAL);
    sigprocmask(SIG_BLOCK, &s, &old);
    int ordered = 0;
    for (int i = 0; i < 300 && !ordered; i++) {
        sigpending(&pend);
        ordered = sigismember(&pend, SWAP_SIGNAL);
        if (!ordered)
            usleep(10000);
    }
    fprintf(stderr, ordered ? "ordered\n" : "not ordered\n");
    pid_t c = fork();
    if (c < 0) {
        perror("fork");
        return 2;
    }
    if (c == 0) {
        /* After the parent's swap (its order is taken at once). */
        usleep(300000);
        say("child\n");
        _exit(0);
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
    say("parent\n");
    int st;
    if (waitpid(c, &st, 0) != c)
        return 2;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}
