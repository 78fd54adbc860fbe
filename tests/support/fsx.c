/*
 * fsx: a seeded random exerciser of one file's data path, checked against an
 * in-memory model of what the file must contain.
 *
 * Each step picks one operation: read, write (also past EOF, leaving a hole),
 * truncate up or down, mapped read, mapped write (MAP_SHARED + msync),
 * fallocate (plain, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, COLLAPSE_RANGE,
 * INSERT_RANGE; each mode is probed and dropped with a note when the file
 * system answers EOPNOTSUPP), copy_file_range within the file, fsync,
 * fdatasync, close and reopen.  After every step the size (fstat) is checked;
 * every read compares bytes with the model, and every --check-every steps (and
 * at the end) the whole file is read back and compared.  On a mismatch it
 * prints the tail of the operation log, the first differing bytes and the step
 * that last wrote there, and exits 1.  The same seed replays the same sequence.
 *
 *   fsx [-N ops] [-d seconds] [-S seed] [-l maxlen] [-o maxop] [-c check-every]
 *       [-I reference] [-M] [-F] [-C] [-q] FILE
 *
 *   -I REF  FILE already exists (e.g. a file of a lower layer) and must start
 *           equal to REF; the model starts from REF.  Without -I, FILE is
 *           created or truncated to 0.
 *   -M / -F / -C  leave out mapped I/O / fallocate / copy_file_range.
 *
 * Exit status: 0 clean, 1 a mismatch or an unexpected error, 2 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum op {
	OP_READ, OP_WRITE, OP_TRUNCATE, OP_MAPREAD, OP_MAPWRITE, OP_FALLOC,
	OP_PUNCH, OP_ZERO, OP_COLLAPSE, OP_INSERT, OP_COPY, OP_FSYNC,
	OP_FDATASYNC, OP_REOPEN, OP_COUNT
};

static const char *op_names[OP_COUNT] = {
	"read", "write", "truncate", "mapread", "mapwrite", "fallocate",
	"punch_hole", "zero_range", "collapse_range", "insert_range",
	"copy_range", "fsync", "fdatasync", "close_open",
};

/* relative frequencies of the operations */
static const int op_weight[OP_COUNT] = {
	14, 14, 6, 8, 8, 3, 3, 3, 2, 2, 5, 1, 1, 2,
};

#define LOG_SIZE	64
#define ALIGN		4096

struct logent {
	uint64_t	step;
	enum op		op;
	int64_t		off, len, arg;
	int64_t		size_before, size_after;
};

static const char *path;
static int fd = -1;
static uint64_t rng_state;
static unsigned char *model;	/* expected contents, maxlen + maxop bytes */
static uint32_t *writer;	/* step that last set each byte (0: initial) */
static unsigned char *buf, *buf2;
static int64_t size;		/* expected file size */
static int64_t maxlen = 256 * 1024, maxop = 64 * 1024;
static uint64_t step;
static struct logent logring[LOG_SIZE];
static uint64_t counts[OP_COUNT];
static int disabled[OP_COUNT];
static int quiet;
static long pagesize;

static uint64_t
rnd(void)
{
	/* xorshift64* */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 2685821657736338717ULL;
}

static int64_t
rnd_below(int64_t n)
{
	return n > 0 ? (int64_t)(rnd() % (uint64_t)n) : 0;
}

static void
print_log(void)
{
	uint64_t first = step >= LOG_SIZE ? step - LOG_SIZE + 1 : 1;

	fprintf(stderr, "fsx: last operations (step op offset length arg size-before size-after):\n");
	for (uint64_t s = first; s <= step; s++) {
		struct logent *e = &logring[s % LOG_SIZE];
		if (e->step != s)
			continue;
		fprintf(stderr, "  %8" PRIu64 " %-14s off=%-8" PRId64 " len=%-7" PRId64 " arg=%-8" PRId64
		    " size %" PRId64 " -> %" PRId64 "\n", e->step, op_names[e->op], e->off, e->len,
		    e->arg, e->size_before, e->size_after);
	}
}

static void __attribute__((noreturn, format(printf, 1, 2)))
fail(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "fsx: FAILED at step %" PRIu64 " (%s): ", step, path);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	print_log();
	exit(1);
}

static void
log_op(enum op op, int64_t off, int64_t len, int64_t arg, int64_t before)
{
	struct logent *e = &logring[step % LOG_SIZE];

	e->step = step;
	e->op = op;
	e->off = off;
	e->len = len;
	e->arg = arg;
	e->size_before = before;
	e->size_after = size;
	counts[op]++;
}

