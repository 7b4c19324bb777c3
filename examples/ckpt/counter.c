/* A CPU-bound counter that prints one line per step: checkpoint, migrate
 * or restart it and the sequence goes on where it was, identical to an
 * undisturbed run (the work per line is fixed, not timed).
 *   counter [lines] [work-per-line] */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long lines = argc > 1 ? atol(argv[1]) : 50;
    long work = argc > 2 ? atol(argv[2]) : 20000000;
    unsigned long long h = 1469598103934665603ULL;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long i = 0; i < lines; i++) {
        for (long k = 0; k < work; k++) h = (h ^ (unsigned long long)k) * 1099511628211ULL;
        printf("%ld %016llx\n", i, h);
    }
    return 0;
}
