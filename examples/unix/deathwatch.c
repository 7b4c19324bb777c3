/* A server shaped like PostgreSQL's postmaster: it shares anonymous memory
 * with its children (MAP_SHARED | MAP_ANONYMOUS, inherited at fork) and
 * holds both ends of a pipe whose read end its children watch: EOF there
 * means the server died. Moving the server alone would copy that memory
 * and remake that pipe as its own, cutting the children off: krg must
 * refuse the move and let everything run on.
 *   deathwatch [BEATS]   prints "ready", a line per beat, then "done". */
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int beats = argc > 1 ? atoi(argv[1]) : 50;
    int *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int watch[2];
    if (shared == MAP_FAILED || pipe(watch)) {
        perror("setup");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t kids[2];
    for (int i = 0; i < 2; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            close(watch[1]);
            for (;;) {
                struct pollfd p = {.fd = watch[0], .events = POLLIN};
                if (poll(&p, 1, 20) > 0) {
                    printf("child %d: the server died\n", i);
                    _exit(1);
                }
                __sync_fetch_and_add(shared, 1);
            }
        }
    }
    /* Both children running (each has added once) before the beats: on a
     * loaded machine a child may take longer than a beat to start. */
    for (int w = 0; w < 1000 && __sync_fetch_and_add(shared, 0) < 2; w++)
        usleep(10000);
    printf("ready\n");
    int last = __sync_fetch_and_add(shared, 0);
    for (int b = 0; b < beats; b++) {
        usleep(100000);
        int now = __sync_fetch_and_add(shared, 0);
        printf("beat %d %s\n", b, now > last ? "children alive" : "children stalled");
        last = now;
    }
    for (int i = 0; i < 2; i++) {
        kill(kids[i], SIGTERM);
        waitpid(kids[i], NULL, 0);
    }
    printf("done\n");
    return 0;
}
