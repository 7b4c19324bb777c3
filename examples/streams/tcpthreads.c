/* A TCP echo server with one thread per connection: its threads sit in
 * read() on their sockets when it is migrated, and resume on the new
 * connections (krg migrate PID NODE).
 *
 *   tcpthreads CONNS     listen on 127.0.0.1 (any port, printed as
 *                        "listening PORT"), serve CONNS clients at once,
 *                        then print "done LINES lines"
 */
#include <arpa/inet.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static long lines[8];
static void *serve(void *a) {
    long i = (long)a >> 8; int c = (long)a & 0xff;
    char buf[65536]; ssize_t n;
    while ((n = read(c, buf, sizeof buf)) > 0) {
        for (ssize_t k = 0; k < n; k++) lines[i] += buf[k] == '\n';
        for (ssize_t off = 0; off < n;) { ssize_t w = write(c, buf + off, n - off); if (w < 0) return NULL; off += w; }
    }
    close(c);
    return NULL;
}
int main(int argc, char **argv) {
    int conns = argc > 1 ? atoi(argv[1]) : 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(s, (void *)&a, sizeof a) || listen(s, 16)) { perror("bind/listen"); return 1; }
    socklen_t l = sizeof a; getsockname(s, (void *)&a, &l);
    printf("listening %d\n", ntohs(a.sin_port));
    pthread_t th[8];
    for (long i = 0; i < conns; i++) {
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        pthread_create(&th[i], NULL, serve, (void *)(i << 8 | c));
    }
    long total = 0;
    for (int i = 0; i < conns; i++) { pthread_join(th[i], NULL); total += lines[i]; }
    printf("done %ld lines\n", total);
    return 0;
}
