/* sockpath.h - the listening socket's path, claimed so that no other local user can take it
 * over.
 *
 * The directory holding the socket must be caked's own and writable by no one else, and so
 * must every directory above it (root's directories and sticky ones such as /tmp excepted):
 * then only caked's uid can create, rename or replace names in it, and nothing between the
 * checks and bind() can be swapped. A missing last directory is created (0700; 0710 and the
 * socket group's when there is one). The socket is born with its final mode (umask around
 * bind) and its group is set on the name without following links (fchownat with
 * AT_SYMLINK_NOFOLLOW). Only a stale socket of caked's own uid is ever removed, and at exit
 * only the socket caked bound (same inode). */
#ifndef CAKE_SOCKPATH_H
#define CAKE_SOCKPATH_H

#include <sys/types.h>

struct sockpath {
    char path[108];
    dev_t dev;
    ino_t ino;
};

/* Binds and listens on path (group: "" or the group that may connect, mode 0660). Returns
 * the listening fd, or -errno with the reason in why (-EADDRINUSE: another caked answers). */
int sockpath_listen(struct sockpath *sp, const char *path, const char *group, char *why,
                    size_t why_len);
/* Removes the socket if it is still the one sockpath_listen bound. */
void sockpath_unlink(const struct sockpath *sp);

#endif
