/* loop.h - the event loop: readiness of file descriptors through io_uring or epoll.
 *
 * The io_uring backend arms one multishot POLL_ADD per watched fd; the epoll backend is
 * the fallback for kernels, containers and sysctls that refuse io_uring. LOOP_AUTO probes
 * io_uring at run time (ring setup, opcodes, a multishot poll that really fires twice)
 * and falls back to epoll. Handles carry a generation, so an event for a fd removed
 * earlier in the same batch is dropped, never delivered to a new owner (style rule 20).
 * One loop per thread; not thread-safe. */
#ifndef CAKE_LOOP_H
#define CAKE_LOOP_H

#include <stdint.h>

enum loop_backend { LOOP_AUTO = 0, LOOP_URING = 1, LOOP_EPOLL = 2 };

#define LOOP_IN 0x1u
#define LOOP_OUT 0x4u
#define LOOP_ERR 0x8u /* error or hang-up: the callback should read to find out */
#define LOOP_HUP 0x10u /* with LOOP_ERR: the peer closed its end entirely (nothing it is sent
                          can reach it); reported even when no event is watched */

typedef void (*loop_fn)(void *arg, uint32_t events);

struct loop;

/* Returns 0 or -errno; *name is "io_uring" or "epoll"; *why explains a fallback or a
 * failure (static text, may be NULL). */
int loop_create(enum loop_backend want, struct loop **out, const char **name, const char **why);
void loop_destroy(struct loop *l);

/* Watches fd for events; *handle identifies the watch. Returns 0 or -errno. */
int loop_add(struct loop *l, int fd, uint32_t events, loop_fn fn, void *arg, int *handle);
/* Changes the events watched. */
int loop_set(struct loop *l, int handle, uint32_t events);
/* Stops watching (the fd is not closed). */
void loop_del(struct loop *l, int handle);

/* Waits up to timeout_ms (-1: forever) and runs callbacks. Returns the number of events
 * dispatched, or -errno (-EINTR is returned as 0). */
int loop_wait(struct loop *l, int timeout_ms);

#endif
