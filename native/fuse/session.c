/* layerfs._fuse: the mount, its worker threads, stop and exit (see fuseloop.h) */
#include "fuseloop.h"

const char *const op_names[N_OPS] = {
    "lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink",
    "rmdir", "symlink", "rename", "link", "open", "read", "write", "flush", "release",
    "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "setxattr",
    "getxattr", "listxattr", "removexattr", "create", "fallocate", "error",
};

/* ---- the connection --------------------------------------------------------------------- */

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

/* ---- the worker threads -------------------------------------------------------------------- */

/* The signal that interrupts a worker's blocking read of /dev/fuse when the session stops. */
static int wake_signal(void) { return SIGRTMIN + 3; }

static void on_wake(int sig) { (void)sig; }

/* the CLOCK_REALTIME time *seconds* from now (for pthread_cond_timedwait) */
static void deadline_in(double seconds, struct timespec *ts)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += (time_t)seconds;
    ts->tv_nsec += (long)((seconds - (double)(time_t)seconds) * 1e9);
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec += 1;
        ts->tv_nsec -= 1000000000L;
    }
}

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
        deadline_in(0.03, &deadline);
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

void Session_dealloc(Session *s)
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

PyObject *Session_new(PyTypeObject *type, PyObject *args, PyObject *kw)
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
    struct fuse_lowlevel_ops ll_ops;     /* copied by fuse_session_new */
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
    memset(&ll_ops, 0, sizeof(ll_ops));
    ll_ops.init = ll_init;
    set_inode_ops(&ll_ops);
    set_file_ops(&ll_ops);
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

PyObject *Session_start(Session *s, PyObject *arg)
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
PyObject *Session_wait(Session *s, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    struct timespec deadline;
    int done;
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (s->ops[OP_RELEASE] != NULL)
        drain_releases(s);           /* the mount went quiet: close what was released */
    deadline_in(timeout, &deadline);
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
PyObject *Session_exit(Session *s, PyObject *unused)
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
PyObject *Session_close(Session *s, PyObject *unused)
{
    session_release(s);
    Py_RETURN_NONE;
}

PyObject *Session_invalidate_inode(Session *s, PyObject *args)
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

PyObject *Session_invalidate_entry(Session *s, PyObject *args)
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
