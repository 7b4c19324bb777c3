/* shmtool: System V shared memory across the nodes of a krg cluster.
 *
 *   shmtool create KEY [BYTES [MODE]]  create a segment (default mode 0666),
 *                                   print its id
 *   shmtool ring-prod KEY N         single producer of N items
 *   shmtool ring-cons KEY N         single consumer: prints the checksum
 *   shmtool add KEY N atomic|mutex [P]  add 1 to the shared counter N times
 *                                   (after P processes have arrived, if P)
 *   shmtool add-paced KEY N USEC    add 1 atomically N times, USEC apart
 *                                   (slow enough to be migrated mid-way)
 *   shmtool fork-add KEY N          attach, fork; the child then the parent
 *                                   add N atomically through the attachment
 *   shmtool show KEY                print the counters
 *   shmtool read-into KEY FILE      read(2) FILE straight into the segment
 *   shmtool dump KEY                print what read-into stored
 *   shmtool stat KEY                print shmid, size, nattch, mode
 *   shmtool rm KEY                  IPC_RMID
 *   shmtool hold KEY SECS           stay attached for SECS seconds
 *   shmtool touch KEY read|write    access every page after the header once,
 *                                   print the median and p99 time per access
 *   shmtool pingpong KEY N 0|1      N round trips through two process-shared
 *                                   semaphores (side 0 serves first)
 *   shmtool condvar KEY N 0|1       N hand-overs through a process-shared
 *                                   mutex and condition variable
 *
 * Layout of a segment (pages apart, so that the producer's and the
 * consumer's indexes do not share a page: on a DSM that is false sharing):
 *   page 0: ring head (written by the producer), counter, mutex
 *   page 1: ring tail (written by the consumer), atomic counter
 *   page 2: read-into length; page 3..: data / ring slots
 */
#define _GNU_SOURCE
#include "../common.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define SLOTS 4096 /* ring capacity (8 pages of u64) */
#define BATCH 256  /* indexes are published every BATCH items */

struct seg {
    /* page 0 */
    _Atomic uint64_t head;
    uint64_t counter;
    int mutex_ready;
    pthread_mutex_t mutex;
    char pad0[PAGE - 8 - 8 - 8 - sizeof(pthread_mutex_t)];
    /* page 1 */
    _Atomic uint64_t tail;
    _Atomic uint64_t acounter;
    char pad1[PAGE - 16];
    /* page 2 */
    uint64_t len;
    _Atomic uint64_t arrived;
    sem_t ping, pong;
    pthread_mutex_t cmutex;
    pthread_cond_t cond;
    uint64_t turn;
    char pad2[PAGE - 24 - 2 * sizeof(sem_t) - sizeof(pthread_mutex_t) - sizeof(pthread_cond_t)];
    /* page 3.. */
    uint64_t slots[SLOTS];
};

static struct seg *attach(key_t key) {
    int id = shmget(key, 0, 0);
    if (id < 0) die("shmget");
    void *p = shmat(id, NULL, 0);
    if (p == (void *)-1) die("shmat");
    return p;
}

static uint64_t item(uint64_t i) { return i * 0x9E3779B97F4A7C15ull ^ (i >> 7); }

static void pause_briefly(unsigned *spins) {
    if (++*spins > 64) sched_yield();
}

