/* layerfs._fuse: Python results to FUSE replies, exceptions to errnos (see fuseloop.h) */
#include "fuseloop.h"

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

long long ts_to_ns(const struct timespec *ts)
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

int parse_entry(PyObject *t, struct fuse_entry_param *e)
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
int parse_open(PyObject *r, struct fuse_file_info *fi, unsigned long *bits_out, Py_ssize_t fd_index)
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
int take_error(Session *s, int op)
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
void fail(fuse_req_t req, Session *s, int op, PyGILState_STATE g)
{
    int err = take_error(s, op);
    PyGILState_Release(g);
    fuse_reply_err(req, err);
}

/* ---- replies ------------------------------------------------------------------------------- */

void reply_entry(fuse_req_t req, Session *s, int op, PyGILState_STATE g, PyObject *r)
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
void reply_ok(fuse_req_t req, Session *s, int op, PyGILState_STATE g, PyObject *r)
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
void reply_attr_result(fuse_req_t req, Session *s, int op, PyGILState_STATE g, PyObject *r)
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

PyObject *fh_or_none(struct fuse_file_info *fi)
{
    if (fi == NULL)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(user_fh(fi->fh));
}
