"""Hostile layer streams for the tests, made with layerfs's own builders.

Decompression bombs (tar streams of one big file of zeros, compressed so that
a few hundred KiB inflate to GiBs) as :class:`~imagebuild.PrebuiltLayer`
for :func:`~imagebuild.build_image`, and the helpers the hostile-input
tests run ``layerfs`` with: a subprocess under an address-space limit whose
peak memory is measured.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

from imagebuild import LayerBuilder, PrebuiltLayer

from layerfs.image import Digest

MiB = 1 << 20
GiB = 1 << 30
_ZEROS = bytes(MiB)
_RLE_BLOCK = 128 << 10          # zstd's largest block (Block_Maximum_Size)


def _file_header(name: str, size: int) -> bytes:
    """The tar header of a regular file of *size* bytes (its data follows it)."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    return LayerBuilder().add_tarinfo(ti).build(end_of_archive=False)


def _zeros_digest(head: bytes, zeros: int) -> Digest:
    """sha256 of *head* followed by *zeros* zero bytes."""
    h = hashlib.sha256(head)
    full, rest = divmod(zeros, MiB)
    for _ in range(full):
        h.update(_ZEROS)
    h.update(bytes(rest))
    return Digest("sha256", h.hexdigest())


def _unknown_diff_id() -> Digest:
    return Digest.of(b"the uncompressed digest of this bomb was not computed")