int main(int argc, char **argv) {
    need_args(argc, 2, "see the comment at the top of shmtool.c");
    const char *cmd = argv[1];
    key_t key = (key_t)strtol(argv[2], NULL, 0);
    if (!strcmp(cmd, "create")) {
        size_t bytes = argc > 3 ? strtoull(argv[3], NULL, 0) : sizeof(struct seg);
        if (bytes < sizeof(struct seg)) bytes = sizeof(struct seg);
        int mode = argc > 4 ? (int)strtol(argv[4], NULL, 8) : 0666;
        int id = shmget(key, bytes, IPC_CREAT | mode);
        if (id < 0) die("shmget");
        struct seg *s = shmat(id, NULL, 0);
        if (s == (void *)-1) die("shmat");
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutex_init(&s->mutex, &a);
        pthread_mutex_init(&s->cmutex, &a);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setpshared(&ca, PTHREAD_PROCESS_SHARED);
        pthread_cond_init(&s->cond, &ca);
        if (sem_init(&s->ping, 1, 0) || sem_init(&s->pong, 1, 0)) die("sem_init");
        s->mutex_ready = 1;
        printf("%d\n", id);
        return 0;
    }
    if (!strcmp(cmd, "ring-prod") || !strcmp(cmd, "ring-cons")) {
        uint64_t n = strtoull(argv[3], NULL, 0);
        struct seg *s = attach(key);
        uint64_t sum = 0;
        unsigned spins = 0;
        if (cmd[5] == 'p') {
            uint64_t tail = atomic_load_explicit(&s->tail, memory_order_acquire);
            for (uint64_t i = 0; i < n; i++) {
                while (i - tail >= SLOTS) {
                    atomic_store_explicit(&s->head, i, memory_order_release);
                    tail = atomic_load_explicit(&s->tail, memory_order_acquire);
                    pause_briefly(&spins);
                }
                spins = 0;
                s->slots[i % SLOTS] = item(i);
                sum += item(i);
                if ((i + 1) % BATCH == 0)
                    atomic_store_explicit(&s->head, i + 1, memory_order_release);
            }
            atomic_store_explicit(&s->head, n, memory_order_release);
        } else {
            uint64_t head = 0;
            for (uint64_t i = 0; i < n; i++) {
                while (i == head) {
                    atomic_store_explicit(&s->tail, i, memory_order_release);
                    head = atomic_load_explicit(&s->head, memory_order_acquire);
                    pause_briefly(&spins);
                }
                spins = 0;
                uint64_t v = s->slots[i % SLOTS];
                if (v != item(i)) {
                    fprintf(stderr, "shmtool: item %llu is %llx, expected %llx\n",
                            (unsigned long long)i, (unsigned long long)v,
                            (unsigned long long)item(i));
                    return 1;
                }
                sum += v;
                if ((i + 1) % BATCH == 0)
                    atomic_store_explicit(&s->tail, i + 1, memory_order_release);
            }
            atomic_store_explicit(&s->tail, n, memory_order_release);
        }
        printf("%s %llu items checksum %016llx\n", cmd, (unsigned long long)n,
               (unsigned long long)sum);
        return 0;
    }
    if (!strcmp(cmd, "add")) {
        uint64_t n = strtoull(argv[3], NULL, 0);
        int use_mutex = argc > 4 && !strcmp(argv[4], "mutex");
        uint64_t parties = argc > 5 ? strtoull(argv[5], NULL, 0) : 0;
        struct seg *s = attach(key);
        /* Start together, so that the adders really contend. */
        atomic_fetch_add(&s->arrived, 1);
        unsigned spins = 0;
        while (parties && atomic_load(&s->arrived) < parties) pause_briefly(&spins);
        for (uint64_t i = 0; i < n; i++) {
            if (use_mutex) {
                int e = pthread_mutex_lock(&s->mutex);
                if (e) { errno = e; die("pthread_mutex_lock"); }
                s->counter++;
                pthread_mutex_unlock(&s->mutex);
            } else {
                atomic_fetch_add(&s->acounter, 1);
            }
        }
        printf("added %llu\n", (unsigned long long)n);
        return 0;
    }
    if (!strcmp(cmd, "add-paced")) {
        uint64_t n = strtoull(argv[3], NULL, 0);
        unsigned us = (unsigned)strtoul(argv[4], NULL, 0);
        struct seg *s = attach(key);
        for (uint64_t i = 0; i < n; i++) {
            atomic_fetch_add(&s->acounter, 1);
            usleep(us);
        }
        printf("added %llu\n", (unsigned long long)n);
        return 0;
    }
    if (!strcmp(cmd, "fork-add")) {
        uint64_t n = strtoull(argv[3], NULL, 0);
        struct seg *s = attach(key);
        pid_t c = xfork();
        if (c == 0) {
            /* The child first, while the page is still another node's. */
            for (uint64_t i = 0; i < n; i++) atomic_fetch_add(&s->acounter, 1);
            _exit(0);
        }
        int st;
        if (waitpid(c, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) die("child");
        for (uint64_t i = 0; i < n; i++) atomic_fetch_add(&s->acounter, 1);
        printf("parent and child added %llu each\n", (unsigned long long)n);
        return 0;
    }
    if (!strcmp(cmd, "show")) {
        struct seg *s = attach(key);
        printf("counter %llu atomic %llu\n", (unsigned long long)s->counter,
               (unsigned long long)atomic_load(&s->acounter));
        return 0;
    }
    if (!strcmp(cmd, "read-into")) {
        struct seg *s = attach(key);
        int fd = open(argv[3], O_RDONLY);
        if (fd < 0) die(argv[3]);
        size_t room = sizeof(s->slots), got = 0;
        for (;;) {
            ssize_t r = read(fd, (char *)s->slots + got, room - got);
            if (r < 0) die("read");
            if (r == 0 || got + r == room) { got += r; break; }
            got += r;
        }
        s->len = got;
        printf("read %zu bytes into the segment\n", got);
        return 0;
    }
    if (!strcmp(cmd, "dump")) {
        struct seg *s = attach(key);
        fwrite(s->slots, 1, s->len, stdout);
        return 0;
    }
    if (!strcmp(cmd, "stat")) {
        int id = shmget(key, 0, 0);
        if (id < 0) die("shmget");
        struct shmid_ds ds;
        if (shmctl(id, IPC_STAT, &ds) < 0) die("shmctl IPC_STAT");
        printf("shmid %d size %zu nattch %lu mode %o uid %u\n", id, ds.shm_segsz,
               (unsigned long)ds.shm_nattch, ds.shm_perm.mode & 0777, ds.shm_perm.uid);
        return 0;
    }
    if (!strcmp(cmd, "pingpong")) {
        uint64_t n = strtoull(argv[3], NULL, 0);
        int side = atoi(argv[4]);
        struct seg *s = attach(key);
        for (uint64_t i = 0; i < n; i++) {
            if (side == 0) {
                if (sem_post(&s->ping)) die("sem_post");
                while (sem_wait(&s->pong)) if (errno != EINTR) die("sem_wait");
            } else {
                while (sem_wait(&s->ping)) if (errno != EINTR) die("sem_wait");
                if (sem_post(&s->pong)) die("sem_post");
            }
        }
        printf("pingpong side %d: %llu round trips\n", side, (unsigned long long)n);
        return 0;
    }
    if (!strcmp(cmd, "condvar")) {
        uint64_t n = strtoull(argv[3], NULL, 0);
        uint64_t side = strtoull(argv[4], NULL, 0);
        struct seg *s = attach(key);
        /* turn counts hand-overs: side 0 moves it from even to odd, side 1
         * from odd to even; each waits on the condition for its turn. */
        for (uint64_t i = 0; i < n; i++) {
            pthread_mutex_lock(&s->cmutex);
            while (s->turn % 2 != side) pthread_cond_wait(&s->cond, &s->cmutex);
            s->turn++;
            pthread_cond_broadcast(&s->cond);
            pthread_mutex_unlock(&s->cmutex);
        }
        printf("condvar side %llu: turn %llu\n", (unsigned long long)side,
               (unsigned long long)s->turn);
        return 0;
    }
    if (!strcmp(cmd, "touch")) {
        int w = !strcmp(argv[3], "write");
        int id = shmget(key, 0, 0);
        if (id < 0) die("shmget");
        struct shmid_ds ds;
        if (shmctl(id, IPC_STAT, &ds) < 0) die("shmctl IPC_STAT");
        volatile char *p = shmat(id, NULL, 0);
        if (p == (void *)-1) die("shmat");
        size_t first = offsetof(struct seg, slots) / PAGE, n = ds.shm_segsz / PAGE - first;
        double *t = calloc(n, sizeof *t);
        struct timespec a, b;
        for (size_t i = 0; i < n; i++) {
            volatile char *q = p + (first + i) * PAGE;
            clock_gettime(CLOCK_MONOTONIC, &a);
            if (w) *q = (char)i; else (void)*q;
            clock_gettime(CLOCK_MONOTONIC, &b);
            t[i] = (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3;
        }
        int cmp(const void *x, const void *y) {
            double d = *(const double *)x - *(const double *)y;
            return d < 0 ? -1 : d > 0;
        }
        qsort(t, n, sizeof *t, cmp);
        printf("%s %zu pages: median %.1f us p99 %.1f us\n", w ? "write" : "read", n,
               t[n / 2], t[n * 99 / 100]);
        return 0;
    }
    if (!strcmp(cmd, "hold")) {
        attach(key);
        printf("attached\n");
        fflush(stdout);
        sleep((unsigned)strtoul(argv[3], NULL, 0));
        return 0;
    }
    if (!strcmp(cmd, "rm")) {
        int id = shmget(key, 0, 0);
        if (id < 0) die("shmget");
        if (shmctl(id, IPC_RMID, NULL) < 0) die("shmctl IPC_RMID");
        return 0;
    }
    fprintf(stderr, "shmtool: unknown command %s\n", cmd);
    return 2;
}
