/* http.h - the Prometheus endpoint: GET /metrics over HTTP (--metrics-listen; off by
 * default). Served on the loop thread (http.c); the text is metrics.c's, every tenant's
 * series included, so the address should reach only those allowed to see tenant names. */
#ifndef CAKE_HTTP_H
#define CAKE_HTTP_H

#include <stddef.h>

struct server;
struct http;

/* "PORT" (127.0.0.1), "HOST:PORT", "[IPV6]:PORT" or "*:PORT" (every address) into host
 * ("" for every address) and port. Returns 0 or -1. */
int http_parse_listen(const char *spec, char *host, size_t hlen, char *port, size_t plen);
/* Listens on spec and serves from s's loop; logs the address bound. 0 or -errno (err
 * says why). */
int http_start(struct server *s, const char *spec, struct http **out, char *err, size_t len);
/* Lets the HTTP server work (requests ready, timeouts); called on each loop tick. */
void http_run(struct http *h);
void http_stop(struct http *h);

#endif