def zstd_rle_bomb(data_size: int, *, diff_id: bool = False) -> PrebuiltLayer:
    """A one-frame zstd layer of a file ``zeros`` of *data_size* bytes (a multiple of 128 KiB):
    a raw block with the tar header, then RLE blocks of 128 KiB, 4 bytes each, and no content
    size in the frame header: 20 GiB take 640 KiB. *diff_id* computes the real one (slow for GiBs)."""
    if data_size % _RLE_BLOCK:
        raise ValueError("data_size must be a multiple of 128 KiB")
    head = _file_header("zeros", data_size)
    # frame header: magic, descriptor 0 (no content size, no checksum, no dictionary), window 128 KiB
    out = bytearray(b"\x28\xb5\x2f\xfd\x00\x38")
    out += (len(head) << 3 | 0 << 1).to_bytes(3, "little") + head          # raw block
    rle = (_RLE_BLOCK << 3 | 1 << 1).to_bytes(3, "little") + b"\0"
    out += rle * (data_size // _RLE_BLOCK)
    out += (1024 << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"\0"            # end of archive, last block
    did = _zeros_digest(head, data_size + 1024) if diff_id else _unknown_diff_id()
    return PrebuiltLayer(bytes(out), "zstd", did)


def gzip_bomb(data_size: int, *, members: int = 1, diff_id: bool = True) -> PrebuiltLayer:
    """A gzip layer of a file ``zeros`` of *data_size* bytes (level 9, about 1000:1). With
    *members* > 1 the zeros are that many identical gzip members (RFC 1952 multi-member),
    made once: fast to build for GiBs."""
    head = _file_header("zeros", data_size)
    pad = -data_size % 512

    if members <= 1:
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        parts = [c.compress(head)]
        full, rest = divmod(data_size + pad + 1024, MiB)
        parts += [c.compress(_ZEROS) for _ in range(full)]
        blob = b"".join([*parts, c.compress(bytes(rest)), c.flush()])
    else:
        if data_size % members:
            raise ValueError("data_size must divide into the members")
        blob = zeros_stream("gzip", head, data_size, bytes(pad + 1024), piece=data_size // members)
    did = _zeros_digest(head, data_size + pad + 1024) if diff_id else _unknown_diff_id()
    return PrebuiltLayer(blob, "gzip", did)


def zeros_stream(kind: str, head: bytes, zeros: int, tail: bytes, *, piece: int = 64 * MiB) -> bytes:
    """*head*, *zeros* zero bytes and *tail*, compressed with *kind* (gzip, xz or zstd) as concatenated
    members / streams / frames, the zeros made once per *piece*: a GiB-sized bomb builds in a second."""
    def one(data: bytes) -> bytes:
        if kind == "xz":
            return lzma.compress(data, preset=0)
        if kind == "gzip":
            c = zlib.compressobj(9, zlib.DEFLATED, 31)
            return c.compress(data) + c.flush()
        import zstandard
        return zstandard.ZstdCompressor(level=3).compress(data)

    parts = [one(head)] if head else []
    full, rest = divmod(zeros, piece)
    if full:
        parts.append(one(bytes(piece)) * full)
    if rest:
        parts.append(one(bytes(rest)))
    if tail:
        parts.append(one(tail))
    return b"".join(parts)


# --- malformed tar members -------------------------------------------------------------------

def member(name: str, data: bytes = b"", *, type_: bytes = tarfile.REGTYPE, linkname: str = "",
           pax: Mapping[str, str] | None = None, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """One tar member (header blocks + data padded to a block), exactly as given: no name checks."""
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.linkname = linkname
    ti.mode = 0o644
    ti.size = len(data) if type_ in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    ti.pax_headers = dict(pax or {})
    b = LayerBuilder(format=fmt)
    b.add_tarinfo(ti, data if data else None, set_size=False)
    return b.build(end_of_archive=False)


def base256(value: int, width: int = 12) -> bytes:
    """A numeric tar field in GNU base-256 form (0x80 positive, 0xff negative, big-endian two's complement)."""
    if value < 0:
        return b"\xff" + (value % (256 ** (width - 1))).to_bytes(width - 1, "big")
    return b"\x80" + value.to_bytes(width - 1, "big")


def patch_field(header: bytes, offset: int, field: bytes) -> bytes:
    """*header* (a 512-byte block first) with *field* written at *offset* and the checksum redone."""
    h = bytearray(header)
    h[offset:offset + len(field)] = field
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h[:512])
    return bytes(h)


SIZE_FIELD = 124
CHKSUM_FIELD = 148


# --- running layerfs under limits -------------------------------------------------------------

@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int          # bytes (the process's own VmHWM)

    @property
    def error_lines(self) -> list[str]:
        return [l for l in self.stderr.splitlines() if l.strip()]


#: ``python -c`` this ``OUTFILE ARGS...``: runs ``layerfs ARGS`` and writes its peak RSS (KiB, VmHWM) to
#: OUTFILE at exit (wait4's ru_maxrss would also count the test process the child was forked from)
_PEAK_WRAPPER = """
import atexit, os, runpy, sys
out = sys.argv.pop(1)
pid = os.getpid()
def peak():
    if os.getpid() == pid:          # not in a mount daemon forked from it
        with open("/proc/self/status") as f:
            kib = next(line for line in f if line.startswith("VmHWM:")).split()[1]
        with open(out, "w") as f:
            f.write(kib)
atexit.register(peak)
sys.argv[0] = "layerfs"
runpy.run_module("layerfs", run_name="__main__", alter_sys=True)
"""


def run_limited(args: Sequence[str], *, env: Mapping[str, str] | None = None,
                environ: Mapping[str, str] | None = None, address_space: int = 2 * GiB,
                timeout: float = 60, cwd: str | os.PathLike[str] | None = None) -> Run:
    """``layerfs ARGS`` in its own process with RLIMIT_AS set to *address_space*: its exit code, output,
    wall time and peak resident memory (its own VmHWM). The environment is *environ* (default: this
    process's) plus *env*. Killed, and an AssertionError raised, past *timeout* seconds."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    full_env = dict(os.environ if environ is None else environ)
    full_env.update(env or {})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as hwm:
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-c", _PEAK_WRAPPER, hwm.name, *args], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err, env=full_env, preexec_fn=limit, cwd=cwd)
        deadline = t0 + timeout
        while True:
            pid, status, _ = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                os.wait4(p.pid, 0)
                p.returncode = -9
                err.seek(0)
                raise AssertionError(f"layerfs {' '.join(args)} did not end within {timeout}s: "
                                     f"{err.read()[-2000:].decode(errors='replace')}")
            time.sleep(0.02)
        seconds = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        kib = hwm.read().strip()
        return Run(p.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                   seconds, int(kib or 0) * 1024)
