/* Touches SIZE MiB with a pattern, then keeps checking and updating it:
 * migrate it and every byte must still be right.
 *   bigmem SIZE-MiB SECONDS */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    int secs = argc > 2 ? atoi(argv[2]) : 10;
    size_t n = mib * 1024 * 1024 / sizeof(uint64_t);
    uint64_t *a = malloc(n * sizeof(uint64_t));
    if (!a) { perror("malloc"); return 2; }
    for (size_t i = 0; i < n; i++) a[i] = i * 0x9e3779b97f4a7c15ULL;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %zu MiB\n", mib);
    time_t end = time(NULL) + secs;
    uint64_t pass = 0;
    while (time(NULL) < end) {
        for (size_t i = 0; i < n; i++) {
            if (a[i] != i * 0x9e3779b97f4a7c15ULL + pass) {
                printf("CORRUPT at %zu pass %llu\n", i, (unsigned long long)pass);
                return 1;
            }
            a[i] += 1;
        }
        pass++;
        usleep(100000);
    }
    printf("ok %llu passes\n", (unsigned long long)pass);
    return 0;
}
