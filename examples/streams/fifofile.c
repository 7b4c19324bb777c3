/* A FIFO opened with fopen, as C programs do: `fifofile r PATH` reads it
 * line by line, `fifofile w PATH N` writes N numbered lines. Each prints
 * what its stream's fd is (a "fifo", or a "socket" when krg met the other
 * end on another node), then what it read or wrote. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *kind(FILE *f) {
    struct stat st;
    if (fstat(fileno(f), &st) != 0)
        return "unknown";
    if (S_ISFIFO(st.st_mode))
        return "fifo";
    if (S_ISSOCK(st.st_mode))
        return "socket";
    return "other";
}

int main(int argc, char **argv) {
    if (argc < 3 || (argv[1][0] == 'w' && argc < 4)) {
        fprintf(stderr, "usage: fifofile r PATH | fifofile w PATH N\n");
        return 2;
    }
    FILE *f = fopen(argv[2], argv[1][0] == 'w' ? "w" : "r");
    if (!f) {
        perror(argv[2]);
        return 1;
    }
    printf("%s\n", kind(f));
    if (argv[1][0] == 'w') {
        long n = atol(argv[3]);
        for (long i = 0; i < n; i++)
            fprintf(f, "line %ld\n", i);
        if (fclose(f) != 0) {
            perror("fclose");
            return 1;
        }
        printf("wrote %ld\n", n);
        return 0;
    }
    char buf[64];
    long n = 0, sum = 0;
    while (fgets(buf, sizeof buf, f)) {
        long v;
        if (sscanf(buf, "line %ld", &v) != 1 || v != n) {
            printf("line %ld is wrong: %s", n, buf);
            return 1;
        }
        sum += v;
        n++;
    }
    printf("read %ld sum %ld\n", n, sum);
    return 0;
}
