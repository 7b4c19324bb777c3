/* handlermalloc: LD_PRELOAD it before libkrg.so to see every malloc,
 * calloc, realloc, free, posix_memalign and aligned_alloc call made while
 * a thread runs libkrg's capture handler (signal 62: a checkpoint, a
 * migration, a stream hand-over). There must be none: the handler may
 * have interrupted malloc in the same thread.
 *
 *   cc -shared -fPIC -o libhandlermalloc.so handlermalloc.c -ldl
 *   LD_PRELOAD="./libhandlermalloc.so libkrg.so" prog
 *
 * It wraps the handler libkrg installs (sigaction is looked up through the
 * preload order, so libkrg's call reaches this one first) to know when a
 * thread is inside it, and writes one line per call to stderr,
 * "handlermalloc: pid P: malloc(N) in the capture handler", followed by a
 * backtrace (the first 20 calls).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define REAL(name)                                                                                 \
    static __typeof__(&name) real_##name;                                                          \
    if (!real_##name)                                                                              \
        real_##name = (__typeof__(&name))dlsym(RTLD_NEXT, #name);

static __thread int inside;
static void (*krg_handler)(int, siginfo_t *, void *);
static int reported;

static void wrapper(int sig, siginfo_t *si, void *uc)
{
    inside++;
    krg_handler(sig, si, uc);
    inside--;
}

int sigaction(int sig, const struct sigaction *sa, struct sigaction *old)
{
    REAL(sigaction);
    if (sig == SIGRTMAX - 2 && sa && (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction != wrapper) {
        struct sigaction w = *sa;
        krg_handler = sa->sa_sigaction;
        w.sa_sigaction = wrapper;
        return real_sigaction(sig, &w, old);
    }
    return real_sigaction(sig, sa, old);
}

static void report(const char *what, size_t n)
{
    if (inside != 1 || reported >= 20)
        return;
    reported++;
    inside++; /* what follows may allocate: not reported */
    char line[128];
    int l = snprintf(line, sizeof line, "handlermalloc: pid %d: %s(%zu) in the capture handler\n",
                     (int)getpid(), what, n);
    if (write(2, line, l) < 0)
        _exit(1);
    void *f[32];
    backtrace_symbols_fd(f, backtrace(f, 32), 2);
    inside--;
}

/* dlsym may call calloc before the real one is known: a small static pool. */
static char boot[4096];
static size_t boot_used;

void *malloc(size_t n)
{
    REAL(malloc);
    report("malloc", n);
    return real_malloc(n);
}

void free(void *p)
{
    if ((char *)p >= boot && (char *)p < boot + sizeof boot)
        return;
    REAL(free);
    if (p)
        report("free", 0);
    real_free(p);
}

void *calloc(size_t a, size_t b)
{
    static __typeof__(&calloc) real_calloc;
    static int looking;
    if (!real_calloc) {
        if (looking) {
            void *p = boot + boot_used;
            boot_used += (a * b + 15) & ~(size_t)15;
            return boot_used <= sizeof boot ? p : NULL;
        }
        looking = 1;
        real_calloc = (__typeof__(&calloc))dlsym(RTLD_NEXT, "calloc");
        looking = 0;
    }
    report("calloc", a * b);
    return real_calloc(a, b);
}

void *realloc(void *p, size_t n)
{
    REAL(realloc);
    report("realloc", n);
    return real_realloc(p, n);
}

int posix_memalign(void **p, size_t align, size_t n)
{
    REAL(posix_memalign);
    report("posix_memalign", n);
    return real_posix_memalign(p, align, n);
}

void *aligned_alloc(size_t align, size_t n)
{
    REAL(aligned_alloc);
    report("aligned_alloc", n);
    return real_aligned_alloc(align, n);
}

__attribute__((constructor)) static void warm(void)
{
    void *f[2];
    backtrace(f, 2); /* loads libgcc_s now, not in a handler */
}