/* Compare got[0..len) with the model at off; on a difference, report and exit. */
static void
compare(const unsigned char *got, int64_t off, int64_t len, const char *what)
{
	int64_t i, bad = -1, nbad = 0;

	for (i = 0; i < len; i++) {
		if (got[i] != model[off + i]) {
			if (bad < 0)
				bad = i;
			nbad++;
		}
	}
	if (bad < 0)
		return;
	fprintf(stderr, "fsx: %s mismatch: %" PRId64 " of %" PRId64 " bytes differ in [%" PRId64 ", %" PRId64
	    "), first at offset %" PRId64 " (0x%" PRIx64 "), last written there by step %" PRIu32 "\n",
	    what, nbad, len, off, off + len, off + bad, (uint64_t)(off + bad), writer[off + bad]);
	fprintf(stderr, "fsx: offset      expected got\n");
	for (i = bad; i < len && i < bad + 16; i++)
		fprintf(stderr, "fsx: %-11" PRId64 " 0x%02x     0x%02x%s\n", off + i, model[off + i], got[i],
		    model[off + i] != got[i] ? "  <" : "");
	fail("%s returned wrong data", what);
}

static void
check_size(const char *after)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		fail("fstat after %s: %s", after, strerror(errno));
	if (st.st_size != size)
		fail("size after %s is %" PRId64 ", expected %" PRId64, after, (int64_t)st.st_size, size);
}

static void
full_check(const char *why)
{
	int64_t done = 0;

	check_size(why);
	while (done < size) {
		int64_t n = size - done > maxop ? maxop : size - done;
		ssize_t r = pread(fd, buf, n, done);
		if (r < 0)
			fail("pread in full check: %s", strerror(errno));
		if (r == 0)
			fail("full check: unexpected EOF at %" PRId64 ", expected size %" PRId64, done, size);
		compare(buf, done, r, "full-file read");
		done += r;
	}
	if (pread(fd, buf, 1, size) != 0)
		fail("full check: data past the expected EOF %" PRId64, size);
}

static void
fill_random(unsigned char *p, int64_t len)
{
	for (int64_t i = 0; i < len; i += 8) {
		uint64_t v = rnd();
		memcpy(p + i, &v, len - i >= 8 ? 8 : (size_t)(len - i));
	}
}

/* The model after writing len bytes of data at off. */
static void
model_write(int64_t off, const unsigned char *data, int64_t len)
{
	memcpy(model + off, data, len);
	for (int64_t i = 0; i < len; i++)
		writer[off + i] = (uint32_t)step;
	if (off + len > size)
		size = off + len;
}

/* The model after the size becomes n: growing reads as zeros. */
static void
model_resize(int64_t n)
{
	if (n > size) {
		memset(model + size, 0, n - size);
		for (int64_t i = size; i < n; i++)
			writer[i] = (uint32_t)step;
	}
	size = n;
}

static void
model_zero(int64_t off, int64_t len)
{
	memset(model + off, 0, len);
	for (int64_t i = 0; i < len; i++)
		writer[off + i] = (uint32_t)step;
}

static void
do_read(void)
{
	int64_t off = rnd_below(size + 1 + size / 8);
	int64_t len = 1 + rnd_below(maxop);
	int64_t want = off >= size ? 0 : (off + len > size ? size - off : len);
	ssize_t r = pread(fd, buf, len, off);

	if (r < 0)
		fail("pread(%" PRId64 ", %" PRId64 "): %s", off, len, strerror(errno));
	log_op(OP_READ, off, len, r, size);
	if (r != want)
		fail("pread(%" PRId64 ", %" PRId64 ") returned %zd bytes, expected %" PRId64, off, len, r, want);
	compare(buf, off, r, "read");
}

static void
do_write(void)
{
	int64_t before = size;
	int64_t len = 1 + rnd_below(maxop);
	int64_t off = rnd_below(maxlen - len + 1);
	ssize_t r;

	fill_random(buf, len);
	r = pwrite(fd, buf, len, off);
	if (r < 0)
		fail("pwrite(%" PRId64 ", %" PRId64 "): %s", off, len, strerror(errno));
	if (r != len)
		fail("pwrite(%" PRId64 ", %" PRId64 ") wrote %zd bytes", off, len, r);
	if (off > size)
		model_resize(off);
	model_write(off, buf, len);
	log_op(OP_WRITE, off, len, 0, before);
}

static void
do_truncate(void)
{
	int64_t before = size;
	int64_t n = rnd_below(maxlen + 1);

	if (ftruncate(fd, n) < 0)
		fail("ftruncate(%" PRId64 "): %s", n, strerror(errno));
	model_resize(n);
	log_op(OP_TRUNCATE, 0, 0, n, before);
}

