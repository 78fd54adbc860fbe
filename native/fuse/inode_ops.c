/* layerfs._fuse: request handlers on names and inodes (see fuseloop.h) */
#include "fuseloop.h"

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

/* the handlers of this file into the op table */
void set_inode_ops(struct fuse_lowlevel_ops *op)
{
    op->lookup = ll_lookup;
    op->forget = ll_forget;
    op->forget_multi = ll_forget_multi;
    op->getattr = ll_getattr;
    op->setattr = ll_setattr;
    op->readlink = ll_readlink;
    op->mknod = ll_mknod;
    op->mkdir = ll_mkdir;
    op->unlink = ll_unlink;
    op->rmdir = ll_rmdir;
    op->symlink = ll_symlink;
    op->rename = ll_rename;
    op->link = ll_link;
    op->statfs = ll_statfs;
    op->setxattr = ll_setxattr;
    op->getxattr = ll_getxattr;
    op->listxattr = ll_listxattr;
    op->removexattr = ll_removexattr;
}
