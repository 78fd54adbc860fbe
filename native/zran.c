/*
 * layerfs._zran -- streaming gzip inflation with random-access checkpoints.
 *
 * The technique is the one of zlib's examples/zran.c (Mark Adler): while a
 * gzip stream is inflated, remember at deflate block boundaries the
 * compressed position (byte + bit) and the last 32 KiB of output (the
 * window).  Later, inflation can restart from any such point: prime the
 * leftover bits, set the window as dictionary and inflate raw deflate data.
 *
 * Differences from zran.c:
 *   - the index is built in the same pass that consumes the data as it
 *     arrives (Inflater.feed returns the decompressed bytes of each chunk);
 *   - multi-member gzip streams: a checkpoint at the start of a member needs
 *     no window, it simply restarts gzip header parsing there;
 *   - windows are stored zlib-compressed;
 *   - the GIL is released while inflating, and everything that comes from
 *     outside (data, index, file) is bounds-checked: bad input raises;
 *   - the indexer inflates with zlib (inflate(Z_BLOCK) reports the block
 *     boundaries), random reads (read_at, Decoder) with ISA-L's igzip,
 *     2-3x faster; the checkpoints are the same deflate positions for both.
 *
 * Python API (wrapped by layerfs/gzindex.py, which is the supported API):
 *
 *   Inflater(span: int, window_level: int = 6)
 *     .feed(data, max_out=-1) -> (bytes out, int consumed)
 *     .finish() -> None                (raises Truncated/Error)
 *     .points() -> list[(uoff, coff, bits, window_or_None)]
 *     .stored() -> list[(uoff, coff, len)]   stored blocks: output = blob bytes
 *     .total_in, .total_out, .members, .finished
 *
 *   read_at(fd, coff, bits, window, skip, length) -> bytes
 *     window None: coff is the first byte of a gzip member header (bits 0).
 *     window bytes: zlib-compressed 32 KiB (or shorter) dictionary; raw
 *     deflate resumes at byte coff with `bits` bits of byte coff-1 pending.
 *     Inflates (discarding `skip` bytes first) and returns exactly `length`
 *     bytes, or raises Truncated if the stream ends before that.  Crosses
 *     member boundaries (trailer skipped, next header parsed, its CRC
 *     checked when the member is read to its end).
 *
 *   Decoder(fd, coff, bits, window)     the same, resumable:
 *     .readinto(buffer) -> n  (fills the whole buffer)
 *     .read(n) -> bytes, .skip(n), .position
 *
 *   read_stored(fd, coff, skip, length, lens) -> bytes
 *     the output of consecutive stored blocks (Inflater.stored() lists
 *     them), read from the blob without inflating; LEN/NLEN checked.
 *
 *   empty_bytearray(n)                  uninitialised bytearray (no memset)
 *   WINSIZE, MAX_CWIN, READ_CHUNK       window size, largest compressed window,
 *                                       bytes per pread of read_at / Decoder
 *
 * Input is read with pread(): no file position is shared, so any number of
 * threads may read the same fd at once.  Objects guard against concurrent
 * use of one instance (RuntimeError) instead of corrupting their state.
 *
 *   Error (ValueError subclass), Truncated (Error subclass)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <zlib.h>
#include <isa-l/igzip_lib.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>

#define WINSIZE 32768U          /* deflate window */
#define MAX_CWIN 65536U         /* compressed window never exceeds this */
#define READ_CHUNK (128 * 1024) /* pread size for read_at */
#define SKIP_CHUNK (64 * 1024)  /* scratch buffer for discarded output */

static PyObject *ZranError;     /* _zran.Error(ValueError) */
static PyObject *ZranTruncated; /* _zran.Truncated(Error) */

/* Errors found while the GIL is released are recorded here and raised
 * after re-acquiring it. */
enum { E_NONE = 0, E_DATA, E_TRUNC, E_NOMEM, E_OS, E_ARG };

typedef struct {
    int kind;
    int os_errno;
    char msg[200];
} err_t;

static void
set_err(err_t *e, int kind, const char *fmt, const char *detail)
{
    if (e->kind != E_NONE)
        return;
    e->kind = kind;
    PyOS_snprintf(e->msg, sizeof(e->msg), fmt, detail ? detail : "");
}

static void
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

/* ------------------------------------------------------------------------ */
/* Output buffer: a bytes object allocated up front (with the GIL) that we
 * fill without the GIL; if it fills up, further output goes to raw-malloc'ed
 * overflow blocks that are copied in at the end. */

typedef struct oblock {
    struct oblock *next;
    size_t used, cap;
    unsigned char data[];
} oblock_t;

