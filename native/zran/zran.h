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
 * Python API (wrapped by layerfs/index/gzindex.py, which is the supported API):
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
 *
 * The sources (one extension, compiled together by setup.py):
 *   module.c    the Python module: its functions, types and constants; the
 *               Error/Truncated exceptions and raising a recorded error
 *   outbuf.c    the output buffer Inflater.feed fills without the GIL
 *   inflater.c  the indexer: zlib inflation that records checkpoints and
 *               stored blocks (the Inflater type)
 *   igzip.c     the random-access engine: ISA-L inflation resumed from a
 *               checkpoint, across gzip members
 *   reader.c    its Python faces: read_at, the Decoder type, read_stored
 * This header declares what crosses those files; the rest stays static.
 */
#ifndef LAYERFS_ZRAN_H
#define LAYERFS_ZRAN_H

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

/* the names shared between the files are internal to the extension: only PyInit__zran is exported */
#pragma GCC visibility push(hidden)

#define WINSIZE 32768U          /* deflate window */
#define MAX_CWIN 65536U         /* compressed window never exceeds this */
#define READ_CHUNK (128 * 1024) /* pread size for read_at */
#define SKIP_CHUNK (64 * 1024)  /* scratch buffer for discarded output */

extern PyObject *ZranError;     /* _zran.Error(ValueError) */
extern PyObject *ZranTruncated; /* _zran.Truncated(Error) */

/* Errors found while the GIL is released are recorded here and raised
 * after re-acquiring it. */
enum { E_NONE = 0, E_DATA, E_TRUNC, E_NOMEM, E_OS, E_ARG };

typedef struct {
    int kind;
    int os_errno;
    char msg[200];
} err_t;

/* module.c: record an error (the first one sticks; no GIL needed) / raise it (GIL held) */
void set_err(err_t *e, int kind, const char *fmt, const char *detail);
void raise_err(const err_t *e);

/* ---- outbuf.c ---- */
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

int obuf_init(obuf_t *ob, size_t cap);
unsigned char *obuf_space(obuf_t *ob, size_t want, size_t *avail);
void obuf_commit(obuf_t *ob, size_t n);
PyObject *obuf_finish(obuf_t *ob);
void obuf_discard(obuf_t *ob);

/* ---- igzip.c ---- */
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

int pread_some(int fd, unsigned char *buf, size_t len, uint64_t off, size_t *got, err_t *e);
int ds_init(dstate_t *d, int fd, long long coff, int bits, PyObject *window);
int ds_output(dstate_t *d, unsigned char *dst, size_t len, err_t *e);
void ds_free(dstate_t *d);

/* ---- the Python faces ---- */
extern PyTypeObject InflaterType;   /* inflater.c */
extern PyTypeObject DecoderType;    /* reader.c */
PyObject *zran_read_at(PyObject *mod, PyObject *args, PyObject *kwds);
PyObject *zran_read_stored(PyObject *mod, PyObject *args, PyObject *kwds);

#pragma GCC visibility pop

#endif /* LAYERFS_ZRAN_H */
