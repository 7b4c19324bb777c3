/* An epoll event loop over a timerfd, an eventfd and a signalfd: migrate it
 * (krg migrate PID NODE) and it goes on serving all three where it lands.
 *
 *   evloop [period-ms]
 *
 * Every timer expiration counts a tick; every 10 ticks the loop posts to
 * its eventfd, whose wake-ups it counts when epoll reports them. SIGUSR1
 * (taken through the signalfd) prints "usr1 N ticks T"; SIGTERM ends the
 * loop with "done ticks T wakes W usr1 N consistent yes|no" (yes when every
 * post was seen once: W == T / 10).
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

enum { TIMER = 1, EVENT = 2, SIGNAL = 3 };

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void watch(int ep, int fd, uint64_t tag) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl");
}

int main(int argc, char **argv) {
    long period = argc > 1 ? atol(argv[1]) : 20;
    setvbuf(stdout, NULL, _IOLBF, 0);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGUSR1);
    sigaddset(&mask, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
        die("sigprocmask");
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (sfd < 0 || tfd < 0 || efd < 0 || ep < 0)
        die("creating the fds");
    struct itimerspec its = {
        .it_interval = {period / 1000, (period % 1000) * 1000000},
        .it_value = {period / 1000, (period % 1000) * 1000000},
    };
    if (timerfd_settime(tfd, 0, &its, NULL) < 0)
        die("timerfd_settime");
    watch(ep, tfd, TIMER);
    watch(ep, efd, EVENT);
    watch(ep, sfd, SIGNAL);
    printf("ready\n");
    uint64_t ticks = 0, posted = 0, wakes = 0, usr1 = 0;
    for (;;) {
        struct epoll_event evs[4];
        int n = epoll_wait(ep, evs, 4, -1);
        if (n < 0) {
            /* A checkpoint or migration interrupts the wait: EINTR. */
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            uint64_t v;
            switch (evs[i].data.u64) {
            case TIMER:
                if (read(tfd, &v, sizeof v) == sizeof v)
                    ticks += v;
                for (; posted < ticks / 10; posted++) {
                    uint64_t one = 1;
                    if (write(efd, &one, sizeof one) != sizeof one)
                        die("eventfd write");
                }
                if (ticks % 50 < v)
                    printf("ticks %llu wakes %llu\n", (unsigned long long)ticks,
                           (unsigned long long)wakes);
                break;
            case EVENT:
                if (read(efd, &v, sizeof v) == sizeof v)
                    wakes += v;
                break;
            case SIGNAL: {
                struct signalfd_siginfo si;
                if (read(sfd, &si, sizeof si) != sizeof si)
                    break;
                if (si.ssi_signo == SIGUSR1) {
                    printf("usr1 %llu ticks %llu\n", (unsigned long long)++usr1,
                           (unsigned long long)ticks);
                    break;
                }
                uint64_t rest;
                if (read(efd, &rest, sizeof rest) == sizeof rest)
                    wakes += rest;
                printf("done ticks %llu wakes %llu usr1 %llu consistent %s\n",
                       (unsigned long long)ticks, (unsigned long long)wakes,
                       (unsigned long long)usr1, wakes == ticks / 10 ? "yes" : "no");
                return 0;
            }
            default:
                fprintf(stderr, "evloop: unknown event tag %llu\n",
                        (unsigned long long)evs[i].data.u64);
                return 1;
            }
        }
    }
}
