/* pipes: pipes that belong to one process survive its migration.
 *
 *   pipes SECONDS
 *
 * Makes three pipes and leaves bytes in flight in them, then waits for
 * SIGUSR1 or SECONDS (migrate it meanwhile) and checks each:
 *   - a self-pipe (both ends here) still holds "self-pipe" and still works
 *     both ways;
 *   - a pipe whose write end was closed gives "closed writer" and then
 *     end of file;
 *   - a pipe whose read end was closed gives EPIPE on write.
 * Prints "ok" and exits 0, or says what differs and exits 1.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t go;
static void on_usr1(int sig)
{
    (void)sig;
    go = 1;
}

static int fail(const char *what)
{
    printf("FAIL %s (errno %s)\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv)
{
    int secs = argc > 1 ? atoi(argv[1]) : 3;
    int selfp[2], eofp[2], deadp[2];
    signal(SIGPIPE, SIG_IGN);
    signal(SIGUSR1, on_usr1);
    if (pipe(selfp) || pipe(eofp) || pipe(deadp))
        return fail("pipe");
    if (write(selfp[1], "self-pipe", 9) != 9 || write(eofp[1], "closed writer", 13) != 13)
        return fail("write");
    close(eofp[1]);
    close(deadp[0]);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    struct timespec t = {secs, 0};
    while (!go && nanosleep(&t, &t) != 0 && errno == EINTR)
        ;
    char buf[64] = {0};
    if (read(selfp[0], buf, sizeof buf) != 9 || memcmp(buf, "self-pipe", 9))
        return fail("self-pipe contents");
    if (write(selfp[1], "again", 5) != 5 || read(selfp[0], buf, sizeof buf) != 5 ||
        memcmp(buf, "again", 5))
        return fail("self-pipe after the move");
    memset(buf, 0, sizeof buf);
    if (read(eofp[0], buf, sizeof buf) != 13 || memcmp(buf, "closed writer", 13))
        return fail("closed writer's bytes");
    if (read(eofp[0], buf, sizeof buf) != 0)
        return fail("end of file after them");
    if (write(deadp[1], "x", 1) != -1 || errno != EPIPE)
        return fail("EPIPE on a pipe without reader");
    printf("ok\n");
    return 0;
}
