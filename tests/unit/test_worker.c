/* Worker threads: every job runs once, done() on the caller's thread, urgent first, the
 * rest shared between owners by weight. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "clock.h"
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
    atomic_int *started; /* set when a gate job holds the worker */
};

static void run(struct job *j)
{
    struct tjob *t = (struct tjob *)j;
    if (t->gate && t->started)
        atomic_store(t->started, 1);
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
        jobs[i] = (struct tjob){.j = {.run = run, .done = done, .urgent = i % 7 == 0, .owner = (uint32_t)(i % 5)},
                                .id = i, .ran = &ran, .done = &dn, .owner = pthread_self(), .release = &release};
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
    atomic_int ran = 0, release = 0, started = 0;
    int dn = 0, order[4], n = 0;
    struct tjob blocker = {.j = {.run = run, .done = done}, .id = 0, .ran = &ran, .done = &dn,
                           .owner = pthread_self(), .order = order, .n_order = &n, .gate = 1,
                           .release = &release, .started = &started};
    struct tjob slow = {.j = {.run = run, .done = done}, .id = 1, .ran = &ran, .done = &dn,
                        .owner = pthread_self(), .order = order, .n_order = &n, .release = &release};
    struct tjob fast = {.j = {.run = run, .done = done, .urgent = 1}, .id = 2, .ran = &ran,
                        .done = &dn, .owner = pthread_self(), .order = order, .n_order = &n,
                        .release = &release};
    workers_submit(w, &blocker.j); /* occupies the only worker */
    while (!atomic_load(&started))
        usleep(100);
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

/* Each job's times (caked_work_seconds): submitted <= taken <= run done <= reaped; a job
 * queued behind a held worker counts the hold as queued, not run; the holder's run counts it. */
Test(worker, jobs_carry_their_queued_and_run_times)
{
    struct workers *w;
    cr_assert_eq(workers_start(&w, 1), 0);
    atomic_int ran = 0, release = 0, started = 0;
    int dn = 0;
    struct tjob blocker = {.j = {.run = run, .done = done}, .ran = &ran, .done = &dn,
                           .owner = pthread_self(), .gate = 1, .release = &release,
                           .started = &started};
    struct tjob queued = {.j = {.run = run, .done = done}, .id = 1, .ran = &ran, .done = &dn,
                          .owner = pthread_self(), .release = &release};
    workers_submit(w, &blocker.j);
    while (!atomic_load(&started))
        usleep(100);
    double held = clock_now_s(); /* before its submission: the wait fits inside */
    workers_submit(w, &queued.j);
    usleep(30000);
    atomic_store(&release, 1);
    while (dn < 2)
        workers_reap(w);
    double reaped = clock_now_s();
    held = reaped - held;
    for (int i = 0; i < 2; i++) {
        const struct job *j = i ? &queued.j : &blocker.j;
        cr_assert(j->t_submit > 0 && j->t_submit <= j->t_start && j->t_start <= j->t_end &&
                  j->t_end <= reaped, "job %d: %f %f %f %f", i, j->t_submit, j->t_start,
                  j->t_end, reaped);
    }
    cr_assert_geq(queued.j.t_start - queued.j.t_submit, 0.029, "it waited for the held worker");
    cr_assert_leq(queued.j.t_start - queued.j.t_submit, held);
    cr_assert_geq(blocker.j.t_end - blocker.j.t_start, 0.029, "the holder ran while held");
    workers_stop(w);
}

/* workers_load (caked_work_queued, _running, _oldest_seconds): nothing when idle; with the
 * only worker held 40 ms and two jobs submitted 20 ms into the hold, one running for the
 * hold's age and two waiting for 20 ms (the two ages apart: a stuck call and a long queue are
 * different things); nothing again once all are reaped. */
Test(worker, load_counts_waiting_and_running_jobs_and_their_ages)
{
    struct workers *w;
    struct workers_load l;
    cr_assert_eq(workers_start(&w, 1), 0);
    workers_load(w, clock_now_s(), &l);
    cr_assert(l.queued == 0 && l.running == 0 && l.oldest_queued_s == 0 && l.oldest_running_s == 0);
    atomic_int ran = 0, release = 0, started = 0;
    int dn = 0;
    struct tjob blocker = {.j = {.run = run, .done = done}, .ran = &ran, .done = &dn,
                           .owner = pthread_self(), .gate = 1, .release = &release,
                           .started = &started};
    struct tjob more[2];
    double t0 = clock_now_s();
    workers_submit(w, &blocker.j);
    while (!atomic_load(&started))
        usleep(100);
    usleep(20000);
    double t1 = clock_now_s();
    for (int i = 0; i < 2; i++) {
        more[i] = (struct tjob){.j = {.run = run, .done = done, .urgent = i}, .id = i + 1,
                                .ran = &ran, .done = &dn, .owner = pthread_self(), .release = &release};
        workers_submit(w, &more[i].j);
    }
    usleep(20000);
    double now = clock_now_s();
    workers_load(w, now, &l);
    cr_assert_eq(l.queued, 2);
    cr_assert_eq(l.running, 1);
    cr_assert_geq(l.oldest_running_s, 0.039, "the held job started at least 40 ms ago");
    cr_assert_leq(l.oldest_running_s, now - t0);
    cr_assert_geq(l.oldest_queued_s, 0.019, "the waiting ones came 20 ms ago");
    cr_assert_leq(l.oldest_queued_s, now - t1);
    atomic_store(&release, 1);
    while (dn < 3)
        workers_reap(w);
    workers_load(w, clock_now_s(), &l);
    cr_assert(l.queued == 0 && l.running == 0 && l.oldest_queued_s == 0 && l.oldest_running_s == 0,
              "%u %u %f %f", l.queued, l.running, l.oldest_queued_s, l.oldest_running_s);
    workers_stop(w);
}

/* Owners share the workers by weight: with one worker held, owner 1 (weight 1) queues 12 jobs
 * first, then owner 2 (weight 1) 6 and owner 3 (weight 3) 12; once released, every prefix
 * of the run order gives each owner still waiting a share of the jobs run proportional to its
 * weight, within one job (FIFO would run all of owner 1's first). An owner that was idle gets
 * no credit for it. */
Test(worker, owners_share_by_weight)
{
    struct workers *w;
    cr_assert_eq(workers_start(&w, 1), 0);
    atomic_int ran = 0, release = 0, started = 0;
    int dn = 0, order[64], n = 0;
    struct tjob gate = {.j = {.run = run, .done = done}, .id = -1, .ran = &ran, .done = &dn,
                        .owner = pthread_self(), .gate = 1, .release = &release, .started = &started};
    workers_submit(w, &gate.j);
    while (!atomic_load(&started))
        usleep(100);
    struct tjob jobs[30];
    uint32_t owner_of[30], weight[4] = {0, 1, 1, 3};
    for (int i = 0; i < 30; i++) {
        owner_of[i] = i < 12 ? 1 : i < 18 ? 2 : 3;
        jobs[i] = (struct tjob){.j = {.run = run, .done = done, .owner = owner_of[i],
                                      .weight = weight[owner_of[i]]},
                                .id = i, .ran = &ran, .done = &dn, .owner = pthread_self(),
                                .order = order, .n_order = &n, .release = &release};
        workers_submit(w, &jobs[i].j);
    }
    atomic_store(&release, 1);
    while (dn < 31)
        workers_reap(w);
    cr_assert_eq(n, 30);
    int served[4] = {0}, left[4] = {0, 12, 6, 12};
    for (int k = 0; k < n; k++) {
        uint32_t o = owner_of[order[k]];
        served[o]++, left[o]--;
        for (uint32_t a = 1; a <= 3; a++)
            for (uint32_t b = 1; b <= 3; b++)
                if (left[a] && left[b]) /* both still backlogged */
                    cr_assert_leq((double)served[a] / weight[a], (double)served[b] / weight[b] + 1.0,
                                  "after %d jobs: owner %u served %d, owner %u served %d", k + 1, a,
                                  served[a], b, served[b]);
        if (k == 9) /* before any owner ran dry: 10 jobs in shares 1:1:3 */
            cr_assert(served[3] >= 5 && served[1] >= 1 && served[2] >= 1, "%d %d %d", served[1],
                      served[2], served[3]);
    }
    /* jobs of one owner keep their order */
    for (int k = 1, last[4] = {-1, -1, -1, -1}; k <= n; k++) {
        int id = order[k - 1];
        cr_assert_gt(id, last[owner_of[id]]);
        last[owner_of[id]] = id;
    }
    workers_stop(w);
}