static void
do_mapread(void)
{
	int64_t off, len, pg;
	unsigned char *p;

	if (size == 0) {
		log_op(OP_MAPREAD, 0, 0, 0, size);
		return;
	}
	off = rnd_below(size);
	len = 1 + rnd_below(maxop);
	if (off + len > size)
		len = size - off;
	pg = off % pagesize;
	p = mmap(NULL, len + pg, PROT_READ, MAP_SHARED, fd, off - pg);
	if (p == MAP_FAILED)
		fail("mmap(PROT_READ, %" PRId64 ", %" PRId64 "): %s", off - pg, len + pg, strerror(errno));
	log_op(OP_MAPREAD, off, len, 0, size);
	compare(p + pg, off, len, "mapped read");
	if (munmap(p, len + pg) < 0)
		fail("munmap: %s", strerror(errno));
}

static void
do_mapwrite(void)
{
	int64_t before = size;
	int64_t len = 1 + rnd_below(maxop);
	int64_t off = rnd_below(maxlen - len + 1);
	int64_t pg = off % pagesize;
	unsigned char *p;

	if (off + len > size) {
		/* a mapping cannot extend a file: grow it first, as fsx does */
		if (ftruncate(fd, off + len) < 0)
			fail("ftruncate(%" PRId64 ") before mapped write: %s", off + len, strerror(errno));
		model_resize(off + len);
	}
	fill_random(buf, len);
	p = mmap(NULL, len + pg, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off - pg);
	if (p == MAP_FAILED)
		fail("mmap(PROT_WRITE, %" PRId64 ", %" PRId64 "): %s", off - pg, len + pg, strerror(errno));
	memcpy(p + pg, buf, len);
	if (msync(p, len + pg, MS_SYNC) < 0)
		fail("msync: %s", strerror(errno));
	if (munmap(p, len + pg) < 0)
		fail("munmap: %s", strerror(errno));
	model_write(off, buf, len);
	log_op(OP_MAPWRITE, off, len, 0, before);
}

/* A fallocate mode the file system does not support is dropped once, with a note. */
static int
unsupported(enum op op, int err)
{
	if (err != EOPNOTSUPP && err != ENOSYS)
		return 0;
	if (!disabled[op] && !quiet)
		fprintf(stderr, "fsx: %s not supported here (%s); left out\n", op_names[op], strerror(err));
	disabled[op] = 1;
	return 1;
}

static void
do_fallocate(enum op op)
{
	int64_t before = size, off, len;
	int mode = 0, keep = 0;

	switch (op) {
	case OP_FALLOC:
		keep = (int)(rnd() & 1);
		len = 1 + rnd_below(maxop);
		off = rnd_below(maxlen - len + 1);
		mode = keep ? FALLOC_FL_KEEP_SIZE : 0;
		break;
	case OP_PUNCH:
		len = 1 + rnd_below(maxop);
		off = rnd_below(maxlen - len + 1);
		mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
		keep = 1;
		break;
	case OP_ZERO:
		keep = (int)(rnd() & 1);
		len = 1 + rnd_below(maxop);
		off = rnd_below(maxlen - len + 1);
		mode = FALLOC_FL_ZERO_RANGE | (keep ? FALLOC_FL_KEEP_SIZE : 0);
		break;
	case OP_COLLAPSE:
		/* block-aligned, and the range must end before EOF */
		if (size < 2 * ALIGN) {
			log_op(op, 0, 0, 0, size);
			return;
		}
		off = rnd_below(size / ALIGN - 1) * ALIGN;
		{
			int64_t blocks = (size - off - 1) / ALIGN;
			if (blocks > maxop / ALIGN)
				blocks = maxop / ALIGN;
			if (blocks < 1) {
				log_op(op, 0, 0, 0, size);
				return;
			}
			len = (1 + rnd_below(blocks)) * ALIGN;
		}
		mode = FALLOC_FL_COLLAPSE_RANGE;
		break;
	case OP_INSERT:
		/* block-aligned, starting inside the file, keeping under maxlen */
		if (size == 0 || size + ALIGN > maxlen) {
			log_op(op, 0, 0, 0, size);
			return;
		}
		off = rnd_below((size - 1) / ALIGN + 1) * ALIGN;
		if (off >= size) {
			log_op(op, 0, 0, 0, size);
			return;
		}
		len = (1 + rnd_below((maxlen - size) / ALIGN)) * ALIGN;
		if (len > maxop)
			len = (maxop / ALIGN) * ALIGN;
		if (len <= 0 || size + len > maxlen) {
			log_op(op, 0, 0, 0, size);
			return;
		}
		mode = FALLOC_FL_INSERT_RANGE;
		break;
	default:
		abort();
	}
	if (fallocate(fd, mode, off, len) < 0) {
		int err = errno;
		if (unsupported(op, err)) {
			log_op(op, off, len, -err, before);
			return;
		}
		fail("fallocate(%s, %" PRId64 ", %" PRId64 "): %s", op_names[op], off, len, strerror(err));
	}
	switch (op) {
	case OP_FALLOC:
		if (!keep && off + len > size)
			model_resize(off + len);
		break;
	case OP_PUNCH:
		if (off < size)
			model_zero(off, (off + len > size ? size : off + len) - off);
		break;
	case OP_ZERO:
		if (off < size)
			model_zero(off, (off + len > size ? size : off + len) - off);
		if (!keep && off + len > size)
			model_resize(off + len);
		break;
	case OP_COLLAPSE:
		memmove(model + off, model + off + len, size - off - len);
		memmove(writer + off, writer + off + len, (size - off - len) * sizeof(*writer));
		size -= len;
		break;
	case OP_INSERT:
		memmove(model + off + len, model + off, size - off);
		memmove(writer + off + len, writer + off, (size - off) * sizeof(*writer));
		size += len;
		model_zero(off, len);
		break;
	default:
		break;
	}
	log_op(op, off, len, mode, before);
}

