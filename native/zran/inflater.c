/* layerfs._zran: the streaming indexer (zlib), Inflater (see zran.h) */
#include "zran.h"

static const char *
zmsg(z_stream *s, int ret)
{
    if (s->msg)
        return s->msg;
    switch (ret) {
    case Z_NEED_DICT: return "unexpected preset dictionary";
    case Z_DATA_ERROR: return "invalid compressed data";
    case Z_MEM_ERROR: return "out of memory";
    case Z_STREAM_ERROR: return "inconsistent stream state";
    case Z_BUF_ERROR: return "no progress possible";
    default: return "zlib error";
    }
}

/* Inflater: the streaming indexer. */

typedef struct {
    uint64_t uoff;         /* offset in the uncompressed stream */
    uint64_t coff;         /* offset in the compressed blob */
    int bits;              /* bits of byte coff-1 still to be used (0-7) */
    unsigned char *win;    /* zlib-compressed window, NULL: member start */
    uint32_t winlen;
} point_t;

enum { ST_START, ST_MEMBER, ST_BETWEEN, ST_PADDING, ST_ERROR };

/* A stored (uncompressed) deflate block: its len bytes of output are the
 * blob's bytes at coff (after the block's LEN/NLEN at coff-4). */
typedef struct {
    uint64_t uoff;
    uint64_t coff;
    uint32_t len;
} stored_t;

typedef struct {
    PyObject_HEAD
    z_stream strm;
    int strm_ok;
    int state;
    int busy;
    int window_level;
    uint64_t span;
    uint64_t cin;          /* compressed bytes consumed */
    uint64_t cout;         /* uncompressed bytes produced */
    uint64_t member_out;   /* produced in the current member */
    uint64_t members;      /* completed members */
    int have_point;
    uint64_t last_point;   /* uoff of the last checkpoint */
    int blk_valid;         /* blk_*: where the current deflate block started */
    uint64_t blk_bitpos;   /* its first bit in the blob */
    uint64_t blk_cout;     /* its first output byte */
    stored_t *sto;         /* stored blocks seen so far */
    size_t nsto, capsto;
    point_t *pts;
    size_t npts, cap;
    err_t err;             /* sticky error (state ST_ERROR) */
    unsigned char winbuf[WINSIZE];
} Inflater;

static int
add_point(Inflater *self, int with_window, err_t *e)
{
    if (self->npts == self->cap) {
        size_t ncap = self->cap ? self->cap * 2 : 16;
        point_t *n = PyMem_RawRealloc(self->pts, ncap * sizeof(point_t));
        if (!n) {
            set_err(e, E_NOMEM, "out of memory%s", NULL);
            return -1;
        }
        self->pts = n;
        self->cap = ncap;
    }
    point_t *p = &self->pts[self->npts];
    p->uoff = self->cout;
    p->coff = self->cin;
    p->bits = 0;
    p->win = NULL;
    p->winlen = 0;
    if (with_window) {
        uInt have = 0;
        if (inflateGetDictionary(&self->strm, self->winbuf, &have) != Z_OK ||
            have == 0 || have > WINSIZE) {
            set_err(e, E_DATA, "could not read the inflate window%s", NULL);
            return -1;
        }
        uLongf clen = compressBound(have);
        unsigned char *c = PyMem_RawMalloc(clen);
        if (!c) {
            set_err(e, E_NOMEM, "out of memory%s", NULL);
            return -1;
        }
        if (compress2(c, &clen, self->winbuf, have, self->window_level) != Z_OK ||
            clen > MAX_CWIN) {
            PyMem_RawFree(c);
            set_err(e, E_DATA, "could not compress the window%s", NULL);
            return -1;
        }
        p->bits = self->strm.data_type & 7;
        p->win = c;
        p->winlen = (uint32_t)clen;
    }
    self->npts++;
    self->have_point = 1;
    self->last_point = self->cout;
    return 0;
}

