/* nodename ARGS...: print this host's name and the arguments, one line.
 * Built static by the test that uses it (no libkrg loads in it). */
#include <stdio.h>
#include <sys/utsname.h>

int main(int argc, char **argv)
{
    struct utsname u;
    uname(&u);
    printf("%s", u.nodename);
    for (int i = 1; i < argc; i++)
        printf(" %s", argv[i]);
    printf("\n");
    return 0;
}