typedef struct {
    PyObject *first;        /* bytes object, refcount 1, owned */
    size_t first_cap, first_used;
    oblock_t *head, *tail;  /* overflow */
    size_t total;
} obuf_t;

/* with GIL */
static int
obuf_init(obuf_t *ob, size_t cap)
{
    memset(ob, 0, sizeof(*ob));
    if (cap > PY_SSIZE_T_MAX)
        cap = PY_SSIZE_T_MAX;
    ob->first = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap);
    if (!ob->first)
        return -1;
    ob->first_cap = cap;
    return 0;
}

/* without GIL: return a writable region of at least 1 byte, at most want */
static unsigned char *
obuf_space(obuf_t *ob, size_t want, size_t *avail)
{
    if (ob->first_used < ob->first_cap) {
        size_t a = ob->first_cap - ob->first_used;
        *avail = a < want ? a : want;
        return (unsigned char *)PyBytes_AS_STRING(ob->first) + ob->first_used;
    }
    if (!ob->tail || ob->tail->used == ob->tail->cap) {
        size_t cap = ob->total < (1U << 20) ? (1U << 20) : ob->total;
        if (cap > (256U << 20))
            cap = 256U << 20;
        oblock_t *b = PyMem_RawMalloc(sizeof(oblock_t) + cap);
        if (!b)
            return NULL;
        b->next = NULL;
        b->used = 0;
        b->cap = cap;
        if (ob->tail)
            ob->tail->next = b;
        else
            ob->head = b;
        ob->tail = b;
    }
    size_t a = ob->tail->cap - ob->tail->used;
    *avail = a < want ? a : want;
    return ob->tail->data + ob->tail->used;
}

/* without GIL: n bytes of the region returned by obuf_space were written */
static void
obuf_commit(obuf_t *ob, size_t n)
{
    if (ob->first_used < ob->first_cap)
        ob->first_used += n;
    else
        ob->tail->used += n;
    ob->total += n;
}

static void
obuf_free_blocks(obuf_t *ob)
{
    oblock_t *b = ob->head;
    while (b) {
        oblock_t *n = b->next;
        PyMem_RawFree(b);
        b = n;
    }
    ob->head = ob->tail = NULL;
}

/* with GIL: returns a new reference to the final bytes, frees everything */
static PyObject *
obuf_finish(obuf_t *ob)
{
    PyObject *res;
    if (!ob->head) {
        res = ob->first;
        ob->first = NULL;
        if (ob->first_used != ob->first_cap &&
            _PyBytes_Resize(&res, (Py_ssize_t)ob->first_used) < 0)
            return NULL;
        return res;
    }
    if (ob->total > PY_SSIZE_T_MAX) {
        obuf_free_blocks(ob);
        Py_CLEAR(ob->first);
        return PyErr_NoMemory();
    }
    res = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)ob->total);
    if (res) {
        char *p = PyBytes_AS_STRING(res);
        memcpy(p, PyBytes_AS_STRING(ob->first), ob->first_used);
        p += ob->first_used;
        for (oblock_t *b = ob->head; b; b = b->next) {
            memcpy(p, b->data, b->used);
            p += b->used;
        }
    }
    obuf_free_blocks(ob);
    Py_CLEAR(ob->first);
    return res;
}

static void
obuf_discard(obuf_t *ob)
{
    obuf_free_blocks(ob);
    Py_CLEAR(ob->first);
}

/* ------------------------------------------------------------------------ */
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

