/* execlrun l|le|lp PROG: run PROG (one argument list, no options) with
 * execl, execle or execlp, KRG_NODE=2 in its environment.
 *
 * glibc's execl family calls execve inside libc, where no hook saw it: the
 * program was not placed at its exec (only a program that loads libkrg
 * could place itself later, at its first contact with the agent; a static
 * one ran where it was). Test: krg-node/tests/semantics.rs,
 * a_program_started_with_execl_is_placed_like_one_started_with_execv. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: execlrun l|le|lp PROG\n");
        return 2;
    }
    const char *prog = argv[2];
    if (!strcmp(argv[1], "le")) {
        /* The library's own variables travel in the new environment. */
        const char *pre = getenv("LD_PRELOAD");
        const char *sock = getenv("KRG_NODE_SOCK");
        const char *cl = getenv("KRG_CLUSTER");
        char e1[4096], e2[4096], e3[256];
        snprintf(e1, sizeof e1, "LD_PRELOAD=%s", pre ? pre : "");
        snprintf(e2, sizeof e2, "KRG_NODE_SOCK=%s", sock ? sock : "");
        snprintf(e3, sizeof e3, "KRG_CLUSTER=%s", cl ? cl : "");
        char *env[] = {e1, e2, e3, "KRG_NODE=2", "PATH=/usr/bin:/bin", NULL};
        execle(prog, prog, "a", "b", "c", "d", "e", "f", "g", (char *)NULL, env);
    } else {
        setenv("KRG_NODE", "2", 1);
        if (!strcmp(argv[1], "lp"))
            execlp(prog, prog, "a", "b", "c", "d", "e", "f", "g", (char *)NULL);
        else
            execl(prog, prog, "a", "b", "c", "d", "e", "f", "g", (char *)NULL);
    }
    perror("execlrun");
    return 1;
}