static int
Inflater_init(Inflater *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"span", "window_level", "check", NULL};
    unsigned long long span;
    int level = 6, check = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "K|ip", kwlist, &span, &level, &check))
        return -1;
    if (span == 0 || span > (1ULL << 40)) {
        PyErr_SetString(PyExc_ValueError, "span must be between 1 and 2**40");
        return -1;
    }
    if (level < 0 || level > 9) {
        PyErr_SetString(PyExc_ValueError, "window_level must be 0-9");
        return -1;
    }
    if (self->strm_ok) {
        PyErr_SetString(PyExc_RuntimeError, "Inflater already initialised");
        return -1;
    }
    memset(&self->strm, 0, sizeof(self->strm));
    int ret = inflateInit2(&self->strm, 15 + 16);  /* gzip only */
    if (ret != Z_OK) {
        if (ret == Z_MEM_ERROR)
            PyErr_NoMemory();
        else
            PyErr_SetString(ZranError, "inflateInit2 failed");
        return -1;
    }
    /* check=False: no CRC-32 and ISIZE of each member (about a fifth of zlib's time), for callers
       that verify stronger digests of the same bytes (the blob's sha256, the layer's diff_id) */
    if (!check && inflateValidate(&self->strm, 0) != Z_OK) {
        inflateEnd(&self->strm);
        PyErr_SetString(ZranError, "inflateValidate failed");
        return -1;
    }
    self->strm_ok = 1;
    self->span = span;
    self->window_level = level;
    self->state = ST_START;
    return 0;
}

