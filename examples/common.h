/* What the example programs share: failing loudly, with the program's
 * name, on a call that must not fail, so that each program reads as what
 * it does. Header-only: the tests compile one source file at a time
 * (cc in krg-node/tests/common), and a quoted include is found next to
 * the file that includes it. Include it first: it asks for _GNU_SOURCE
 * (program_invocation_short_name). */
#ifndef KRG_EXAMPLES_COMMON_H
#define KRG_EXAMPLES_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* "PROGRAM: WHAT: strerror(errno)" on stderr, exit status 1. */
static inline void die(const char *what)
{
    fprintf(stderr, "%s: %s: %s\n", program_invocation_short_name, what, strerror(errno));
    exit(1);
}

/* "usage: USAGE" on stderr and exit status 2 unless the program has at
 * least N arguments. */
static inline void need_args(int argc, int n, const char *usage)
{
    if (argc - 1 < n) {
        fprintf(stderr, "usage: %s\n", usage);
        exit(2);
    }
}

/* fork(), dying if there is no child. */
static inline pid_t xfork(void)
{
    pid_t p = fork();
    if (p < 0)
        die("fork");
    return p;
}

#endif
