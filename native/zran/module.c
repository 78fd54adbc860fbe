/* layerfs._zran: the Python module (see zran.h) */
#include "zran.h"

PyObject *ZranError;
PyObject *ZranTruncated;

void
set_err(err_t *e, int kind, const char *fmt, const char *detail)
{
    if (e->kind != E_NONE)
        return;
    e->kind = kind;
    PyOS_snprintf(e->msg, sizeof(e->msg), fmt, detail ? detail : "");
}

void
raise_err(const err_t *e)
{
    switch (e->kind) {
    case E_NOMEM:
        PyErr_NoMemory();
        break;
    case E_OS:
        errno = e->os_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        break;
    case E_TRUNC:
        PyErr_SetString(ZranTruncated, e->msg);
        break;
    case E_ARG:
        PyErr_SetString(PyExc_ValueError, e->msg);
        break;
    default:
        PyErr_SetString(ZranError, e->msg);
        break;
    }
}

static PyObject *
zran_empty_bytearray(PyObject *mod, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, n);
}

static PyMethodDef zran_methods[] = {
    {"read_at", (PyCFunction)(void (*)(void))zran_read_at, METH_VARARGS | METH_KEYWORDS,
     "read_at(fd, coff, bits, window, skip, length) -> bytes\n\n"
     "Inflate from a checkpoint (window None: gzip member start at coff),\n"
     "discard `skip` bytes and return the next `length` bytes."},
    {"read_stored", (PyCFunction)(void (*)(void))zran_read_stored, METH_VARARGS | METH_KEYWORDS,
     "read_stored(fd, coff, skip, length, lens) -> bytes\n\n"
     "Bytes [skip, skip+length) of the output of consecutive stored blocks, the\n"
     "first one's data at blob offset coff; lens: their lengths (uint16 buffer).\n"
     "Read straight from the blob; each block's LEN/NLEN is checked."},
    {"empty_bytearray", (PyCFunction)zran_empty_bytearray, METH_O,
     "empty_bytearray(n): a bytearray of n uninitialised bytes."},
    {NULL}
};

static struct PyModuleDef zran_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "layerfs._zran",
    .m_doc = "Streaming gzip inflation with zran-style checkpoints (see layerfs.gzindex).",
    .m_size = -1,
    .m_methods = zran_methods,
};

static int
add_type(PyObject *m, PyTypeObject *t, const char *name)
{
    if (PyType_Ready(t) < 0)
        return -1;
    Py_INCREF(t);
    if (PyModule_AddObject(m, name, (PyObject *)t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__zran(void)
{
    PyObject *m = PyModule_Create(&zran_module);
    if (!m)
        return NULL;
    if (add_type(m, &InflaterType, "Inflater") < 0 || add_type(m, &DecoderType, "Decoder") < 0)
        goto fail;
    ZranError = PyErr_NewException("layerfs._zran.Error", PyExc_ValueError, NULL);
    if (!ZranError || PyModule_AddObjectRef(m, "Error", ZranError) < 0)
        goto fail;
    ZranTruncated = PyErr_NewException("layerfs._zran.Truncated", ZranError, NULL);
    if (!ZranTruncated || PyModule_AddObjectRef(m, "Truncated", ZranTruncated) < 0)
        goto fail;
    if (PyModule_AddIntConstant(m, "WINSIZE", WINSIZE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_CWIN", MAX_CWIN) < 0 ||
        PyModule_AddIntConstant(m, "READ_CHUNK", READ_CHUNK) < 0 ||
        PyModule_AddStringConstant(m, "ZLIB_VERSION", zlibVersion()) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}

