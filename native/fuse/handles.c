/* layerfs._fuse: the handle tables (see fuseloop.h) */
#include "fuseloop.h"

/* ---- inodes with a direct fd (BIT_DIRECT_ATTR) --------------------------------------------------
 * A linear-probing table keyed by inode (never 0), under s->lock. */
static size_t slot_of(uint64_t ino, size_t cap)
{
    return (size_t)((ino * 0x9E3779B97F4A7C15ULL) >> 17) & (cap - 1);
}

/* the slot of *tab* that holds ino, or the empty slot where it would go (cap > 0, never full) */
static size_t attr_fd_slot(const struct ino_fd *tab, size_t cap, uint64_t ino)
{
    size_t i = slot_of(ino, cap);
    while (tab[i].ino != 0 && tab[i].ino != ino)
        i = (i + 1) & (cap - 1);
    return i;
}

int attr_fd_get(Session *s, uint64_t ino)
{
    int fd = -1;
    pthread_mutex_lock(&s->lock);
    if (s->cap_attr_fds) {
        size_t i = attr_fd_slot(s->attr_fds, s->cap_attr_fds, ino);
        if (s->attr_fds[i].ino == ino)
            fd = s->attr_fds[i].fd;
    }
    pthread_mutex_unlock(&s->lock);
    return fd;
}

void attr_fd_put(Session *s, uint64_t ino, int fd)
{
    size_t i;
    pthread_mutex_lock(&s->lock);
    if ((s->n_attr_fds + 1) * 2 > s->cap_attr_fds) {
        size_t cap = s->cap_attr_fds ? s->cap_attr_fds * 2 : 64;
        struct ino_fd *tab = calloc(cap, sizeof(*tab));
        if (tab == NULL) {          /* no fast path for this one: Python serves it */
            pthread_mutex_unlock(&s->lock);
            return;
        }
        for (i = 0; i < s->cap_attr_fds; i++)
            if (s->attr_fds[i].ino != 0)
                tab[attr_fd_slot(tab, cap, s->attr_fds[i].ino)] = s->attr_fds[i];
        free(s->attr_fds);
        s->attr_fds = tab;
        s->cap_attr_fds = cap;
    }
    i = attr_fd_slot(s->attr_fds, s->cap_attr_fds, ino);
    if (s->attr_fds[i].ino == 0)
        s->n_attr_fds++;
    s->attr_fds[i].ino = ino;
    s->attr_fds[i].fd = fd;
    pthread_mutex_unlock(&s->lock);
}

/* forget ino's entry if it is fd (the handle being released); backward-shift deletion */
void attr_fd_drop(Session *s, uint64_t ino, int fd)
{
    size_t cap, i, j;
    pthread_mutex_lock(&s->lock);
    cap = s->cap_attr_fds;
    if (cap == 0)
        goto out;
    i = attr_fd_slot(s->attr_fds, cap, ino);
    if (s->attr_fds[i].ino != ino || s->attr_fds[i].fd != fd)
        goto out;
    s->attr_fds[i].ino = 0;
    s->n_attr_fds--;
    for (j = (i + 1) & (cap - 1); s->attr_fds[j].ino != 0; j = (j + 1) & (cap - 1)) {
        size_t k = slot_of(s->attr_fds[j].ino, cap);
        /* move j back to i unless its home slot k lies cyclically in (i, j] */
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            s->attr_fds[i] = s->attr_fds[j];
            s->attr_fds[j].ino = 0;
            i = j;
        }
    }
out:
    pthread_mutex_unlock(&s->lock);
}

/* ---- deferred releases ----------------------------------------------------------------------
 * RELEASE is answered at once, and its handler is called later by whichever thread next holds the
 * GIL for a request (or by the main thread's wait(), or by the releasing thread once many are
 * pending): a close(2) then never makes the next request of its process wait for the GIL. Handle
 * numbers are never reused, so a late release cannot close another file; what it frees (the upper
 * fd, the open count) no answer depends on. */
