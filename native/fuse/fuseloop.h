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
 *
 * The sources (one extension, compiled together by setup.py):
 *   session.c    the mount and its session: the worker threads that read /dev/fuse, stop and exit
 *                (the wake signal), connection settings (init), unmount and free; the Session methods
 *   inode_ops.c  request handlers on names and inodes: lookup, forget, attributes (served from a
 *                direct fd when there is one), links, directories' entries, statfs, xattrs
 *   file_ops.c   request handlers on open handles: open/create, read, write (direct fd), flush,
 *                release, fsync, fallocate, opendir/readdir/releasedir
 *   reply.c      Python results -> FUSE replies (attr/entry/open tuples), exceptions -> errnos
 *   handles.c    the handle tables: inodes with a direct fd, deferred releases, the
 *                security.capability cache
 *   module.c     the Python module: the Session type object, its methods and attributes, constants
 * This header declares what crosses those files; everything else stays static in its file.
 */
#ifndef LAYERFS_FUSELOOP_H
#define LAYERFS_FUSELOOP_H

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

/* the names shared between the files are internal to the extension: only PyInit__fuse is exported */
#pragma GCC visibility push(hidden)

enum {
    OP_LOOKUP, OP_FORGET, OP_GETATTR, OP_SETATTR, OP_READLINK, OP_MKNOD, OP_MKDIR, OP_UNLINK,
    OP_RMDIR, OP_SYMLINK, OP_RENAME, OP_LINK, OP_OPEN, OP_READ, OP_WRITE, OP_FLUSH, OP_RELEASE,
    OP_FSYNC, OP_OPENDIR, OP_READDIR, OP_RELEASEDIR, OP_FSYNCDIR, OP_STATFS, OP_SETXATTR,
    OP_GETXATTR, OP_LISTXATTR, OP_REMOVEXATTR, OP_CREATE, OP_FALLOCATE, OP_ERROR, N_OPS
};

/* the ops object's method name of each op (session.c) */
extern const char *const op_names[N_OPS];

/* open_bits of the protocol (also the module's constants) */
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

/* the handler's fh of a kernel fh */
static inline unsigned long long user_fh(uint64_t fh)
{
    return (fh & FH_DIRECT) ? (unsigned long long)(fh & 0xffffffffULL) : (unsigned long long)fh;
}

static inline int direct_fd(uint64_t fh)
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
    /* releases not yet handed to Python (see handles.c), under lock */
    unsigned long long *released;
    size_t n_released, cap_released;
    /* inodes known to have no security.capability (the kernel asks before every write) */
    unsigned char *nocap;
    size_t nocap_len;
    unsigned long long requests; /* requests read so far (for callers that want to work when idle) */
    unsigned long long busy;     /* requests being served right now */
} Session;

static inline Session *sess(fuse_req_t req) { return (Session *)fuse_req_userdata(req); }

/* Handler prologue: answer ENOSYS when the ops object has no such handler, else take the GIL (as g)
 * and run the deferred releases first; declares s, g and r. */
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

/* ---- reply.c: conversions, errors, replies (called with the GIL; fail and reply_* release it) ---- */
long long ts_to_ns(const struct timespec *ts);
int parse_entry(PyObject *t, struct fuse_entry_param *e);
int parse_open(PyObject *r, struct fuse_file_info *fi, unsigned long *bits_out, Py_ssize_t fd_index);
int take_error(Session *s, int op);
void fail(fuse_req_t req, Session *s, int op, PyGILState_STATE g);
void reply_entry(fuse_req_t req, Session *s, int op, PyGILState_STATE g, PyObject *r);
void reply_ok(fuse_req_t req, Session *s, int op, PyGILState_STATE g, PyObject *r);
void reply_attr_result(fuse_req_t req, Session *s, int op, PyGILState_STATE g, PyObject *r);
PyObject *fh_or_none(struct fuse_file_info *fi);

/* ---- handles.c: inodes with a direct fd, deferred releases, the security.capability cache ---- */
/* a releasing thread hands the pending releases to Python itself once this many are queued */
#define RELEASE_BATCH 256
#define CAP_XATTR "security.capability"
int attr_fd_get(Session *s, uint64_t ino);
void attr_fd_put(Session *s, uint64_t ino, int fd);
void attr_fd_drop(Session *s, uint64_t ino, int fd);
void drain_releases(Session *s);
size_t defer_release(Session *s, unsigned long long fh);
void release_now(Session *s, fuse_ino_t ino, struct fuse_file_info *fi);
int nocap_get(Session *s, fuse_ino_t ino);
void nocap_set(Session *s, fuse_ino_t ino, int on);

/* ---- inode_ops.c, file_ops.c: each fills its handlers into the low-level op table ---- */
void set_inode_ops(struct fuse_lowlevel_ops *op);
void set_file_ops(struct fuse_lowlevel_ops *op);

/* ---- session.c: the Session type's functions (module.c builds the type from them) ---- */
void Session_dealloc(Session *s);
PyObject *Session_new(PyTypeObject *type, PyObject *args, PyObject *kw);
PyObject *Session_start(Session *s, PyObject *arg);
PyObject *Session_wait(Session *s, PyObject *arg);
PyObject *Session_exit(Session *s, PyObject *unused);
PyObject *Session_close(Session *s, PyObject *unused);
PyObject *Session_invalidate_inode(Session *s, PyObject *args);
PyObject *Session_invalidate_entry(Session *s, PyObject *args);

#pragma GCC visibility pop

#endif /* LAYERFS_FUSELOOP_H */
