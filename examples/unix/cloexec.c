/* How a parent learns that its child's exec happened (git's run-command,
 * Python's subprocess): EOF on a close-on-exec pipe, on which the child
 * writes errno only if the exec fails. Here the parent then feeds the
 * child's stdin, so a close-on-exec pipe that stays open after the exec
 * (kept by a stand-in that never exec'd) hangs both for ever.
 *
 *   cloexec PROGRAM [ARGS...]   # PROGRAM reads stdin: cat, md5sum...
 * prints "exec done", what PROGRAM prints of "hello", "status N". */
#define _GNU_SOURCE
#include "../common.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int status_pipe[2], in[2];
    need_args(argc, 1, "cloexec PROGRAM [ARGS...]");
    if (pipe2(status_pipe, O_CLOEXEC) || pipe(in))
        die("pipe");
    pid_t c = xfork();
    if (c == 0) {
        close(status_pipe[0]);
        dup2(in[0], 0);
        close(in[0]);
        close(in[1]);
        execv(argv[1], argv + 1);
        int e = errno;
        if (write(status_pipe[1], &e, sizeof e) < 0)
            _exit(126);
        _exit(127);
    }
    close(status_pipe[1]);
    close(in[0]);
    int e = 0;
    ssize_t n = read(status_pipe[0], &e, sizeof e);
    if (n != 0) {
        printf("exec failed: %s\n", n > 0 ? strerror(e) : "read");
        return 1;
    }
    printf("exec done\n");
    fflush(stdout);
    const char *msg = "hello\n";
    if (write(in[1], msg, strlen(msg)) < 0)
        perror("write");
    close(in[1]);
    int st;
    if (waitpid(c, &st, 0) != c) {
        perror("waitpid");
        return 1;
    }
    printf("status %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
    return 0;
}