/* call the release handler for every pending handle (GIL held) */
void drain_releases(Session *s)
{
    unsigned long long batch[64];
    size_t n, i;
    for (;;) {
        pthread_mutex_lock(&s->lock);
        n = s->n_released < 64 ? s->n_released : 64;
        memcpy(batch, s->released + (s->n_released - n), n * sizeof(batch[0]));
        s->n_released -= n;
        pthread_mutex_unlock(&s->lock);
        if (n == 0)
            return;
        Py_BEGIN_ALLOW_THREADS
        pthread_rwlock_wrlock(&s->fdlock);   /* no direct fd is in use while Python closes them */
        Py_END_ALLOW_THREADS
        for (i = 0; i < n; i++) {
            PyObject *r = PyObject_CallFunction(s->ops[OP_RELEASE], "K", batch[i]);
            if (r == NULL)
                take_error(s, OP_RELEASE);   /* logged there; nobody waits for the answer */
            Py_XDECREF(r);
        }
        pthread_rwlock_unlock(&s->fdlock);
    }
}

/* queue a release; returns the number pending, or 0 when it could not be queued */
size_t defer_release(Session *s, unsigned long long fh)
{
    size_t n = 0;
    pthread_mutex_lock(&s->lock);
    if (s->n_released == s->cap_released) {
        size_t cap = s->cap_released ? s->cap_released * 2 : 64;
        unsigned long long *p = realloc(s->released, cap * sizeof(*p));
        if (p != NULL) {
            s->released = p;
            s->cap_released = cap;
        }
    }
    if (s->n_released < s->cap_released) {
        s->released[s->n_released++] = fh;
        n = s->n_released;
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

/* call the release handler at once (no GIL held by the caller) */
void release_now(Session *s, fuse_ino_t ino, struct fuse_file_info *fi)
{
    PyGILState_STATE g;
    PyObject *r;
    if (direct_fd(fi->fh) >= 0)
        attr_fd_drop(s, ino, direct_fd(fi->fh));
    if (s->ops[OP_RELEASE] == NULL)
        return;
    pthread_rwlock_wrlock(&s->fdlock);
    g = PyGILState_Ensure();
    r = PyObject_CallFunction(s->ops[OP_RELEASE], "K", user_fh(fi->fh));
    if (r == NULL)
        take_error(s, OP_RELEASE);
    Py_XDECREF(r);
    PyGILState_Release(g);
    pthread_rwlock_unlock(&s->fdlock);
}

/* ---- the security.capability cache ----------------------------------------------------------
 * The kernel asks for security.capability before every write(2) and chown (to drop file
 * capabilities). The answer only changes through setxattr/removexattr requests, which pass here:
 * remembering "none" per inode answers those requests without Python. "None" is learnt from an
 * ENODATA answer, or from an open or create whose handler says so (BIT_NO_CAPABILITY: a new file,
 * a file opened for writing that has none), which spares the first write its round trip to Python.
 * Inode numbers are never reused by a session's handlers while the kernel knows them. */
int nocap_get(Session *s, fuse_ino_t ino)
{
    int r;
    pthread_mutex_lock(&s->lock);
    r = (size_t)(ino >> 3) < s->nocap_len && (s->nocap[ino >> 3] >> (ino & 7)) & 1;
    pthread_mutex_unlock(&s->lock);
    return r;
}

void nocap_set(Session *s, fuse_ino_t ino, int on)
{
    size_t byte = (size_t)(ino >> 3);
    pthread_mutex_lock(&s->lock);
    if (byte >= s->nocap_len && on && byte < ((size_t)1 << 28)) {
        size_t n = s->nocap_len ? s->nocap_len : 4096;
        unsigned char *p;
        while (n <= byte)
            n *= 2;
        p = realloc(s->nocap, n);
        if (p != NULL) {
            memset(p + s->nocap_len, 0, n - s->nocap_len);
            s->nocap = p;
            s->nocap_len = n;
        }
    }
    if (byte < s->nocap_len) {
        if (on)
            s->nocap[byte] |= (unsigned char)(1u << (ino & 7));
        else
            s->nocap[byte] &= (unsigned char)~(1u << (ino & 7));
    }
    pthread_mutex_unlock(&s->lock);
}
