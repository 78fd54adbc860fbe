/*
 * layerfs._fuse: a thin binding of libfuse 3's low-level API that serves
 * requests from a pool of native threads and calls plain (synchronous)
 * Python handlers.
 *
 * Why not pyfuse3: every pyfuse3 request goes through trio (a task wakes,
 * a coroutine runs, a worker-thread hop for anything blocking), which
 * costs several times what layerfs' own handlers cost, and pyfuse3 3.5
 * cannot set the FUSE flags that matter most for an image that never
 * changes (FOPEN_CACHE_DIR, FOPEN_NOFLUSH, no-open, CACHE_SYMLINKS,
 * max_background), has no fallocate handler, and asks the kernel to leave
 * setuid clearing to the server (HANDLE_KILLPRIV) without giving the
 * write handler the caller's credentials.
 *
 * Model: N worker threads each read one request from /dev/fuse (blocking;
 * a stop interrupts them with a signal) and dispatch it; a handler
 * takes the GIL, calls the Python method of the ops object, converts the
 * result and replies (with the GIL released for the reply's write).
 * Handlers that block release the GIL themselves (syscalls, zlib, zran),
 * so concurrent requests overlap.
 *
 * The Python protocol (all handlers optional; a missing one, or None,
 * answers ENOSYS, which for open/opendir tells the kernel to stop sending
 * them and to cache file data and directory listings on its own):
 *
 *   attr tuple: (ino, mode, nlink, uid, gid, rdev, size, blocks,
 *                atime_ns, mtime_ns, ctime_ns, timeout)
 *   lookup(parent, name) -> attr | None (negative entry)
 *   forget([(ino, nlookup), ...])
 *   getattr(ino, fh | None) -> attr
 *   setattr(ino, to_set, mode, uid, gid, size, atime_ns, mtime_ns, fh | None) -> attr
 *   readlink(ino) -> bytes
 *   mknod(parent, name, mode, rdev, uid, gid) -> attr
 *   mkdir(parent, name, mode, uid, gid) -> attr
 *   unlink(parent, name); rmdir(parent, name)
 *   symlink(parent, name, target, uid, gid) -> attr
 *   rename(parent, name, newparent, newname, flags)
 *   link(ino, newparent, newname) -> attr
 *   open(ino, flags) -> (fh, open_bits[, fd])
 *   create(parent, name, mode, flags, uid, gid) -> (fh, open_bits, attr[, fd])
 *   read(ino, fh, off, size) -> bytes-like
 *   write(fh, off, data) -> int
 *   flush(fh); release(fh); fsync(fh, datasync); fallocate(fh, mode, off, length)
 *   opendir(ino) -> (fh, open_bits)
 *   readdir(ino, fh, off, count) -> [(name, attr, next_off), ...]
 *   releasedir(fh); fsyncdir(fh, datasync)
 *   statfs() -> (bsize, frsize, blocks, bfree, bavail, files, ffree, favail, namemax)
 *   getxattr(ino, name) -> bytes; listxattr(ino) -> [bytes]; setxattr(ino, name, value, flags);
 *   removexattr(ino, name)
 *   error(opname, exception) -> errno   (any exception but an OSError with an ordinary errno:
 *                                        ENOENT, EEXIST, ENOTEMPTY...; see quiet_errno)
 *
 * open_bits: 1 keep_cache, 2 direct_io, 4 cache_readdir, 8 noflush, 16 nonseekable,
 *            32 no_capability (the inode has no security.capability: see the cache below).
 *            64 direct_attr (with an fd: see below).
 * fd (optional, >= 0): writes on this handle are plain pwrite(2)s to that fd, which stays open
 *            until release: they are served here, without Python (the kernel clears setuid and
 *            setgid itself before an unprivileged write: HANDLE_KILLPRIV stays off). With
 *            direct_attr, the fd's own stat is also the inode's truth (its owner and mode are
 *            real, it has one name or its links are real): while the handle is open, getattr
 *            and setattr of the inode (fstat, fchown, fchmod, ftruncate, futimens) are served
 *            here too, answered with the session's attr_timeout; a chown the host refuses with
 *            EINVAL still goes to the handler. fh values must then stay below 2**32, fds below
 *            2**30.
 * Handlers fail by raising OSError(errno, ...).
 */
#define FUSE_USE_VERSION 34
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

enum {
    OP_LOOKUP, OP_FORGET, OP_GETATTR, OP_SETATTR, OP_READLINK, OP_MKNOD, OP_MKDIR, OP_UNLINK,
    OP_RMDIR, OP_SYMLINK, OP_RENAME, OP_LINK, OP_OPEN, OP_READ, OP_WRITE, OP_FLUSH, OP_RELEASE,
    OP_FSYNC, OP_OPENDIR, OP_READDIR, OP_RELEASEDIR, OP_FSYNCDIR, OP_STATFS, OP_SETXATTR,
    OP_GETXATTR, OP_LISTXATTR, OP_REMOVEXATTR, OP_CREATE, OP_FALLOCATE, OP_ERROR, N_OPS
};

static const char *const op_names[N_OPS] = {
    "lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink",
    "rmdir", "symlink", "rename", "link", "open", "read", "write", "flush", "release",
    "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "setxattr",
    "getxattr", "listxattr", "removexattr", "create", "fallocate", "error",
};

#define BIT_KEEP_CACHE 1
#define BIT_DIRECT_IO 2
#define BIT_CACHE_DIR 4
#define BIT_NOFLUSH 8
#define BIT_NONSEEKABLE 16
#define BIT_NO_CAPABILITY 32
#define BIT_DIRECT_ATTR 64

/* A handle with a direct fd carries it in the kernel's fh: FH_DIRECT | (fd << 32) | the handler's fh
 * (fd < 2**30, fh < 2**32). */
#define FH_DIRECT (1ULL << 63)
#define FD_MAX 0x3fffffff

static unsigned long long user_fh(uint64_t fh)
{
    return (fh & FH_DIRECT) ? (unsigned long long)(fh & 0xffffffffULL) : (unsigned long long)fh;
}

static int direct_fd(uint64_t fh)
{
    return (fh & FH_DIRECT) ? (int)((fh >> 32) & FD_MAX) : -1;
}

struct ino_fd {
    uint64_t ino;   /* 0: empty slot */
    int fd;
};

typedef struct {
    PyObject_HEAD
    struct fuse_session *se;
    PyObject *ops[N_OPS];
    int mounted;
    int fd;
    /* workers */
    pthread_t *threads;
    int nthreads;
    int live;
    volatile int stop;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    /* connection settings */
    double negative_timeout;
    double attr_timeout;        /* for attributes answered from a direct fd */
    int writeback;
    int cache_symlinks;
    unsigned max_background;
    /* inode -> direct fd of an open handle whose fd stat is the inode's truth (BIT_DIRECT_ATTR), under
     * lock; fdlock is held for reading while such an fd is used, for writing while Python releases */
    struct ino_fd *attr_fds;
    size_t n_attr_fds, cap_attr_fds;
    pthread_rwlock_t fdlock;
    /* releases not yet handed to Python (see ll_release), under lock */
    unsigned long long *released;
    size_t n_released, cap_released;
    /* inodes known to have no security.capability (the kernel asks before every write) */
    unsigned char *nocap;
    size_t nocap_len;
    unsigned long long requests; /* requests read so far (for callers that want to work when idle) */
    unsigned long long busy;     /* requests being served right now */
} Session;

