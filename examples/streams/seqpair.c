/* seqpair: a parent and its child talk over a UNIX seqpacket socketpair;
 * either can be migrated while they talk, and every message must come
 * back whole: same length (zero-length messages included), same bytes,
 * same order.
 *
 *   seqpair [forked]
 *                print "pids PARENT CHILD", then keep 8 messages of
 *                varying sizes (0 to 60000 bytes) in flight to the child,
 *                which echoes each, and check every echo until SIGUSR1;
 *                then shut the conversation down, wait for the child and
 *                print "ok COUNT" (and the child's exit status if it is
 *                not 0). With "forked" the child echoes in the forked
 *                process itself, without running the program again.
 *
 * A zero-length message and the end of the conversation both make recv
 * return 0: the credentials every message carries (SO_PASSCRED) tell them
 * apart.
 */
#define _GNU_SOURCE
#include "echopair.h"
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define WINDOW 8
#define MAXLEN 60000

/* Length and bytes of message i. */
static size_t len_of(long i)
{
    if (i % 13 == 5)
        return 0;
    return (size_t)((i * 7919) % MAXLEN);
}

static void fill(long i, unsigned char *b, size_t n)
{
    for (size_t j = 0; j < n; j++)
        b[j] = (unsigned char)(i * 31 + j * 7);
}

/* One message into buf: its length, -1 at the end of the conversation,
 * -2 on an error (errno), -3 if it was cut. */
static ssize_t get(int s, unsigned char *buf, size_t size)
{
    for (;;) {
        struct iovec iov = {buf, size};
        union {
            struct cmsghdr h;
            char b[CMSG_SPACE(sizeof(struct ucred)) + 64];
        } c;
        struct msghdr m = {0};
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = c.b;
        m.msg_controllen = sizeof c.b;
        ssize_t n = recvmsg(s, &m, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -2;
        }
        if (m.msg_flags & MSG_TRUNC)
            return -3;
        if (n == 0 && CMSG_FIRSTHDR(&m) == NULL)
            return -1;
        return n;
    }
}

static int put(int s, const unsigned char *buf, size_t n)
{
    for (;;) {
        ssize_t w = send(s, buf, n, MSG_NOSIGNAL);
        if (w == (ssize_t)n)
            return 0;
        if (w < 0 && errno == EINTR)
            continue;
        return -1;
    }
}

static int echo(int s)
{
    static unsigned char buf[MAXLEN + 1];
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
    for (;;) {
        ssize_t n = get(s, buf, sizeof buf);
        if (n == -1)
            return 0;
        if (n < 0)
            return 10 - (int)n;
        if (put(s, buf, (size_t)n) != 0)
            return 20;
    }
}

int main(int argc, char **argv)
{
    pid_t child;
    int s = echo_child(argc, argv, SOCK_SEQPACKET, echo, &child);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
    printf("pids %d %d\n", (int)getpid(), (int)child);
    fflush(stdout);
    static unsigned char out[MAXLEN], in[MAXLEN + 1], want[MAXLEN];
    long sent = 0, got = 0;
    for (;;) {
        while (!stop && sent - got < WINDOW) {
            size_t n = len_of(sent);
            fill(sent, out, n);
            if (put(s, out, n) != 0) {
                printf("FAIL send %ld: %s\n", sent, strerror(errno));
                return 1;
            }
            sent++;
        }
        if (got == sent)
            break;
        ssize_t n = get(s, in, sizeof in);
        if (n < 0) {
            printf("FAIL echo %ld: %s\n", got,
                   n == -1 ? "the child ended" : n == -3 ? "cut" : strerror(errno));
            return 1;
        }
        size_t w = len_of(got);
        fill(got, want, w);
        if ((size_t)n != w || memcmp(in, want, w) != 0) {
            printf("FAIL echo %ld: %zd bytes, %zu sent%s\n", got, n, w,
                   (size_t)n == w ? " (other bytes)" : "");
            return 1;
        }
        got++;
    }
    shutdown(s, SHUT_WR);
    ssize_t n = get(s, in, sizeof in);
    if (n != -1) {
        printf("FAIL after the last echo: %zd\n", n);
        return 1;
    }
    return echo_child_done(child, got);
}
