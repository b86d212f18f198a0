/* http.c - the Prometheus endpoint: GET /metrics over HTTP on --metrics-listen (see http.h),
 * and GET /healthz: 200 "ok" whenever the loop answers (a liveness probe's target).
 *
 * libmicrohttpd in its external-loop mode with epoll: its epoll fd is one more fd of caked's
 * loop, and every request is parsed and answered on the loop thread by MHD_run, so the
 * metrics text is rendered from the server's state without locks, like cachectl's. Bounded:
 * a few connections, a small per-connection buffer, a timeout for slow clients; a scraper
 * never delays an engine for longer than one rendering. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "http.h"
#include "server_int.h"

#define HTTP_MAX_CONNECTIONS 16
#define HTTP_TIMEOUT_S 10
#define HTTP_CONN_MEMORY (32u << 10) /* request headers; the reply is a separate buffer */

struct http {
    struct server *srv;
    struct MHD_Daemon *d;
    int fd;       /* the listening socket (ours: MHD does not close it) */
    int handle;   /* the loop's watch of MHD's epoll fd */
};

int http_parse_listen(const char *spec, char *host, size_t hlen, char *port, size_t plen)
{
    const char *colon = strrchr(spec, ':');
    const char *h = "127.0.0.1", *p = spec;
    size_t hl = strlen(h);
    if (colon) {
        h = spec, hl = (size_t)(colon - spec), p = colon + 1;
        if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') /* [v6]:port */
            h++, hl -= 2;
        else if (memchr(h, ':', hl))
            return -1; /* a bare IPv6 address needs brackets */
        if (hl == 0)
            return -1;
    }
    char *end;
    long n = strtol(p, &end, 10);
    if (!*p || *end || n < 0 || n > 65535 || hl >= hlen || strlen(p) >= plen)
        return -1;
    memcpy(host, h, hl), host[hl] = 0;
    if (!strcmp(host, "*"))
        host[0] = 0; /* every address */
    snprintf(port, plen, "%s", p);
    return 0;
}

/* MHD's messages: its format strings, not ours */
__attribute__((format(printf, 2, 0))) static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    char line[256];
    vsnprintf(line, sizeof line, fmt, ap);
    line[strcspn(line, "\n")] = 0;
    srv_logl(SRV_LOG_DEBUG, "metrics-listen: %s", line);
}

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *text)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "text/plain; charset=utf-8");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(r, "Allow", "GET, HEAD");
    enum MHD_Result rc = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload, size_t *upload_len, void **state)
{
    struct http *h = cls;
    /* answered at the headers: a body, if any, is not read (MHD closes that connection) */
    if (strcmp(method, "GET") && strcmp(method, "HEAD"))
        return reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "caked serves GET /metrics and /healthz only\n");
    if (!strcmp(url, "/healthz")) /* answered by the loop that serves the engines */
        return reply(conn, MHD_HTTP_OK, "ok\n");
    if (strcmp(url, "/metrics"))
        return reply(conn, MHD_HTTP_NOT_FOUND, "caked serves /metrics and /healthz only\n");
    struct strbuf b = {0};
    if (metrics_render(h->srv, NULL, &b)) {
        free(b.s);
        return reply(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory for the metrics\n");
    }
    struct MHD_Response *r = MHD_create_response_from_buffer(b.len, b.s, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(b.s);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
    enum MHD_Result rc = MHD_queue_response(conn, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return rc;
}

static void on_ready(void *arg, uint32_t events)
{
    http_run(arg);
}

static int listen_tcp(const char *host, const char *port, char *err, size_t len)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
                    *ai;
    int rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &ai);
    if (rc) {
        snprintf(err, len, "%s:%s: %s", host[0] ? host : "*", port, gai_strerror(rc));
        return -1;
    }
    int fd = -1, e = 0;
    for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) || listen(fd, 64)) {
            e = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(ai);
    if (fd < 0)
        snprintf(err, len, "%s:%s: %s", host[0] ? host : "*", port, strerror(e));
    return fd;
}

int http_start(struct server *s, const char *spec, struct http **out, char *err, size_t len)
{
    char host[256], port[16];
    if (http_parse_listen(spec, host, sizeof host, port, sizeof port)) {
        snprintf(err, len, "metrics-listen: bad address %s (PORT, HOST:PORT or [IPV6]:PORT)",
                 spec);
        return -EINVAL;
    }
    struct http *h = calloc(1, sizeof *h);
    if (!h)
        return -ENOMEM;
    h->srv = s, h->handle = -1;
    if ((h->fd = listen_tcp(host, port, err, len)) < 0) {
        free(h);
        return -EADDRNOTAVAIL;
    }
    h->d = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_request, h,
                            MHD_OPTION_LISTEN_SOCKET, h->fd,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)HTTP_MAX_CONNECTIONS,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)HTTP_TIMEOUT_S,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HTTP_CONN_MEMORY,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_log, h, MHD_OPTION_END);
    const union MHD_DaemonInfo *di =
        h->d ? MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_EPOLL_FD) : NULL;
    if (!di || loop_add(s->loop, di->epoll_fd, LOOP_IN, on_ready, h, &h->handle)) {
        snprintf(err, len, "metrics-listen: the HTTP server did not start");
        http_stop(h);
        return -EIO;
    }
    /* the address really bound (port 0: the kernel's choice) */
    struct sockaddr_storage a;
    socklen_t al = sizeof a;
    char ah[INET6_ADDRSTRLEN] = "?";
    unsigned p = 0;
    if (!getsockname(h->fd, (struct sockaddr *)&a, &al)) {
        if (a.ss_family == AF_INET6) {
            struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&a;
            inet_ntop(AF_INET6, &a6->sin6_addr, ah, sizeof ah), p = ntohs(a6->sin6_port);
        } else {
            struct sockaddr_in *a4 = (struct sockaddr_in *)&a;
            inet_ntop(AF_INET, &a4->sin_addr, ah, sizeof ah), p = ntohs(a4->sin_port);
        }
    }
    srv_log("metrics on http://%s%s%s:%u/metrics", a.ss_family == AF_INET6 ? "[" : "", ah,
            a.ss_family == AF_INET6 ? "]" : "", p);
    *out = h;
    return 0;
}

void http_run(struct http *h)
{
    if (h && h->d)
        MHD_run(h->d);
}

void http_stop(struct http *h)
{
    if (!h)
        return;
    if (h->handle >= 0)
        loop_del(h->srv->loop, h->handle);
    if (h->d)
        MHD_stop_daemon(h->d);
    if (h->fd >= 0)
        close(h->fd);
    free(h);
}