static inline Session *sess(fuse_req_t req) { return (Session *)fuse_req_userdata(req); }

/* ---- conversions --------------------------------------------------------------------------- */

static void ns_to_ts(long long ns, struct timespec *ts)
{
    long long sec = ns / 1000000000LL, rem = ns % 1000000000LL;
    if (rem < 0) {
        rem += 1000000000LL;
        sec -= 1;
    }
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = (long)rem;
}

static long long ts_to_ns(const struct timespec *ts)
{
    return (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

/* attr tuple -> struct stat + timeout; -1 with an exception set on a bad value */
static int parse_attr(PyObject *t, struct stat *st, double *timeout)
{
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 12) {
        PyErr_SetString(PyExc_TypeError, "attributes must be a 12-tuple");
        return -1;
    }
    memset(st, 0, sizeof(*st));
    st->st_ino = (ino_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 0));
    st->st_mode = (mode_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 1));
    st->st_nlink = (nlink_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 2));
    st->st_uid = (uid_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 3));
    st->st_gid = (gid_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 4));
    st->st_rdev = (dev_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 5));
    st->st_size = (off_t)PyLong_AsLongLong(PyTuple_GET_ITEM(t, 6));
    st->st_blocks = (blkcnt_t)PyLong_AsLongLong(PyTuple_GET_ITEM(t, 7));
    st->st_blksize = 4096;
    ns_to_ts(PyLong_AsLongLong(PyTuple_GET_ITEM(t, 8)), &st->st_atim);
    ns_to_ts(PyLong_AsLongLong(PyTuple_GET_ITEM(t, 9)), &st->st_mtim);
    ns_to_ts(PyLong_AsLongLong(PyTuple_GET_ITEM(t, 10)), &st->st_ctim);
    *timeout = PyFloat_AsDouble(PyTuple_GET_ITEM(t, 11));
    return PyErr_Occurred() ? -1 : 0;
}

static int parse_entry(PyObject *t, struct fuse_entry_param *e)
{
    double timeout;
    memset(e, 0, sizeof(*e));
    if (parse_attr(t, &e->attr, &timeout) < 0)
        return -1;
    e->ino = e->attr.st_ino;
    e->attr_timeout = timeout;
    e->entry_timeout = timeout;
    return 0;
}

static void apply_bits(struct fuse_file_info *fi, unsigned long bits)
{
    fi->keep_cache = !!(bits & BIT_KEEP_CACHE);
    fi->direct_io = !!(bits & BIT_DIRECT_IO);
    fi->cache_readdir = !!(bits & BIT_CACHE_DIR);
    fi->noflush = !!(bits & BIT_NOFLUSH);
    fi->nonseekable = !!(bits & BIT_NONSEEKABLE);
}

/* (fh, bits, ...) -> fi (and *bits_out, when given); the item at fd_index, when present and not None,
 * is a direct fd (see the protocol). -1 with an exception set */
static int parse_open(PyObject *r, struct fuse_file_info *fi, unsigned long *bits_out, Py_ssize_t fd_index)
{
    unsigned long long fh;
    unsigned long bits;
    long fd = -1;
    if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) < 2) {
        PyErr_SetString(PyExc_TypeError, "open must return (fh, bits)");
        return -1;
    }
    fh = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(r, 0));
    bits = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(r, 1));
    if (PyErr_Occurred())
        return -1;
    if (fd_index > 0 && PyTuple_GET_SIZE(r) > fd_index && PyTuple_GET_ITEM(r, fd_index) != Py_None) {
        fd = PyLong_AsLong(PyTuple_GET_ITEM(r, fd_index));
        if (fd == -1 && PyErr_Occurred())
            return -1;
    }
    if (fd >= 0 && fd <= FD_MAX && fh <= 0xffffffffULL)
        fi->fh = FH_DIRECT | ((uint64_t)fd << 32) | fh;
    else
        fi->fh = fh;
    apply_bits(fi, bits);
    if (bits_out != NULL)
        *bits_out = bits;
    return 0;
}

/* ---- errors -------------------------------------------------------------------------------- */

/* errnos that are ordinary answers of a file system: replied without a word to the error handler */
static int quiet_errno(long v)
{
    switch (v) {
    case ENOENT: case EEXIST: case ENOTEMPTY: case EISDIR: case ENOTDIR: case EXDEV: case EINVAL:
    case ENODATA: case EPERM: case EACCES: case EROFS: case ENAMETOOLONG: case ERANGE: case ENOTSUP:
    case ENOSPC: case EDQUOT: case EBADF: case ENOSYS: case ELOOP: case EMLINK: case EFBIG: case ETXTBSY:
    case EOVERFLOW: case ESPIPE: case EAGAIN: case EINTR:
        return 1;
    default:
        return 0;
    }
}

/* The errno for the pending exception (cleared); GIL held. An OSError with an ordinary errno is
   answered as it is; anything else goes to the ops' error(opname, exception) (to log it), which
   returns the errno to answer. */
static int take_error(Session *s, int op)
{
    PyObject *type, *value, *tb;
    int err = EIO;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && PyErr_GivenExceptionMatches(type, PyExc_OSError)) {
        PyObject *no = PyObject_GetAttrString(value, "errno");
        if (no != NULL && PyLong_Check(no)) {
            long v = PyLong_AsLong(no);
            if (v > 0 && v < 4096 && (quiet_errno(v) || s->ops[OP_ERROR] == NULL)) {
                Py_DECREF(no);
                Py_XDECREF(type);
                Py_XDECREF(value);
                Py_XDECREF(tb);
                return (int)v;
            }
        }
        Py_XDECREF(no);
        PyErr_Clear();
    }
    if (s->ops[OP_ERROR] != NULL && value != NULL) {
        PyObject *r;
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        r = PyObject_CallFunction(s->ops[OP_ERROR], "sO", op_names[op], value);
        if (r != NULL && PyLong_Check(r)) {
            long v = PyLong_AsLong(r);
            if (v > 0 && v < 4096)
                err = (int)v;
        }
        Py_XDECREF(r);
        if (PyErr_Occurred())
            PyErr_WriteUnraisable(s->ops[OP_ERROR]);
    } else {
        PyErr_Restore(type, value, tb);
        PyErr_WriteUnraisable(NULL);
        return EIO;
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return err;
}

/* Reply with the error of the pending exception and drop the GIL. */
static void fail(fuse_req_t req, Session *s, int op, PyGILState_STATE g)
{
    int err = take_error(s, op);
    PyGILState_Release(g);
    fuse_reply_err(req, err);
}

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

static int attr_fd_get(Session *s, uint64_t ino)
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

static void attr_fd_put(Session *s, uint64_t ino, int fd)
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
static void attr_fd_drop(Session *s, uint64_t ino, int fd)
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
#define RELEASE_BATCH 256

/* call the release handler for every pending handle (GIL held) */
static void drain_releases(Session *s)
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
static size_t defer_release(Session *s, unsigned long long fh)
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
static void release_now(Session *s, fuse_ino_t ino, struct fuse_file_info *fi)
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