static void
do_copy(void)
{
	int64_t before = size, src, dst, len, done = 0;

	if (size == 0) {
		log_op(OP_COPY, 0, 0, 0, size);
		return;
	}
	src = rnd_below(size);
	len = 1 + rnd_below(maxop);
	if (src + len > size)
		len = size - src;
	/* a destination that does not overlap the source (the call refuses overlap) */
	for (int tries = 0;; tries++) {
		dst = rnd_below(maxlen - len + 1);
		if (dst + len <= src || dst >= src + len)
			break;
		if (tries == 16) {
			log_op(OP_COPY, src, 0, 0, size);
			return;
		}
	}
	memcpy(buf2, model + src, len);
	while (done < len) {
		loff_t in = src + done, out = dst + done;
		ssize_t r = copy_file_range(fd, &in, fd, &out, len - done, 0);
		if (r < 0) {
			if (done == 0 && (errno == EOPNOTSUPP || errno == ENOSYS || errno == EXDEV)) {
				unsupported(OP_COPY, errno == EXDEV ? EOPNOTSUPP : errno);
				log_op(OP_COPY, src, len, -errno, before);
				return;
			}
			fail("copy_file_range(%" PRId64 " -> %" PRId64 ", %" PRId64 "): %s", src + done, dst + done,
			    len - done, strerror(errno));
		}
		if (r == 0)
			fail("copy_file_range(%" PRId64 " -> %" PRId64 ", %" PRId64 ") returned 0 inside the file",
			    src + done, dst + done, len - done);
		done += r;
	}
	if (dst > size)
		model_resize(dst);
	model_write(dst, buf2, len);
	log_op(OP_COPY, src, len, dst, before);
}

static void
reopen(void)
{
	if (close(fd) < 0)
		fail("close: %s", strerror(errno));
	fd = open(path, O_RDWR);
	if (fd < 0)
		fail("reopen: %s", strerror(errno));
	log_op(OP_REOPEN, 0, 0, 0, size);
}

static enum op
pick(void)
{
	int total = 0, r;

	for (int i = 0; i < OP_COUNT; i++)
		total += disabled[i] ? 0 : op_weight[i];
	r = (int)rnd_below(total);
	for (int i = 0; i < OP_COUNT; i++) {
		if (disabled[i])
			continue;
		if (r < op_weight[i])
			return (enum op)i;
		r -= op_weight[i];
	}
	return OP_READ;
}

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
usage(void)
{
	fprintf(stderr, "usage: fsx [-N ops] [-d seconds] [-S seed] [-l maxlen] [-o maxop] [-c check-every]\n"
	    "           [-I reference] [-M] [-F] [-C] [-q] FILE\n");
	exit(2);
}

static int64_t
number(const char *s)
{
	char *end;
	long long v = strtoll(s, &end, 0);

	if (*end != '\0' || v < 0)
		usage();
	return v;
}

