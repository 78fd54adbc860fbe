/* layerfs._zran: read_at, Decoder and read_stored (see zran.h) */
#include "zran.h"

PyObject *
zran_read_at(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "coff", "bits", "window", "skip", "length", NULL};
    int fd, bits;
    long long coff, skip;
    Py_ssize_t length;
    PyObject *window;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iLiOLn", kwlist, &fd, &coff,
                                     &bits, &window, &skip, &length))
        return NULL;
    if (skip < 0 || length < 0) {
        PyErr_SetString(PyExc_ValueError, "negative skip or length");
        return NULL;
    }
    dstate_t d;
    if (ds_init(&d, fd, coff, bits, window) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, length);
    if (!out) {
        ds_free(&d);
        return NULL;
    }
    err_t e = {0};
    if (length > 0) {
        Py_BEGIN_ALLOW_THREADS
        if (ds_output(&d, NULL, (size_t)skip, &e) == 0)
            ds_output(&d, (unsigned char *)PyBytes_AS_STRING(out), (size_t)length, &e);
        ds_free(&d);
        Py_END_ALLOW_THREADS
    }
    else {
        ds_free(&d);
    }
    if (e.kind != E_NONE) {
        Py_DECREF(out);
        raise_err(&e);
        return NULL;
    }
    return out;
}

/* Decoder: a resumable read_at. */

typedef struct {
    PyObject_HEAD
    dstate_t d;
    int inited;
    int busy;
    int failed;
    err_t err;
} Decoder;

static int
Decoder_init(Decoder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "coff", "bits", "window", NULL};
    int fd, bits;
    long long coff;
    PyObject *window;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iLiO", kwlist, &fd, &coff, &bits, &window))
        return -1;
    if (self->inited) {
        PyErr_SetString(PyExc_RuntimeError, "Decoder already initialised");
        return -1;
    }
    if (ds_init(&self->d, fd, coff, bits, window) < 0)
        return -1;
    self->inited = 1;
    return 0;
}

static void
Decoder_dealloc(Decoder *self)
{
    if (self->inited)
        ds_free(&self->d);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
decoder_enter(Decoder *self)
{
    if (!self->inited) {
        PyErr_SetString(PyExc_RuntimeError, "Decoder not initialised");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Decoder used from two threads at once");
        return -1;
    }
    if (self->failed) {
        raise_err(&self->err);
        return -1;
    }
    return 0;
}

static PyObject *
decoder_leave(Decoder *self, err_t *e)
{
    self->busy = 0;
    if (e->kind != E_NONE) {
        self->failed = 1;
        self->err = *e;
        raise_err(e);
        return NULL;
    }
    return (PyObject *)1;
}

static PyObject *
Decoder_readinto(Decoder *self, PyObject *arg)
{
    Py_buffer buf;
    if (decoder_enter(self) < 0)
        return NULL;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    err_t e = {0};
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    ds_output(&self->d, buf.buf, (size_t)buf.len, &e);
    Py_END_ALLOW_THREADS
    Py_ssize_t n = buf.len;
    PyBuffer_Release(&buf);
    if (!decoder_leave(self, &e))
        return NULL;
    return PyLong_FromSsize_t(n);
}

static PyObject *
Decoder_skip(Decoder *self, PyObject *arg)
{
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative skip");
        return NULL;
    }
    if (decoder_enter(self) < 0)
        return NULL;
    err_t e = {0};
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    ds_output(&self->d, NULL, (size_t)n, &e);
    Py_END_ALLOW_THREADS
    if (!decoder_leave(self, &e))
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Decoder_read(Decoder *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative length");
        return NULL;
    }
    if (decoder_enter(self) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (!out)
        return NULL;
    err_t e = {0};
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    ds_output(&self->d, (unsigned char *)PyBytes_AS_STRING(out), (size_t)n, &e);
    Py_END_ALLOW_THREADS
    if (!decoder_leave(self, &e)) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *
Decoder_get_position(Decoder *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->d.produced);
}

static PyMethodDef Decoder_methods[] = {
    {"readinto", (PyCFunction)Decoder_readinto, METH_O,
     "readinto(buffer) -> n: fill the whole writable buffer with the next output bytes."},
    {"read", (PyCFunction)Decoder_read, METH_O,
     "read(n) -> bytes: exactly the next n output bytes."},
    {"skip", (PyCFunction)Decoder_skip, METH_O, "skip(n): discard the next n output bytes."},
    {NULL}
};

static PyGetSetDef Decoder_getset[] = {
    {"position", (getter)Decoder_get_position, NULL,
     "output bytes produced since the checkpoint", NULL},
    {NULL}
};

PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "layerfs._zran.Decoder",
    .tp_basicsize = sizeof(Decoder),
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Decoder(fd, coff, bits, window): resumable inflation from a checkpoint",
    .tp_methods = Decoder_methods,
    .tp_getset = Decoder_getset,
    .tp_init = (initproc)Decoder_init,
    .tp_new = PyType_GenericNew,
};

