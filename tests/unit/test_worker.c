/* Worker threads: every job runs once, done() on the caller's thread, urgent first. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "worker.h"

struct tjob {
    struct job j;
    int id;
    atomic_int *ran;
    int *done;
    pthread_t owner;
    int *order, *n_order;
    int gate; /* blocks the worker until released */
    atomic_int *release;
};

static void run(struct job *j)
{
    struct tjob *t = (struct tjob *)j;
    while (t->gate && !atomic_load(t->release))
        usleep(1000);
    atomic_fetch_add(t->ran, 1);
    if (t->order) /* run order (one worker: no race); done() order is not specified */
        t->order[(*t->n_order)++] = t->id;
}

static void done(struct job *j)
{
    struct tjob *t = (struct tjob *)j;
    cr_assert(pthread_equal(pthread_self(), t->owner));
    (*t->done)++;
}

Test(worker, all_jobs_run_once_and_complete_on_the_loop)
{
    struct workers *w;
    cr_assert_eq(workers_start(&w, 3), 0);
    atomic_int ran = 0, release = 1;
    int dn = 0;
    struct tjob jobs[500];
    for (int i = 0; i < 500; i++) {
        jobs[i] = (struct tjob){{run, done, i % 7 == 0, NULL}, i, &ran, &dn, pthread_self(), NULL, NULL, 0, &release};
        workers_submit(w, &jobs[i].j);
    }
    while (dn < 500)
        workers_reap(w);
    cr_assert_eq(atomic_load(&ran), 500);
    cr_assert_eq(workers_pending(w), 0);
    workers_stop(w);
}

Test(worker, urgent_jobs_overtake_queued_ones)
{
    struct workers *w;
    cr_assert_eq(workers_start(&w, 1), 0);
    atomic_int ran = 0, release = 0;
    int dn = 0, order[4], n = 0;
    struct tjob blocker = {{run, done, 0, NULL}, 0, &ran, &dn, pthread_self(), order, &n, 1, &release};
    struct tjob slow = {{run, done, 0, NULL}, 1, &ran, &dn, pthread_self(), order, &n, 0, &release};
    struct tjob fast = {{run, done, 1, NULL}, 2, &ran, &dn, pthread_self(), order, &n, 0, &release};
    workers_submit(w, &blocker.j); /* occupies the only worker */
    usleep(20000);
    workers_submit(w, &slow.j);
    workers_submit(w, &fast.j);
    atomic_store(&release, 1);
    while (dn < 3)
        workers_reap(w);
    cr_assert_eq(order[0], 0);
    cr_assert_eq(order[1], 2, "the urgent job should run before the queued one");
    cr_assert_eq(order[2], 1);
    workers_stop(w);
}
