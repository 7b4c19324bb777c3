/* pipegen: a producer for pipelines that move between nodes.
 *
 *   pipegen MIB [MS]   write MIB MiB of a fixed pseudo-random stream to
 *                      stdout, sleeping MS milliseconds after each MiB (so
 *                      that the stream lasts long enough to migrate its
 *                      ends mid-way) until SIGUSR1 says to go on at full
 *                      speed; the same bytes on every run.
 *
 * The stream is xorshift64 output from a fixed seed, so `pipegen N | sha256sum`
 * has one right answer whatever happened to the pipe in between.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void write_all(const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(1, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "pipegen: write: %s\n", strerror(errno));
            exit(1);
        }
        p += w;
        n -= (size_t)w;
    }
}

static volatile sig_atomic_t fast;
static void on_usr1(int sig)
{
    (void)sig;
    fast = 1;
}

int main(int argc, char **argv)
{
    signal(SIGUSR1, on_usr1);
    if (argc < 2) {
        fprintf(stderr, "usage: pipegen MIB [MS]\n");
        return 2;
    }
    long mib = atol(argv[1]);
    long ms = argc > 2 ? atol(argv[2]) : 0;
    static uint64_t buf[(1 << 20) / 8];
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (long m = 0; m < mib; m++) {
        for (size_t i = 0; i < sizeof buf / 8; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[i] = x;
        }
        /* Several writes per MiB, as a program writing lines would. */
        for (size_t off = 0; off < sizeof buf; off += 64 * 1024)
            write_all((const char *)buf + off, 64 * 1024);
        if (ms > 0 && !fast) {
            struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
            while (nanosleep(&t, &t) != 0 && errno == EINTR && !fast)
                ;
        }
    }
    return 0;
}
