/* posixshm: POSIX shared memory objects (shm_open + mmap) across the
 * nodes of a krg cluster.
 *
 *   posixshm create NAME BYTES   create (0600), size with ftruncate, fill:
 *                                byte i = i * 7 mod 251
 *   posixshm check NAME          map read-only, check every byte, print the
 *                                size (from fstat) and "ok"
 *   posixshm add NAME N [P]      atomic add 1 to the counter at offset 0
 *                                (after P processes arrived, if P) N times
 *   posixshm show NAME           print the counter
 *   posixshm unlink NAME
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "posixshm: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint8_t pattern(size_t i) { return (uint8_t)(i * 7 % 251); }

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: see the comment at the top of posixshm.c\n");
        return 2;
    }
    const char *cmd = argv[1], *name = argv[2];
    if (!strcmp(cmd, "create")) {
        size_t n = strtoull(argv[3], NULL, 0);
        int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
        if (fd < 0) die("shm_open");
        if (ftruncate(fd, (off_t)n) < 0) die("ftruncate");
        uint8_t *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) die("mmap");
        close(fd);
        for (size_t i = 16; i < n; i++) p[i] = pattern(i);
        if (munmap(p, n) < 0) die("munmap");
        printf("created %zu bytes\n", n);
        return 0;
    }
    if (!strcmp(cmd, "check")) {
        int fd = shm_open(name, O_RDONLY, 0);
        if (fd < 0) die("shm_open");
        struct stat st;
        if (fstat(fd, &st) < 0) die("fstat");
        size_t n = (size_t)st.st_size;
        const uint8_t *p = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) die("mmap");
        for (size_t i = 16; i < n; i++)
            if (p[i] != pattern(i)) {
                fprintf(stderr, "posixshm: byte %zu is %u, expected %u\n", i, p[i], pattern(i));
                return 1;
            }
        printf("size %zu ok\n", n);
        return 0;
    }
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0 && !strcmp(cmd, "unlink")) die("shm_open");
    if (!strcmp(cmd, "unlink")) {
        if (shm_unlink(name) < 0) die("shm_unlink");
        return 0;
    }
    if (fd < 0) die("shm_open");
    _Atomic uint64_t *c = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (c == MAP_FAILED) die("mmap");
    if (!strcmp(cmd, "add")) {
        uint64_t n = strtoull(argv[3], NULL, 0), parties = argc > 4 ? strtoull(argv[4], NULL, 0) : 0;
        atomic_fetch_add(&c[1], 1);
        while (parties && atomic_load(&c[1]) < parties) sched_yield();
        for (uint64_t i = 0; i < n; i++) atomic_fetch_add(&c[0], 1);
        printf("added %llu\n", (unsigned long long)n);
        return 0;
    }
    if (!strcmp(cmd, "show")) {
        printf("counter %llu\n", (unsigned long long)atomic_load(&c[0]));
        return 0;
    }
    fprintf(stderr, "posixshm: unknown command %s\n", cmd);
    return 2;
}
