/* layerfs._zran: random access with ISA-L igzip from a checkpoint (see zran.h) */
#include "zran.h"

int
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
int
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

void
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
int
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