static void
Inflater_dealloc(Inflater *self)
{
    if (self->strm_ok)
        inflateEnd(&self->strm);
    for (size_t i = 0; i < self->npts; i++)
        PyMem_RawFree(self->pts[i].win);
    PyMem_RawFree(self->pts);
    PyMem_RawFree(self->sto);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* without GIL: a deflate block ended at bit `endbit` of the blob (the next
 * block starts there, or the member's trailer at the next byte).  It was a
 * stored block if its bytes are exactly: 3 header bits, padding to a byte,
 * LEN and NLEN, then its output; record where that output lies in the blob.
 * (The readers check LEN/NLEN again before they trust it.) */
static int
block_ended(Inflater *self, uint64_t endbit, err_t *e)
{
    if (!self->blk_valid)
        return 0;
    self->blk_valid = 0;
    uint64_t len = self->cout - self->blk_cout;
    uint64_t data = (self->blk_bitpos + 3 + 7) / 8 + 4;
    if (len == 0 || len > 65535 || endbit != (data + len) * 8)
        return 0;
    if (self->nsto && self->sto[self->nsto - 1].uoff + self->sto[self->nsto - 1].len > self->blk_cout)
        return 0;
    if (self->nsto == self->capsto) {
        size_t ncap = self->capsto ? self->capsto * 2 : 64;
        stored_t *n = PyMem_RawRealloc(self->sto, ncap * sizeof(stored_t));
        if (!n) {
            set_err(e, E_NOMEM, "out of memory%s", NULL);
            return -1;
        }
        self->sto = n;
        self->capsto = ncap;
    }
    stored_t *b = &self->sto[self->nsto++];
    b->uoff = self->blk_cout;
    b->coff = data;
    b->len = (uint32_t)len;
    return 0;
}

/* The core loop, run without the GIL.  Consumes input until it is all used
 * or `max_out` bytes were produced.  Returns the number of input bytes
 * consumed; on error fills `e`. */
static size_t
inflater_run(Inflater *self, const unsigned char *in, size_t inlen,
             obuf_t *ob, size_t max_out, err_t *e)
{
    z_stream *s = &self->strm;
    size_t pos = 0;

    for (;;) {
        if (self->state == ST_MEMBER) {
            if (ob->total >= max_out)
                break;
            size_t avail;
            unsigned char *out = obuf_space(ob, max_out - ob->total, &avail);
            if (!out) {
                set_err(e, E_NOMEM, "out of memory%s", NULL);
                break;
            }
            size_t in_avail = inlen - pos;
            s->next_in = (Bytef *)(in + pos);
            s->avail_in = in_avail > UINT_MAX ? UINT_MAX : (uInt)in_avail;
            s->next_out = out;
            s->avail_out = avail > UINT_MAX ? UINT_MAX : (uInt)avail;
            uInt in0 = s->avail_in, out0 = s->avail_out;
            int ret = inflate(s, Z_BLOCK);
            size_t used = in0 - s->avail_in, made = out0 - s->avail_out;
            pos += used;
            self->cin += used;
            self->cout += made;
            self->member_out += made;
            obuf_commit(ob, made);
            if (ret == Z_STREAM_END) {
                /* the last block ended at the byte before the 8-byte trailer */
                if (block_ended(self, (self->cin - 8) * 8, e) < 0)
                    break;
                self->members++;
                self->state = ST_BETWEEN;
                continue;
            }
            if (ret == Z_BUF_ERROR) {
                /* no progress: needs more input (or more output room) */
                if (pos == inlen)
                    break;
                if (s->avail_out == 0)
                    continue;
                set_err(e, E_DATA, "inflate made no progress%s", NULL);
                break;
            }
            if (ret != Z_OK) {
                set_err(e, E_DATA, "invalid gzip data: %s", zmsg(s, ret));
                break;
            }
            if (s->data_type & 128) {
                /* at a block boundary (or after the member header): a block
                 * ended here, and the next one starts */
                uint64_t bitpos = self->cin * 8 - (uint64_t)(s->data_type & 7);
                if (!self->blk_valid || bitpos != self->blk_bitpos) {
                    if (block_ended(self, bitpos, e) < 0)
                        break;
                    self->blk_valid = 1;
                    self->blk_bitpos = bitpos;
                    self->blk_cout = self->cout;
                }
            }
            /* At a deflate block boundary that is not the end of the last
             * block: a possible checkpoint. */
            if ((s->data_type & 128) && !(s->data_type & 64) &&
                self->member_out > 0 &&
                self->cout - self->last_point >= self->span) {
                if (add_point(self, 1, e) < 0)
                    break;
            }
            if (pos == inlen && s->avail_out > 0 && used == 0 && made == 0)
                break;
            continue;
        }
        if (pos == inlen)
            break;
        if (self->state == ST_START ||
            (self->state == ST_BETWEEN && in[pos] == 0x1f)) {
            if (self->state != ST_START) {
                int ret = inflateReset(s);
                if (ret != Z_OK) {
                    set_err(e, E_DATA, "inflateReset failed: %s", zmsg(s, ret));
                    break;
                }
            }
            self->member_out = 0;
            self->blk_valid = 0;
            if (!self->have_point || self->cout - self->last_point >= self->span) {
                if (add_point(self, 0, e) < 0)
                    break;
            }
            self->state = ST_MEMBER;
            continue;
        }
        if (self->state == ST_BETWEEN) {
            if (in[pos] != 0) {
                set_err(e, E_DATA, "trailing garbage after gzip member%s", NULL);
                break;
            }
            self->state = ST_PADDING;
        }
        /* ST_PADDING: only zero bytes may follow the last member */
        while (pos < inlen && in[pos] == 0) {
            pos++;
            self->cin++;
        }
        if (pos < inlen) {
            set_err(e, E_DATA, "trailing garbage after gzip padding%s", NULL);
            break;
        }
    }
    return pos;
}

static PyObject *
Inflater_feed(Inflater *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "max_out", NULL};
    Py_buffer buf;
    Py_ssize_t max_out = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|n", kwlist, &buf, &max_out))
        return NULL;
    if (!self->strm_ok) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_RuntimeError, "Inflater not initialised");
        return NULL;
    }
    if (self->busy) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_RuntimeError, "Inflater used from two threads at once");
        return NULL;
    }
    if (self->state == ST_ERROR) {
        PyBuffer_Release(&buf);
        raise_err(&self->err);
        return NULL;
    }
    size_t limit = max_out < 0 ? (size_t)PY_SSIZE_T_MAX : (size_t)max_out;
    size_t guess = (size_t)buf.len * 4 + 65536;
    if (guess > limit)
        guess = limit;
    obuf_t ob;
    if (obuf_init(&ob, guess) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    err_t e = {0};
    size_t consumed;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    consumed = inflater_run(self, buf.buf, (size_t)buf.len, &ob, limit, &e);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    PyBuffer_Release(&buf);
    if (e.kind != E_NONE) {
        /* sticky: how much input was consumed is lost with the output */
        obuf_discard(&ob);
        self->err = e;
        self->state = ST_ERROR;
        raise_err(&e);
        return NULL;
    }
    PyObject *out = obuf_finish(&ob);
    if (!out)
        return NULL;
    return Py_BuildValue("(Nn)", out, (Py_ssize_t)consumed);
}

