/* execloop N: print "left N", then execl itself with N-1, down to 0.
 *
 * A program that spends nearly all its life in exec: glibc's execl calls
 * execve inside libc, where no hook sees it. Its stdout's reader moved to
 * another node hands the pipe over with a signal to this process; one
 * arriving between the execve and libkrg's constructor in the new image
 * killed it (the signal's default action), unless the exec holds it.
 * Test: krg-node/tests/streams.rs,
 * a_program_that_execs_itself_through_execl_keeps_its_stream_while_its_reader_moves. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: execloop N\n");
        return 2;
    }
    long n = atol(argv[1]);
    printf("left %ld\n", n);
    fflush(stdout);
    if (n <= 0)
        return 0;
    char next[32];
    snprintf(next, sizeof next, "%ld", n - 1);
    execl(argv[0], argv[0], next, (char *)NULL);
    perror("execloop: execl");
    return 1;
}
