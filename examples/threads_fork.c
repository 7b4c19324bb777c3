/*
 * threads_fork.c - fork from several threads at once.
 *
 * Four threads each fork children in a loop while the others keep calling
 * getpid/getppid; every child checks its own pid and its parent, and every
 * parent checks that waitpid hands back the pid fork gave. This is what the
 * library must survive: no lock held across fork, no stale state in the
 * child, no cache confusion between threads.
 *
 *   LD_PRELOAD=$PWD/target/debug/libkrg.so examples/bin/threads_fork
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define THREADS 4
#define FORKS 25

static pid_t me;
static int bad[THREADS];

static void *worker(void *arg)
{
    int t = (int)(long)arg;
    for (int i = 0; i < FORKS; i++) {
        int fds[2];
        if (pipe(fds) != 0)
            abort();
        pid_t c = fork();
        if (c == 0) {
            pid_t self = getpid();
            int ok = getppid() == me && self != me;
            if (write(fds[1], &self, sizeof self) != sizeof self)
                _exit(3);
            _exit(ok ? 0 : 1);
        }
        close(fds[1]);
        pid_t said = -1;
        if (read(fds[0], &said, sizeof said) != sizeof said)
            said = -2;
        close(fds[0]);
        int st;
        pid_t w = waitpid(c, &st, 0);
        if (c <= 0 || w != c || said != c || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "thread %d fork %d: fork %d child says %d waitpid %d status %x\n", t, i,
                    c, said, w, st);
            bad[t]++;
        }
        if (getpid() != me)
            bad[t]++;
    }
    return NULL;
}

int main(void)
{
    me = getpid();
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++)
        pthread_create(&th[t], NULL, worker, (void *)t);
    int total = 0;
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        total += bad[t];
    }
    printf("pid %d: %d forks from %d threads, %d bad\n", me, THREADS * FORKS, THREADS, total);
    return total ? 1 : 0;
}