static void
load_reference(const char *ref)
{
	int rfd = open(ref, O_RDONLY);
	struct stat st;

	if (rfd < 0 || fstat(rfd, &st) < 0) {
		fprintf(stderr, "fsx: cannot read reference %s: %s\n", ref, strerror(errno));
		exit(2);
	}
	if (st.st_size > maxlen) {
		fprintf(stderr, "fsx: reference %s is larger than -l %" PRId64 "\n", ref, maxlen);
		exit(2);
	}
	if (read(rfd, model, st.st_size) != st.st_size) {
		fprintf(stderr, "fsx: short read of reference %s\n", ref);
		exit(2);
	}
	close(rfd);
	size = st.st_size;
}

int
main(int argc, char **argv)
{
	uint64_t nops = 0, seed = 1;
	double seconds = 0, t0, elapsed;
	int64_t check_every = 64;
	const char *ref = NULL;
	int ch;

	while ((ch = getopt(argc, argv, "N:d:S:l:o:c:I:MFCq")) != -1) {
		switch (ch) {
		case 'N': nops = (uint64_t)number(optarg); break;
		case 'd': seconds = (double)number(optarg); break;
		case 'S': seed = (uint64_t)number(optarg); break;
		case 'l': maxlen = number(optarg); break;
		case 'o': maxop = number(optarg); break;
		case 'c': check_every = number(optarg); break;
		case 'I': ref = optarg; break;
		case 'M': disabled[OP_MAPREAD] = disabled[OP_MAPWRITE] = 1; break;
		case 'F':
			disabled[OP_FALLOC] = disabled[OP_PUNCH] = disabled[OP_ZERO] = 1;
			disabled[OP_COLLAPSE] = disabled[OP_INSERT] = 1;
			break;
		case 'C': disabled[OP_COPY] = 1; break;
		case 'q': quiet = 1; break;
		default: usage();
		}
	}
	if (optind != argc - 1 || maxop <= 0 || maxlen < maxop || (nops == 0 && seconds == 0))
		usage();
	path = argv[optind];
	pagesize = sysconf(_SC_PAGESIZE);
	rng_state = seed * 0x9E3779B97F4A7C15ULL + 1;
	model = calloc(maxlen + maxop, 1);
	writer = calloc(maxlen + maxop, sizeof(*writer));
	buf = malloc(maxop + 1);
	buf2 = malloc(maxop + 1);
	if (model == NULL || writer == NULL || buf == NULL || buf2 == NULL) {
		fprintf(stderr, "fsx: out of memory\n");
		return 2;
	}
	if (ref != NULL) {
		load_reference(ref);
		fd = open(path, O_RDWR);
	} else {
		fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	}
	if (fd < 0) {
		fprintf(stderr, "fsx: cannot open %s: %s\n", path, strerror(errno));
		return 1;
	}
	full_check("open");

	t0 = now();
	for (step = 1; nops == 0 || step <= nops; step++) {
		enum op op;

		if (seconds > 0 && (step & 63) == 0 && now() - t0 >= seconds)
			break;
		op = pick();
		switch (op) {
		case OP_READ: do_read(); break;
		case OP_WRITE: do_write(); break;
		case OP_TRUNCATE: do_truncate(); break;
		case OP_MAPREAD: do_mapread(); break;
		case OP_MAPWRITE: do_mapwrite(); break;
		case OP_FALLOC: case OP_PUNCH: case OP_ZERO: case OP_COLLAPSE: case OP_INSERT:
			do_fallocate(op);
			break;
		case OP_COPY: do_copy(); break;
		case OP_FSYNC:
			if (fsync(fd) < 0)
				fail("fsync: %s", strerror(errno));
			log_op(op, 0, 0, 0, size);
			break;
		case OP_FDATASYNC:
			if (fdatasync(fd) < 0)
				fail("fdatasync: %s", strerror(errno));
			log_op(op, 0, 0, 0, size);
			break;
		case OP_REOPEN: reopen(); break;
		default: abort();
		}
		check_size(op_names[op]);
		if (check_every > 0 && step % (uint64_t)check_every == 0)
			full_check("periodic check");
	}
	step--;
	full_check("the last step");
	elapsed = now() - t0;
	if (close(fd) < 0) {
		fprintf(stderr, "fsx: close: %s\n", strerror(errno));
		return 1;
	}
	printf("fsx: %" PRIu64 " ops in %.1f s (%.0f ops/s), seed %" PRIu64 ", final size %" PRId64 ", clean\n",
	    step, elapsed, elapsed > 0 ? step / elapsed : 0.0, seed, size);
	if (!quiet) {
		printf("fsx: ops:");
		for (int i = 0; i < OP_COUNT; i++)
			printf(" %s=%" PRIu64 "%s", op_names[i], counts[i], disabled[i] ? "(off)" : "");
		printf("\n");
	}
	return 0;
}