#define HAVE(op) (s->ops[op] != NULL)
#define ENTER(op)                                   \
    Session *s = sess(req);                         \
    PyGILState_STATE g;                             \
    PyObject *r;                                    \
    if (!HAVE(op)) {                                \
        fuse_reply_err(req, ENOSYS);                \
        return;                                     \
    }                                               \
    g = PyGILState_Ensure();                        \
    if (__atomic_load_n(&s->n_released, __ATOMIC_RELAXED))  \
        drain_releases(s);

/* reply for handlers that answer an entry */
static void reply_entry(fuse_req_t req, Session *s, int op, PyGILState_STATE g, PyObject *r)
{
    struct fuse_entry_param e;
    if (r == NULL) {
        fail(req, s, op, g);
        return;
    }
    if (r == Py_None) {
        memset(&e, 0, sizeof(e));
        e.entry_timeout = s->negative_timeout;
        Py_DECREF(r);
        PyGILState_Release(g);
        fuse_reply_entry(req, &e);
        return;
    }
    if (parse_entry(r, &e) < 0) {
        Py_DECREF(r);
        fail(req, s, op, g);
        return;
    }
    Py_DECREF(r);
    PyGILState_Release(g);
    fuse_reply_entry(req, &e);
}

/* reply 0 for handlers whose result is ignored */
static void reply_ok(fuse_req_t req, Session *s, int op, PyGILState_STATE g, PyObject *r)
{
    if (r == NULL) {
        fail(req, s, op, g);
        return;
    }
    Py_DECREF(r);
    PyGILState_Release(g);
    fuse_reply_err(req, 0);
}



/* reply for handlers that answer attributes */
static void reply_attr_result(fuse_req_t req, Session *s, int op, PyGILState_STATE g, PyObject *r)
{
    struct stat st;
    double timeout;
    if (r == NULL || parse_attr(r, &st, &timeout) < 0) {
        Py_XDECREF(r);
        fail(req, s, op, g);
        return;
    }
    Py_DECREF(r);
    PyGILState_Release(g);
    fuse_reply_attr(req, &st, timeout);
}

static PyObject *fh_or_none(struct fuse_file_info *fi)
{
    if (fi == NULL)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(user_fh(fi->fh));
}

/* ---- the security.capability cache ----------------------------------------------------------
 * The kernel asks for security.capability before every write(2) and chown (to drop file
 * capabilities). The answer only changes through setxattr/removexattr requests, which pass here:
 * remembering "none" per inode answers those requests without Python. "None" is learnt from an
 * ENODATA answer, or from an open or create whose handler says so (BIT_NO_CAPABILITY: a new file,
 * a file opened for writing that has none), which spares the first write its round trip to Python.
 * Inode numbers are never reused by a session's handlers while the kernel knows them. */
#define CAP_XATTR "security.capability"

static int nocap_get(Session *s, fuse_ino_t ino)
{
    int r;
    pthread_mutex_lock(&s->lock);
    r = (size_t)(ino >> 3) < s->nocap_len && (s->nocap[ino >> 3] >> (ino & 7)) & 1;
    pthread_mutex_unlock(&s->lock);
    return r;
}

static void nocap_set(Session *s, fuse_ino_t ino, int on)
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

/* ---- handlers ------------------------------------------------------------------------------ */

static void ll_init(void *userdata, struct fuse_conn_info *conn)
{
    Session *s = userdata;
    conn->want &= ~(FUSE_CAP_HANDLE_KILLPRIV | FUSE_CAP_READDIRPLUS_AUTO | FUSE_CAP_SPLICE_READ |
                    FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);

    if (conn->capable & FUSE_CAP_READDIRPLUS)
        conn->want |= FUSE_CAP_READDIRPLUS;
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS)
        conn->want |= FUSE_CAP_PARALLEL_DIROPS;
    if (conn->capable & FUSE_CAP_ASYNC_READ)
        conn->want |= FUSE_CAP_ASYNC_READ;
    if (s->cache_symlinks && (conn->capable & FUSE_CAP_CACHE_SYMLINKS))
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
    if (s->writeback && (conn->capable & FUSE_CAP_WRITEBACK_CACHE))
        conn->want |= FUSE_CAP_WRITEBACK_CACHE;
    else
        conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
    if (s->max_background) {
        conn->max_background = s->max_background;
        conn->congestion_threshold = s->max_background * 3 / 4;
    }
    conn->time_gran = 1;
}

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    ENTER(OP_LOOKUP)
    r = PyObject_CallFunction(s->ops[OP_LOOKUP], "Ky", (unsigned long long)parent, name);
    reply_entry(req, s, OP_LOOKUP, g, r);
}

static void forget_list(Session *s, size_t n, const struct fuse_forget_data *f)
{
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *lst = PyList_New((Py_ssize_t)n), *r;
    size_t i;
    if (lst == NULL)
        goto out;
    for (i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("KK", (unsigned long long)f[i].ino, (unsigned long long)f[i].nlookup);
        if (t == NULL) {
            Py_DECREF(lst);
            goto out;
        }
        PyList_SET_ITEM(lst, (Py_ssize_t)i, t);
    }
    r = PyObject_CallOneArg(s->ops[OP_FORGET], lst);
    Py_DECREF(lst);
    Py_XDECREF(r);
out:
    if (PyErr_Occurred())
        PyErr_WriteUnraisable(s->ops[OP_FORGET]);
    PyGILState_Release(g);
}

static void ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    Session *s = sess(req);
    if (HAVE(OP_FORGET)) {
        struct fuse_forget_data f = {.ino = ino, .nlookup = nlookup};
        forget_list(s, 1, &f);
    }
    fuse_reply_none(req);
}

static void ll_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    Session *s = sess(req);
    if (HAVE(OP_FORGET) && count)
        forget_list(s, count, forgets);
    fuse_reply_none(req);
}

/* reply the attributes of *ino* from its direct fd; -1 (nothing replied) when fstat fails */
static int reply_fd_attr(fuse_req_t req, Session *s, fuse_ino_t ino, int fd)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -1;
    st.st_ino = (ino_t)ino;
    st.st_blksize = 4096;
    fuse_reply_attr(req, &st, s->attr_timeout);
    return 0;
}

static int direct_setattr(fuse_req_t req, Session *s, fuse_ino_t ino, int fd, struct stat *attr, int to_set);

/* serve getattr (attr == NULL) or setattr of *ino* from its direct fd, if it has one; 0 when replied */
static int direct_attr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set)
{
    Session *s = sess(req);
    int fd, done = -1;
    pthread_rwlock_rdlock(&s->fdlock);
    fd = attr_fd_get(s, ino);
    if (fd >= 0)
        done = attr == NULL ? reply_fd_attr(req, s, ino, fd) : direct_setattr(req, s, ino, fd, attr, to_set);
    pthread_rwlock_unlock(&s->fdlock);
    return done;
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (direct_attr(req, ino, NULL, 0) == 0)
        return;
    {
    ENTER(OP_GETATTR)
    r = PyObject_CallFunction(s->ops[OP_GETATTR], "KN", (unsigned long long)ino, fh_or_none(fi));
    reply_attr_result(req, s, OP_GETATTR, g, r);
    }
}

