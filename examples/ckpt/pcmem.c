/* Memory traffic for post-copy migration: SIZE MiB in one region, filled
 * with a pattern; THREADS workers each keep checking and updating their own
 * slice of the first 7/8 (so right after a migration they all fault at
 * once, in different places); one reader thread keeps read()ing a few bytes
 * from FILE into the middle of pages of the last 1/8, walking down from the
 * end (the pages a post-copy sends last), each page once: the read() itself
 * is the first touch of the page, and the rest of the page must still hold
 * the pattern. Prints "ready", then after SECONDS "ok PASSES READS" or what
 * went wrong (exit 1).
 *   pcmem SIZE-MiB THREADS SECONDS FILE */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
static uint64_t *mem;
static size_t words, work_words;
static int nthreads, secs, fd;
static time_t end;
static volatile int failed;
static unsigned long long passes[64], reads;
static char want[100];

static uint64_t pat(size_t i) { return i * 0x9e3779b97f4a7c15ULL; }

static void *worker(void *arg) {
    int t = (int)(intptr_t)arg;
    size_t per = work_words / nthreads, lo = per * t, hi = lo + per;
    uint64_t pass = 0;
    while (time(NULL) < end && !failed) {
        for (size_t i = lo; i < hi; i++) {
            if (mem[i] != pat(i) + pass) {
                printf("CORRUPT word %zu (thread %d pass %llu): %llx\n", i, t,
                       (unsigned long long)pass, (unsigned long long)mem[i]);
                failed = 1;
                return NULL;
            }
            mem[i] += 1;
        }
        pass++;
    }
    passes[t] = pass;
    return NULL;
}

static void *reader(void *arg) {
    (void)arg;
    size_t first = work_words * 8 / PAGE, last = words * 8 / PAGE;
    for (size_t p = last; p-- > first && time(NULL) < end && !failed;) {
        char *page = (char *)mem + p * PAGE;
        ssize_t n = pread(fd, page + 1000, 100, 0);
        if (n != 100) {
            printf("READ page %zu: %zd (%m)\n", p, n);
            failed = 1;
            return NULL;
        }
        if (memcmp(page + 1000, want, 100) != 0) {
            printf("READ page %zu: wrong bytes\n", p);
            failed = 1;
            return NULL;
        }
        uint64_t *w = (uint64_t *)page;
        size_t base = p * PAGE / 8;
        for (size_t k = 0; k < PAGE / 8; k++) {
            if (k * 8 + 8 > 1000 && k * 8 < 1100) continue;
            if (w[k] != pat(base + k)) {
                printf("READ page %zu: word %zu lost its pattern\n", p, k);
                failed = 1;
                return NULL;
            }
        }
        reads++;
        usleep(300);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: pcmem SIZE-MiB THREADS SECONDS FILE\n");
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    nthreads = atoi(argv[2]);
    secs = atoi(argv[3]);
    if (nthreads < 1 || nthreads > 64) return 2;
    fd = open(argv[4], O_RDONLY);
    if (fd < 0 || pread(fd, want, 100, 0) != 100) {
        perror(argv[4]);
        return 2;
    }
    words = mib * 1024 * 1024 / 8;
    work_words = words / 8 * 7;
    mem = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    for (size_t i = 0; i < words; i++) mem[i] = pat(i);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    end = time(NULL) + secs;
    pthread_t th[65];
    for (int t = 0; t < nthreads; t++) pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t);
    pthread_create(&th[nthreads], NULL, reader, NULL);
    for (int t = 0; t <= nthreads; t++) pthread_join(th[t], NULL);
    if (failed) return 1;
    unsigned long long min = ~0ULL;
    for (int t = 0; t < nthreads; t++)
        if (passes[t] < min) min = passes[t];
    printf("ok %llu %llu\n", min, reads);
    return 0;
}
