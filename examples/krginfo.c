/*
 * krginfo.c - the C API of libkrg (krg.h), used through weak symbols so the
 * same binary runs with and without the library.
 *
 *   make -C examples
 *   examples/bin/krginfo                                   # no krg
 *   LD_PRELOAD=$PWD/target/debug/libkrg.so examples/bin/krginfo
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define KRG_WEAK
#include "krg.h"

static const char *mode_name(int m)
{
    switch (m) {
    case KRG_MODE_ACTIVE: return "active (SSI process)";
    case KRG_MODE_STANDALONE: return "standalone (no agent)";
    case KRG_MODE_DISABLED: return "disabled (KRG_DISABLE)";
    }
    return "?";
}

int main(void)
{
    if (!krg_mode) {
        printf("libkrg is not loaded: pid %d\n", getpid());
        return 0;
    }
    printf("mode: %s\n", mode_name(krg_mode()));
    printf("protocol: %u\n", krg_proto_version());
    pid_t g = krg_getgpid();
    if (g < 0) {
        printf("gpid: none (%s); getpid() = %d\n", strerror(errno), getpid());
        return 0;
    }
    printf("gpid: %d (node %u, getpid() = %d)\n", g, krg_gpid_node(g), getpid());
    printf("node: %u\n", krg_node_id());
    int caps = krg_caps();
    printf("caps: 0x%x:%s%s%s%s%s%s\n", caps, caps & KRG_CAP_MIGRATE ? " migrate" : "",
           caps & KRG_CAP_DISTANT_FORK ? " distant-fork" : "",
           caps & KRG_CAP_CHECKPOINT ? " checkpoint" : "", caps & KRG_CAP_DSM ? " dsm" : "",
           caps & KRG_CAP_STREAMS ? " streams" : "", caps & KRG_CAP_DFS ? " dfs" : "");
    return g == getpid() ? 0 : 1;
}
