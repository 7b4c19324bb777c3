/* spawn_ways.c: every way a program creates a program goes through krg's
 * placement. Run under krg with a policy that moves programs (or with
 * KRG_NODE=N in the environment this program gives its children), each child
 * prints the node it runs on:
 *
 *   krg cluster exec --node 1 -- examples/bin/spawn_ways 2
 *
 * With an argument N, the children are pinned to node N (KRG_NODE=N).
 */
#define _GNU_SOURCE
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#define CHILD(way) "read h < /proc/sys/kernel/hostname; echo " way " $h; exit 7"

static void report(const char *way, pid_t pid, int st)
{
    if (WIFEXITED(st))
        printf("%s: pid %d exit %d\n", way, (int)pid, WEXITSTATUS(st));
    else if (WIFSIGNALED(st))
        printf("%s: pid %d signal %d\n", way, (int)pid, WTERMSIG(st));
    fflush(stdout);
}

int main(int argc, char **argv)
{
    int st;
    pid_t p;
    if (argc > 1)
        setenv("KRG_NODE", argv[1], 1);
    fflush(stdout);

    /* fork + execvp */
    p = fork();
    if (p == 0) {
        execlp("sh", "sh", "-c", CHILD("fork-exec"), (char *)NULL);
        _exit(127);
    }
    waitpid(p, &st, 0);
    report("fork-exec", p, st);

    /* vfork + execve */
    p = vfork();
    if (p == 0) {
        char *a[] = {"/bin/sh", "-c", CHILD("vfork-exec"), NULL};
        execve("/bin/sh", a, environ);
        _exit(127);
    }
    waitpid(p, &st, 0);
    report("vfork-exec", p, st);

    /* posix_spawnp */
    char *a[] = {"sh", "-c", CHILD("posix_spawnp"), NULL};
    if (posix_spawnp(&p, "sh", NULL, NULL, a, environ) == 0) {
        waitpid(p, &st, 0);
        report("posix_spawnp", p, st);
    }

    /* system (glibc runs it through an internal posix_spawn) */
    st = system(CHILD("system"));
    report("system", 0, st);

    /* popen */
    FILE *f = popen(CHILD("popen"), "r");
    if (f) {
        char line[256];
        while (fgets(line, sizeof line, f))
            fputs(line, stdout);
        st = pclose(f);
        report("popen", 0, st);
    }
    return 0;
}
