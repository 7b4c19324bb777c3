/* A tuned application moving itself: krg_migrate(NODE), then
 * krg_checkpoint(DIR), which returns 0 now and 1 in a process restarted
 * from DIR (krg restart DIR). Callbacks count captures and restores.
 *   selfmig NODE DIR */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define KRG_WEAK
#include "krg.h"

static int captures, restores;
static void before(void) { captures++; }
static void after(void) { restores++; }

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: selfmig NODE DIR\n");
        return 2;
    }
    if (!krg_migrate || krg_mode() != KRG_MODE_ACTIVE) {
        fprintf(stderr, "not running under krg\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    krg_on_checkpoint(before);
    krg_on_restart(after);
    pid_t me = getpid();
    printf("start node %u\n", krg_node_id());
    if (krg_migrate((unsigned)atoi(argv[1])) != 0) {
        perror("krg_migrate");
        return 1;
    }
    printf("moved node %u same-pid %d captures %d restores %d\n", krg_node_id(),
           getpid() == me, captures, restores);
    int r = krg_checkpoint(argv[2]);
    if (r < 0) {
        perror("krg_checkpoint");
        return 1;
    }
    printf("checkpoint returned %d on node %u captures %d restores %d\n", r, krg_node_id(),
           captures, restores);
    return 0;
}