static PyObject *
Inflater_finish(Inflater *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Inflater used from two threads at once");
        return NULL;
    }
    switch (self->state) {
    case ST_ERROR:
        raise_err(&self->err);
        return NULL;
    case ST_START:
        PyErr_SetString(ZranTruncated, "empty blob: no gzip data");
        return NULL;
    case ST_MEMBER:
        PyErr_Format(ZranTruncated,
                     "gzip stream truncated after %llu compressed bytes "
                     "(%llu bytes decompressed)",
                     (unsigned long long)self->cin, (unsigned long long)self->cout);
        return NULL;
    default:
        Py_RETURN_NONE;
    }
}

static PyObject *
Inflater_points(Inflater *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Inflater used from two threads at once");
        return NULL;
    }
    PyObject *list = PyList_New((Py_ssize_t)self->npts);
    if (!list)
        return NULL;
    for (size_t i = 0; i < self->npts; i++) {
        point_t *p = &self->pts[i];
        PyObject *t;
        if (p->win)
            t = Py_BuildValue("(KKiy#)", (unsigned long long)p->uoff,
                              (unsigned long long)p->coff, p->bits,
                              (const char *)p->win, (Py_ssize_t)p->winlen);
        else
            t = Py_BuildValue("(KKiO)", (unsigned long long)p->uoff,
                              (unsigned long long)p->coff, p->bits, Py_None);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

static PyObject *
Inflater_stored(Inflater *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Inflater used from two threads at once");
        return NULL;
    }
    PyObject *list = PyList_New((Py_ssize_t)self->nsto);
    if (!list)
        return NULL;
    for (size_t i = 0; i < self->nsto; i++) {
        stored_t *b = &self->sto[i];
        PyObject *t = Py_BuildValue("(KKI)", (unsigned long long)b->uoff, (unsigned long long)b->coff,
                                    (unsigned int)b->len);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

static PyObject *
Inflater_get_total_in(Inflater *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->cin);
}

static PyObject *
Inflater_get_total_out(Inflater *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->cout);
}

static PyObject *
Inflater_get_members(Inflater *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->members);
}

static PyObject *
Inflater_get_npoints(Inflater *self, void *c)
{
    return PyLong_FromSize_t(self->npts);
}

static PyObject *
Inflater_get_at_end(Inflater *self, void *c)
{
    return PyBool_FromLong(self->state == ST_BETWEEN || self->state == ST_PADDING);
}

static PyMethodDef Inflater_methods[] = {
    {"feed", (PyCFunction)(void (*)(void))Inflater_feed, METH_VARARGS | METH_KEYWORDS,
     "feed(data, max_out=-1) -> (bytes, consumed)\n\n"
     "Inflate `data` (a chunk of the gzip blob), recording checkpoints.\n"
     "Stops early once max_out bytes were produced (if max_out >= 0);\n"
     "`consumed` says how much of `data` was used."},
    {"finish", (PyCFunction)Inflater_finish, METH_NOARGS,
     "Raise unless the stream ended cleanly after a complete member."},
    {"stored", (PyCFunction)Inflater_stored, METH_NOARGS,
     "List of (uoff, coff, len): stored blocks, whose output is the blob's bytes at coff."},
    {"points", (PyCFunction)Inflater_points, METH_NOARGS,
     "List of (uoff, coff, bits, compressed_window_or_None)."},
    {NULL}
};

static PyGetSetDef Inflater_getset[] = {
    {"total_in", (getter)Inflater_get_total_in, NULL, "compressed bytes consumed", NULL},
    {"total_out", (getter)Inflater_get_total_out, NULL, "bytes produced", NULL},
    {"members", (getter)Inflater_get_members, NULL, "complete gzip members", NULL},
    {"npoints", (getter)Inflater_get_npoints, NULL, "number of checkpoints", NULL},
    {"at_end", (getter)Inflater_get_at_end, NULL, "between members / in padding", NULL},
    {NULL}
};

PyTypeObject InflaterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "layerfs._zran.Inflater",
    .tp_basicsize = sizeof(Inflater),
    .tp_dealloc = (destructor)Inflater_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Inflater(span, window_level=6, check=True): streaming gzip inflater that records checkpoints",
    .tp_methods = Inflater_methods,
    .tp_getset = Inflater_getset,
    .tp_init = (initproc)Inflater_init,
    .tp_new = PyType_GenericNew,
};