static PyTypeObject InflaterType = {
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

/* ------------------------------------------------------------------------ */
/* Random access: a decoder that starts at a checkpoint. */

static int
pread_some(int fd, unsigned char *buf, size_t len, uint64_t off, size_t *got, err_t *e)
{
    for (;;) {
        ssize_t n = pread(fd, buf, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            e->kind = E_OS;
            e->os_errno = errno;
            return -1;
        }
        *got = (size_t)n;
        return 0;
    }
}

enum { RM_MEMBER, RM_TRAILER, RM_BETWEEN };

/* Reading inflates with ISA-L's igzip (2-3x zlib's speed; a stored block is
 * a memcpy).  A checkpoint written by the zlib indexer is a plain deflate
 * bit position plus window, so it primes igzip the same way: the pending
 * bits of byte coff-1 go to the bit buffer (read_in, LSB first like zlib's
 * hold), the window becomes the dictionary. */
typedef struct {
    struct inflate_state *st;
    int started;
    int fd;
    uint64_t coff;         /* checkpoint */
    int bits;
    unsigned char *cwin;   /* compressed window (owned copy), NULL: member start */
    size_t cwinlen;
    uint64_t pos;          /* next blob offset to read */
    int eof;
    int mode;
    int raw;
    unsigned trailer_left;
    unsigned char *inbuf;
    unsigned char *scratch;
    uint64_t produced;     /* output bytes so far (including skipped ones) */
} dstate_t;

/* without GIL */
static int
ds_start(dstate_t *d, err_t *e)
{
    unsigned char *win = NULL;
    uLongf winlen = 0;
    int ret = -1;

    d->started = 1;
    d->pos = d->coff;
    d->mode = RM_MEMBER;
    d->raw = d->cwin != NULL;
    d->inbuf = PyMem_RawMalloc(READ_CHUNK);
    d->st = PyMem_RawMalloc(sizeof(struct inflate_state));
    if (!d->inbuf || !d->st) {
        set_err(e, E_NOMEM, "out of memory%s", NULL);
        goto done;
    }
    if (d->raw) {
        win = PyMem_RawMalloc(WINSIZE);
        if (!win) {
            set_err(e, E_NOMEM, "out of memory%s", NULL);
            goto done;
        }
        winlen = WINSIZE;
        if (uncompress(win, &winlen, d->cwin, (uLong)d->cwinlen) != Z_OK || winlen == 0) {
            set_err(e, E_DATA, "bad checkpoint window in index%s", NULL);
            goto done;
        }
    }
    isal_inflate_init(d->st);
    d->st->crc_flag = d->raw ? ISAL_DEFLATE : ISAL_GZIP;
    if (d->bits) {
        unsigned char ch;
        size_t got;
        if (pread_some(d->fd, &ch, 1, d->coff - 1, &got, e) < 0)
            goto done;
        if (got != 1) {
            set_err(e, E_TRUNC, "blob ends before the checkpoint%s", NULL);
            goto done;
        }
        d->st->read_in = (uint64_t)(ch >> (8 - d->bits));
        d->st->read_in_length = d->bits;
    }
    if (d->raw && isal_inflate_set_dict(d->st, win, (uint32_t)winlen) != ISAL_DECOMP_OK) {
        set_err(e, E_DATA, "could not set the inflate dictionary%s", NULL);
        goto done;
    }
    d->st->next_in = d->inbuf;
    d->st->avail_in = 0;
    ret = 0;
done:
    PyMem_RawFree(win);
    return ret;
}

/* without GIL: the deflate stream of a member ended; whole bytes igzip had
 * pulled into its bit buffer belong to what follows (trailer, next member):
 * hand them back to the input. */
static int
ds_unread(dstate_t *d, err_t *e)
{
    struct inflate_state *st = d->st;
    size_t back = (size_t)(st->read_in_length > 0 ? st->read_in_length / 8 : 0);
    st->read_in = 0;
    st->read_in_length = 0;
    if (back == 0)
        return 0;
    if ((size_t)(st->next_in - d->inbuf) >= back) {
        st->next_in -= back;
        st->avail_in += (uint32_t)back;
        return 0;
    }
    /* they came from an earlier buffer: read again from there */
    uint64_t at = d->pos - st->avail_in - back;
    d->pos = at;
    d->eof = 0;
    st->next_in = d->inbuf;
    st->avail_in = 0;
    return 0;
}

/* without GIL: write the next `len` output bytes to dst (dst NULL: discard
 * them).  Returns 0, or -1 with `e` set (E_TRUNC if the stream ends). */
static int
ds_output(dstate_t *d, unsigned char *dst, size_t len, err_t *e)
{
    size_t done_n = 0;

    if (!d->started && ds_start(d, e) < 0)
        return -1;
    struct inflate_state *st = d->st;
    if (!dst && len && !d->scratch) {
        d->scratch = PyMem_RawMalloc(SKIP_CHUNK);
        if (!d->scratch) {
            set_err(e, E_NOMEM, "out of memory%s", NULL);
            return -1;
        }
    }
    while (done_n < len) {
        if (st->avail_in == 0 && !d->eof) {
            size_t got;
            if (pread_some(d->fd, d->inbuf, READ_CHUNK, d->pos, &got, e) < 0)
                return -1;
            if (got == 0)
                d->eof = 1;
            d->pos += got;
            st->next_in = d->inbuf;
            st->avail_in = (uint32_t)got;
        }
        if (d->mode == RM_TRAILER) {
            if (st->avail_in == 0) {
                set_err(e, E_TRUNC, "gzip stream truncated in a member trailer%s", NULL);
                return -1;
            }
            unsigned n = st->avail_in < d->trailer_left ? st->avail_in : d->trailer_left;
            st->next_in += n;
            st->avail_in -= n;
            d->trailer_left -= n;
            if (d->trailer_left == 0)
                d->mode = RM_BETWEEN;
            continue;
        }
        if (d->mode == RM_BETWEEN) {
            if (st->avail_in == 0) {
                set_err(e, E_TRUNC, "gzip stream ends before the data the index promises%s", NULL);
                return -1;
            }
            if (st->next_in[0] != 0x1f) {
                set_err(e, E_DATA, "gzip stream ends before the data the index promises%s", NULL);
                return -1;
            }
            uint8_t *nin = st->next_in;
            uint32_t ain = st->avail_in;
            isal_inflate_reset(st);
            st->crc_flag = ISAL_GZIP;
            st->next_in = nin;
            st->avail_in = ain;
            d->raw = 0;
            d->mode = RM_MEMBER;
            continue;
        }
        /* RM_MEMBER (with no input left igzip may still hold output) */
        size_t want = len - done_n;
        if (dst) {
            st->next_out = dst + done_n;
            st->avail_out = want > UINT32_MAX ? UINT32_MAX : (uint32_t)want;
        }
        else {
            st->next_out = d->scratch;
            st->avail_out = want > SKIP_CHUNK ? SKIP_CHUNK : (uint32_t)want;
        }
        uint32_t out0 = st->avail_out, in0 = st->avail_in;
        int ret = isal_inflate(st);
        size_t made = out0 - st->avail_out;
        done_n += made;
        d->produced += made;
        if (ret < 0) {
            set_err(e, E_DATA, "invalid gzip data: %s",
                    ret == ISAL_INCORRECT_CHECKSUM ? "incorrect data check" :
                    ret == ISAL_INVALID_WRAPPER ? "bad gzip header" :
                    ret == ISAL_INVALID_LOOKBACK ? "invalid distance too far back" :
                    ret == ISAL_INVALID_SYMBOL ? "invalid code" :
                    ret == ISAL_INVALID_BLOCK ? "invalid block" : "igzip error");
            return -1;
        }
        if (st->block_state == ISAL_BLOCK_FINISH) {
            if (ds_unread(d, e) < 0)
                return -1;
            if (d->raw) {
                d->mode = RM_TRAILER;
                d->trailer_left = 8;
            }
            else {
                d->mode = RM_BETWEEN;
            }
            continue;
        }
        if (made == 0 && st->avail_in == in0) {
            if (st->avail_in == 0 && !d->eof)
                continue;  /* read more */
            if (st->avail_in == 0) {
                set_err(e, E_TRUNC, "gzip stream truncated%s", NULL);
                return -1;
            }
            set_err(e, E_DATA, "inflate made no progress%s", NULL);
            return -1;
        }
    }
    return 0;
}

static void
ds_free(dstate_t *d)
{
    PyMem_RawFree(d->st);
    PyMem_RawFree(d->inbuf);
    PyMem_RawFree(d->scratch);
    PyMem_RawFree(d->cwin);
    d->st = NULL;
    d->inbuf = d->scratch = d->cwin = NULL;
}

/* with GIL: validate the checkpoint arguments and fill d (copies the window) */
static int
ds_init(dstate_t *d, int fd, long long coff, int bits, PyObject *window)
{
    memset(d, 0, sizeof(*d));
    if (fd < 0 || coff < 0 || bits < 0 || bits > 7) {
        PyErr_SetString(PyExc_ValueError, "checkpoint argument out of range");
        return -1;
    }
    if (bits && coff < 1) {
        PyErr_SetString(ZranError, "bad checkpoint: bit offset at byte 0");
        return -1;
    }
    if (window != Py_None) {
        Py_buffer wb;
        if (PyObject_GetBuffer(window, &wb, PyBUF_SIMPLE) < 0)
            return -1;
        if (wb.len == 0 || (size_t)wb.len > MAX_CWIN) {
            PyBuffer_Release(&wb);
            PyErr_SetString(ZranError, "bad checkpoint window length in index");
            return -1;
        }
        d->cwin = PyMem_RawMalloc((size_t)wb.len);
        if (!d->cwin) {
            PyBuffer_Release(&wb);
            PyErr_NoMemory();
            return -1;
        }
        memcpy(d->cwin, wb.buf, (size_t)wb.len);
        d->cwinlen = (size_t)wb.len;
        PyBuffer_Release(&wb);
    }
    else if (bits) {
        PyErr_SetString(ZranError, "bad checkpoint: bit offset without window");
        return -1;
    }
    d->fd = fd;
    d->coff = (uint64_t)coff;
    d->bits = bits;
    return 0;
}

static PyObject *
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

static PyTypeObject DecoderType = {
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

static PyObject *
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
