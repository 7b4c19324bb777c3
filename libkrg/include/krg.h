/*
 * krg.h - the C interface of libkrg for tuned applications.
 *
 * An unmodified program gets the single system image from LD_PRELOAD alone
 * (getpid returns its cluster-wide pid, kill and wait accept them, ...).
 * These functions are for programs that want to know more: whether they run
 * as an SSI process, their node, their capabilities.
 *
 * They are exported by libkrg.so. Link with -lkrg, or declare them weak so
 * that the program also runs without krg:
 *
 *     #define KRG_WEAK
 *     #include <krg.h>
 *     ...
 *     if (krg_getgpid && krg_mode() == KRG_MODE_ACTIVE) ...
 *
 * None of them allocates, locks or blocks on anything but the local agent;
 * all are async-signal-safe.
 */
#ifndef KRG_H
#define KRG_H

#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifdef KRG_WEAK
#define KRG_API __attribute__((weak))
#else
#define KRG_API
#endif

/* krg_mode() */
#define KRG_MODE_DISABLED 0   /* KRG_DISABLE=1: the library does nothing */
#define KRG_MODE_STANDALONE 1 /* no agent: a plain local process */
#define KRG_MODE_ACTIVE 2     /* an SSI process of the cluster */

/* Capability bits of krg_caps() (the names of KRG_CAPS and krg capset). */
#define KRG_CAP_MIGRATE 1u
#define KRG_CAP_DISTANT_FORK 2u
#define KRG_CAP_CHECKPOINT 4u
#define KRG_CAP_DSM 8u
#define KRG_CAP_STREAMS 16u
#define KRG_CAP_DFS 32u
#define KRG_CAP_DSM_ANON 64u  /* off by default: MAP_SHARED|MAP_ANONYMOUS as cluster memory */

/* A gpid is node << 22 | local part; anything below 1 << 22 is a kernel pid
 * of the local node. */
#define KRG_GPID_NODE_SHIFT 22
static inline int krg_is_gpid(pid_t pid) { return pid >= (1 << KRG_GPID_NODE_SHIFT); }
static inline unsigned krg_gpid_node(pid_t gpid)
{
    return krg_is_gpid(gpid) ? (unsigned)gpid >> KRG_GPID_NODE_SHIFT : 0;
}

/* The mode of the library in this process: KRG_MODE_*. */
KRG_API int krg_mode(void);

/* This process's cluster-wide pid (what getpid() returns under krg).
 * -1 with errno ENOSYS (disabled) or ENOTCONN (no agent) when it has none. */
KRG_API pid_t krg_getgpid(void);

/* The node this process runs on; 0 when it is not an SSI process. */
KRG_API unsigned krg_node_id(void);

/* Effective capabilities (KRG_CAP_* bits), as the agent has them now;
 * -1 with errno when the process has none. */
KRG_API int krg_caps(void);

/* The version of the protocol between the library and its agent. */
KRG_API unsigned krg_proto_version(void);

/* Checkpoint and migration from inside (tuned applications).
 * krg_checkpoint: write this process's image to directory DIR and go on;
 * returns 0 after taking it, 1 in a process restarted from it (krg restart
 * DIR), -1 with errno if it could not (nothing changed).
 * krg_migrate: move this process to NODE; returns 0 there, or -1 with
 * errno here if it could not move.
 * krg_on_checkpoint / krg_on_restart: run FN in the capturing thread before
 * each capture / in a restored process before its other threads go on (at
 * most 16 each; -1 with ENOSPC beyond). */
KRG_API int krg_checkpoint(const char *dir);
KRG_API int krg_migrate(unsigned node);
KRG_API int krg_on_checkpoint(void (*fn)(void));
KRG_API int krg_on_restart(void (*fn)(void));

#ifdef __cplusplus
}
#endif

#endif /* KRG_H */