/* setattr through a direct fd (see the protocol), in the overlay's order: owner, size, mode, times.
 * Returns -1 when the request goes to the handler instead (nothing changed), else 0 (replied). */
static int direct_setattr(fuse_req_t req, Session *s, fuse_ino_t ino, int fd, struct stat *attr, int to_set)
{
    struct stat cur;
    int err = 0;
    if (fstat(fd, &cur) != 0 || !S_ISREG(cur.st_mode))
        return -1;
    if (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        uid_t u = (to_set & FUSE_SET_ATTR_UID) ? attr->st_uid : cur.st_uid;
        gid_t g = (to_set & FUSE_SET_ATTR_GID) ? attr->st_gid : cur.st_gid;
        if (u != cur.st_uid || g != cur.st_gid) {
            if (fchown(fd, u, g) != 0) {
                if (errno == EINVAL)
                    return -1;          /* an id the host cannot hold: the handler records it */
                err = errno;
                goto out;
            }
        }
        if (!(to_set & FUSE_SET_ATTR_MODE)) {
            /* chown clears set-user-ID, and set-group-ID of group-executable files */
            mode_t m = cur.st_mode & 07777 & ~(mode_t)S_ISUID;
            if (m & S_IXGRP)
                m &= ~(mode_t)S_ISGID;
            if (m != (cur.st_mode & 07777) && fchmod(fd, m) != 0) {
                err = errno;
                goto out;
            }
        }
    }
    if ((to_set & FUSE_SET_ATTR_SIZE) && ftruncate(fd, attr->st_size) != 0) {
        err = errno;
        goto out;
    }
    if ((to_set & FUSE_SET_ATTR_MODE) && fchmod(fd, attr->st_mode & 07777) != 0) {
        err = errno;
        goto out;
    }
    if (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)) {
        struct timespec ts[2];
        ts[0].tv_sec = ts[1].tv_sec = 0;
        ts[0].tv_nsec = ts[1].tv_nsec = UTIME_OMIT;
        if (to_set & FUSE_SET_ATTR_ATIME_NOW)
            ts[0].tv_nsec = UTIME_NOW;
        else if (to_set & FUSE_SET_ATTR_ATIME)
            ts[0] = attr->st_atim;
        if (to_set & FUSE_SET_ATTR_MTIME_NOW)
            ts[1].tv_nsec = UTIME_NOW;
        else if (to_set & FUSE_SET_ATTR_MTIME)
            ts[1] = attr->st_mtim;
        if (futimens(fd, ts) != 0) {
            err = errno;
            goto out;
        }
    }
out:
    if (err != 0 || reply_fd_attr(req, s, ino, fd) != 0)
        fuse_reply_err(req, err ? err : EIO);
    return 0;
}

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
    struct timespec now;
    long long atime = ts_to_ns(&attr->st_atim), mtime = ts_to_ns(&attr->st_mtim);
    if (direct_attr(req, ino, attr, to_set) == 0)
        return;
    {
    ENTER(OP_SETATTR)
    if (to_set & (FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)) {
        clock_gettime(CLOCK_REALTIME, &now);
        if (to_set & FUSE_SET_ATTR_ATIME_NOW) {
            atime = ts_to_ns(&now);
            to_set |= FUSE_SET_ATTR_ATIME;
        }
        if (to_set & FUSE_SET_ATTR_MTIME_NOW) {
            mtime = ts_to_ns(&now);
            to_set |= FUSE_SET_ATTR_MTIME;
        }
    }
    r = PyObject_CallFunction(s->ops[OP_SETATTR], "KiIIILLLN", (unsigned long long)ino, to_set,
                              (unsigned)attr->st_mode, (unsigned)attr->st_uid, (unsigned)attr->st_gid,
                              (long long)attr->st_size, atime, mtime, fh_or_none(fi));
    reply_attr_result(req, s, OP_SETATTR, g, r);
    }
}

static void ll_readlink(fuse_req_t req, fuse_ino_t ino)
{
    ENTER(OP_READLINK)
    r = PyObject_CallFunction(s->ops[OP_READLINK], "K", (unsigned long long)ino);
    if (r == NULL || !PyBytes_Check(r)) {
        if (r != NULL) {
            Py_DECREF(r);
            PyErr_SetString(PyExc_TypeError, "readlink must return bytes");
        }
        fail(req, s, OP_READLINK, g);
        return;
    }
    /* PyBytes are NUL-terminated; the object stays alive until the reply is sent */
    PyGILState_Release(g);
    fuse_reply_readlink(req, PyBytes_AS_STRING(r));
    g = PyGILState_Ensure();
    Py_DECREF(r);
    PyGILState_Release(g);
}

static void ll_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
    const struct fuse_ctx *c = fuse_req_ctx(req);
    ENTER(OP_MKNOD)
    r = PyObject_CallFunction(s->ops[OP_MKNOD], "KyIKII", (unsigned long long)parent, name, (unsigned)mode,
                              (unsigned long long)rdev, (unsigned)c->uid, (unsigned)c->gid);
    reply_entry(req, s, OP_MKNOD, g, r);
}

static void ll_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    const struct fuse_ctx *c = fuse_req_ctx(req);
    ENTER(OP_MKDIR)
    r = PyObject_CallFunction(s->ops[OP_MKDIR], "KyIII", (unsigned long long)parent, name, (unsigned)mode,
                              (unsigned)c->uid, (unsigned)c->gid);
    reply_entry(req, s, OP_MKDIR, g, r);
}

static void ll_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    ENTER(OP_UNLINK)
    r = PyObject_CallFunction(s->ops[OP_UNLINK], "Ky", (unsigned long long)parent, name);
    reply_ok(req, s, OP_UNLINK, g, r);
}

static void ll_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    ENTER(OP_RMDIR)
    r = PyObject_CallFunction(s->ops[OP_RMDIR], "Ky", (unsigned long long)parent, name);
    reply_ok(req, s, OP_RMDIR, g, r);
}

static void ll_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
    const struct fuse_ctx *c = fuse_req_ctx(req);
    ENTER(OP_SYMLINK)
    r = PyObject_CallFunction(s->ops[OP_SYMLINK], "KyyII", (unsigned long long)parent, name, link,
                              (unsigned)c->uid, (unsigned)c->gid);
    reply_entry(req, s, OP_SYMLINK, g, r);
}

static void ll_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                      const char *newname, unsigned int flags)
{
    ENTER(OP_RENAME)
    r = PyObject_CallFunction(s->ops[OP_RENAME], "KyKyI", (unsigned long long)parent, name,
                              (unsigned long long)newparent, newname, flags);
    reply_ok(req, s, OP_RENAME, g, r);
}

