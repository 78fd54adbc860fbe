"""layerfs.index (tar scanner, TOC): streaming tar indexing, TOC files, random reads of members."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import struct
import subprocess
import tarfile
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
from prereqs import require_binary
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs.index import readers, seek
from layerfs.errors import ContentError, TarError
from layerfs.index import (DIR, FILE, HARDLINK, SYMLINK, Entry, IndexFormatError, LayerIndex, LayerIndexer,
    index_path, load_or_build, normalize_path, open_layer_reader)
from layerfs.image import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor, Digest
from layerfs.store import Store

# --- building tars ------------------------------------------------------------------

CAP = b"\x01\x00\x00\x02\x00\x30\x00\x00\xff\xfe\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # binary, not UTF-8


def _ti(name: str, type_: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def rich_members(rng: random.Random | None = None) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    rng = rng or random.Random(7)
    big = rng.randbytes(300_000)
    long_dir = "d" * 120
    long_name = f"{long_dir}/" + "n" * 150 + "/file-with-a-very-long-name-" + "x" * 60
    long_target = "/" + "t" * 80 + "/" + "u" * 80
    return [
        (_ti("./", tarfile.DIRTYPE, mode=0o755, mtime=1000), None),
        (_ti("./etc", tarfile.DIRTYPE, mode=0o755, uid=0, gid=0, mtime=1_600_000_000), None),
        (_ti("./etc/passwd", mode=0o644, uid=0, gid=0, mtime=1_600_000_001), b"root:x:0:0::/root:/bin/sh\n"),
        (_ti("/abs/path.txt", mode=0o600, mtime=5), b"absolute"),
        (_ti("tmp", tarfile.DIRTYPE, mode=0o1777), None),
        (_ti("usr/bin/su", mode=0o4755, uid=0, gid=0), b"#!/bin/true\n"),
        (_ti("usr/bin/wall", mode=0o2755, uid=0, gid=5), b"wall"),
        (_ti("home/big", mode=0o640, uid=3_000_000_000, gid=4_000_000_000,
             pax_headers={"mtime": "1700000000.123456789"}), b"large ids and ns mtime"),
        (_ti("home/neg", mode=0o644, pax_headers={"mtime": "-1.5"}), b"before 1970"),
        (_ti("bin/ping", mode=0o755, pax_headers={
            "SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape"),
            "SCHILY.xattr.user.comment": "héllo wörld",
            "SCHILY.xattr.user.empty": ""}), b"\x7fELF"),
        (_ti("big.bin", mode=0o644), big),
        (_ti(long_name, mode=0o644), b"long"),
        (_ti(long_dir + "/short", mode=0o644), b"s"),
        (_ti("links/sym", tarfile.SYMTYPE, linkname="../etc/passwd", mode=0o777), None),
        (_ti("links/longsym", tarfile.SYMTYPE, linkname=long_target, mode=0o777), None),
        (_ti("links/hard", tarfile.LNKTYPE, linkname="./etc/passwd"), None),
        (_ti("links/hard2", tarfile.LNKTYPE, linkname="big.bin"), None),
        (_ti("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), None),
        (_ti("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6), None),
        (_ti("run/fifo", tarfile.FIFOTYPE, mode=0o600), None),
        (_ti("empty", mode=0o644), b""),
        (_ti("contig", tarfile.CONTTYPE, mode=0o644), b"contiguous file"),
        (_ti("nöt-ascii-ñame", mode=0o644), b"utf8 name"),
        (_ti("a/../resolved", mode=0o644), b"dotdot inside"),
        (_ti("dup", mode=0o644), b"first"),
        (_ti("dup", mode=0o600), b"second wins"),
    ]


RICH_TAR = make_tar(rich_members())


def expected_entries(tar: bytes) -> dict[str, Entry]:
    """What tarfile itself (random-access mode, whole archive) says, as Entry records; later duplicates win."""
    out: dict[str, Entry] = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for m in tf.getmembers():
            path = os.path.normpath("/" + m.name).lstrip("/")
            path = "" if path == "." else path
            if m.isreg():
                kind = FILE
            else:
                kind = {tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: SYMLINK, tarfile.LNKTYPE: HARDLINK,
                        tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}[m.type]
            pax = m.pax_headers
            mtime = int(Decimal(pax["mtime"]) * 10**9) if "mtime" in pax else int(m.mtime) * 10**9
            xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                      for k, v in pax.items() if k.startswith("SCHILY.xattr.")} or None
            link = None
            if kind == SYMLINK:
                link = m.linkname
            elif kind == HARDLINK:
                link = os.path.normpath("/" + m.linkname).lstrip("/")
            sparse = None
            if m.sparse is not None:
                sparse, pos = [], m.offset_data
                for off, n in m.sparse:
                    if n:
                        sparse.append((off, n, pos))
                        pos += n
                sparse = tuple(sparse)
            dev = (m.devmajor, m.devminor) if kind in ("char", "block") else (0, 0)
            out.pop(path, None)
            mode = 0o777 if kind == SYMLINK else m.mode & 0o7777      # as extracted: Linux symlinks are 0777
            out[path] = Entry(path, kind, mode, m.uid, m.gid, m.size if kind == FILE else 0, mtime,
                              link, dev[0], dev[1], m.offset_data, xattrs, sparse)
    return out


def index_bytes(blob: bytes, compression, chunks=None, **kw) -> LayerIndex:
    ix = LayerIndexer(compression, where="test", **kw)
    pos = 0
    sizes = chunks or [1 << 20]
    i = 0
    while pos < len(blob):
        n = sizes[i % len(sizes)]
        ix.feed(blob[pos:pos + n])
        pos += n
        i += 1
    return ix.finish()


def gzip_multi(data: bytes) -> bytes:
    cut = [0, len(data) // 3, len(data) // 2 + 7, len(data)]
    return b"".join(gzip.compress(data[a:b]) for a, b in zip(cut, cut[1:]))


def zstd_multi(data: bytes) -> bytes:
    c = zstandard.ZstdCompressor(level=3)
    h = len(data) // 2 + 3
    return c.compress(data[:h]) + c.compress(data[h:])


COMPRESSORS = {
    "none": (None, lambda d: d),
    "gzip": ("gzip", lambda d: gzip.compress(d, 6)),
    "gzip-multi": ("gzip", gzip_multi),
    "zstd": ("zstd", lambda d: zstandard.ZstdCompressor(level=3).compress(d)),
    "zstd-multi": ("zstd", zstd_multi),
}


# --- records ------------------------------------------------------------------------

def test_every_record_field_matches_tarfile():
    idx = index_bytes(RICH_TAR, None)
    want = expected_entries(RICH_TAR)
    got = {e.path: e for e in idx.entries}
    assert list(got) == list(want)
    for path in want:
        assert got[path] == want[path], path
    # spot checks of the trickier fields
    assert got[""].type == DIR and got[""].mtime_ns == 1000 * 10**9
    assert got["abs/path.txt"].mode == 0o600
    assert got["tmp"].mode == 0o1777
    assert got["usr/bin/su"].mode == 0o4755 and got["usr/bin/wall"].mode == 0o2755
    big = got["home/big"]
    assert (big.uid, big.gid, big.mtime_ns) == (3_000_000_000, 4_000_000_000, 1_700_000_000_123_456_789)
    assert got["home/neg"].mtime_ns == -1_500_000_000
    assert got["bin/ping"].xattrs == {"security.capability": CAP, "user.comment": "héllo wörld".encode(),
                                      "user.empty": b""}
    assert got["links/hard"].linkname == "etc/passwd" and got["links/hard"].type == HARDLINK
    assert got["links/sym"].linkname == "../etc/passwd"
    assert got["links/longsym"].linkname.startswith("/tttt")
    assert (got["dev/null"].type, got["dev/null"].devmajor, got["dev/null"].devminor) == ("char", 1, 3)
    assert got["dev/sda"].type == "block" and got["run/fifo"].type == "fifo"
    assert got["contig"].type == FILE
    assert "resolved" in got and "nöt-ascii-ñame" in got
    assert any(len(p) > 255 for p in got)
    assert got["dup"].mode == 0o600 and got["dup"].size == len(b"second wins")
    assert idx.diff_id == Digest("sha256", hashlib.sha256(RICH_TAR).hexdigest())
    assert idx.size == len(RICH_TAR) and idx.compression is None


def _many_members(n: int) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out: list[tuple[tarfile.TarInfo, bytes | None]] = [(_ti("d", tarfile.DIRTYPE, mode=0o755), None)]
    for i in range(n):
        pax = {"SCHILY.xattr.user.i": str(i)} if i % 7 == 0 else {}
        out.append((_ti(f"d/f{i}", mode=0o644, uid=i, mtime=i, pax_headers=pax), b"x" * (i % 5)))
        if i % 11 == 0:
            out.append((_ti(f"d/h{i}", tarfile.LNKTYPE, linkname=f"d/f{i}"), None))
        if i % 13 == 0:
            out.append((_ti(f"d/s{i}", tarfile.SYMTYPE, linkname=f"f{i}", mode=0o644), None))
    return out


@pytest.mark.parametrize("rows", [1, 3, 100])
@pytest.mark.parametrize("tar", ["rich", "rich-no-duplicates", "many", "many-rewritten"])
def test_records_spooled_to_disk_encode_as_in_memory(monkeypatch, tmp_path, rows, tar):
    """The indexer writes records to a spool file in batches and streams the columnar encoding out of it:
    the records section decodes to exactly what the in-memory encoding of the same records gives."""
    from layerfs.index import columns, spool, tarscan
    members = {"rich": rich_members, "rich-no-duplicates": lambda: rich_members()[:-2],
               "many": lambda: _many_members(300),
               "many-rewritten": lambda: _many_members(300) + [(_ti("d/f5", mode=0o600), b"again"),
                                                              (_ti("d/f11", mode=0o600), b"link target again")]}[tar]
    data = make_tar(members())
    scan = tarscan.TarScanner("test")
    scan.feed(data)
    want = spool.dedupe(scan.finish())
    monkeypatch.setattr(spool, "_SPOOL_ROWS", rows)
    idx = index_bytes(gzip.compress(data, 1), "gzip", [5000], spool_dir=tmp_path)
    assert len(idx) == len(want)
    assert idx.entries == want
    raw = zstandard.ZstdDecompressor().decompress(LayerIndex.from_bytes(idx.to_bytes())._raw_entries)
    assert raw == columns.encode_columns(tuple(map(list, zip(*want))))
    assert list(tmp_path.iterdir()) == []       # the spool file is anonymous


def test_spool_directory_that_cannot_be_written_is_one_clear_error(monkeypatch, tmp_path):
    from layerfs.index import spool
    from layerfs.errors import StoreError
    monkeypatch.setattr(spool, "_SPOOL_ROWS", 2)
    with pytest.raises(StoreError) as ei:
        index_bytes(gzip.compress(RICH_TAR, 1), "gzip", spool_dir=tmp_path / "missing")
    assert "temporary file" in ei.value.message and ei.value.where == str(tmp_path / "missing")
    assert ei.value.hint



@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_gnu_and_ustar_headers(fmt):
    long_name = "g" * 90 + "/" + "h" * 90 + "/" + "name"   # ustar prefix/name split, GNU longname
    members = [(_ti(long_name, mode=0o644, uid=1, gid=2, mtime=77), b"data"),
               (_ti("lnk", tarfile.SYMTYPE, linkname="x" * 99), None),
               (_ti("dev", tarfile.CHRTYPE, devmajor=4, devminor=64), None)]
    if fmt == tarfile.GNU_FORMAT:
        members.append((_ti("glong", tarfile.SYMTYPE, linkname="y" * 300), None))   # GNU longlink
        members.append((_ti("bigid", uid=1 << 40, gid=2), b"base-256 uid"))
    tar = make_tar(members, fmt)
    idx = index_bytes(tar, None, [511, 3, 1024])
    assert {e.path: e for e in idx.entries} == expected_entries(tar)


@pytest.mark.parametrize("threaded", [True, False])
def test_streaming_chunks_give_the_same_index_for_every_compression(threaded):
    want = index_bytes(RICH_TAR, None).entries
    for name, (comp, fn) in COMPRESSORS.items():
        blob = fn(RICH_TAR)
        for chunks in ([1], [1 << 20], [7, 512, 4093], [100_000]):
            if chunks == [1] and len(blob) > 50_000 and comp is not None:
                chunks = [3, 1, 5]
            idx = index_bytes(blob, comp, chunks, threaded=threaded)
            assert idx.entries == want, (name, chunks)
            assert idx.diff_id.hex == hashlib.sha256(RICH_TAR).hexdigest()
            assert idx.size == len(RICH_TAR)
            assert idx.compression == comp
            assert idx.compressed_size == len(blob)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.integers(1, 9000), min_size=1, max_size=12),
       kind=st.sampled_from(sorted(COMPRESSORS)))
def test_random_chunk_sizes(chunks, kind):
    comp, fn = COMPRESSORS[kind]
    idx = index_bytes(fn(RICH_TAR), comp, chunks)
    assert idx.entries == index_bytes(RICH_TAR, None).entries


def test_gzip_tool_output_and_media_type_mismatch():
    gz = require_binary("gzip")
    blob = subprocess.run([gz, "-9", "-c"], input=RICH_TAR, capture_output=True, check=True).stdout
    assert index_bytes(blob, "gzip").entries == index_bytes(RICH_TAR, None).entries
    # the data decides, as in containerd: a gzip blob labelled uncompressed, and the reverse
    assert index_bytes(blob, None).compression == "gzip"
    assert index_bytes(RICH_TAR, "gzip").compression is None


def test_unknown_types_are_skipped_and_data_skipped():
    tar = make_tar([(_ti("vol", b"V"), b"volume label data" * 100), (_ti("after", mode=0o644), b"ok")])
    idx = index_bytes(tar, None, [100])
    assert [e.path for e in idx.entries] == ["after"]


def test_empty_layers():
    assert index_bytes(b"", None).entries == []
    empty_tar = make_tar([])
    assert index_bytes(gzip.compress(empty_tar), "gzip").entries == []
    assert index_bytes(empty_tar + b"\0" * 10240, None).entries == []


def test_end_of_archive_without_zero_blocks_and_trailing_data():
    tar = make_tar([(_ti("a"), b"x")])
    body = tar[:1024]                                  # header + data block, no end blocks
    assert [e.path for e in index_bytes(body, None).entries] == ["a"]
    # anything after the end-of-archive marker is not looked at (it still counts for the diff_id)
    idx = index_bytes(tar + b"garbage after the end", None)
    assert [e.path for e in idx.entries] == ["a"]


# --- sparse files -------------------------------------------------------------------

def _sparse_file(path: Path) -> bytes:
    with open(path, "wb") as f:
        f.seek(1 << 20)
        f.write(b"data at one MiB" * 100)
        f.seek(3 << 20)
        f.write(os.urandom(10_000))
        f.truncate(5 << 20)
    return path.read_bytes()


@pytest.mark.parametrize("args", [["--format=gnu"], ["--format=pax", "--sparse-version=0.0"],
                                  ["--format=pax", "--sparse-version=0.1"],
                                  ["--format=pax", "--sparse-version=1.0"]])
def test_gnu_sparse_files_from_tar(tmp_path, args):
    tar_bin = require_binary("tar")
    src = tmp_path / "src"
    src.mkdir()
    content = _sparse_file(src / "sparse.img")
    (src / "after").write_bytes(b"after the sparse file")
    out = tmp_path / "s.tar"
    subprocess.run([tar_bin, "--sparse", *args, "-C", str(src), "-cf", str(out), "sparse.img", "after"],
                   check=True)
    tar = out.read_bytes()
    idx = index_bytes(gzip.compress(tar, 1), "gzip", [4096])
    got = {e.path: e for e in idx.entries}
    assert got == expected_entries(tar)
    e = got["sparse.img"]
    assert e.size == 5 << 20 and e.sparse is not None
    if len(e.sparse) < 2:
        pytest.skip("this file system did not keep the holes")
    assert sum(n for _, n, _ in e.sparse) < len(content)
    # reassemble through the layer reader
    blob_path = tmp_path / "blob"
    blob_path.write_bytes(gzip.compress(tar, 1))
    from layerfs.fs import read_sparse
    with readers.open_reader(blob_path, "gzip", idx.checkpoints) as r:
        assert read_sparse(r, list(e.sparse), 0, e.size) == content
        a = got["after"]
        assert r.read(a.offset, a.size) == b"after the sparse file"


# --- bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "./../x", "/../x"])
def test_dotdot_escape_is_rejected(name):
    tar = make_tar([(_ti("ok"), b"1"), (_ti(name), b"2")])
    with pytest.raises(TarError) as ei:
        index_bytes(tar, None)
    assert name in str(ei.value)


def test_hardlink_escape_is_rejected():
    tar = make_tar([(_ti("l", tarfile.LNKTYPE, linkname="../../etc/shadow"), None)])
    with pytest.raises(TarError, match="shadow"):
        index_bytes(tar, None)


def test_normalize_path():
    assert normalize_path("./a//b/./c/") == "a/b/c"
    assert normalize_path("/abs") == "abs"
    assert normalize_path("./") == "" and normalize_path("/") == ""
    assert normalize_path("a/../b") == "b"
    with pytest.raises(TarError):
        normalize_path("a/../..")
    with pytest.raises(TarError):
        normalize_path("a\0b")


def test_bad_header_checksum_is_an_error():
    tar = bytearray(make_tar([(_ti("a"), b"x" * 600), (_ti("b"), b"y")]))
    tar[1536 + 10] ^= 0xFF               # second member's header: name byte, checksum now wrong
    with pytest.raises(TarError, match="bad tar header"):
        index_bytes(bytes(tar), None)


def test_bad_first_header_is_an_error():
    with pytest.raises(TarError):
        index_bytes(b"this is not a tar file at all" * 40, None)


@pytest.mark.parametrize("cut", [100, 700, 1536 + 200])
def test_truncated_tar_is_an_error(cut):
    tar = make_tar([(_ti("a"), b"x" * 1000), (_ti("b"), b"y" * 10)])
    with pytest.raises(TarError, match="truncated"):
        index_bytes(tar[:cut], None, [64])


def test_truncated_and_corrupt_gzip(tmp_path):
    blob = gzip.compress(RICH_TAR)
    with pytest.raises(ContentError):
        index_bytes(blob[: len(blob) // 2], "gzip")
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x55
    with pytest.raises(ContentError):
        index_bytes(bytes(bad), "gzip")


@pytest.mark.parametrize("threaded", [False, True])
def test_errors_stick_and_carry_where(threaded):
    ix = LayerIndexer(None, where="layer abc", threaded=threaded)
    bad = make_tar([(_ti("../x"), b"1")])
    with pytest.raises(TarError) as e1:
        ix.feed(bad)                    # the worker thread may report it only from a later call
        ix.finish()
    assert e1.value.where == "layer abc" and "../x" in str(e1.value)
    with pytest.raises(TarError) as e2:
        ix.feed(b"more")
    assert e2.value is e1.value
    with pytest.raises(TarError) as e3:
        ix.finish()
    assert e3.value is e1.value


def test_tar_error_surfaces_from_feed_when_threaded():
    ix = LayerIndexer(None, where="w")
    ix.feed(make_tar([(_ti("../x"), b"1")]) + b"\0" * (1 << 20))
    with pytest.raises(TarError):
        for _ in range(100):
            ix.feed(b"\0" * (1 << 20))


def test_no_thread_is_left_behind():
    before = {t for t in threading.enumerate() if t.name == "layerindex"}
    blob = gzip.compress(RICH_TAR)
    # finished, failed, closed, and abandoned indexers
    index_bytes(blob, "gzip", [4096])
    with pytest.raises(ContentError):
        index_bytes(blob[:-100], "gzip", [4096])
    with pytest.raises(TarError):
        index_bytes(make_tar([(_ti("../x"), b"1")]) + bytes(1 << 20), None, [1 << 19])
    ix = LayerIndexer("gzip", where="w")
    ix.feed(blob[:5000])
    ix.close()
    ix = LayerIndexer("gzip", where="w")
    ix.feed(blob[:100_000])
    del ix
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if {t for t in threading.enumerate() if t.name == "layerindex"} <= before:
            break
        time.sleep(0.01)
    assert {t for t in threading.enumerate() if t.name == "layerindex"} <= before


def test_huge_pax_header_in_small_chunks():
    val = "v" * 200_000
    tar = make_tar([(_ti("x", pax_headers={"SCHILY.xattr.user.big": val}), b"data"), (_ti("y"), b"z")])
    idx = index_bytes(tar, None, [333])
    assert idx.entries[0].xattrs == {"user.big": val.encode()}
    assert [e.path for e in idx.entries] == ["x", "y"]


# --- index files --------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    idx = index_bytes(gzip.compress(RICH_TAR), "gzip", digest=Digest.of(b"blob"))
    p = tmp_path / "x.idx"
    idx.save(p)
    back = LayerIndex.load(p)
    assert back.entries == idx.entries
    assert (back.diff_id, back.size, back.compression, back.checkpoints, back.digest, back.compressed_size) == \
        (idx.diff_id, idx.size, idx.compression, idx.checkpoints, idx.digest, idx.compressed_size)
    # rows() and entries agree, and a loaded index saves to the same bytes
    assert [tuple(e) for e in back.entries] == list(LayerIndex.load(p).rows())
    assert LayerIndex.load(p).to_bytes() == p.read_bytes()
    # rows for one pass: the same, and the index keeps its records compressed (and still whole)
    once = LayerIndex.load(p)
    assert list(once.rows(keep=False)) == list(once.rows(keep=False)) == [tuple(e) for e in back.entries]
    assert once._cols is None and once.entries == back.entries and once.to_bytes() == p.read_bytes()


def _rewrite_head(data: bytes, *, magic=None, version=None) -> bytes:
    m, v, flags, _ = struct.unpack_from("<8sIIQ", data)
    body = data[24:]
    return struct.pack("<8sIIQ", magic or m, v if version is None else version, flags,
                       xxhash.xxh3_64_intdigest(body)) + body


def test_corrupt_truncated_and_old_index_files_raise(tmp_path):
    idx = index_bytes(RICH_TAR, None)
    good = idx.to_bytes()
    p = tmp_path / "x.idx"
    rng = random.Random(3)
    cases = [good[:n] for n in (0, 10, 23, 24, 40, len(good) // 2, len(good) - 1)]
    for _ in range(20):
        b = bytearray(good)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        cases.append(bytes(b))
    from layerfs.index import FORMAT_VERSION
    cases += [_rewrite_head(good, version=FORMAT_VERSION - 1), _rewrite_head(good, version=FORMAT_VERSION + 1),
              _rewrite_head(good, version=0), _rewrite_head(good, magic=b"NOTANIDX"),
              good + b"\0"]
    for data in cases:
        p.write_bytes(data)
        with pytest.raises(IndexFormatError):
            LayerIndex.load(p).entries
    with pytest.raises(FileNotFoundError):
        LayerIndex.load(tmp_path / "missing.idx")


def test_corrupt_records_with_valid_checksum_raise():
    """Damage behind a matching checksum (a bug, or a hostile file) still fails cleanly."""
    idx = index_bytes(RICH_TAR, None)
    good = idx.to_bytes()
    meta_len, rec_len, cp_len = struct.unpack_from("<IQQ", good, 24)
    start = 24 + 20 + meta_len
    raw = zstandard.ZstdDecompressor().decompress(good[start:start + rec_len])
    for cut in (5, len(raw) // 2, len(raw) - 1):
        rec = zstandard.ZstdCompressor().compress(raw[:cut])
        body = struct.pack("<IQQ", meta_len, len(rec), cp_len) + good[44:44 + meta_len] + rec + \
            good[start + rec_len:]
        data = struct.pack("<8sIIQ", b"LFSLIDX\n", 1, 0, xxhash.xxh3_64_intdigest(body)) + body
        with pytest.raises(IndexFormatError):
            LayerIndex.from_bytes(data).entries


# --- the store: load_or_build and readers --------------------------------------------

def _store_layer(store: Store, blob: bytes, media_type: str) -> Descriptor:
    d = store.put_blob(blob)
    return Descriptor(media_type, d, len(blob))


@pytest.mark.parametrize("kind,media_type", [("none", OCI_LAYER), ("gzip", OCI_LAYER_GZIP),
                                             ("gzip-multi", OCI_LAYER_GZIP), ("zstd", OCI_LAYER_ZSTD),
                                             ("zstd-multi", OCI_LAYER_ZSTD)])
def test_reader_returns_every_member_content(tmp_path, kind, media_type):
    store = Store(tmp_path / "store").init()
    comp, fn = COMPRESSORS[kind]
    desc = _store_layer(store, fn(RICH_TAR), media_type)
    idx = load_or_build(store, desc)
    assert index_path(store, desc.digest).exists()
    assert store.layer_info(desc.digest)["diff_id"] == str(idx.diff_id)
    by_path = {e.path: e for e in idx.entries}
    with open_layer_reader(store, desc, idx) as r, tarfile.open(fileobj=io.BytesIO(RICH_TAR)) as tf:
        for m in tf.getmembers():
            if not m.isreg():
                continue
            e = by_path[normalize_path(m.name)]
            if e.offset != m.offset_data:       # an earlier duplicate
                continue
            want = tf.extractfile(m).read()
            assert r.read(e.offset, e.size) == want, m.name
            if e.size > 10:
                assert r.read(e.offset + 3, 5) == want[3:8]


def test_reader_with_many_checkpoints(tmp_path):
    rng = random.Random(5)
    members = [(_ti(f"f{i:03}"), rng.randbytes(rng.randrange(1, 40_000))) for i in range(60)]
    tar = make_tar(members)
    blob = gzip.compress(tar, 6)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    idx = index_bytes(blob, "gzip", [8192], span=64 << 10)
    assert len(seek.SeekIndex.from_bytes(idx.checkpoints).checkpoints) > 10
    with readers.open_reader(path, "gzip", idx.checkpoints, cache_bytes=0) as r:
        order = list(zip(idx.entries, members))
        rng.shuffle(order)
        for e, (_, data) in order:
            assert r.read(e.offset, e.size) == data


def test_load_or_build_rebuilds_corrupt_and_foreign_indexes(tmp_path):
    store = Store(tmp_path / "store").init()
    desc = _store_layer(store, gzip.compress(RICH_TAR), OCI_LAYER_GZIP)
    first = load_or_build(store, desc)
    p = index_path(store, desc.digest)
    mtime = p.stat().st_mtime_ns
    assert load_or_build(store, desc).entries == first.entries
    assert p.stat().st_mtime_ns == mtime                       # loaded, not rebuilt
    p.write_bytes(b"garbage")
    assert load_or_build(store, desc).entries == first.entries
    assert LayerIndex.load(p).entries == first.entries         # rewritten
    # an index of another blob under this name is not trusted
    other = _store_layer(store, gzip.compress(make_tar([(_ti("z"), b"z")])), OCI_LAYER_GZIP)
    load_or_build(store, other)
    shutil.copy(index_path(store, other.digest), p)
    assert load_or_build(store, desc).entries == first.entries
    # an index of an older format version is rebuilt
    p.write_bytes(_rewrite_head(p.read_bytes(), version=0))
    assert load_or_build(store, desc).entries == first.entries
    assert LayerIndex.load(p).entries == first.entries


def test_load_or_build_verifies_the_blob(tmp_path):
    store = Store(tmp_path / "store").init()
    desc = _store_layer(store, gzip.compress(RICH_TAR), OCI_LAYER_GZIP)
    path = store.blob_path(desc.digest)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-20] ^= 1                                              # the gzip trailer: still inflates
    path.write_bytes(bytes(data))
    with pytest.raises(ContentError):
        load_or_build(store, desc)
    assert not index_path(store, desc.digest).exists()


# --- the fast header path equals tarfile's own -------------------------------------------

from layerfs.index.tarscan import _TarInfo  # noqa: E402

_SLOTS = [s for s in tarfile.TarInfo.__slots__ if s not in ("tarfile", "_link_target")]


def _parse_with(cls, buf):
    try:
        obj = cls.frombuf(buf, "utf-8", "surrogateescape")
    except Exception as e:        # noqa: BLE001
        return type(e).__name__
    return {s: getattr(obj, s, "<unset>") for s in _SLOTS}


@settings(max_examples=200, deadline=None)
@given(name=st.text(min_size=1, max_size=120), mode=st.integers(0, 0o7777), uid=st.integers(0, 1 << 40),
       size=st.integers(0, 1 << 36), mtime=st.integers(-(1 << 33), 1 << 34),
       type_=st.sampled_from([b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"x", b"L", b"V"]),
       fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]),
       edits=st.lists(st.tuples(st.integers(0, 511), st.sampled_from(b"\0 07\x80\xff/a\x1c9")), max_size=6),
       fix=st.booleans())
def test_fast_frombuf_equals_tarfile(name, mode, uid, size, mtime, type_, fmt, edits, fix):
    ti = tarfile.TarInfo(name)
    ti.mode, ti.uid, ti.size, ti.mtime, ti.type = mode, uid, size, mtime, type_
    ti.linkname = "target" if type_ in (b"1", b"2") else ""
    try:
        buf = bytearray(ti.tobuf(fmt, "utf-8", "surrogateescape")[-512:])
    except (ValueError, UnicodeError):
        return
    for pos, val in edits:
        buf[pos] = val
    if fix:
        buf[148:156] = b"        "
        buf[148:156] = b"%06o\0 " % sum(buf)
    assert _parse_with(_TarInfo, bytes(buf)) == _parse_with(tarfile.TarInfo, bytes(buf))


def test_load_or_build_on_a_read_only_store(tmp_path, monkeypatch, caplog):
    store = Store(tmp_path / "store").init()
    desc = _store_layer(store, gzip.compress(RICH_TAR), OCI_LAYER_GZIP)

    def no_lock(*a, **kw):
        raise PermissionError(13, "Permission denied")

    def no_save(self, path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Store, "lock", no_lock)
    monkeypatch.setattr(LayerIndex, "save", no_save)
    idx = load_or_build(store, desc)
    assert idx.entries == index_bytes(RICH_TAR, None).entries
    assert not index_path(store, desc.digest).exists()
    assert "cannot save" in caplog.text


def test_damaged_records_behind_a_valid_checksum_fail_cleanly():
    """Random damage the checksum cannot see: IndexFormatError, or records the union view copes with."""
    from layerfs.index import FORMAT_VERSION, pack_file, unpack_file
    from layerfs.fs import build_tree
    idx = index_bytes(RICH_TAR, None)
    meta, (records, cps) = unpack_file(idx.to_bytes(), FORMAT_VERSION, 2)
    raw = zstandard.ZstdDecompressor().decompress(bytes(records))
    rng = random.Random(4)
    rejected = 0
    for _ in range(300):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.choice([0, 1, 2, 0x2F, 0x2E, 0xFF, rng.randrange(256)])
        data = pack_file(FORMAT_VERSION, meta, [zstandard.ZstdCompressor().compress(bytes(b)), bytes(cps)])
        try:
            back = LayerIndex.from_bytes(data)
            back.entries
        except IndexFormatError:
            rejected += 1
            continue
        build_tree([back], [io.BytesIO(RICH_TAR)])
    assert rejected > 20
