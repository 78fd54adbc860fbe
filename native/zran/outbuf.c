/* layerfs._zran: the output buffer (see zran.h) */
#include "zran.h"

/* with GIL */
int
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
unsigned char *
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
void
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
PyObject *
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

void
obuf_discard(obuf_t *ob)
{
    obuf_free_blocks(ob);
    Py_CLEAR(ob->first);
}
