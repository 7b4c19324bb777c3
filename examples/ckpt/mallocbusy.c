/* mallocbusy: a pipeline stage that spends its time inside malloc.
 *
 *   mallocbusy ROUNDS
 *
 * Copies stdin to stdout; for every chunk read it frees and allocates
 * ROUNDS blocks (1-7 KiB, one in 64 of 140-240 KiB: past the tcache, so
 * glibc's own bin handling runs), touching a byte per page and checking
 * it when the block is freed. Single-threaded, so glibc takes no lock: a
 * signal handler that calls malloc or free while this is inside malloc
 * corrupts the heap, and glibc aborts ("malloc(): unsorted double linked
 * list corrupted"...). Prints its pid to stderr first; exits 0 at end of
 * input.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define SLOTS 512
static unsigned char *blk[SLOTS];
static size_t len[SLOTS];

static unsigned rnd(void)
{
    static unsigned s = 12345;
    s = s * 1103515245 + 12345;
    return s >> 8;
}

static void check(int i)
{
    for (size_t k = 0; k < len[i]; k += 4093)
        if (blk[i][k] != (unsigned char)(i + len[i])) {
            fprintf(stderr, "mallocbusy: block %d changed\n", i);
            abort();
        }
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 1000;
    static char buf[65536];
    fprintf(stderr, "mallocbusy: pid %d\n", (int)getpid());
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            perror("mallocbusy: read");
            return 1;
        }
        if (n == 0)
            break;
        for (int r = 0; r < rounds; r++) {
            int i = rnd() % SLOTS;
            if (blk[i]) {
                check(i);
                free(blk[i]);
            }
            size_t l = rnd() % 64 == 0 ? 140000 + rnd() % 100000 : 1100 + rnd() % 6000;
            blk[i] = malloc(l);
            if (!blk[i]) {
                fprintf(stderr, "mallocbusy: malloc(%zu) failed\n", l);
                abort();
            }
            len[i] = l;
            for (size_t k = 0; k < l; k += 4093)
                blk[i][k] = (unsigned char)(i + l);
        }
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(1, buf + off, n - off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                perror("mallocbusy: write");
                return 1;
            }
            off += w;
        }
    }
    for (int i = 0; i < SLOTS; i++)
        if (blk[i]) {
            check(i);
            free(blk[i]);
        }
    return 0;
}