static void ll_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
    ENTER(OP_LINK)
    r = PyObject_CallFunction(s->ops[OP_LINK], "KKy", (unsigned long long)ino, (unsigned long long)newparent,
                              newname);
    reply_entry(req, s, OP_LINK, g, r);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    unsigned long bits;
    ENTER(OP_OPEN)
    r = PyObject_CallFunction(s->ops[OP_OPEN], "Ki", (unsigned long long)ino, fi->flags);
    if (r == NULL || parse_open(r, fi, &bits, 2) < 0) {
        Py_XDECREF(r);
        fail(req, s, OP_OPEN, g);
        return;
    }
    Py_DECREF(r);
    PyGILState_Release(g);
    if (bits & BIT_NO_CAPABILITY)
        nocap_set(s, ino, 1);
    if ((bits & BIT_DIRECT_ATTR) && direct_fd(fi->fh) >= 0)
        attr_fd_put(s, ino, direct_fd(fi->fh));
    if (fuse_reply_open(req, fi) == -ENOENT)
        release_now(s, ino, fi);    /* the open was interrupted: the kernel will never release it */
}

static void ll_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
    const struct fuse_ctx *c = fuse_req_ctx(req);
    struct fuse_entry_param e;
    unsigned long bits;
    ENTER(OP_CREATE)
    r = PyObject_CallFunction(s->ops[OP_CREATE], "KyIiII", (unsigned long long)parent, name, (unsigned)mode,
                              fi->flags, (unsigned)c->uid, (unsigned)c->gid);
    if (r == NULL || parse_open(r, fi, &bits, 3) < 0 || PyTuple_GET_SIZE(r) < 3 ||
        parse_entry(PyTuple_GET_ITEM(r, 2), &e) < 0) {
        if (r != NULL && !PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "create must return (fh, bits, attr[, fd])");
        Py_XDECREF(r);
        fail(req, s, OP_CREATE, g);
        return;
    }
    Py_DECREF(r);
    PyGILState_Release(g);
    if (bits & BIT_NO_CAPABILITY)
        nocap_set(s, e.ino, 1);
    if ((bits & BIT_DIRECT_ATTR) && direct_fd(fi->fh) >= 0)
        attr_fd_put(s, e.ino, direct_fd(fi->fh));
    if (fuse_reply_create(req, &e, fi) == -ENOENT)
        release_now(s, e.ino, fi);
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    Py_buffer view;
    ENTER(OP_READ)
    r = PyObject_CallFunction(s->ops[OP_READ], "KKLn", (unsigned long long)ino, user_fh(fi->fh),
                              (long long)off, (Py_ssize_t)size);
    if (r == NULL || PyObject_GetBuffer(r, &view, PyBUF_SIMPLE) < 0) {
        Py_XDECREF(r);
        fail(req, s, OP_READ, g);
        return;
    }
    Py_BEGIN_ALLOW_THREADS
    fuse_reply_buf(req, view.buf, (size_t)view.len > size ? size : (size_t)view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    Py_DECREF(r);
    PyGILState_Release(g);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    size_t n;
    int fd = direct_fd(fi->fh);
    if (fd >= 0) {
        ssize_t w = pwrite(fd, buf, size, off);
        if (w < 0)
            fuse_reply_err(req, errno);
        else
            fuse_reply_write(req, (size_t)w);
        return;
    }
    {
    ENTER(OP_WRITE)
    r = PyObject_CallFunction(s->ops[OP_WRITE], "KLy#", user_fh(fi->fh), (long long)off, buf,
                              (Py_ssize_t)size);
    if (r == NULL) {
        fail(req, s, OP_WRITE, g);
        return;
    }
    n = PyLong_AsSize_t(r);
    Py_DECREF(r);
    if (PyErr_Occurred()) {
        fail(req, s, OP_WRITE, g);
        return;
    }
    PyGILState_Release(g);
    fuse_reply_write(req, n);
    }
}

static void call_fh(fuse_req_t req, int op, struct fuse_file_info *fi)
{
    ENTER(op)
    r = PyObject_CallFunction(s->ops[op], "K", user_fh(fi->fh));
    reply_ok(req, s, op, g, r);
}

static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (!sess(req)->ops[OP_FLUSH]) {
        /* ENOSYS: the kernel takes it as success and sends no more FLUSH on this connection (a
         * read-only mount has no open handler, so FOPEN_NOFLUSH cannot spare it one per close) */
        fuse_reply_err(req, ENOSYS);
        return;
    }
    call_fh(req, OP_FLUSH, fi);
}

static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    Session *s = sess(req);
    size_t pending;
    if (!s->ops[OP_RELEASE]) {
        fuse_reply_err(req, 0);
        return;
    }
    if (direct_fd(fi->fh) >= 0)
        attr_fd_drop(s, ino, direct_fd(fi->fh));
    pending = defer_release(s, user_fh(fi->fh));
    if (pending == 0) {            /* out of memory: release now */
        fuse_reply_err(req, 0);
        release_now(s, ino, fi);
        return;
    }
    fuse_reply_err(req, 0);
    if (pending >= RELEASE_BATCH) {
        PyGILState_STATE g = PyGILState_Ensure();
        drain_releases(s);
        PyGILState_Release(g);
    }
}

static void ll_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (!sess(req)->ops[OP_RELEASEDIR]) {
        fuse_reply_err(req, 0);
        return;
    }
    call_fh(req, OP_RELEASEDIR, fi);
}

static void fsync_common(fuse_req_t req, int op, int datasync, struct fuse_file_info *fi)
{
    Session *s0 = sess(req);
    if (!s0->ops[op]) {
        fuse_reply_err(req, 0);
        return;
    }
    {
        ENTER(op)
        r = PyObject_CallFunction(s->ops[op], "Ki", user_fh(fi->fh), datasync);
        reply_ok(req, s, op, g, r);
    }
}

static void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    fsync_common(req, OP_FSYNC, datasync, fi);
}

static void ll_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    fsync_common(req, OP_FSYNCDIR, datasync, fi);
}

static void ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi)
{
    ENTER(OP_FALLOCATE)
    r = PyObject_CallFunction(s->ops[OP_FALLOCATE], "KiLL", user_fh(fi->fh), mode, (long long)offset,
                              (long long)length);
    reply_ok(req, s, OP_FALLOCATE, g, r);
}

static void ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    ENTER(OP_OPENDIR)
    r = PyObject_CallFunction(s->ops[OP_OPENDIR], "K", (unsigned long long)ino);
    if (r == NULL || parse_open(r, fi, NULL, 0) < 0) {
        Py_XDECREF(r);
        fail(req, s, OP_OPENDIR, g);
        return;
    }
    Py_DECREF(r);
    PyGILState_Release(g);
    if (fuse_reply_open(req, fi) == -ENOENT && HAVE(OP_RELEASEDIR)) {
        g = PyGILState_Ensure();
        r = PyObject_CallFunction(s->ops[OP_RELEASEDIR], "K", user_fh(fi->fh));
        Py_XDECREF(r);
        PyErr_Clear();
        PyGILState_Release(g);
    }
}

