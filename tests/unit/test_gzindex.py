"""layerfs.index (seek indexers, seek index, readers, span cache): streaming indexers and random-access readers for gzip,
zstd and uncompressed layer blobs."""
from __future__ import annotations

import dataclasses
import gzip
import io
import os
import random
import struct
import subprocess
import tarfile
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs import _zran

from layerfs.index import compression, indexers, readers, seek, spancache
from layerfs.errors import ContentError
from layerfs.index import (BadIndex, Checkpoint, CompressedDataError, GzipIndexer, Indexer, SeekIndex,
    TruncatedStream, ZstdIndexer, build_index, open_reader)
from prereqs import require_binary

zstandard = pytest.importorskip("zstandard")

KiB = 1024
MiB = 1024 * KiB
SPAN = 64 * KiB  # small spans: many checkpoints in small test data
HYP = settings(max_examples=60, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- test data -----------------------------------------------------------------

def make_tar(seed: int, size: int = 1 * MiB) -> bytes:
    """A tar mixing incompressible random files and compressible text."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 8)).hex() for _ in range(300)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        total = 0
        n = 0
        while total < size:
            if rng.random() < 0.4:
                data = rng.randbytes(rng.randint(0, 96 * KiB))
            else:
                data = " ".join(rng.choices(words, k=rng.randint(0, 30000))).encode()
            info = tarfile.TarInfo(f"d{n % 7}/f{n}")
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
            total += len(data)
            n += 1
    return buf.getvalue()


@pytest.fixture(scope="module")
def tar_data() -> bytes:
    return make_tar(1)


def run_tool(args: list[str], data: bytes) -> bytes:
    return subprocess.run(args, input=data, stdout=subprocess.PIPE, check=True).stdout


def multi_member(data: bytes, seed: int = 3) -> bytes:
    """Concatenated gzip members of random sizes, with empty members in between."""
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, 200 * KiB)
        out.append(gzip.compress(data[pos:pos + n], rng.choice([1, 6, 9]), mtime=0))
        if rng.random() < 0.2:
            out.append(gzip.compress(b"", mtime=0))
        pos += n
    return b"".join(out)


def gzip_with_all_header_fields(data: bytes) -> bytes:
    """FTEXT|FHCRC|FEXTRA|FNAME|FCOMMENT set (zlib checks the header CRC)."""
    flg = 0x01 | 0x02 | 0x04 | 0x08 | 0x10
    head = b"\x1f\x8b\x08" + bytes([flg]) + struct.pack("<I", 0) + b"\x00\x03"
    head += struct.pack("<H", 6) + b"AB\x02\x00xy" + b"name.tar\x00" + b"a comment\x00"
    head += struct.pack("<H", zlib.crc32(head) & 0xFFFF)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = c.compress(data) + c.flush()
    return head + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def pigz(args: list[str], data: bytes) -> bytes:
    return run_tool([require_binary("pigz"), *args, "-c"], data)


GZIP_MAKERS = {
    "python-1": lambda d: gzip.compress(d, 1, mtime=0),
    "python-6": lambda d: gzip.compress(d, 6, mtime=0),
    "python-9": lambda d: gzip.compress(d, 9, mtime=0),
    "gzip-1": lambda d: run_tool(["gzip", "-1", "-c"], d),
    "gzip-9": lambda d: run_tool(["gzip", "-9", "-c"], d),
    "pigz": lambda d: pigz(["-p", "2", "-b", "64"], d),
    "pigz-independent": lambda d: pigz(["-i", "-p", "2", "-b", "32"], d),
    "multi-member": multi_member,
    "header-fields": gzip_with_all_header_fields,
    "zero-padding": lambda d: gzip.compress(d, mtime=0) + b"\0" * 1000,
}


def feed_all(ix, blob: bytes, rng: random.Random | None = None) -> bytes:
    rng = rng or random.Random(0)
    out, pos = [], 0
    while pos < len(blob):
        n = rng.choice([1, 7, 100, 4096, 65536, 300_000])
        out.append(ix.feed(blob[pos:pos + n]))
        pos += n
    ix.finish()
    return b"".join(out)


def write(tmp_path, name: str, blob: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(blob)
    return str(p)


def check_reads(reader, data: bytes, n: int = 150, seed: int = 0) -> None:
    rng = random.Random(seed)
    assert reader.size == len(data)
    for _ in range(n):
        off = rng.randrange(len(data) + 10)
        length = rng.choice([0, 1, 100, 4096, 70_000, 300_000])
        assert reader.read(off, length) == data[off:off + length], (off, length)
    assert reader.read(0, len(data) + 5) == data


# --- gzip: streaming indexer ------------------------------------------------------

@pytest.mark.parametrize("maker", sorted(GZIP_MAKERS))
def test_gzip_index_and_read(maker, tar_data, tmp_path):
    blob = GZIP_MAKERS[maker](tar_data)
    ix = GzipIndexer(SPAN)
    assert feed_all(ix, blob) == tar_data
    idx = ix.index
    assert idx.compressed_size == len(blob)
    assert idx.uncompressed_size == len(tar_data)
    cps = idx.checkpoints
    assert cps[0] == Checkpoint(0, 0, 0, None)
    assert len(cps) >= len(tar_data) // (SPAN + 1 * MiB)
    for a, b in zip(cps, cps[1:]):
        assert b.uoffset - a.uoffset >= SPAN
    # the same index after a round trip through bytes
    assert SeekIndex.from_bytes(ix.to_bytes()) == idx
    path = write(tmp_path, "layer.gz", blob)
    for cache in (0, 256 * KiB, 32 * MiB):
        with open_reader(path, "gzip", ix.to_bytes(), cache_bytes=cache) as r:
            check_reads(r, tar_data, n=60, seed=cache)


def test_multi_member_checkpoints_at_member_starts(tar_data):
    blob = multi_member(tar_data)
    ix = GzipIndexer(SPAN)
    feed_all(ix, blob)
    assert ix.members > 10
    starts = [cp for cp in ix.checkpoints if cp.at_member_start]
    assert len(starts) > 1
    for cp in starts:
        assert blob[cp.coffset:cp.coffset + 2] == b"\x1f\x8b"
        assert cp.bits == 0


def _stored_block(data: bytes) -> bytes:
    return b"\x00" + struct.pack("<HH", len(data), len(data) ^ 0xFFFF) + data


@pytest.mark.parametrize("d", range(0, 24))
def test_member_end_near_an_input_boundary(d, tmp_path):
    """A member whose deflate data ends ``d`` bytes before a boundary of the
    reader's input (counted from a checkpoint): the bytes the inflater had
    taken past the end go back to the input, for the trailer and the next
    member (a raw-deflate resume across a member end)."""
    rng = random.Random(d)
    chunk = _zran.READ_CHUNK
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    text = b" ".join(rng.choice([b"alpha", b"beta", b"gamma", b"delta"]) for _ in range(12000))
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = c.compress(text) + c.flush(zlib.Z_FULL_FLUSH)      # byte aligned from here on
    blocks = [rng.randbytes(20 * KiB) for _ in range(3)]       # stored: checkpoints at their starts
    coff = len(head) + len(body) + 5 + len(blocks[0])
    tail = b"the end of the member, compressed against the window " * (1 + d % 5)
    out, pos = [text] + blocks, len(head) + len(body) + sum(5 + len(b) for b in blocks)

    def final_block() -> bytes:    # a Huffman-coded last block that refers back into the output
        fin = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=b"".join(out)[-32 * KiB:])
        return fin.compress(tail) + fin.flush()

    while (fill := (-d - (pos + 5 - coff) - len(final_block())) % chunk) > 65535:
        out.append(rng.randbytes(60000))
        pos += 5 + 60000
    out.append(rng.randbytes(fill))
    last = final_block()
    out.append(tail)
    data = b"".join(out)
    deflate = body + b"".join(_stored_block(b) for b in out[1:-1]) + last
    assert (len(head) + len(deflate) - coff) % chunk == (chunk - d) % chunk
    second = b"second member " * 1000
    blob = (head + deflate + struct.pack("<II", zlib.crc32(data), len(data))
            + gzip.compress(second, 6, mtime=0))
    full = data + second
    ix = GzipIndexer(16 * KiB)
    assert feed_all(ix, blob) == full
    cp = next(cp for cp in ix.checkpoints if cp.coffset == coff)
    fd = os.open(write(tmp_path, "b.gz", blob), os.O_RDONLY)
    try:
        assert _zran.read_at(fd, cp.coffset, cp.bits, cp.window, 0, len(full) - cp.uoffset) == full[cp.uoffset:]
    finally:
        os.close(fd)


def test_checkpoints_with_bit_offsets(tar_data):
    ix = GzipIndexer(16 * KiB)
    feed_all(ix, gzip.compress(tar_data, 9, mtime=0))
    cps = ix.checkpoints
    assert any(cp.bits for cp in cps), "expected some checkpoints in the middle of a byte"
    assert all(cp.window is not None and 0 < len(zlib.decompress(cp.window)) <= 32 * KiB for cp in cps[1:])


def tiny_members(data: bytes, seed: int = 5) -> bytes:
    """Many small members (level 0-9, so stored blocks too), some empty: member
    ends fall at every position of the reader's input buffers."""
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(0, 5000)
        out.append(gzip.compress(data[pos:pos + n], rng.randint(0, 9), mtime=0))
        pos += n
    return b"".join(out)


@pytest.mark.parametrize("maker", ["python-9", "gzip-1", "pigz", "multi-member", "tiny-members", "stored"])
def test_read_from_every_checkpoint_to_the_end(maker, tar_data, tmp_path):
    """Inflation resumed at any checkpoint (bit offset, window, member start)
    runs to the end of the blob across member boundaries."""
    data = tar_data[: 700 * KiB]
    make = {"tiny-members": tiny_members,
            "stored": lambda d: gzip.compress(d, 0, mtime=0) + gzip.compress(d[:1000], 0, mtime=0)}
    blob = make[maker](data) if maker in make else GZIP_MAKERS[maker](data)
    ix = GzipIndexer(24 * KiB)
    out = feed_all(ix, blob)
    fd = os.open(write(tmp_path, "b.gz", blob), os.O_RDONLY)
    try:
        for cp in ix.checkpoints:
            got = _zran.read_at(fd, cp.coffset, cp.bits, cp.window, 0, len(out) - cp.uoffset)
            assert got == out[cp.uoffset:], cp[:3]
            d = _zran.Decoder(fd, cp.coffset, cp.bits, cp.window)
            skip = min(1000, len(out) - cp.uoffset)
            d.skip(skip)
            assert d.position == skip
            assert d.read(len(out) - cp.uoffset - skip) == out[cp.uoffset + skip:]
    finally:
        os.close(fd)


def test_empty_content_and_empty_blob(tmp_path):
    blob = gzip.compress(b"", mtime=0)
    ix = GzipIndexer()
    assert ix.feed(blob) == b""
    idx = ix.finish()
    assert idx.uncompressed_size == 0
    with open_reader(write(tmp_path, "e.gz", blob), "gzip", ix.to_bytes()) as r:
        assert r.size == 0
        assert r.read(0, 100) == b""
        assert r.read(10, 100) == b""
    ix = GzipIndexer()
    assert ix.feed(b"") == b""
    with pytest.raises(TruncatedStream):
        ix.finish()


@HYP
@given(cuts=st.lists(st.integers(0, 10**9), max_size=20))
def test_chunking_does_not_matter(cuts, small_gz):
    data, blob, ref_cps = small_gz
    points = sorted({c % (len(blob) + 1) for c in cuts})
    ix = GzipIndexer(8 * KiB)
    out, prev = [], 0
    for p in points + [len(blob)]:
        out.append(ix.feed(blob[prev:p]))
        prev = p
    ix.finish()
    assert b"".join(out) == data
    assert ix.checkpoints == ref_cps


@pytest.fixture(scope="module")
def small_gz():
    data = make_tar(5, 200 * KiB)
    blob = multi_member(data, seed=9)[: 10**9]
    ix = GzipIndexer(8 * KiB)
    ix.feed(blob)
    ix.finish()
    return data, blob, ix.checkpoints


def test_feed_iter_bounds_output():
    data = b"\0" * (40 * MiB) + b"tail" * 1000
    blob = gzip.compress(data, 9, mtime=0)  # ~40 KiB: a small decompression bomb
    ix = GzipIndexer()
    sizes = []
    total = 0
    for piece in ix.feed_iter(blob, max_out=1 * MiB):
        assert len(piece) <= 1 * MiB
        sizes.append(len(piece))
        total += len(piece)
    ix.finish()
    assert total == len(data)
    assert len(sizes) >= 40


def test_feed_iter_equals_feed(tar_data):
    blob = multi_member(tar_data)
    ix = GzipIndexer(SPAN)
    out = []
    for i in range(0, len(blob), 50_000):
        out.extend(ix.feed_iter(blob[i:i + 50_000], max_out=10_000))
    ix.finish()
    assert b"".join(out) == tar_data
    ix2 = GzipIndexer(SPAN)
    ix2.feed(blob)
    ix2.finish()
    assert ix.checkpoints == ix2.checkpoints


# --- gzip: bad streams --------------------------------------------------------------

@pytest.mark.parametrize("cut", [1, 2, 9, 10, 30, 5000, -100, -9, -8, -5, -1])
def test_truncated_gzip_raises(cut, tar_data):
    blob = gzip.compress(tar_data, 6, mtime=0)
    ix = GzipIndexer(SPAN)
    with pytest.raises(TruncatedStream):
        feed_all(ix, blob[:cut])


@pytest.mark.parametrize("where", ["magic", "method", "data", "crc", "isize", "garbage", "padding-garbage"])
def test_corrupt_gzip_raises(where, tar_data):
    blob = bytearray(gzip.compress(tar_data, 6, mtime=0))
    if where == "magic":
        blob[0] ^= 0xFF
    elif where == "method":
        blob[2] = 7
    elif where == "data":
        for i in range(1000, len(blob) - 100, 997):
            blob[i] ^= 0x55
    elif where == "crc":
        blob[-6] ^= 0x01
    elif where == "isize":
        blob[-2] ^= 0x01
    elif where == "garbage":
        blob += b"not gzip"
    elif where == "padding-garbage":
        blob += b"\0\0\0x"
    ix = GzipIndexer(SPAN)
    with pytest.raises(CompressedDataError) as info:
        feed_all(ix, bytes(blob))
    assert isinstance(info.value, ContentError)
    # the error sticks
    with pytest.raises(CompressedDataError):
        ix.feed(b"\x1f\x8b")
        ix.finish()


def test_header_crc_checked(tar_data):
    blob = bytearray(gzip_with_all_header_fields(tar_data[:5000]))
    assert feed_all(GzipIndexer(SPAN), bytes(blob)) == tar_data[:5000]
    hcrc_at = blob.index(b"a comment\x00") + 10
    blob[hcrc_at] ^= 0xFF
    with pytest.raises(CompressedDataError, match="header crc"):
        feed_all(GzipIndexer(SPAN), bytes(blob))


def test_second_member_corrupt(tar_data):
    a = gzip.compress(tar_data[:1000], mtime=0)
    b = bytearray(gzip.compress(tar_data[1000:], mtime=0))
    b[-7] ^= 0xFF  # CRC of the second member
    with pytest.raises(CompressedDataError, match="incorrect data check"):
        feed_all(GzipIndexer(SPAN), a + bytes(b))


def test_reader_on_damaged_blob(tar_data, tmp_path):
    blob = gzip.compress(tar_data, 6, mtime=0)
    ix = GzipIndexer(SPAN)
    feed_all(ix, blob)
    # a shorter blob than the index says
    short = write(tmp_path, "short.gz", blob[:-1000])
    with pytest.raises(BadIndex):
        open_reader(short, "gzip", ix.to_bytes())
    # same size, data damaged after indexing: errors, never a crash
    bad = bytearray(blob)
    for i in range(200, len(bad) - 20, 1500):
        bad[i] ^= 0xA5
    path = write(tmp_path, "bad.gz", bytes(bad))
    with open_reader(path, "gzip", ix.to_bytes(), cache_bytes=0) as r:
        errors = 0
        for off in range(0, len(tar_data), 50_000):
            try:
                r.read(off, 10_000)
            except CompressedDataError:
                errors += 1
        assert errors > 0
    # reading through a fd the reader does not own
    fd = os.open(path, os.O_RDONLY)
    try:
        with open_reader(fd, "gzip", ix.to_bytes()) as r:
            with pytest.raises(CompressedDataError):
                r.read(0, len(tar_data))
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


# --- index serialisation -------------------------------------------------------------

@pytest.fixture(scope="module")
def indexed(tar_data, tmp_path_factory):
    blob = multi_member(tar_data[: 600 * KiB], seed=4) + gzip.compress(tar_data[600 * KiB:], 9, mtime=0)
    ix = GzipIndexer(SPAN)
    feed_all(ix, blob)
    path = tmp_path_factory.mktemp("ix") / "blob.gz"
    path.write_bytes(blob)
    return tar_data, str(path), ix.index


def test_index_roundtrip_and_version(indexed):
    _, _, idx = indexed
    raw = idx.to_bytes()
    assert raw[:4] == b"LFZI" and raw[4] == seek.INDEX_VERSION
    assert SeekIndex.from_bytes(raw) == idx
    assert SeekIndex.from_bytes(memoryview(raw)) == idx
    # compact: the windows dominate, ~20 bytes per checkpoint and 18 per stored block otherwise
    assert idx.stored
    assert len(raw) < 64 + sum(22 + len(cp.window or b"") for cp in idx.checkpoints) + 18 * len(idx.stored)


def test_version_1_index_still_read(indexed):
    """Version 1 (no stored blocks) still loads, and reads inflate everything."""
    tar_data, path, idx = indexed
    body = idx.to_bytes()[:-4]
    v1 = _recrc(body[:4] + b"\x01" + body[5:-(4 + 18 * len(idx.stored))])
    old = SeekIndex.from_bytes(v1)
    assert old.stored == () and old.checkpoints == idx.checkpoints
    with open_reader(path, "gzip", v1) as r:
        check_reads(r, tar_data, n=30)


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_bad_index_bytes_raise(indexed):
    _, _, idx = indexed
    raw = idx.to_bytes()
    body = raw[:-4]
    cases = {
        "empty": b"",
        "short": raw[:10],
        "magic": b"XXXX" + raw[4:],
        "version": _recrc(body[:4] + b"\x03" + body[5:]),
        "version 1 with stored blocks": _recrc(body[:4] + b"\x01" + body[5:]),
        "stored count": _recrc(body[:-(4 + 18 * len(idx.stored))] + struct.pack("<I", 10**6)
                               + body[-18 * len(idx.stored):]),
        "crc": raw[:-1] + bytes([raw[-1] ^ 1]),
        "truncated": _recrc(body[:-10]),
        "trailing": _recrc(body + b"x"),
        "compression": _recrc(body[:5] + b"\x07" + body[6:]),
        "flags": _recrc(body[:6] + b"\x01\x00" + body[8:]),
        "count": _recrc(body[:36] + struct.pack("<I", 10**9) + body[40:]),
        "span0": _recrc(body[:8] + struct.pack("<Q", 0) + body[16:]),
        "csize": _recrc(body[:16] + struct.pack("<Q", 10) + body[24:]),
    }
    for name, bad in cases.items():
        with pytest.raises(BadIndex):
            SeekIndex.from_bytes(bad)
        assert name


def test_bad_checkpoints_rejected(indexed):
    _, _, idx = indexed
    cps = list(idx.checkpoints)
    mid = next(i for i, cp in enumerate(cps) if cp.window is not None)

    def variant(i, **kw):
        c = list(cps)
        c[i] = c[i]._replace(**kw)
        return c

    bad_lists = {
        "none": [],
        "first-u": variant(0, uoffset=1),
        "first-c": variant(0, coffset=5),
        "first-window": variant(0, window=b"x"),
        "bits-8": variant(mid, bits=8),
        "bits-neg": variant(mid, bits=-1),
        "window-empty": variant(mid, window=b""),
        "window-huge": variant(mid, window=b"x" * 70_000),
        "same-u": variant(mid, uoffset=cps[mid - 1].uoffset),
        "c-outside": variant(mid, coffset=idx.compressed_size),
        "u-outside": variant(mid, uoffset=idx.uncompressed_size + 1),
        "bits-no-window": variant(mid, window=None, bits=3),
        "order": [cps[0]] + list(reversed(cps[1:])),
    }
    for name, c in bad_lists.items():
        with pytest.raises(BadIndex):
            SeekIndex("gzip", idx.span, idx.compressed_size, idx.uncompressed_size, c)
    with pytest.raises(BadIndex):
        SeekIndex("zstd", idx.span, idx.compressed_size, idx.uncompressed_size, cps)
    with pytest.raises(BadIndex):
        SeekIndex(None, idx.span, 10, 10, cps[:1])


@HYP
@given(data=st.data())
def test_hostile_but_consistent_index_never_crashes(data, indexed):
    """Indexes that pass validation but lie (wrong offsets, bits, windows):
    reads return bytes or raise ContentError, never crash or hang."""
    tar_data, path, idx = indexed
    cps = list(idx.checkpoints)
    n_changes = data.draw(st.integers(1, 4))
    for _ in range(n_changes):
        i = data.draw(st.integers(1, len(cps) - 1))
        cp = cps[i]
        what = data.draw(st.sampled_from(["coff", "bits", "window", "window-raw", "start"]))
        if what == "coff":
            lo = cps[i - 1].coffset + 1
            hi = cps[i + 1].coffset - 1 if i + 1 < len(cps) else idx.compressed_size - 1
            if lo <= hi:
                cp = cp._replace(coffset=data.draw(st.integers(lo, hi)))
        elif what == "bits" and cp.window is not None:
            cp = cp._replace(bits=data.draw(st.integers(0, 7)))
        elif what == "window":
            raw = data.draw(st.binary(min_size=1, max_size=40_000))
            cp = cp._replace(window=zlib.compress(raw))
        elif what == "window-raw":
            cp = cp._replace(window=data.draw(st.binary(min_size=1, max_size=200)))
        elif what == "start":
            cp = cp._replace(window=None, bits=0)
        cps[i] = cp
    try:
        bogus = SeekIndex("gzip", idx.span, idx.compressed_size, idx.uncompressed_size, cps)
    except BadIndex:
        return
    raw = bogus.to_bytes()
    with open_reader(path, "gzip", raw, cache_bytes=data.draw(st.sampled_from([0, 1 * MiB]))) as r:
        for _ in range(3):
            off = data.draw(st.integers(0, len(tar_data)))
            try:
                got = r.read(off, 20_000)
            except ContentError:
                continue
            assert len(got) == min(20_000, len(tar_data) - off)


@HYP
@given(coff=st.integers(-5, 3 * MiB), bits=st.integers(-2, 9), skip=st.integers(0, 100_000),
       length=st.integers(0, 100_000), window=st.one_of(st.none(), st.binary(max_size=300)))
def test_read_at_arguments_are_checked(coff, bits, skip, length, window, indexed):
    _, path, _ = indexed
    fd = os.open(path, os.O_RDONLY)
    try:
        _zran.read_at(fd, coff, bits, window, skip, length)
    except (ValueError, OSError):  # _zran.Error is a ValueError
        pass
    finally:
        os.close(fd)


def test_read_at_bad_fd_and_window():
    with pytest.raises(OSError):
        _zran.read_at(987654, 0, 0, None, 0, 10)
    too_big = zlib.compress(b"a" * 40_000)  # more than a 32 KiB window
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(_zran.Error, match="window"):
            _zran.read_at(r, 10, 0, too_big, 0, 10)
    finally:
        os.close(r)


# --- reads: properties and threads --------------------------------------------------------

@HYP
@given(offset=st.integers(0, 2 * MiB), length=st.integers(0, 400_000), cache=st.sampled_from([0, 200 * KiB, 8 * MiB]))
def test_random_reads_equal_slices(offset, length, cache, indexed):
    tar_data, path, idx = indexed
    with readers.GzipReader(path, idx, cache_bytes=cache) as r:
        assert r.read(offset, length) == tar_data[offset:offset + length]


def test_cache_serves_small_reads_in_one_span(indexed):
    tar_data, path, idx = indexed
    idx = inflating(idx)
    with readers.GzipReader(path, idx, cache_bytes=8 * MiB) as r:
        base = idx.checkpoints[3].uoffset
        for k in range(50):
            off = base + k * 1000
            assert r.read(off, 500) == tar_data[off:off + 500]
        hits, misses = r.cache_stats
        assert misses == 1 and hits == 49


def test_concurrent_reads(indexed):
    tar_data, path, idx = indexed
    errors = []
    with readers.GzipReader(path, idx, cache_bytes=1 * MiB) as r:
        def work(seed):
            try:
                rng = random.Random(seed)
                for _ in range(60):
                    off = rng.randrange(len(tar_data))
                    n = rng.choice([1, 4096, 131072])
                    assert r.read(off, n) == tar_data[off:off + n]
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def inflating(idx: SeekIndex) -> SeekIndex:
    """The index without its stored blocks: every read inflates (and goes through the span cache)."""
    return dataclasses.replace(idx, stored=())


def _runs(idx: SeekIndex) -> list[tuple[int, int]]:
    """[start, end) of the uncompressed ranges covered by back-to-back stored blocks."""
    runs = []
    prev = None
    for u, c, n in idx.stored:
        if prev and prev[0] + prev[2] == u and prev[1] + prev[2] + 5 == c:
            runs[-1] = (runs[-1][0], u + n)
        else:
            runs.append((u, u + n))
        prev = (u, c, n)
    return runs


@pytest.mark.parametrize("maker", ["python-6", "gzip-1", "pigz", "multi-member", "level-0"])
def test_stored_blocks_recorded(maker, tar_data):
    make = GZIP_MAKERS.get(maker) or (lambda d: gzip.compress(d, 0, mtime=0))
    blob = make(tar_data)
    ix = GzipIndexer(SPAN)
    feed_all(ix, blob)
    stored = ix.index.stored
    assert stored, "random file data makes stored blocks"
    for u, c, n in stored:
        assert tar_data[u:u + n] == blob[c:c + n]
        assert struct.unpack("<HH", blob[c - 4:c]) == (n, n ^ 0xFFFF)
    if maker == "level-0":
        assert sum(n for _, _, n in stored) == len(tar_data)
    # text compresses: no stored blocks at all
    text = b" ".join(b"word%d" % (i % 1000) for i in range(200_000))
    ix = GzipIndexer(SPAN)
    feed_all(ix, make(text))
    assert ix.index.stored == () or maker == "level-0"


def test_reads_in_stored_runs_are_not_inflated(indexed):
    tar_data, path, idx = indexed
    runs = [r for r in _runs(idx) if r[1] - r[0] > 3 * KiB]
    assert runs
    with readers.GzipReader(path, idx, cache_bytes=8 * MiB) as r:
        rng = random.Random(2)
        for a, b in runs:
            for _ in range(5):
                off = rng.randrange(a, b - 1)
                n = rng.randrange(1, b - off + 1)
                assert r.read(off, n) == tar_data[off:off + n]
            assert r.read(a, b - a) == tar_data[a:b]
        assert r.cache_stats == (0, 0)                  # nothing inflated, nothing cached
        a, b = runs[0]
        assert r.read(a, b - a + 10) == tar_data[a:b + 10]   # past the run: inflated
        assert r.cache_stats[1] >= 1


def test_stored_blocks_that_do_not_fit_raise(indexed):
    tar_data, path, idx = indexed
    a, b = max(_runs(idx), key=lambda r: r[1] - r[0])
    for shift in (1, -1, 5):
        bad = dataclasses.replace(idx, stored=tuple((u, c + shift, n) for u, c, n in idx.stored))
        with readers.GzipReader(path, bad) as r:
            with pytest.raises(CompressedDataError):
                r.read(a, b - a)
    fd = os.open(path, os.O_RDONLY)
    try:
        u, c, n = idx.stored[0]
        lens = __import__("array").array("H", [n])
        assert _zran.read_stored(fd, c, 0, n, lens) == tar_data[u:u + n]
        for args in [(fd, c, 0, n + 1, lens), (fd, c, n, 1, lens), (fd, 2, 0, 1, lens), (-1, c, 0, 1, lens),
                     (fd, c, 0, 1, b"")]:
            with pytest.raises(ValueError):
                _zran.read_stored(*args)
    finally:
        os.close(fd)


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_decode_ahead_inflates_the_next_spans(indexed, monkeypatch):
    tar_data, path, idx = indexed
    idx = inflating(idx)
    monkeypatch.setattr(readers, "_SEQ_TRIGGER", 100 * KiB)
    starts = [cp.uoffset for cp in idx.checkpoints] + [idx.uncompressed_size]
    assert len(starts) > 8
    with readers.GzipReader(path, idx, cache_bytes=8 * MiB, ahead=3) as r:
        pos = 0
        while pos < starts[3] + 1000:           # sequential reads into span 3
            assert r.read(pos, 16 * KiB) == tar_data[pos:pos + 16 * KiB]
            pos += 16 * KiB
        misses = r.cache_stats[1]
        for k in (4, 5, 6):                     # inflated without being read
            a, b = starts[k], starts[k + 1]
            assert _wait_for(lambda: r.read_cached(a, b - a) is not None), k
            assert r.read_cached(a, b - a) == tar_data[a:b]
        assert r.read_cached(starts[8], 10) is None     # not that far
        assert r.cache_stats[1] == misses               # decode-ahead is not counted as misses
        assert r.read(starts[4], 5000) == tar_data[starts[4]:starts[4] + 5000]
        assert r.cache_stats[1] == misses


def test_no_decode_ahead_for_scattered_reads(indexed, monkeypatch):
    tar_data, path, idx = indexed
    idx = inflating(idx)
    monkeypatch.setattr(readers, "_SEQ_TRIGGER", 100 * KiB)
    starts = [cp.uoffset for cp in idx.checkpoints]
    with readers.GzipReader(path, idx, cache_bytes=8 * MiB, ahead=3) as r:
        for k in (1, 7, 3, 9, 5):
            off = starts[k] + 10
            assert r.read(off, 60 * KiB) == tar_data[off:off + 60 * KiB]
        time.sleep(0.1)
        assert len(r._cache._items) == r.cache_stats[1] == 5


def test_decode_ahead_off(indexed, monkeypatch):
    tar_data, path, idx = indexed
    idx = inflating(idx)
    monkeypatch.setattr(readers, "_SEQ_TRIGGER", 100 * KiB)
    with readers.GzipReader(path, idx, cache_bytes=8 * MiB, ahead=0) as r:
        assert r.read(0, len(tar_data) // 2) == tar_data[:len(tar_data) // 2]
        time.sleep(0.1)
        assert len(r._cache._items) == r.cache_stats[1]
    # a cache too small for the spans ahead switches it off too
    with readers.GzipReader(path, idx, cache_bytes=4 * SPAN, ahead=3) as r:
        assert r._ahead == 0


def test_close_during_decode_ahead(indexed, monkeypatch):
    """close() waits for running decode-ahead (it uses the fd) and drops queued work."""
    tar_data, path, idx = indexed
    idx = inflating(idx)
    monkeypatch.setattr(readers, "_SEQ_TRIGGER", 1)
    for n in range(30):
        r = readers.GzipReader(path, idx, cache_bytes=8 * MiB, ahead=4)
        for pos in range(0, 3 * SPAN, 32 * KiB):
            assert r.read(pos, 32 * KiB) == tar_data[pos:pos + 32 * KiB]
        r.close()
        assert r._inflight == 0 and r._cache.nbytes == 0
        with pytest.raises(ValueError):
            r.read(0, 10)


def test_concurrent_sequential_readers_with_decode_ahead(indexed, monkeypatch):
    """Several threads each read the stream front to back in small pieces (and
    reused span buffers hold bytes of other spans before they are refilled)."""
    tar_data, path, idx = indexed
    idx = inflating(idx)
    monkeypatch.setattr(readers, "_SEQ_TRIGGER", 64 * KiB)
    errors = []
    with readers.GzipReader(path, idx, cache_bytes=6 * SPAN, ahead=3) as r:
        def work(step):
            try:
                for pos in range(0, len(tar_data), step):
                    assert r.read(pos, step) == tar_data[pos:pos + step], pos
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(s,)) for s in (4096, 10_000, 65536, 200_000)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_concurrent_indexers(tar_data):
    blobs = [gzip.compress(tar_data, lvl, mtime=0) for lvl in (1, 6, 9)] + [multi_member(tar_data)]
    results = [None] * len(blobs)

    def work(i):
        ix = GzipIndexer(SPAN)
        results[i] = (feed_all(ix, blobs[i], random.Random(i)), ix.to_bytes())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(blobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out, raw in results:
        assert out == tar_data
        SeekIndex.from_bytes(raw)


def test_feed_releases_the_gil():
    """While one thread inflates, another runs Python code."""
    data = os.urandom(6 * MiB).hex().encode()  # 12 MiB of hex text
    blob = gzip.compress(data, 1, mtime=0)
    state = {"in_feed": False, "during": 0, "stop": False}

    def spin():
        while not state["stop"]:
            if state["in_feed"]:
                state["during"] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            ix = GzipIndexer()
            state["in_feed"] = True
            out = ix.feed(blob)
            state["in_feed"] = False
            assert len(out) == len(data)
    finally:
        state["stop"] = True
        t.join()
    assert state["during"] > 1000


def test_indexer_rejects_concurrent_use(tar_data):
    blob = gzip.compress(os.urandom(2 * MiB).hex().encode(), 1, mtime=0)
    ix = GzipIndexer()
    errors = []
    ready = threading.Event()

    def other():
        ready.wait()
        for _ in range(2000):
            try:
                ix.feed(b"")
            except RuntimeError:
                errors.append(1)
                return
            except CompressedDataError:
                return

    t = threading.Thread(target=other)
    t.start()
    ready.set()
    for _ in range(5):
        try:
            ix.feed(blob)
        except (RuntimeError, CompressedDataError):
            break
    t.join()  # no crash either way; a RuntimeError if the two calls overlapped


def test_readers_close_and_errors(indexed, tmp_path):
    tar_data, path, idx = indexed
    r = open_reader(path, "gzip", idx.to_bytes())
    r.close()
    with pytest.raises(ValueError):
        r.read(0, 1)
    with open_reader(path, "gzip", idx.to_bytes()) as r:
        with pytest.raises(ValueError):
            r.read(-1, 1)
        with pytest.raises(ValueError):
            r.read(0, -1)
        assert r.read(len(tar_data), 10) == b""
    with pytest.raises(BadIndex):
        open_reader(path, "zstd", idx.to_bytes())
    with pytest.raises(BadIndex):
        open_reader(path, None, idx.to_bytes())
    with pytest.raises(ValueError):
        open_reader(path, "lz4", idx.to_bytes())
    # no index: built by reading the blob
    with open_reader(path, "gzip", None) as r:
        assert r.read(100_000, 5000) == tar_data[100_000:105_000]


# --- zstd ---------------------------------------------------------------------------

def zstd_makers(data: bytes) -> dict[str, bytes]:
    c = zstandard.ZstdCompressor(level=3, write_checksum=True)
    frames = [zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data[i:i + 100 * KiB])
              for i in range(0, len(data), 100 * KiB)]
    skippable = struct.pack("<II", 0x184D2A50, 5) + b"hello"
    streamed = io.BytesIO()
    with c.stream_writer(streamed, closefd=False) as w:  # frame without content size
        for i in range(0, len(data), 10_000):
            w.write(data[i:i + 10_000])
    out = {
        "single": c.compress(data),
        "frames": b"".join(frames),
        "frames-skippable": skippable + frames[0] + skippable + b"".join(frames[1:]),
        "streamed": streamed.getvalue(),
        "empty-frame": c.compress(b"") + c.compress(data),
    }
    return out


@pytest.mark.parametrize("kind", ["single", "frames", "frames-skippable", "streamed", "empty-frame", "cli"])
def test_zstd_index_and_read(kind, tar_data, tmp_path):
    if kind == "cli":
        blob = run_tool([require_binary("zstd"), "-q", "-3", "-c"], tar_data)
    else:
        blob = zstd_makers(tar_data)[kind]
    ix = indexers.make_indexer("zstd", SPAN)
    assert isinstance(ix, ZstdIndexer)
    assert feed_all(ix, blob) == tar_data
    idx = ix.index
    assert idx.compressed_size == len(blob)
    if kind.startswith("frames"):
        assert len(idx.checkpoints) > 3
    for cp in idx.checkpoints:
        assert cp.window is None and cp.bits == 0
    assert SeekIndex.from_bytes(ix.to_bytes()) == idx
    path = write(tmp_path, "layer.zst", blob)
    for cache in (0, 256 * KiB, 32 * MiB):
        with open_reader(path, "zstd", ix.to_bytes(), cache_bytes=cache) as r:
            check_reads(r, tar_data, n=40, seed=cache)


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 20, 5000, -4, -1])
def test_zstd_truncated(cut, tar_data):
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(tar_data)
    with pytest.raises(TruncatedStream):
        feed_all(ZstdIndexer(SPAN), blob[:cut])


