/* A library whose constructor allocates, initialised before libkrg.so's
 * (its program links it): with jemalloc as the program's malloc, that
 * first malloc runs jemalloc's initialisation, which calls
 * readlink("/etc/malloc.conf") with its init lock held (libsystemd ->
 * libgcrypt -> libgpg-error do this in real programs). See jemalloc_ctor.c. */
#include <stdlib.h>

static void *kept;

__attribute__((constructor)) static void allocate_early(void)
{
    kept = malloc(100);
}

int ctorlib_ready(void)
{
    return kept != NULL;
}
