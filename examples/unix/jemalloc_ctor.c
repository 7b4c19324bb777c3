/* A program whose malloc is jemalloc and whose library allocates in its
 * constructor (ctorlib.c): under LD_PRELOAD=libkrg.so it must start and
 * print "ready 1", never hang.
 *   cc -shared -fPIC -o libctorlib.so ctorlib.c
 *   cc -o jemalloc_ctor jemalloc_ctor.c -L. -lctorlib -ljemalloc -Wl,-rpath,. */
#include <stdio.h>
#include <stdlib.h>

int ctorlib_ready(void);

int main(void)
{
    char *p = malloc(64);
    printf("ready %d\n", ctorlib_ready() && p != NULL);
    free(p);
    return 0;
}
