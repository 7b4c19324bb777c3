/* semtool: System V semaphores across the nodes of a krg cluster.
 *
 *   semtool create KEY NSEMS         create a set (mode 0666), print its id
 *   semtool pingpong KEY N 0|1       N round trips through semaphores 0 and 1
 *   semtool up-undo KEY NUM          +1 on NUM with SEM_UNDO, then exit
 *   semtool get KEY NUM              print semaphore NUM's value
 *   semtool down KEY NUM [nowait|MS] -1 on NUM (IPC_NOWAIT, or a timeout in
 *                                    milliseconds), print what happened
 *   semtool rm KEY                   IPC_RMID
 */
#define _GNU_SOURCE
#include "../common.h"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <time.h>

union semun {
    int val;
    struct semid_ds *buf;
    unsigned short *array;
};

static int id_of(key_t key) {
    int id = semget(key, 0, 0);
    if (id < 0) die("semget");
    return id;
}

static void op(int id, unsigned short num, short delta, short flg) {
    struct sembuf b = {num, delta, flg};
    while (semop(id, &b, 1) < 0) {
        if (errno != EINTR) die("semop");
    }
}

int main(int argc, char **argv) {
    need_args(argc, 2, "see the comment at the top of semtool.c");
    const char *cmd = argv[1];
    key_t key = (key_t)strtol(argv[2], NULL, 0);
    if (!strcmp(cmd, "create")) {
        int n = atoi(argv[3]);
        int id = semget(key, n, IPC_CREAT | 0666);
        if (id < 0) die("semget");
        unsigned short zeros[64] = {0};
        union semun u = {.array = zeros};
        if (semctl(id, 0, SETALL, u) < 0) die("semctl SETALL");
        struct semid_ds ds;
        u.buf = &ds;
        if (semctl(id, 0, IPC_STAT, u) < 0) die("semctl IPC_STAT");
        printf("%d nsems %lu\n", id, (unsigned long)ds.sem_nsems);
        return 0;
    }
    int id = id_of(key);
    if (!strcmp(cmd, "pingpong")) {
        long n = atol(argv[3]);
        int side = atoi(argv[4]);
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < n; i++) {
            if (side == 0) {
                op(id, 0, 1, 0);
                op(id, 1, -1, 0);
            } else {
                op(id, 0, -1, 0);
                op(id, 1, 1, 0);
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / (n ? n : 1);
        printf("pingpong side %d: %ld round trips, %.1f us each\n", side, n, us);
        return 0;
    }
    if (!strcmp(cmd, "up-undo")) {
        op(id, (unsigned short)atoi(argv[3]), 1, SEM_UNDO);
        printf("up with undo\n");
        return 0;
    }
    if (!strcmp(cmd, "get")) {
        int v = semctl(id, atoi(argv[3]), GETVAL);
        if (v < 0) die("semctl GETVAL");
        printf("%d\n", v);
        return 0;
    }
    if (!strcmp(cmd, "down")) {
        struct sembuf b = {(unsigned short)atoi(argv[3]), -1, 0};
        int r;
        if (argc > 4 && !strcmp(argv[4], "nowait")) {
            b.sem_flg = IPC_NOWAIT;
            r = semop(id, &b, 1);
        } else if (argc > 4) {
            long ms = atol(argv[4]);
            struct timespec t = {ms / 1000, (ms % 1000) * 1000000};
            r = semtimedop(id, &b, 1, &t);
        } else {
            r = semop(id, &b, 1);
        }
        printf("%s\n", r == 0 ? "ok" : strerror(errno));
        return 0;
    }
    if (!strcmp(cmd, "rm")) {
        if (semctl(id, 0, IPC_RMID) < 0) die("semctl IPC_RMID");
        return 0;
    }
    fprintf(stderr, "semtool: unknown command %s\n", cmd);
    return 2;
}
