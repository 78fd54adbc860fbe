/* layerfs._fuse: request handlers on open handles (see fuseloop.h) */
#include "fuseloop.h"

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

/* the handlers of this file into the op table */
void set_file_ops(struct fuse_lowlevel_ops *op)
{
    op->open = ll_open;
    op->read = ll_read;
    op->write = ll_write;
    op->flush = ll_flush;
    op->release = ll_release;
    op->fsync = ll_fsync;
    op->opendir = ll_opendir;
    op->readdir = ll_readdir;
    op->readdirplus = ll_readdirplus;
    op->releasedir = ll_releasedir;
    op->fsyncdir = ll_fsyncdir;
    op->create = ll_create;
    op->fallocate = ll_fallocate;
}
