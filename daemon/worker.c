/* worker.c - a fixed pool of threads, urgent jobs first, the rest weighted-fair between
 * owners (see worker.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "clock.h"
#include "worker.h"

#define WORKER_OWNERS 4097 /* owner ids 0..4096 (tenant ids) */

struct workers {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct job *head, *tail;   /* queued */
    struct job *uhead, *utail; /* queued urgent jobs, taken first */
    struct job *done;          /* completed, LIFO (reaped in any order) */
    double vnow;               /* virtual time of the last job given out */
    double *vt;                /* [WORKER_OWNERS]: each owner's virtual time */
    uint32_t *queued;          /* [WORKER_OWNERS]: its jobs waiting */
    int efd;
    int stop;
    int n;
    int pending;
    uint32_t waiting;          /* jobs queued (both lists) */
    double *since;             /* [n]: when each thread's current job started, 0 if idle */
    pthread_t *th;
};

struct worker_arg {
    struct workers *w;
    int i;
};

/* The first queued job of the backlogged owner with the lowest virtual time (w->mu held). */
static struct job *take_fair(struct workers *w)
{
    struct job *best = NULL, *bprev = NULL, *prev = NULL;
    for (struct job *j = w->head; j; prev = j, j = j->next)
        if (!best || w->vt[j->owner] < w->vt[best->owner])
            best = j, bprev = prev;
    if (bprev)
        bprev->next = best->next;
    else
        w->head = best->next;
    if (w->tail == best)
        w->tail = bprev;
    w->vnow = w->vt[best->owner];
    w->vt[best->owner] += 1.0 / (best->weight ? best->weight : 1);
    w->queued[best->owner]--;
    return best;
}

static void *main_fn(void *arg)
{
    struct workers *w = ((struct worker_arg *)arg)->w;
    int me = ((struct worker_arg *)arg)->i;
    free(arg);
    for (;;) {
        pthread_mutex_lock(&w->mu);
        while (!w->head && !w->uhead && !w->stop)
            pthread_cond_wait(&w->cv, &w->mu);
        struct job *j;
        if (w->uhead) {
            j = w->uhead;
            w->uhead = j->next;
            if (!w->uhead)
                w->utail = NULL;
        } else if (w->head) {
            j = take_fair(w);
        } else {
            pthread_mutex_unlock(&w->mu);
            return NULL;
        }
        w->waiting--;
        w->since[me] = j->t_start = clock_now_s();
        pthread_mutex_unlock(&w->mu);
        j->run(j);
        j->t_end = clock_now_s();
        pthread_mutex_lock(&w->mu);
        w->since[me] = 0;
        j->next = w->done, w->done = j;
        pthread_mutex_unlock(&w->mu);
        uint64_t one = 1;
        if (write(w->efd, &one, sizeof one) < 0) {
            /* the counter cannot overflow in practice; the loop also polls pending */
        }
    }
}

int workers_start(struct workers **out, int n)
{
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    struct workers *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    w->th = calloc((size_t)n, sizeof(pthread_t));
    w->since = calloc((size_t)n, sizeof(double));
    w->vt = calloc(WORKER_OWNERS, sizeof(double));
    w->queued = calloc(WORKER_OWNERS, sizeof(uint32_t));
    if (w->efd < 0 || !w->th || !w->since || !w->vt || !w->queued) {
        if (w->efd >= 0)
            close(w->efd);
        free(w->th), free(w->since), free(w->vt), free(w->queued), free(w);
        return -ENOMEM;
    }
    for (int i = 0; i < n; i++) {
        struct worker_arg *a = malloc(sizeof(*a));
        if (a)
            *a = (struct worker_arg){w, i};
        if (!a || pthread_create(&w->th[i], NULL, main_fn, a)) {
            free(a);
            w->n = i;
            workers_stop(w);
            return -EAGAIN;
        }
        w->n = i + 1;
    }
    *out = w;
    return 0;
}

void workers_stop(struct workers *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < w->n; i++)
        pthread_join(w->th[i], NULL);
    workers_reap(w);
    close(w->efd);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w->th), free(w->since), free(w->vt), free(w->queued), free(w);
}

void workers_submit(struct workers *w, struct job *j)
{
    j->next = NULL;
    j->t_submit = clock_now_s(), j->t_start = j->t_end = 0;
    if (j->owner >= WORKER_OWNERS)
        j->owner = 0;
    pthread_mutex_lock(&w->mu);
    if (!j->urgent && !w->queued[j->owner]++ && w->vt[j->owner] < w->vnow)
        w->vt[j->owner] = w->vnow; /* back from idle: no credit saved up */
    struct job **head = j->urgent ? &w->uhead : &w->head, **tail = j->urgent ? &w->utail : &w->tail;
    if (*tail)
        (*tail)->next = j;
    else
        *head = j;
    *tail = j;
    w->pending++, w->waiting++;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

int workers_fd(const struct workers *w) { return w->efd; }
int workers_pending(const struct workers *w) { return w->pending; }

int workers_count(const struct workers *w) { return w->n; }

void workers_load(struct workers *w, double now, struct workers_load *l)
{
    *l = (struct workers_load){0};
    pthread_mutex_lock(&w->mu);
    l->queued = w->waiting;
    /* the lists are in submission order: their heads are the oldest waiting */
    double waited = now, ran = now;
    if (w->head && w->head->t_submit < waited)
        waited = w->head->t_submit;
    if (w->uhead && w->uhead->t_submit < waited)
        waited = w->uhead->t_submit;
    for (int i = 0; i < w->n; i++)
        if (w->since[i] > 0) {
            l->running++;
            ran = w->since[i] < ran ? w->since[i] : ran;
        }
    pthread_mutex_unlock(&w->mu);
    l->oldest_queued_s = now - waited, l->oldest_running_s = now - ran;
}

int workers_reap(struct workers *w)
{
    uint64_t v;
    if (read(w->efd, &v, sizeof v) < 0) {
        /* EAGAIN: nothing signalled, but check the list anyway */
    }
    pthread_mutex_lock(&w->mu);
    struct job *j = w->done;
    w->done = NULL;
    pthread_mutex_unlock(&w->mu);
    int n = 0;
    while (j) {
        struct job *next = j->next;
        w->pending--;
        j->done(j);
        j = next;
        n++;
    }
    return n;
}
