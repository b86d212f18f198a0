/* sockpath.c - claiming the listening socket's path safely (see sockpath.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "sockpath.h"

static int fail(char *why, size_t len, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(char *why, size_t len, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, len, fmt, ap);
    va_end(ap);
    return rc;
}

/* Every directory from / down to dir (resolved) is root's or ours, and writable by others
 * only when sticky; dir itself is ours and writable by no one else (above: dir is only
 * above the socket, held to the rule for those). */
static int dirs_safe(const char *dir, uid_t me, int above, char *why, size_t len)
{
    char real[PATH_MAX];
    if (!realpath(dir, real))
        return fail(why, len, -errno, "socket directory %s: %s", dir, strerror(errno));
    char cur[PATH_MAX] = "";
    size_t n = strlen(real);
    for (size_t i = 0; i <= n; i++) {
        if (i && real[i] != '/' && real[i] != 0)
            continue;
        if (i == n && n == 1)
            break; /* "/" was checked at i = 0 */
        size_t k = i ? i : 1;
        memcpy(cur, real, k);
        cur[k] = 0;
        struct stat st;
        if (lstat(cur, &st) < 0)
            return fail(why, len, -errno, "%s: %s", cur, strerror(errno));
        int last = k == n && !above;
        if (last) {
            if (st.st_uid != me)
                return fail(why, len, -EPERM,
                            "the socket directory %s is owned by uid %u, not caked's uid %u: "
                            "another user could replace the socket (remove it, or choose "
                            "--socket in a directory of caked's own)", cur, (unsigned)st.st_uid,
                            (unsigned)me);
            if (st.st_mode & (S_IWGRP | S_IWOTH))
                return fail(why, len, -EPERM,
                            "the socket directory %s is writable by others (mode %04o): "
                            "another user could replace the socket (chmod go-w, or choose "
                            "--socket in a private directory)", cur, (unsigned)(st.st_mode & 07777));
        } else {
            if (st.st_uid != 0 && st.st_uid != me)
                return fail(why, len, -EPERM,
                            "%s, above the socket, is owned by uid %u: that user could move the "
                            "socket directory away", cur, (unsigned)st.st_uid);
            if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))
                return fail(why, len, -EPERM,
                            "%s, above the socket, is writable by others and not sticky (mode "
                            "%04o): they could move the socket directory away", cur,
                            (unsigned)(st.st_mode & 07777));
        }
    }
    return 0;
}

/* Can members of gid reach a socket in dir (search permission)? */
static int group_can_search(const struct stat *st, gid_t gid)
{
    return (st->st_gid == gid && (st->st_mode & S_IXGRP)) || (st->st_mode & S_IXOTH);
}