/* read_stored: bytes of a run of consecutive stored blocks, read straight
 * from the blob into the result (one copy, no inflation).  The blocks are
 * back to back: block k+1's 5 header bytes (BFINAL/BTYPE byte, LEN, NLEN)
 * follow block k's data.  Every LEN/NLEN is checked against `lens`, so an
 * index that does not fit the blob makes the read raise. */

static int
stored_header_ok(const unsigned char *h, unsigned len)
{
    unsigned l = h[0] | (unsigned)h[1] << 8, n = h[2] | (unsigned)h[3] << 8;
    return l == len && n == (~len & 0xFFFF);
}

PyObject *
zran_read_stored(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "coff", "skip", "length", "lens", NULL};
    int fd;
    long long coff, skip;
    Py_ssize_t length;
    Py_buffer lb;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iLLny*", kwlist, &fd, &coff, &skip, &length, &lb))
        return NULL;
    size_t nblk = (size_t)lb.len / sizeof(uint16_t);
    const uint16_t *lens = lb.buf;
    if (fd < 0 || coff < 4 || skip < 0 || length < 0 || nblk == 0 || lb.len % sizeof(uint16_t) ||
        nblk > 1U << 20) {
        PyBuffer_Release(&lb);
        PyErr_SetString(PyExc_ValueError, "read_stored: argument out of range");
        return NULL;
    }
    /* the blocks must hold skip + length bytes */
    uint64_t have = 0;
    for (size_t k = 0; k < nblk; k++)
        have += lens[k];
    if (have < (uint64_t)skip + (uint64_t)length || (uint64_t)skip >= lens[0] + (uint64_t)(length == 0)) {
        PyBuffer_Release(&lb);
        PyErr_SetString(PyExc_ValueError, "read_stored: the blocks do not hold the range");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, length);
    unsigned char *hdr = PyMem_Malloc(5 * nblk + 4);
    struct iovec *iov = PyMem_Malloc(sizeof(struct iovec) * 2 * nblk);
    if (!out || !hdr || !iov) {
        Py_XDECREF(out);
        PyMem_Free(hdr);
        PyMem_Free(iov);
        PyBuffer_Release(&lb);
        return PyErr_NoMemory();
    }
    err_t e = {0};
    if (length > 0) {
        Py_BEGIN_ALLOW_THREADS
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
        size_t need = (size_t)length, niov = 0, used = 0;
        size_t got;
        /* block 0's LEN/NLEN, then its data from skip, then header + data of the next ones */
        if (pread_some(fd, hdr, 4, (uint64_t)coff - 4, &got, &e) == 0 && got != 4)
            set_err(&e, E_TRUNC, "blob ends inside a stored block header%s", NULL);
        for (size_t k = 0; e.kind == E_NONE && need > 0 && k < nblk; k++) {
            if (k > 0) {
                iov[niov].iov_base = hdr + 4 + 5 * k;
                iov[niov++].iov_len = 5;
            }
            size_t take = (size_t)lens[k] - (k == 0 ? (size_t)skip : 0);
            if (take > need)
                take = need;
            iov[niov].iov_base = dst;
            iov[niov++].iov_len = take;
            dst += take;
            need -= take;
            used = k + 1;
        }
        /* one preadv for the whole range (again from where a short read stopped) */
        uint64_t pos = (uint64_t)coff + (uint64_t)skip;
        struct iovec *v = iov;
        size_t nv = niov;
        while (e.kind == E_NONE && nv > 0) {
            ssize_t n = preadv(fd, v, nv > 1024 ? 1024 : (int)nv, (off_t)pos);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                e.kind = E_OS;
                e.os_errno = errno;
                break;
            }
            if (n == 0) {
                set_err(&e, E_TRUNC, "blob ends inside a stored block%s", NULL);
                break;
            }
            pos += (uint64_t)n;
            while (nv > 0 && (size_t)n >= v->iov_len) {
                n -= (ssize_t)v->iov_len;
                v++;
                nv--;
            }
            if (nv > 0) {
                v->iov_base = (unsigned char *)v->iov_base + n;
                v->iov_len -= (size_t)n;
            }
        }
        for (size_t k = 0; e.kind == E_NONE && k < used; k++) {
            const unsigned char *h = k == 0 ? hdr : hdr + 4 + 5 * k + 1;
            if ((k > 0 && (hdr[4 + 5 * k] & 6) != 0) || !stored_header_ok(h, lens[k]))
                set_err(&e, E_DATA, "the index's stored blocks do not fit the blob%s", NULL);
        }
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(hdr);
    PyMem_Free(iov);
    PyBuffer_Release(&lb);
    if (e.kind != E_NONE) {
        Py_DECREF(out);
        raise_err(&e);
        return NULL;
    }
    return out;
}
