/* layerfs._fuse: the Python module: the Session type and constants (see fuseloop.h) */
#include "fuseloop.h"

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
