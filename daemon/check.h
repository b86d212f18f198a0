/* check.h - caked's invariants: CAKE_CHECK(cond) stops the daemon with the file, line and
 * condition on stderr when cond is false (as Redis' serverAssert does), in every build: a
 * broken invariant of the page accounting or a sequence's state would otherwise corrupt
 * other tenants' memory quietly. Only for what no client can cause; bad input gets an error. */
#ifndef CAKE_CHECK_H
#define CAKE_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CAKE_CHECK(cond)                                                                   \
    do {                                                                                   \
        if (__builtin_expect(!(cond), 0)) {                                                \
            fprintf(stderr, "caked: invariant broken at %s:%d: %s\n", __FILE__, __LINE__,  \
                    #cond);                                                                \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

#endif