def test_zstd_corrupt(tar_data, tmp_path):
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(tar_data))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(CompressedDataError):
        feed_all(ZstdIndexer(SPAN), bytes(blob))
    with pytest.raises(CompressedDataError):
        feed_all(ZstdIndexer(SPAN), b"\x28\xb5\x2f\xfdgarbage")
    good = zstandard.ZstdCompressor().compress(tar_data)
    with pytest.raises(CompressedDataError):
        feed_all(ZstdIndexer(SPAN), good + b"trailing")


@HYP
@given(offset=st.integers(0, 1100 * KiB), length=st.integers(0, 300_000))
def test_zstd_random_reads(offset, length, zstd_blob):
    data, path, raw = zstd_blob
    with open_reader(path, "zstd", raw, cache_bytes=1 * MiB) as r:
        assert r.read(offset, length) == data[offset:offset + length]


@pytest.fixture(scope="module")
def zstd_blob(tar_data, tmp_path_factory):
    blob = zstd_makers(tar_data)["frames"]
    ix = ZstdIndexer(SPAN)
    feed_all(ix, blob)
    path = tmp_path_factory.mktemp("z") / "blob.zst"
    path.write_bytes(blob)
    return tar_data, str(path), ix.to_bytes()


def test_zstd_sequential_reads_reuse_cursor(tar_data, tmp_path):
    blob = zstandard.ZstdCompressor().compress(tar_data)
    ix = ZstdIndexer(SPAN)
    feed_all(ix, blob)
    path = write(tmp_path, "s.zst", blob)
    with open_reader(path, "zstd", ix.to_bytes(), cache_bytes=0) as r:
        pos, out = 0, []
        while pos < len(tar_data):
            out.append(r.read(pos, 50_000))
            pos += len(out[-1])
        assert b"".join(out) == tar_data
        assert len(r._cursors) == 1  # one cursor walked the whole frame


