/* A TCP echo server and client for the cluster-wide loopback.
 *
 *   tcpecho serve ADDR PORT CONNS   listen on ADDR:PORT (PORT 0: any), print
 *                                   "listening PORT", echo CONNS clients one
 *                                   after the other (each until EOF), then
 *                                   print the address getsockname shows
 *                                   (ADDR "-": listen without bind)
 *   tcpecho client ADDR PORT MSGS [SRC]
 *                                   send MSGS numbered lines, check every
 *                                   echo, print "ok COUNT" (from address
 *                                   SRC); SIGUSR1 ends it early; "replies
 *                                   N" on stderr every 10000
 *   tcpecho bind ADDR PORT          bind only: print "bound" or the error
 *
 * ADDR is an IPv4 or IPv6 literal (127.0.0.1, ::1, 0.0.0.0, ::). Under krg,
 * a server bound to 127.0.0.1 on one node answers 127.0.0.1 on every node.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "tcpecho: %s: %s\n", what, strerror(errno));
    exit(1);
}

static socklen_t make_addr(const char *ip, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons(port);
        return sizeof *a4;
    }
    if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons(port);
        return sizeof *a6;
    }
    fprintf(stderr, "tcpecho: bad address %s\n", ip);
    exit(2);
}

static const char *show(const struct sockaddr_storage *ss, char *buf, size_t n) {
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const void *)ss;
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
        port = ntohs(a->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const void *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
        port = ntohs(a->sin6_port);
    }
    snprintf(buf, n, "%s port %d", ip, port);
    return buf;
}

static int bound_socket(const char *ip, int port) {
    struct sockaddr_storage ss;
    socklen_t len = make_addr(ip, port, &ss);
    int s = socket(ss.ss_family, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&ss, len) < 0)
        return -errno;
    return s;
}

static int serve(const char *ip, int port, int conns) {
    /* "-": no bind, listen() picks the port (the kernel's autobind). */
    int s = strcmp(ip, "-") ? bound_socket(ip, port) : socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) {
        errno = -s;
        die("bind");
    }
    if (listen(s, 16) < 0)
        die("listen");
    struct sockaddr_storage me;
    socklen_t ml = sizeof me;
    if (getsockname(s, (struct sockaddr *)&me, &ml) < 0)
        die("getsockname");
    int p = ntohs(me.ss_family == AF_INET ? ((struct sockaddr_in *)&me)->sin_port
                                          : ((struct sockaddr_in6 *)&me)->sin6_port);
    printf("listening %d\n", p);
    fflush(stdout);
    long lines = 0;
    for (int i = 0; i < conns; i++) {
        struct sockaddr_storage peer;
        socklen_t pl = sizeof peer;
        int c = accept(s, (struct sockaddr *)&peer, &pl);
        if (c < 0)
            die("accept");
        char buf[65536];
        ssize_t n;
        while ((n = read(c, buf, sizeof buf)) > 0) {
            for (ssize_t k = 0; k < n; k++)
                lines += buf[k] == '\n';
            for (ssize_t off = 0; off < n;) {
                ssize_t w = write(c, buf + off, n - off);
                if (w < 0)
                    die("write");
                off += w;
            }
        }
        if (n < 0)
            die("read");
        close(c);
    }
    char b[128];
    printf("served %d connections, %ld lines, bound to %s\n", conns, lines,
           show(&me, b, sizeof b));
    return 0;
}

/* SIGUSR1 ends a client's conversation after the current message: a test
 * stops it once its moves are done, however fast the machine is. */
static volatile sig_atomic_t stop;
static void on_usr1(int sig) { (void)sig; stop = 1; }

static int client(const char *ip, int port, long msgs, const char *src) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    struct sockaddr_storage ss;
    socklen_t len = make_addr(ip, port, &ss);
    int s = socket(ss.ss_family, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    if (src) {
        struct sockaddr_storage from;
        socklen_t fl = make_addr(src, 0, &from);
        if (bind(s, (struct sockaddr *)&from, fl) < 0)
            die("bind to the source address");
    }
    if (connect(s, (struct sockaddr *)&ss, len) < 0)
        die("connect");
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    FILE *in = fdopen(dup(s), "r");
    char line[128], want[128];
    long i;
    for (i = 0; i < msgs && !stop; i++) {
        int n = snprintf(want, sizeof want, "message %ld from pid %d\n", i, getpid());
        if (write(s, want, n) != n)
            die("write");
        if (!fgets(line, sizeof line, in)) {
            fprintf(stderr, "tcpecho: connection closed after %ld replies\n", i);
            return 1;
        }
        if (strcmp(line, want) != 0) {
            fprintf(stderr, "tcpecho: reply %ld is \"%s\", sent \"%s\"\n", i, line, want);
            return 1;
        }
        if ((i + 1) % 10000 == 0)
            fprintf(stderr, "replies %ld\n", i + 1);
    }
    shutdown(s, SHUT_WR);
    if (fgets(line, sizeof line, in)) {
        fprintf(stderr, "tcpecho: extra data after the last reply\n");
        return 1;
    }
    printf("ok %ld\n", i);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "serve"))
        return serve(argv[2], atoi(argv[3]), atoi(argv[4]));
    if ((argc == 5 || argc == 6) && !strcmp(argv[1], "client"))
        return client(argv[2], atoi(argv[3]), atol(argv[4]), argc == 6 ? argv[5] : NULL);
    if (argc == 4 && !strcmp(argv[1], "bind")) {
        int s = bound_socket(argv[2], atoi(argv[3]));
        if (s < 0) {
            printf("%s\n", strerror(-s));
            return 1;
        }
        printf("bound\n");
        return 0;
    }
    fprintf(stderr, "usage: tcpecho serve ADDR PORT N | client ADDR PORT N [SRC] | bind ADDR PORT\n");
    return 2;
}