static void readdir_common(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi,
                           int plus)
{
    char *buf;
    size_t pos = 0;
    Py_ssize_t i, n, count;
    ENTER(OP_READDIR)
    /* a hint of how many entries can fit: a direntplus is >= 152 bytes, a dirent >= 32 */
    count = (Py_ssize_t)(size / (plus ? 152 : 32)) + 1;
    r = PyObject_CallFunction(s->ops[OP_READDIR], "KKLn", (unsigned long long)ino,
                              (fi ? user_fh(fi->fh) : 0ULL), (long long)off, count);
    if (r == NULL || !PyList_Check(r)) {
        if (r != NULL) {
            Py_DECREF(r);
            PyErr_SetString(PyExc_TypeError, "readdir must return a list");
        }
        fail(req, s, OP_READDIR, g);
        return;
    }
    buf = malloc(size ? size : 1);
    if (buf == NULL) {
        Py_DECREF(r);
        PyGILState_Release(g);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    n = PyList_GET_SIZE(r);
    for (i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(r, i);
        struct fuse_entry_param e;
        const char *name;
        long long next;
        size_t need;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_TypeError, "readdir entries must be (name, attr, next_offset)");
            break;
        }
        name = PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 0));
        next = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 2));
        if (parse_entry(PyTuple_GET_ITEM(item, 1), &e) < 0)
            break;
        if (plus)
            need = fuse_add_direntry_plus(req, buf + pos, size - pos, name, &e, (off_t)next);
        else
            need = fuse_add_direntry(req, buf + pos, size - pos, name, &e.attr, (off_t)next);
        if (need > size - pos)
            break;
        pos += need;
    }
    Py_DECREF(r);
    if (PyErr_Occurred()) {
        free(buf);
        fail(req, s, OP_READDIR, g);
        return;
    }
    PyGILState_Release(g);
    fuse_reply_buf(req, buf, pos);
    free(buf);
}

static void ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    readdir_common(req, ino, size, off, fi, 0);
}

static void ll_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    readdir_common(req, ino, size, off, fi, 1);
}

static void ll_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct statvfs sv;
    unsigned long long v[9];
    int i;
    ENTER(OP_STATFS)
    r = PyObject_CallNoArgs(s->ops[OP_STATFS]);
    if (r == NULL || !PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 9) {
        if (r != NULL) {
            Py_DECREF(r);
            PyErr_SetString(PyExc_TypeError, "statfs must return a 9-tuple");
        }
        fail(req, s, OP_STATFS, g);
        return;
    }
    for (i = 0; i < 9; i++)
        v[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(r, i));
    Py_DECREF(r);
    if (PyErr_Occurred()) {
        fail(req, s, OP_STATFS, g);
        return;
    }
    PyGILState_Release(g);
    memset(&sv, 0, sizeof(sv));
    sv.f_bsize = v[0];
    sv.f_frsize = v[1];
    sv.f_blocks = v[2];
    sv.f_bfree = v[3];
    sv.f_bavail = v[4];
    sv.f_files = v[5];
    sv.f_ffree = v[6];
    sv.f_favail = v[7];
    sv.f_namemax = v[8];
    fuse_reply_statfs(req, &sv);
}

static void ll_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size,
                        int flags)
{
    nocap_set(sess(req), ino, 0);
    {
    ENTER(OP_SETXATTR)
    r = PyObject_CallFunction(s->ops[OP_SETXATTR], "Kyy#i", (unsigned long long)ino, name, value,
                              (Py_ssize_t)size, flags);
    reply_ok(req, s, OP_SETXATTR, g, r);
    }
}

/* reply a value for getxattr/listxattr: its size when size == 0, ERANGE when it does not fit */
static void reply_xattr_value(fuse_req_t req, PyGILState_STATE g, PyObject *value, size_t size)
{
    Py_ssize_t len = PyBytes_GET_SIZE(value);
    if (size == 0) {
        Py_DECREF(value);
        PyGILState_Release(g);
        fuse_reply_xattr(req, (size_t)len);
    } else if ((size_t)len > size) {
        Py_DECREF(value);
        PyGILState_Release(g);
        fuse_reply_err(req, ERANGE);
    } else {
        PyGILState_Release(g);
        fuse_reply_buf(req, PyBytes_AS_STRING(value), (size_t)len);
        g = PyGILState_Ensure();
        Py_DECREF(value);
        PyGILState_Release(g);
    }
}

static void ll_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    PyObject *b;
    int cap = strcmp(name, CAP_XATTR) == 0;
    if (cap && nocap_get(sess(req), ino)) {
        fuse_reply_err(req, ENODATA);
        return;
    }
    {
    ENTER(OP_GETXATTR)
    r = PyObject_CallFunction(s->ops[OP_GETXATTR], "Ky", (unsigned long long)ino, name);
    if (r == NULL || (b = PyBytes_FromObject(r)) == NULL) {
        int err;
        Py_XDECREF(r);
        err = take_error(s, OP_GETXATTR);
        PyGILState_Release(g);
        if (cap && err == ENODATA)
            nocap_set(s, ino, 1);
        fuse_reply_err(req, err);
        return;
    }
    Py_DECREF(r);
    reply_xattr_value(req, g, b, size);
    }
}

static void ll_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    PyObject *names, *joined;
    Py_ssize_t i, n, total = 0;
    char *p;
    ENTER(OP_LISTXATTR)
    r = PyObject_CallFunction(s->ops[OP_LISTXATTR], "K", (unsigned long long)ino);
    if (r == NULL) {
        fail(req, s, OP_LISTXATTR, g);
        return;
    }
    names = PySequence_Fast(r, "listxattr must return a sequence of bytes");
    Py_DECREF(r);
    if (names == NULL) {
        fail(req, s, OP_LISTXATTR, g);
        return;
    }
    /* the names, each followed by a NUL */
    n = PySequence_Fast_GET_SIZE(names);
    for (i = 0; i < n; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(names, i);
        if (!PyBytes_Check(name)) {
            Py_DECREF(names);
            PyErr_SetString(PyExc_TypeError, "listxattr must return a sequence of bytes");
            fail(req, s, OP_LISTXATTR, g);
            return;
        }
        total += PyBytes_GET_SIZE(name) + 1;
    }
    joined = PyBytes_FromStringAndSize(NULL, total);
    if (joined == NULL) {
        Py_DECREF(names);
        fail(req, s, OP_LISTXATTR, g);
        return;
    }
    p = PyBytes_AS_STRING(joined);
    for (i = 0; i < n; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(names, i);
        memcpy(p, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name) + 1);
        p += PyBytes_GET_SIZE(name) + 1;
    }
    Py_DECREF(names);
    reply_xattr_value(req, g, joined, size);
}

static void ll_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    nocap_set(sess(req), ino, 0);
    {
    ENTER(OP_REMOVEXATTR)
    r = PyObject_CallFunction(s->ops[OP_REMOVEXATTR], "Ky", (unsigned long long)ino, name);
    reply_ok(req, s, OP_REMOVEXATTR, g, r);
    }
}

static const struct fuse_lowlevel_ops ll_ops = {
    .init = ll_init,
    .lookup = ll_lookup,
    .forget = ll_forget,
    .forget_multi = ll_forget_multi,
    .getattr = ll_getattr,
    .setattr = ll_setattr,
    .readlink = ll_readlink,
    .mknod = ll_mknod,
    .mkdir = ll_mkdir,
    .unlink = ll_unlink,
    .rmdir = ll_rmdir,
    .symlink = ll_symlink,
    .rename = ll_rename,
    .link = ll_link,
    .open = ll_open,
    .read = ll_read,
    .write = ll_write,
    .flush = ll_flush,
    .release = ll_release,
    .fsync = ll_fsync,
    .opendir = ll_opendir,
    .readdir = ll_readdir,
    .readdirplus = ll_readdirplus,
    .releasedir = ll_releasedir,
    .fsyncdir = ll_fsyncdir,
    .statfs = ll_statfs,
    .setxattr = ll_setxattr,
    .getxattr = ll_getxattr,
    .listxattr = ll_listxattr,
    .removexattr = ll_removexattr,
    .create = ll_create,
    .fallocate = ll_fallocate,
};

