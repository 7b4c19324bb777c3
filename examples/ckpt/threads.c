/* 8 pthreads around shared counters with a mutex, a condition variable
 * and a barrier. Each round every thread adds its share under the mutex;
 * the last one of the round signals the condition; all meet at the
 * barrier. Checkpoint or migrate it at any time: the final counters are
 * exact.   threads [rounds] [work-per-round] */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define N 8
static long rounds, work;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_barrier_t bar;
static long total, arrived, round_done;
static unsigned long long digest[N];

static void *worker(void *arg) {
    long id = (long)arg;
    unsigned long long h = 1469598103934665603ULL + id;
    for (long r = 0; r < rounds; r++) {
        for (long k = 0; k < work; k++) h = (h ^ (unsigned long long)k) * 1099511628211ULL;
        pthread_mutex_lock(&mu);
        total += id + 1;
        if (++arrived == N) {
            arrived = 0;
            round_done++;
            pthread_cond_broadcast(&cv);
        } else {
            long seen = round_done;
            while (round_done == seen) pthread_cond_wait(&cv, &mu);
        }
        pthread_mutex_unlock(&mu);
        pthread_barrier_wait(&bar);
    }
    digest[id] = h;
    return NULL;
}

int main(int argc, char **argv) {
    rounds = argc > 1 ? atol(argv[1]) : 200;
    work = argc > 2 ? atol(argv[2]) : 2000000;
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_barrier_init(&bar, NULL, N);
    pthread_t t[N];
    for (long i = 0; i < N; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    for (long i = 0; i < N; i++) pthread_join(t[i], NULL);
    unsigned long long d = 0;
    for (int i = 0; i < N; i++) d ^= digest[i] * (i + 1);
    printf("rounds %ld total %ld expected %ld digest %016llx\n", round_done, total,
           rounds * N * (N + 1) / 2, d);
    return total == rounds * N * (N + 1) / 2 && round_done == rounds ? 0 : 1;
}
