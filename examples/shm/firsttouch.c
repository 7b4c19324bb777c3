/* firsttouch: the cost of the first write to each page of fresh
 * MAP_SHARED|MAP_ANONYMOUS memory (under krg with KRG_CAPS=+dsm-anon it
 * is a cluster segment whose pages the agent serves).
 *
 *   firsttouch MIB     map MIB MiB, write one byte per page, print the
 *                      time of the mmap and of the writes
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: firsttouch MIB\n");
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 0), len = mib << 20;
    double t0 = now();
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    double t1 = now();
    for (size_t i = 0; i < len; i += 4096) p[i] = 1;
    double t2 = now();
    printf("%zu MiB: mmap %.3f ms, first touch %.1f ms (%.2f us/page)\n", mib,
           (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t1) * 1e6 / (double)(len / 4096));
    return 0;
}