/* ---- the worker threads -------------------------------------------------------------------- */

/* The signal that interrupts a worker's blocking read of /dev/fuse when the session stops. */
static int wake_signal(void) { return SIGRTMIN + 3; }

static void on_wake(int sig) { (void)sig; }

static void *worker(void *arg)
{
    Session *s = arg;
    struct fuse_buf buf;
    PyGILState_STATE g;
    PyThreadState *ts;
    sigset_t wake;
    memset(&buf, 0, sizeof(buf));
    /* one Python thread state for the worker's life: handlers then only take and drop the GIL */
    g = PyGILState_Ensure();
    ts = PyEval_SaveThread();
    sigemptyset(&wake);
    sigaddset(&wake, wake_signal());
    pthread_sigmask(SIG_UNBLOCK, &wake, NULL);
    /* Blocking reads: the kernel wakes one waiting reader per request (an exclusive wait), where
       poll() would wake every worker for each request. A stop interrupts them with wake_signal(). */
    while (!s->stop && !fuse_session_exited(s->se)) {
        int res = fuse_session_receive_buf(s->se, &buf);
        if (res == -EINTR || res == -EAGAIN)
            continue;
        if (res <= 0) {
            if (res < 0)
                fuse_session_exit(s->se);
            break;
        }
        __atomic_add_fetch(&s->requests, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->busy, 1, __ATOMIC_RELAXED);
        fuse_session_process_buf(s->se, &buf);
        __atomic_sub_fetch(&s->busy, 1, __ATOMIC_RELAXED);
    }
    free(buf.mem);
    PyEval_RestoreThread(ts);
    PyGILState_Release(g);
    pthread_mutex_lock(&s->lock);
    s->live--;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* Stop the workers: interrupt their reads until all have ended (GIL released by the caller).
   Returns 0, or -1 when some are still stuck after a few seconds (they are then left alone). */
static int stop_workers(Session *s)
{
    int i, rounds;
    s->stop = 1;
    fuse_session_exit(s->se);
    for (rounds = 0; rounds < 100; rounds++) {
        struct timespec deadline;
        int live;
        pthread_mutex_lock(&s->lock);
        live = s->live;
        pthread_mutex_unlock(&s->lock);
        if (live == 0)
            return 0;
        for (i = 0; i < s->nthreads; i++)
            pthread_kill(s->threads[i], wake_signal());
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_nsec += 30 * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec += 1;
            deadline.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&s->lock);
        if (s->live > 0)
            pthread_cond_timedwait(&s->cond, &s->lock, &deadline);
        pthread_mutex_unlock(&s->lock);
    }
    return -1;
}

/* ---- the Session type ---------------------------------------------------------------------- */

static void session_release(Session *s)
{
    int i, stuck = 0;
    if (s->threads != NULL) {
        Py_BEGIN_ALLOW_THREADS
        stuck = stop_workers(s) < 0;
        if (!stuck)
            for (i = 0; i < s->nthreads; i++)
                pthread_join(s->threads[i], NULL);
        Py_END_ALLOW_THREADS
        if (stuck)
            return; /* workers still use the session: leave it to the process's exit */
        free(s->threads);
        s->threads = NULL;
        s->nthreads = 0;
    }
    if (s->ops[OP_RELEASE] != NULL)
        drain_releases(s);
    if (s->se != NULL) {
        if (s->mounted) {
            Py_BEGIN_ALLOW_THREADS
            fuse_session_unmount(s->se);
            Py_END_ALLOW_THREADS
            s->mounted = 0;
        }
        fuse_session_destroy(s->se);
        s->se = NULL;
    }
}

static void Session_dealloc(Session *s)
{
    int i;
    session_release(s);
    for (i = 0; i < N_OPS; i++)
        Py_CLEAR(s->ops[i]);
    pthread_mutex_destroy(&s->lock);
    pthread_rwlock_destroy(&s->fdlock);
    free(s->attr_fds);
    pthread_cond_destroy(&s->cond);
    free(s->nocap);
    free(s->released);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *Session_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ops", "mountpoint", "options", "negative_timeout", "writeback", "cache_symlinks",
                             "max_background", "attr_timeout", NULL};
    PyObject *ops, *options, *opt_text = NULL;
    const char *mountpoint;
    double negative_timeout = 0.0, attr_timeout = 1.0;
    int writeback = 0, cache_symlinks = 1;
    unsigned int max_background = 0;
    Session *s;
    struct fuse_args fargs = FUSE_ARGS_INIT(0, NULL);
    char *argv[4];
    int i, rc;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OsO|dppId", kwlist, &ops, &mountpoint, &options,
                                     &negative_timeout, &writeback, &cache_symlinks, &max_background,
                                     &attr_timeout))
        return NULL;
    s = (Session *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    pthread_rwlock_init(&s->fdlock, NULL);
    s->fd = -1;
    s->negative_timeout = negative_timeout;
    s->attr_timeout = attr_timeout;
    s->writeback = writeback;
    s->cache_symlinks = cache_symlinks;
    s->max_background = max_background;
    for (i = 0; i < N_OPS; i++) {
        PyObject *m = PyObject_GetAttrString(ops, op_names[i]);
        if (m == NULL) {
            PyErr_Clear();
            continue;
        }
        if (m == Py_None || !PyCallable_Check(m)) {
            Py_DECREF(m);
            continue;
        }
        s->ops[i] = m;
    }
    /* "-o a,b,c" (the options are escaped for libfuse's parser by the caller) */
    {
        PyObject *comma = PyUnicode_FromString(",");
        if (comma == NULL)
            goto error;
        opt_text = PyUnicode_Join(comma, options);
        Py_DECREF(comma);
        if (opt_text == NULL)
            goto error;
    }
    argv[0] = "layerfs";
    argv[1] = "-o";
    argv[2] = (char *)PyUnicode_AsUTF8(opt_text);
    argv[3] = NULL;
    if (argv[2] == NULL)
        goto error;
    fargs.argc = argv[2][0] ? 3 : 1;
    fargs.argv = argv;
    fargs.allocated = 0;
    Py_BEGIN_ALLOW_THREADS
    s->se = fuse_session_new(&fargs, &ll_ops, sizeof(ll_ops), s);
    Py_END_ALLOW_THREADS
    fuse_opt_free_args(&fargs);
    Py_CLEAR(opt_text);
    if (s->se == NULL) {
        PyErr_SetString(PyExc_OSError, "libfuse refused the options");
        goto error;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = fuse_session_mount(s->se, mountpoint);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_Format(PyExc_OSError, "cannot mount %s", mountpoint);
        goto error;
    }
    s->mounted = 1;
    s->fd = fuse_session_fd(s->se);
    return (PyObject *)s;
error:
    Py_XDECREF(opt_text);
    Py_DECREF(s);
    return NULL;
}