def test_zstd_concurrent_reads(zstd_blob):
    data, path, raw = zstd_blob
    errors = []
    with open_reader(path, "zstd", raw, cache_bytes=512 * KiB) as r:
        def work(seed):
            try:
                rng = random.Random(seed)
                for _ in range(30):
                    off = rng.randrange(len(data))
                    assert r.read(off, 70_000) == data[off:off + 70_000]
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_zstd_reader_on_truncated_blob_with_lying_index(tar_data, tmp_path):
    blob = zstandard.ZstdCompressor().compress(tar_data)
    ix = ZstdIndexer(SPAN)
    feed_all(ix, blob)
    idx = ix.index
    short = blob[: len(blob) // 2]
    lying = SeekIndex("zstd", idx.span, len(short), idx.uncompressed_size, idx.checkpoints)
    path = write(tmp_path, "short.zst", short)
    with open_reader(path, "zstd", lying.to_bytes(), cache_bytes=0) as r:
        with pytest.raises(ContentError):
            r.read(len(tar_data) - 100, 100)


# --- uncompressed and common interface ----------------------------------------------------

def test_plain(tar_data, tmp_path):
    ix = indexers.make_indexer(None)
    assert feed_all(ix, tar_data) == tar_data
    assert ix.checkpoints == []
    path = write(tmp_path, "layer.tar", tar_data)
    with open_reader(path, None, ix.to_bytes()) as r:
        check_reads(r, tar_data, n=50)
    with open_reader(path, "none", None) as r:
        assert r.read(5, 10) == tar_data[5:15]
    with pytest.raises(BadIndex):
        open_reader(path, None, SeekIndex(None, 1, 5, 5).to_bytes())


def test_indexer_protocol_and_names():
    for comp in ("gzip", "zstd", None):
        ix = indexers.make_indexer(comp)
        assert isinstance(ix, Indexer)
        assert ix.compression == comp
        with pytest.raises(RuntimeError):
            ix.to_bytes()  # only after finish()
    assert compression.normalize_compression("GZIP") == "gzip"
    assert compression.normalize_compression("zst") == "zstd"
    assert compression.normalize_compression("identity") is None
    with pytest.raises(ValueError):
        compression.normalize_compression("bzip2")
    assert compression.detect_compression(gzip.compress(b"x")) == "gzip"
    assert compression.detect_compression(zstandard.ZstdCompressor().compress(b"x")) == "zstd"
    assert compression.detect_compression(b"ustar") is None
    with pytest.raises(ValueError):
        GzipIndexer(0)


def test_build_index_from_file(indexed):
    tar_data, path, idx = indexed
    assert indexers.build_index(path, "gzip", SPAN) == idx


def test_shared_span_cache(indexed, zstd_blob):
    tar_data, gz_path, idx = indexed
    data_z, z_path, z_raw = zstd_blob
    cache = spancache.SpanCache(1 * MiB)
    r1 = open_reader(gz_path, "gzip", idx.to_bytes(), cache=cache)
    r2 = open_reader(z_path, "zstd", z_raw, cache=cache)
    r3 = open_reader(gz_path, "gzip", idx.to_bytes(), cache=cache)
    rng = random.Random(5)
    for _ in range(100):
        r, data = rng.choice([(r1, tar_data), (r2, data_z), (r3, tar_data)])
        off = rng.randrange(len(data))
        assert r.read(off, 3000) == data[off:off + 3000]
        assert cache.nbytes <= cache.max_bytes
    r1.close()
    r3.close()
    assert all(k[0] is r2._token for k in cache._items)
    r2.close()
    assert cache.nbytes == 0


@pytest.mark.parametrize("comp", ["gzip", "zstd"])
def test_read_cached_never_decodes(comp, tar_data, tmp_path):
    """read_cached answers only from spans already decoded in the cache, else None."""
    blob = GZIP_MAKERS[sorted(GZIP_MAKERS)[0]](tar_data) if comp == "gzip" else \
        __import__("zstandard").ZstdCompressor().compress(tar_data)
    path = write(tmp_path, "layer", blob)
    raw = inflating(build_index(path, "gzip")).to_bytes() if comp == "gzip" else None
    with open_reader(path, comp, raw, cache_bytes=64 * MiB) as r:
        assert r.read_cached(1000, 5000) is None          # nothing decoded yet
        misses = r.cache_stats[1]
        assert r.read(1000, 5000) == tar_data[1000:6000]
        assert r.read_cached(1000, 5000) == tar_data[1000:6000]
        assert r.read_cached(1200, 100) == tar_data[1200:1300]
        assert r.read_cached(len(tar_data) - 10, 10) in (None, tar_data[-10:])   # decoded ahead, or not
        assert r.cache_stats[1] == misses + 1              # read_cached created no entries


# --- the span file -----------------------------------------------------------------------

def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def test_span_file_is_bounded_and_cleaned_up(indexed, zstd_blob, tmp_path):
    """Inflated spans live in an unlinked file in the given directory, which never holds much more than
    the cache's bound, shrinks to nothing when the readers close, and is closed with the cache."""
    tar_data, gz_path, idx = indexed
    data_z, z_path, z_raw = zstd_blob
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()
    bound = 6 * SPAN
    cache = spancache.SpanCache(bound, directory=spans_dir)
    gz = readers.GzipReader(gz_path, inflating(idx), cache=cache, ahead=0)
    zs = open_reader(z_path, "zstd", z_raw, cache=cache)
    rng = random.Random(11)
    biggest = 0
    for _ in range(300):
        r, data = rng.choice([(gz, tar_data), (zs, data_z)])
        off = rng.randrange(len(data))
        n = rng.choice([100, 5000, 70 * KiB])
        assert r.read(off, n) == data[off:off + n]
        assert cache.nbytes <= bound
        biggest = max(biggest, cache.file.size)
    # what the cache holds (at most one span per SPAN bytes), each span in whole blocks
    assert 0 < biggest <= bound + (bound // SPAN + 1) * spancache.SpanFile.BLOCK
    fd = cache.file.fileno
    target = _fd_target(fd)
    assert target is not None and target.startswith(str(spans_dir)) and target.endswith("(deleted)")
    assert list(spans_dir.iterdir()) == []              # never visible in the directory
    assert os.fstat(fd).st_size <= biggest
    gz.close()
    zs.close()
    assert cache.nbytes == 0
    assert cache.file.size == 0 and os.fstat(fd).st_size == 0      # all extents given back: cut to nothing
    del cache, gz, zs, r
    import gc
    gc.collect()
    assert _fd_target(fd) is None or not _fd_target(fd).startswith(str(spans_dir))


def test_span_file_keeps_no_inflated_bytes_in_memory(indexed, tmp_path):
    """A cached gzip span is an extent of the span file, not a buffer in the process."""
    tar_data, path, idx = indexed
    cache = spancache.SpanCache(8 * MiB, directory=tmp_path)
    with readers.GzipReader(path, inflating(idx), cache=cache, ahead=0) as r:
        base = idx.checkpoints[2].uoffset
        assert r.read(base, 1000) == tar_data[base:base + 1000]
        (entry,) = cache._items.values()
        assert isinstance(entry, spancache.GzipSpan)
        assert not any(isinstance(getattr(entry, s), (bytes, bytearray)) for s in entry.__slots__)
        first = entry.blocks[0] * cache.file.BLOCK
        assert os.pread(cache.file.fileno, 1000, first) == tar_data[base:base + 1000]


def test_span_file_in_a_directory_that_cannot_take_it(indexed, tmp_path):
    """A directory that is missing (or read-only) does not stop reads: the file goes elsewhere."""
    tar_data, path, idx = indexed
    cache = spancache.SpanCache(8 * MiB, directory=tmp_path / "missing")
    with readers.GzipReader(path, inflating(idx), cache=cache) as r:
        assert r.read(100_000, 300_000) == tar_data[100_000:400_000]
    assert cache.file.fileno >= 0


def test_span_file_blocks_are_reused_and_the_file_cut_back():
    f = spancache.SpanFile()
    B = f.BLOCK
    try:
        a = f.allocate(2 * B - 1)
        b = f.allocate(1)
        c = f.allocate(3 * B)
        assert (list(a), list(b), list(c)) == ([0, 1], [2], [3, 4, 5])
        f.write(c, B - 3, b"0123456789")                 # across a block boundary
        assert f.read(c, B - 3, B + 7) == b"0123456789"
        f.release(a)
        f.release(b)
        d = f.allocate(2 * B + 5)                        # the lowest free blocks, in order
        assert list(d) == [0, 1, 2] and f.size == 6 * B
        f.write(d, 0, bytes(range(256)) * (3 * B // 256))
        assert f.read(d, 2 * B - 10, 2 * B + 10) == (bytes(range(256)) * (3 * B // 256))[2 * B - 10:2 * B + 10]
        f.release(c)
        f.release(d)                                     # nothing held: the file is cut to nothing
        assert f.size == 0 and os.fstat(f.fileno).st_size == 0
        assert list(f.allocate(B)) == [0]
    finally:
        f.close()


@pytest.mark.timeout(120)
def test_concurrent_readers_share_a_small_span_file(indexed, zstd_blob, monkeypatch, tmp_path):
    """Threads reading two blobs at random and in sequence (decode-ahead on) through one cache that
    holds only a few spans -- extents of the span file freed and reused all the time -- get the right
    bytes, and the file stays bounded."""
    tar_data, gz_path, idx = indexed
    data_z, z_path, z_raw = zstd_blob
    monkeypatch.setattr(readers, "_SEQ_TRIGGER", 64 * KiB)
    bound = 8 * SPAN
    cache = spancache.SpanCache(bound, directory=tmp_path)
    gz = readers.GzipReader(gz_path, inflating(idx), cache=cache, ahead=3)
    zs = open_reader(z_path, "zstd", z_raw, cache=cache)
    errors: list = []
    sizes: list[int] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                r, data = rng.choice([(gz, tar_data), (zs, data_z)])
                if rng.random() < 0.5:       # a sequential run
                    off = rng.randrange(len(data))
                    for _ in range(8):
                        assert r.read(off, 32 * KiB) == data[off:off + 32 * KiB]
                        off += 32 * KiB
                else:
                    off = rng.randrange(len(data))
                    n = rng.randrange(1, 100 * KiB)
                    assert r.read(off, n) == data[off:off + n]
                sizes.append(cache.file.size)
        except BaseException as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gz.close()
    zs.close()
    assert not errors, errors[0]
    # the cache's bound in whole blocks plus, per thread and decode-ahead worker, a span still in use
    assert max(sizes) <= bound + (bound // SPAN + 1) * spancache.SpanFile.BLOCK + (6 + 4) * 4 * SPAN
    assert cache.nbytes == 0


@pytest.mark.timeout(60)
def test_forked_child_gets_a_span_file_of_its_own(indexed, tmp_path):
    """After a fork, parent and child must not write their spans into the same file: the child
    forgets the cached spans and makes a span file of its own."""
    tar_data, path, idx = indexed
    idx = inflating(idx)
    starts = [cp.uoffset for cp in idx.checkpoints]
    cache = spancache.SpanCache(8 * MiB, directory=tmp_path)
    r = readers.GzipReader(path, idx, cache=cache, ahead=0)
    a, b = starts[1], starts[2]
    assert r.read(starts[0], 1000) == tar_data[starts[0]:starts[0] + 1000]     # the parent's file exists
    to_parent, from_child = os.pipe()
    to_child, from_parent = os.pipe()
    pid = os.fork()
    if pid == 0:            # the child: fill a span, let the parent fill one, read ours again
        ok = False
        try:
            ok = r.read(a, 30_000) == tar_data[a:a + 30_000]
            os.write(from_child, b"1")
            os.read(to_child, 1)
            ok = ok and r.read(a, 30_000) == tar_data[a:a + 30_000]
            ok = ok and cache.file.fileno >= 0 and len(cache._items) == 1
        finally:
            os._exit(0 if ok else 1)
    try:
        os.read(to_parent, 1)
        assert r.read(b, 30_000) == tar_data[b:b + 30_000]     # the blocks the child's span took, here
        os.write(from_parent, b"1")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert r.read(starts[0], 1000) == tar_data[starts[0]:starts[0] + 1000]
    finally:
        for fd in (to_parent, from_child, to_child, from_parent):
            os.close(fd)
        r.close()
