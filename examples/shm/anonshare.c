/* anonshare: MAP_SHARED|MAP_ANONYMOUS memory shared by a parent and its
 * child, as programs share memory with the children they fork.
 *
 *   anonshare N USEC   map one shared page, fork; the parent and the child
 *                      each add 1 atomically N times, USEC apart; the
 *                      parent waits for the child and prints the total
 *
 * On one machine the total is always 2N. Under krg with KRG_CAPS=+dsm-anon
 * it stays 2N when either process is migrated to another node meanwhile.
 */
#define _GNU_SOURCE
#include "../common.h"
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static void add(_Atomic uint64_t *c, uint64_t n, unsigned us) {
    for (uint64_t i = 0; i < n; i++) {
        atomic_fetch_add(c, 1);
        usleep(us);
    }
}

int main(int argc, char **argv) {
    need_args(argc, 2, "anonshare N USEC");
    uint64_t n = strtoull(argv[1], NULL, 0);
    unsigned us = (unsigned)strtoul(argv[2], NULL, 0);
    _Atomic uint64_t *c = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                               MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (c == MAP_FAILED)
        die("mmap");
    pid_t k = xfork();
    if (k == 0) {
        add(c, n, us);
        _exit(0);
    }
    add(c, n, us);
    int st;
    if (waitpid(k, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) {
        fprintf(stderr, "anonshare: the child failed\n");
        return 1;
    }
    printf("total %llu\n", (unsigned long long)atomic_load(c));
    munmap((void *)c, 4096);
    return 0;
}