static PyObject *Session_start(Session *s, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    int i;
    sigset_t all, old;
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > 256) {
        PyErr_SetString(PyExc_ValueError, "threads must be 1..256");
        return NULL;
    }
    if (s->se == NULL || s->threads != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "session closed or already started");
        return NULL;
    }
    s->threads = calloc((size_t)n, sizeof(pthread_t));
    if (s->threads == NULL)
        return PyErr_NoMemory();
    {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = on_wake; /* no SA_RESTART: a read in progress returns EINTR */
        sigemptyset(&sa.sa_mask);
        sigaction(wake_signal(), &sa, NULL);
    }
    /* workers take no signal but wake_signal(): Python handles them in the main thread */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (i = 0; i < n; i++) {
        if (pthread_create(&s->threads[i], NULL, worker, s) != 0)
            break;
        pthread_mutex_lock(&s->lock);
        s->live++;
        pthread_mutex_unlock(&s->lock);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    s->nthreads = i;
    if (i == 0) {
        free(s->threads);
        s->threads = NULL;
        PyErr_SetString(PyExc_OSError, "cannot start worker threads");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* wait(timeout) -> True once every worker has ended (the file system was unmounted or stopped) */
static PyObject *Session_wait(Session *s, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    struct timespec deadline;
    int done;
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (s->ops[OP_RELEASE] != NULL)
        drain_releases(s);           /* the mount went quiet: close what was released */
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += (time_t)timeout;
    deadline.tv_nsec += (long)((timeout - (double)(time_t)timeout) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->lock);
    while (s->live > 0) {
        if (pthread_cond_timedwait(&s->cond, &s->lock, &deadline) == ETIMEDOUT)
            break;
    }
    done = s->live == 0;
    pthread_mutex_unlock(&s->lock);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(done);
}

/* exit(): ask the workers to stop (from a signal handler: must not block) */
static PyObject *Session_exit(Session *s, PyObject *unused)
{
    int i;
    s->stop = 1;
    if (s->se != NULL)
        fuse_session_exit(s->se);
    for (i = 0; i < s->nthreads; i++)
        pthread_kill(s->threads[i], wake_signal());
    Py_RETURN_NONE;
}

/* close(): stop, join the workers, unmount (lazily) and free the session */
static PyObject *Session_close(Session *s, PyObject *unused)
{
    session_release(s);
    Py_RETURN_NONE;
}

static PyObject *Session_invalidate_inode(Session *s, PyObject *args)
{
    unsigned long long ino;
    int attr_only = 1, rc;
    if (!PyArg_ParseTuple(args, "K|p", &ino, &attr_only))
        return NULL;
    if (s->se == NULL)
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    rc = fuse_lowlevel_notify_inval_inode(s->se, (fuse_ino_t)ino, attr_only ? -1 : 0, 0);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Session_invalidate_entry(Session *s, PyObject *args)
{
    unsigned long long parent;
    const char *name;
    Py_ssize_t len;
    int rc;
    if (!PyArg_ParseTuple(args, "Ky#", &parent, &name, &len))
        return NULL;
    if (s->se == NULL)
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    rc = fuse_lowlevel_notify_inval_entry(s->se, (fuse_ino_t)parent, name, (size_t)len);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Session_get_fd(Session *s, void *closure) { return PyLong_FromLong(s->fd); }

static PyObject *Session_get_busy(Session *s, void *closure)
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&s->busy, __ATOMIC_RELAXED));
}

static PyObject *Session_get_requests(Session *s, void *closure)
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&s->requests, __ATOMIC_RELAXED));
}

static PyMethodDef Session_methods[] = {
    {"start", (PyCFunction)Session_start, METH_O, "start(threads): serve requests from that many threads"},
    {"wait", (PyCFunction)Session_wait, METH_O, "wait(timeout) -> True once all workers ended"},
    {"exit", (PyCFunction)Session_exit, METH_NOARGS, "ask the workers to stop"},
    {"close", (PyCFunction)Session_close, METH_NOARGS, "stop, unmount (lazily) and free the session"},
    {"invalidate_inode", (PyCFunction)Session_invalidate_inode, METH_VARARGS,
     "invalidate_inode(ino, attr_only=True): drop the kernel's cached attributes (and data)"},
    {"invalidate_entry", (PyCFunction)Session_invalidate_entry, METH_VARARGS,
     "invalidate_entry(parent, name): drop the kernel's cached dentry"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Session_getset[] = {
    {"fd", (getter)Session_get_fd, NULL, "the /dev/fuse descriptor", NULL},
    {"requests", (getter)Session_get_requests, NULL, "how many requests were read so far", NULL},
    {"busy", (getter)Session_get_busy, NULL, "how many requests are being served right now", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "layerfs._fuse.Session",
    .tp_basicsize = sizeof(Session),
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Session(ops, mountpoint, options, negative_timeout=0.0, writeback=False, cache_symlinks=True, "
              "max_background=0, attr_timeout=1.0): a mounted libfuse low-level session",
    .tp_methods = Session_methods,
    .tp_getset = Session_getset,
    .tp_new = Session_new,
};

static struct PyModuleDef fusemodule = {
    PyModuleDef_HEAD_INIT, "layerfs._fuse", "libfuse 3 low-level sessions served by native threads", -1, NULL,
};

PyMODINIT_FUNC PyInit__fuse(void)
{
    PyObject *m;
    if (PyType_Ready(&SessionType) < 0)
        return NULL;
    m = PyModule_Create(&fusemodule);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SessionType);
    if (PyModule_AddObject(m, "Session", (PyObject *)&SessionType) < 0) {
        Py_DECREF(&SessionType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "KEEP_CACHE", BIT_KEEP_CACHE);
    PyModule_AddIntConstant(m, "DIRECT_IO", BIT_DIRECT_IO);
    PyModule_AddIntConstant(m, "CACHE_DIR", BIT_CACHE_DIR);
    PyModule_AddIntConstant(m, "NOFLUSH", BIT_NOFLUSH);
    PyModule_AddIntConstant(m, "NONSEEKABLE", BIT_NONSEEKABLE);
    PyModule_AddIntConstant(m, "NO_CAPABILITY", BIT_NO_CAPABILITY);
    PyModule_AddIntConstant(m, "DIRECT_ATTR", BIT_DIRECT_ATTR);
    PyModule_AddIntConstant(m, "SET_ATTR_MODE", FUSE_SET_ATTR_MODE);
    PyModule_AddIntConstant(m, "SET_ATTR_UID", FUSE_SET_ATTR_UID);
    PyModule_AddIntConstant(m, "SET_ATTR_GID", FUSE_SET_ATTR_GID);
    PyModule_AddIntConstant(m, "SET_ATTR_SIZE", FUSE_SET_ATTR_SIZE);
    PyModule_AddIntConstant(m, "SET_ATTR_ATIME", FUSE_SET_ATTR_ATIME);
    PyModule_AddIntConstant(m, "SET_ATTR_MTIME", FUSE_SET_ATTR_MTIME);
    PyModule_AddIntConstant(m, "SET_ATTR_CTIME", FUSE_SET_ATTR_CTIME);
    PyModule_AddIntConstant(m, "ROOT_INO", FUSE_ROOT_ID);
    return m;
}