int sockpath_listen(struct sockpath *sp, const char *path, const char *group, char *why,
                    size_t why_len)
{
    memset(sp, 0, sizeof(*sp));
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (!path[0] || strlen(path) >= sizeof a.sun_path)
        return fail(why, why_len, -ENAMETOOLONG, "socket path empty or over %zu bytes: %s",
                    sizeof a.sun_path - 1, path);
    snprintf(sp->path, sizeof sp->path, "%s", path);
    gid_t gid = (gid_t)-1;
    if (group && group[0]) {
        struct group *g = getgrnam(group);
        if (!g)
            return fail(why, why_len, -EINVAL, "socket group %s: no such group", group);
        gid = g->gr_gid;
    }
    char dir[108], name[108];
    const char *slash = strrchr(path, '/');
    if (!slash) {
        strcpy(dir, ".");
        snprintf(name, sizeof name, "%s", path);
    } else {
        size_t dl = slash == path ? 1 : (size_t)(slash - path);
        memcpy(dir, path, dl), dir[dl] = 0;
        snprintf(name, sizeof name, "%s", slash + 1);
    }
    if (!name[0] || !strcmp(name, ".") || !strcmp(name, ".."))
        return fail(why, why_len, -EINVAL, "socket path must name a file: %s", path);
    uid_t me = geteuid();
    /* a missing last directory is ours to create, in a parent no one else can tamper with */
    struct stat st;
    if (lstat(dir, &st) < 0) {
        if (errno != ENOENT)
            return fail(why, why_len, -errno, "socket directory %s: %s", dir, strerror(errno));
        char parent[108];
        snprintf(parent, sizeof parent, "%s", dir);
        char *ps = strrchr(parent, '/');
        if (ps)
            *(ps == parent ? ps + 1 : ps) = 0;
        else
            strcpy(parent, ".");
        int rc = dirs_safe(parent, me, 1, why, why_len);
        if (rc)
            return rc;
        if (mkdir(dir, 0700) < 0 && errno != EEXIST)
            return fail(why, why_len, -errno, "cannot create the socket directory %s: %s", dir,
                        strerror(errno));
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (dfd < 0)
            return fail(why, why_len, -errno, "socket directory %s: %s", dir, strerror(errno));
        if (fstat(dfd, &st) == 0 && st.st_uid == me && gid != (gid_t)-1 &&
            (fchown(dfd, (uid_t)-1, gid) < 0 || fchmod(dfd, 0710) < 0)) {
            int e = errno;
            close(dfd);
            return fail(why, why_len, -e, "cannot give group %s the socket directory %s: %s",
                        group, dir, strerror(e));
        }
        close(dfd);
    }
    int rc = dirs_safe(dir, me, 0, why, why_len);
    if (rc)
        return rc;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return fail(why, why_len, -errno, "socket directory %s: %s", dir, strerror(errno));
    if (fstat(dfd, &st) < 0 || st.st_uid != me) {
        close(dfd);
        return fail(why, why_len, -EPERM, "socket directory %s changed while checked", dir);
    }
    if (gid != (gid_t)-1 && !group_can_search(&st, gid)) {
        close(dfd);
        return fail(why, why_len, -EACCES,
                    "group %s cannot reach a socket in %s (mode %04o, group %u): give it search "
                    "permission (chgrp %s and chmod g+x), or let caked create the directory",
                    group, dir, (unsigned)(st.st_mode & 07777), (unsigned)st.st_gid, group);
    }
    /* what is at the name: nothing, a stale socket of ours (removed), or a refusal */
    struct stat at;
    if (fstatat(dfd, name, &at, AT_SYMLINK_NOFOLLOW) == 0) {
        if (!S_ISSOCK(at.st_mode) || at.st_uid != me) {
            close(dfd);
            return fail(why, why_len, -EEXIST,
                        "%s exists and is not a socket of caked's uid %u (%s, owner %u): caked "
                        "removes only its own stale sockets; remove it or choose another --socket",
                        path, (unsigned)me, S_ISLNK(at.st_mode) ? "a symbolic link"
                                               : S_ISSOCK(at.st_mode) ? "a socket" : "not a socket",
                        (unsigned)at.st_uid);
        }
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe < 0) {
            close(dfd);
            return fail(why, why_len, -errno, "socket: %s", strerror(errno));
        }
        strcpy(a.sun_path, path);
        int live = connect(probe, (struct sockaddr *)&a, sizeof a) == 0;
        int e = errno;
        close(probe);
        if (live) {
            close(dfd);
            return fail(why, why_len, -EADDRINUSE, "another caked is listening on %s", path);
        }
        if (e != ECONNREFUSED) {
            close(dfd);
            return fail(why, why_len, -e, "cannot tell whether %s is stale: %s", path, strerror(e));
        }
        if (unlinkat(dfd, name, 0) < 0 && errno != ENOENT) {
            e = errno;
            close(dfd);
            return fail(why, why_len, -e, "cannot remove the stale socket %s: %s", path, strerror(e));
        }
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        rc = -errno;
        close(dfd);
        return fail(why, why_len, rc, "socket: %s", strerror(-rc));
    }
    strcpy(a.sun_path, path);
    /* born with its final mode: no window in which others may connect */
    mode_t old = umask(gid != (gid_t)-1 ? 0117 : 0177);
    rc = bind(fd, (struct sockaddr *)&a, sizeof a);
    umask(old);
    if (rc < 0) {
        rc = -errno;
        close(fd), close(dfd);
        return fail(why, why_len, rc, "cannot bind %s: %s", path, strerror(-rc));
    }
    if (fstatat(dfd, name, &at, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISSOCK(at.st_mode) ||
        at.st_uid != me) {
        close(fd), close(dfd);
        return fail(why, why_len, -EPERM, "%s changed right after bind", path);
    }
    sp->dev = at.st_dev, sp->ino = at.st_ino;
    if (gid != (gid_t)-1 && fchownat(dfd, name, (uid_t)-1, gid, AT_SYMLINK_NOFOLLOW) < 0) {
        rc = -errno;
        unlinkat(dfd, name, 0);
        close(fd), close(dfd);
        return fail(why, why_len, rc, "cannot give socket group %s access: %s", group,
                    strerror(-rc));
    }
    close(dfd);
    if (listen(fd, 512) < 0) {
        rc = -errno;
        sockpath_unlink(sp);
        close(fd);
        return fail(why, why_len, rc, "cannot listen on %s: %s", path, strerror(-rc));
    }
    return fd;
}

void sockpath_unlink(const struct sockpath *sp)
{
    struct stat st;
    if (!sp->path[0] || lstat(sp->path, &st) < 0)
        return;
    if (S_ISSOCK(st.st_mode) && st.st_dev == sp->dev && st.st_ino == sp->ino)
        unlink(sp->path);
}
