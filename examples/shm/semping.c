/* semping: ping-pong between two processes through two named POSIX
 * semaphores; under krg the two sides may run on different nodes.
 *
 *   semping NAME N 0|1      side 0 posts NAME-ping and waits for NAME-pong,
 *                           side 1 the other way round, N times; side 0
 *                           unlinks both names at the end.
 */
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static sem_t *open_sem(const char *base, const char *suffix) {
    char name[256];
    snprintf(name, sizeof name, "/%s-%s", base, suffix);
    sem_t *s = sem_open(name, O_CREAT, 0600, 0);
    if (s == SEM_FAILED) {
        fprintf(stderr, "semping: sem_open %s: %s\n", name, strerror(errno));
        exit(1);
    }
    return s;
}

static void wait_sem(sem_t *s) {
    while (sem_wait(s) != 0) {
        if (errno != EINTR) {
            perror("semping: sem_wait");
            exit(1);
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: semping NAME N 0|1\n");
        return 2;
    }
    long n = atol(argv[2]);
    int side = atoi(argv[3]);
    sem_t *ping = open_sem(argv[1], "ping"), *pong = open_sem(argv[1], "pong");
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        if (side == 0) {
            sem_post(ping);
            wait_sem(pong);
        } else {
            wait_sem(ping);
            sem_post(pong);
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / (n ? n : 1);
    printf("semping side %d: %ld round trips, %.1f us each\n", side, n, us);
    sem_close(ping);
    sem_close(pong);
    if (side == 0) {
        char name[256];
        snprintf(name, sizeof name, "/%s-ping", argv[1]);
        sem_unlink(name);
        snprintf(name, sizeof name, "/%s-pong", argv[1]);
        sem_unlink(name);
    }
    return 0;
}
