"""Hostile layers: decompression bombs, path escapes, lying tar headers, damaged compressed streams.

Each image is built with layerfs's own builders (tests/support/hostile.py for what
they cannot make whole), pushed to the real test registry, and pulled (and,
where it pulls, mounted) by ``layerfs`` in a subprocess under an
address-space limit. For every case: the command ends in time; an error is
exactly one line on stderr, with no traceback and no "internal error";
memory stays bounded; nothing is written outside the store (a canary
directory the hostile names aim at, and the working directory, stay empty);
a rejected layer is not in ``blobs/`` and the image is not tagged. What is
rejected and what is normalised is what layerfs/index/tarscan.py and
layerfs/union.py document (README: "Hostile input").
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hostile import (GiB, MiB, SIZE_FIELD, base256, gzip_bomb, member, patch_field, run_limited, zeros_stream,
                     zstd_rle_bomb)
from imagebuild import LayerBuilder, PrebuiltLayer, build_image, compress
from layerfs.index import max_layer_size
from layerfs.mount import mounts
from layerfs.image import Digest
from layerfs.store import Store
from mounthelpers import force_unmount, require_fuse, track, watchdog
from registryclient import push_image

pytestmark = pytest.mark.timeout(240)

#: address space of one pull, load or mount (a small pull runs within 256 MiB)
ADDRESS_SPACE = 1 * GiB
#: resident memory a bomb pull may reach (the bombs inflate to GiBs)
PEAK_RSS = 256 * MiB
EOA = b"\0" * 1024      # tar's end-of-archive blocks


@pytest.fixture
def site() -> Iterator[Path]:
    """A world-traversable directory (the mount is used by uid 65534 too) holding the store, the
    mount point, the working directory of the commands, and ``canary/``, where hostile names point."""
    base = Path(tempfile.mkdtemp(prefix="layerfs-hostile-", dir="/tmp"))
    os.chmod(base, 0o755)
    for d in ("store", "mnt", "cwd", "canary"):
        (base / d).mkdir()
    os.chmod(base / "mnt", 0o755)
    try:
        yield base
    finally:
        with contextlib.suppress(Exception):
            force_unmount(base / "mnt")
        shutil.rmtree(base, ignore_errors=True)


def layerfs(site: Path, *args: str, env: dict | None = None, timeout: float = 60):
    return run_limited(["--root", str(site / "store"), *args], env=env, address_space=ADDRESS_SPACE,
                       timeout=timeout, cwd=site / "cwd")


def assert_nothing_escaped(site: Path) -> None:
    assert os.listdir(site / "canary") == [], "a hostile name wrote outside the store"
    assert os.listdir(site / "cwd") == [], "something was written to the working directory"
    assert sorted(os.listdir(site)) == ["canary", "cwd", "mnt", "store"]


def assert_one_error(run, *needles: str, screen: bool = False) -> str:
    """Exit code 1 and one error line (*screen*: beside the pull screen ``mount`` shows on stderr)."""
    assert run.returncode == 1, (run.returncode, run.stderr)
    lines = run.error_lines
    if screen:
        lines = [l for l in lines if l.startswith("layerfs")]
    assert len(lines) == 1, run.stderr
    line = lines[0]
    assert line.startswith("layerfs: error: "), line
    assert "Traceback" not in run.stderr and "internal error" not in line, line
    for n in needles:
        assert n in line, line
    return line


def assert_rejected(site: Path, image, ref: str, bad_layer: int = -1) -> None:
    """The layer was not stored, the image not tagged, no partial file left behind."""
    store = Store(site / "store")
    d = image.layer_descriptors[bad_layer].digest
    assert not (site / "store" / "blobs" / d.algorithm / d.hex).exists()
    assert not list((site / "store" / "ingest").glob("*")) if (site / "store" / "ingest").exists() else True
    index = site / "store" / "index.json"
    assert not index.exists() or ref not in index.read_text()
    assert store.root.exists()


@contextlib.contextmanager
def mounted(site: Path, ref: str, *options: str) -> Iterator[Path]:
    """``layerfs mount -o allow_other REF`` (writable) under the address-space limit; always torn down."""
    require_fuse()
    mnt = site / "mnt"
    pid = None
    with watchdog(60):
        try:
            run = layerfs(site, "mount", "-o", "allow_other", *options, ref, str(mnt))
            for rec in mounts(Store(site / "store")):
                if rec.mountpoint == str(mnt):
                    pid = rec.pid
                    track(mnt, pid)
            assert run.returncode == 0, run.stderr
            assert run.peak_rss < PEAK_RSS
            yield mnt
            done = layerfs(site, "umount", str(mnt))
            assert done.returncode == 0, done.stderr
        finally:
            force_unmount(mnt, pid)


def push(registry, repo: str, tag: str, layers, compression="gzip"):
    image = build_image(layers, compression=compression)
    push_image(registry.host, repo, tag, image)
    return image, f"{registry.host}/{repo}:{tag}"


# --- decompression bombs -------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_zstd_rle_bomb_ends_with_one_line_in_bounded_memory(registry, unique_repo, site):
    """640 KiB of zstd RLE blocks, no content size in the frame header, 20 GiB of output: the limit
    (made small here) ends the pull with one line naming the layer, the limit and how to raise it."""
    bomb = zstd_rle_bomb(20 * GiB)
    assert len(bomb.blob) < 700 << 10
    image, ref = push(registry, unique_repo, "zstd", [bomb])
    run = layerfs(site, "pull", "-q", ref, env={"LAYERFS_MAX_LAYER_SIZE": "256M"}, timeout=30)
    line = assert_one_error(run, str(image.layer_descriptors[0].digest), "256M", "LAYERFS_MAX_LAYER_SIZE=512M")
    assert run.peak_rss < PEAK_RSS, run.peak_rss
    assert_rejected(site, image, ref)
    assert_nothing_escaped(site)
    print(f"zstd RLE bomb (20 GiB in {len(bomb.blob)} bytes), limit 256M: {run.seconds:.2f}s, "
          f"peak RSS {run.peak_rss >> 20} MiB: {line}")


@pytest.mark.timeout(120)
def test_gzip_bomb_ends_with_one_line(registry, unique_repo, site):
    bomb = gzip_bomb(256 * MiB, diff_id=False)           # one member, level 9: about 1000:1
    image, ref = push(registry, unique_repo, "gzip", [LayerBuilder().add_file("ok", b"fine").build(), bomb])
    run = layerfs(site, "pull", "-q", ref, env={"LAYERFS_MAX_LAYER_SIZE": "64M"}, timeout=30)
    assert_one_error(run, str(image.layer_descriptors[1].digest), "64M")
    assert run.peak_rss < PEAK_RSS, run.peak_rss
    assert_rejected(site, image, ref)
    assert_nothing_escaped(site)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_large_ratio_layer_pulls_and_mounts_in_bounded_memory(registry, unique_repo, site, kind):
    """A 2 GiB file of zeros in about 2 MiB (gzip, 16 members) or 64 KiB (zstd RLE): below the default
    limit, so it is pulled whole; resident memory stays far below the data, and the mount reads it."""
    size = 2 * GiB
    layer = gzip_bomb(size, members=32) if kind == "gzip" else zstd_rle_bomb(size, diff_id=True)
    assert max_layer_size(len(layer.blob)) > size          # the default limit lets it through
    image, ref = push(registry, unique_repo, kind, [layer])
    run = layerfs(site, "pull", "-q", ref, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.peak_rss < PEAK_RSS, run.peak_rss
    print(f"{kind} 2 GiB of zeros in {len(layer.blob)} bytes: pulled in {run.seconds:.2f}s, "
          f"peak RSS {run.peak_rss >> 20} MiB")
    with mounted(site, ref, "--read-only") as mnt:
        f = mnt / "zeros"
        assert f.stat().st_size == size
        with open(f, "rb") as fh:
            fh.seek(size - 4096)
            assert fh.read() == bytes(4096)
    assert_nothing_escaped(site)


def _docker_archive_head(diff_id: Digest, layer_size: int) -> bytes:
    """The members of a ``docker save`` archive up to the header of its one ``layer.tar``."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [str(diff_id)]}}).encode()
    head = LayerBuilder(format=tarfile.USTAR_FORMAT)
    head.add_file("config.json", config)
    head.add_file("manifest.json", json.dumps([{"Config": "config.json", "RepoTags": ["bomb/xz:1"],
                                                 "Layers": ["layer.tar"]}]).encode())
    ti = tarfile.TarInfo("layer.tar")
    ti.size = layer_size
    head.add_tarinfo(ti)
    return head.build(end_of_archive=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["xz", "gzip", "zstd"])
def test_archive_bomb_ends_with_one_line(site, kind):
    """``layerfs load`` of a docker-archive .tar.xz/.tar.gz/.tar.zst that inflates to 1 GiB (a few
    MiB at most on disk) with the limit at 64M: xz says its size up front, so it is refused at once;
    gzip and zstd are counted while they are read."""
    zeros = 1 * GiB
    head = _docker_archive_head(Digest.of(b"not checked"), zeros)
    archive = site / "cwd" / f"bomb.tar.{kind}"
    archive.write_bytes(zeros_stream(kind, head, zeros, EOA))
    assert archive.stat().st_size < 2 * MiB
    run = layerfs(site, "load", "-q", "-i", str(archive), env={"LAYERFS_MAX_LAYER_SIZE": "64M"}, timeout=30)
    line = assert_one_error(run, f"bomb.tar.{kind}", "64M", "LAYERFS_MAX_LAYER_SIZE")
    assert run.seconds < 20 and run.peak_rss < PEAK_RSS
    print(f"{kind} archive bomb: {run.seconds:.2f}s, peak RSS {run.peak_rss >> 20} MiB: {line}")
    archive.unlink()
    assert_nothing_escaped(site)
    assert not list((site / "store" / "blobs").rglob("*")) if (site / "store" / "blobs").exists() else True


def test_limit_default_and_configuration(monkeypatch):
    monkeypatch.delenv("LAYERFS_MAX_LAYER_SIZE", raising=False)
    assert max_layer_size(1 << 20) == 64 * GiB
    assert max_layer_size(1 * GiB) == 200 * GiB
    assert max_layer_size(1 * GiB, 5) == 5
    monkeypatch.setenv("LAYERFS_MAX_LAYER_SIZE", "3G")
    assert max_layer_size(1 * GiB) == 3 * GiB
    assert max_layer_size(1, 7) == 7
    monkeypatch.setenv("LAYERFS_MAX_LAYER_SIZE", "lots")
    from layerfs.errors import UsageError
    with pytest.raises(UsageError, match="LAYERFS_MAX_LAYER_SIZE"):
        max_layer_size(1)


# --- hostile tar streams ---------------------------------------------------------------------------

def _file(name: str, data: bytes = b"data\n") -> bytes:
    return member(name, data)


def _header_of(name: str, data: bytes, fmt=tarfile.USTAR_FORMAT) -> bytes:
    return member(name, data, fmt=fmt)


def _chain(n: int, kind: bytes) -> bytes:
    out = bytearray()
    for _ in range(n):
        if kind == tarfile.XHDTYPE:
            out += patch_field(member("pax", b"20 comment=abcdefgh\n", fmt=tarfile.USTAR_FORMAT), 156, kind)
        else:
            out += patch_field(member("././@LongLink", b"longname\0", fmt=tarfile.USTAR_FORMAT), 156, kind)
    return bytes(out)


def _pax_member(records: bytes, then: bytes) -> bytes:
    """A PAX extended header holding *records* verbatim, followed by the member *then*."""
    return patch_field(member("PaxHeaders/x", records, fmt=tarfile.USTAR_FORMAT), 156, tarfile.XHDTYPE) + then


#: a check of the mount (mount point, canary directory)
Check = Callable[[Path, Path], None]


def _check_normalised(mnt: Path, canary: Path) -> None:
    assert (mnt / "b").read_bytes() == b"data\n" and (mnt / "c").read_bytes() == b"data\n"
    assert not (mnt / "a").exists()


def _check_end_of_archive(mnt: Path, canary: Path) -> None:
    _check_normalised(mnt, canary)
    assert not os.path.lexists(mnt / "hidden")       # after the end-of-archive blocks: not part of the layer


def _check_absolute(mnt: Path, canary: Path) -> None:
    inside = mnt / str(canary).lstrip("/") / "abs"
    assert inside.read_bytes() == b"data\n"          # the leading / is dropped: inside the image


def _check_symlink_then_file(mnt: Path, canary: Path) -> None:
    assert os.readlink(mnt / "a") == str(canary)     # the link as written, never followed by layerfs
    assert not os.path.lexists(canary / "evil")      # a/evil is below a non-directory of its layer: ignored


def _check_symlink_lower_file_upper(mnt: Path, canary: Path) -> None:
    assert stat.S_ISDIR(os.lstat(mnt / "a").st_mode)   # the upper layer's implicit directory replaces the link
    assert (mnt / "a" / "evil").read_bytes() == b"data\n"


def _check_hardlink_absolute(mnt: Path, canary: Path) -> None:
    assert (mnt / "h").read_bytes() == b"image's own\n"      # /etc/passwd of the layer, not of the host
    assert os.stat(mnt / "h").st_ino == os.stat(mnt / "etc" / "passwd").st_ino
    assert not os.path.lexists(mnt / "shadow")                # a link to a name the layer lacks: skipped


def _check_hardlink_through_symlink(mnt: Path, canary: Path) -> None:
    assert os.readlink(mnt / "l") == str(canary)
    assert not os.path.lexists(mnt / "h")                     # its target is below a symlink: no such entry


def _check_symlink_dotdot(mnt: Path, canary: Path) -> None:
    assert os.readlink(mnt / "s") == "../../../../../../etc/passwd"


def _check_gzip_padding(mnt: Path, canary: Path) -> None:
    assert (mnt / "f").read_bytes() == b"data\n"


#: (id, the layers given the canary directory, expected: a substring of the error line, or a Check)
CASES: list[tuple[str, Callable[[Path], list], str | Check]] = [
    # path traversal
    ("dotdot", lambda c: [_file("../escape") + EOA], "escapes the layer root"),
    ("dotdot-deep", lambda c: [_file("a/../../" + str(c).lstrip("/") + "/escape") + EOA], "escapes the layer root"),
    ("dotdot-normalised", lambda c: [_file("a/../b") + _file("./c") + EOA], _check_normalised),
    ("absolute", lambda c: [_file(str(c) + "/abs") + EOA], _check_absolute),
    ("symlink-then-file", lambda c: [member("a", type_=tarfile.SYMTYPE, linkname=str(c)) + _file("a/evil") + EOA],
     _check_symlink_then_file),
    ("symlink-lower-file-upper", lambda c: [member("a", type_=tarfile.SYMTYPE, linkname=str(c)) + EOA,
                                            _file("a/evil") + EOA], _check_symlink_lower_file_upper),
    ("members-after-end-of-archive", lambda c: [_file("b") + _file("c") + EOA + _file("hidden") + EOA],
     _check_end_of_archive),
    ("symlink-dotdot-target", lambda c: [member("s", type_=tarfile.SYMTYPE,
                                                linkname="../../../../../../etc/passwd") + EOA], _check_symlink_dotdot),
    ("hardlink-dotdot", lambda c: [_file("x") + member("h", type_=tarfile.LNKTYPE, linkname="../../etc/passwd") + EOA],
     "escapes the layer root"),
    ("hardlink-absolute", lambda c: [_file("etc/passwd", b"image's own\n")
                                     + member("h", type_=tarfile.LNKTYPE, linkname="/etc/passwd")
                                     + member("shadow", type_=tarfile.LNKTYPE, linkname="/etc/shadow") + EOA],
     _check_hardlink_absolute),
    ("hardlink-through-symlink", lambda c: [member("l", type_=tarfile.SYMTYPE, linkname=str(c))
                                            + member("h", type_=tarfile.LNKTYPE, linkname="l/passwd") + EOA],
     _check_hardlink_through_symlink),
    # tar header lies
    ("size-negative-base256", lambda c: [patch_field(_header_of("f", b"x" * 600), SIZE_FIELD, base256(-512)) + EOA],
     "bad tar header"),
    ("size-overflow-base256", lambda c: [patch_field(_header_of("f", b"x" * 600), SIZE_FIELD, base256(2 ** 80))
                                         + EOA], "out of range"),
    ("size-beyond-stream", lambda c: [patch_field(_header_of("f", b"x" * 600), SIZE_FIELD, b"77777777777\0")
                                      + EOA], "truncated"),
    ("bad-checksum", lambda c: [_file("ok") + _header_of("f", b"x").replace(b"f\0", b"g\0", 1) + EOA],
     "bad tar header"),
    ("truncated-mid-member", lambda c: [(_file("ok") + _file("f", b"y" * 5000))[:-2000]], "truncated"),
    ("truncated-mid-header", lambda c: [_file("ok") + _header_of("f", b"y" * 10)[:300]], "truncated"),
    ("pax-size-bigger", lambda c: [member("f", b"z" * 600, pax={"size": "100000"}) + EOA], "truncated"),
    ("pax-size-smaller", lambda c: [member("f", b"z" * 3000, pax={"size": "10"}) + EOA], "bad tar header"),
    ("pax-path-nul", lambda c: [_pax_member(b"16 path=a\0/evil\n", _file("x")) + EOA], "NUL"),
    ("pax-huge-record-length", lambda c: [_pax_member(b"99999999999999 path=x\n", _file("x")) + EOA], "tar"),
    ("pax-chain", lambda c: [_chain(2000, tarfile.XHDTYPE) + _file("x") + EOA], "too many extended headers"),
    ("gnu-longname-chain", lambda c: [_chain(2000, tarfile.GNUTYPE_LONGNAME) + _file("x") + EOA],
     "too many extended headers"),
    ("pax-header-too-big", lambda c: [patch_field(patch_field(_header_of("PaxHeaders/x", b"30 path=x\n"), 156,
                                                              tarfile.XHDTYPE), SIZE_FIELD, b"%011o\0" % (1 << 30))
                                      + b"30 path=x\n".ljust(512, b"\0") + EOA], "larger than"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_tar(registry, unique_repo, site, case):
    name, layers_of, expect = case
    layers = layers_of(site / "canary")
    image, ref = push(registry, unique_repo, "t", layers)
    run = layerfs(site, "pull", "-q", ref, timeout=30)
    if isinstance(expect, str):
        print(f"{name}: {assert_one_error(run, expect, image.layer_descriptors[-1].digest.short)}")
        assert_rejected(site, image, ref)
        # mount pulls what is missing: the same one line
        mrun = layerfs(site, "mount", "--read-only", ref, str(site / "mnt"), timeout=30)
        assert_one_error(mrun, expect, screen=True)
        assert not os.listdir(site / "mnt")
    else:
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr
        print(f"{name}: pulled{'; ' + run.stderr.strip() if run.stderr.strip() else ''}")
        with mounted(site, ref) as mnt:
            expect(mnt, site / "canary")
            # the whole tree can be walked and read without error
            for root, dirs, files in os.walk(mnt):
                for f in files:
                    p = Path(root, f)
                    if p.is_file() and not p.is_symlink():
                        p.read_bytes()
    assert run.peak_rss < PEAK_RSS
    assert_nothing_escaped(site)


# --- damaged compressed streams -----------------------------------------------------------------

def _gz(tar: bytes) -> bytes:
    return compress(tar, "gzip")


TAR = _file("f") + EOA

STREAMS = [
    # (id, blob, compression, expected error or None when the layer pulls)
    ("gzip-trailing-garbage", _gz(TAR) + b"GARBAGE!", "gzip", "trailing garbage"),
    ("gzip-trailing-zeros", _gz(TAR) + bytes(4096), "gzip", None),
    ("gzip-second-member-garbage", _gz(TAR) + b"\x1f\x8b\x08\x00garbage", "gzip", "gzip"),
    ("gzip-truncated", _gz(_file("f", os.urandom(64 << 10)) + EOA)[:-5000], "gzip", "truncated"),
    ("zstd-trailing-garbage", compress(TAR, "zstd") + b"GARBAGE!", "zstd", "invalid zstd data"),
    ("zstd-truncated", compress(_file("f", os.urandom(64 << 10)) + EOA, "zstd")[:-5000], "zstd", "truncated"),
]


@pytest.mark.parametrize("case", STREAMS, ids=[c[0] for c in STREAMS])
def test_damaged_compressed_stream(registry, unique_repo, site, case):
    """The blob's digest covers every byte the registry serves; the stream inside must end where the
    blob ends: trailing bytes other than gzip's zero padding are an error, as in containerd, which
    reads the decompressed stream to its end after applying a layer."""
    name, blob, comp, expect = case
    tar = TAR if "truncated" not in name else b""
    layer = PrebuiltLayer(blob, comp, Digest.of(tar))
    image, ref = push(registry, unique_repo, "t", [layer])
    run = layerfs(site, "pull", "-q", ref, timeout=30)
    if expect is None:
        assert run.returncode == 0, run.stderr
        with mounted(site, ref, "--read-only") as mnt:
            _check_gzip_padding(mnt, site / "canary")
    else:
        print(f"{name}: {assert_one_error(run, expect)}")
        assert_rejected(site, image, ref)
    assert run.peak_rss < PEAK_RSS
    assert_nothing_escaped(site)


# --- setuid and device files ------------------------------------------------------------------------

def _as_nobody() -> None:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


def test_setuid_and_devices_are_inert(registry, unique_repo, site):
    """A setuid-root binary and device nodes from an image: the mount is nosuid,nodev, so the binary
    runs with the caller's ids and the devices cannot be opened, by an unprivileged user or by root."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts with allow_other and switches to uid 65534)")
    idbin = shutil.which("id")
    assert idbin
    b = LayerBuilder()
    b.add_file("bin/suid-id", Path(idbin).read_bytes(), mode=0o4755, uid=0, gid=0)
    b.add_device("dev/mem", "c", 1, 1, mode=0o666)
    b.add_device("dev/null", "c", 1, 3, mode=0o666)
    b.add_device("dev/sda", "b", 8, 0, mode=0o666)
    image, ref = push(registry, unique_repo, "t", [b.build()])
    run = layerfs(site, "pull", "-q", ref)
    assert run.returncode == 0, run.stderr
    with mounted(site, ref) as mnt:
        line = next(l for l in Path("/proc/self/mountinfo").read_text().splitlines() if f" {mnt} " in l)
        opts = line.split()[5].split(",")
        assert "nosuid" in opts and "nodev" in opts, line
        assert os.stat(mnt / "bin/suid-id").st_mode & 0o7777 == 0o4755
        out = subprocess.run([str(mnt / "bin/suid-id")], capture_output=True, text=True, preexec_fn=_as_nobody,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("uid=65534") and "euid=" not in out.stdout, out.stdout
        for dev in ("dev/mem", "dev/null", "dev/sda"):
            st = os.lstat(mnt / dev)
            assert stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            with pytest.raises(OSError) as e:
                os.close(os.open(mnt / dev, os.O_RDONLY))
            assert e.value.errno in (errno.EACCES, errno.EPERM, errno.ENXIO), e.value
            probe = subprocess.run(["sh", "-c", f"head -c1 {mnt / dev}"], capture_output=True,
                                   preexec_fn=_as_nobody, timeout=30)
            assert probe.returncode != 0 and probe.stdout == b"", probe
    assert_nothing_escaped(site)


# --- lazy mounts ------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_lazy_estargz_chunk_inflates_in_bounded_memory(registry, unique_repo, site):
    """An eStargz layer whose one chunk inflates to 256 MiB (its file in one piece): a lazy read
    inflates it into the cache piece by piece, so the mount daemon stays far below the chunk."""
    size = 256 * MiB
    layer = gzip_bomb(size, members=4)
    _, src = push(registry, unique_repo, "src", [layer])
    dst = f"{registry.host}/{unique_repo}:estargz"
    conv = site / "conv"
    for args in (["pull", "-q", src], ["convert", "--estargz", "--chunk-size", "1G", src, dst], ["push", "-q", dst]):
        run = run_limited(["--root", str(conv), *args], address_space=ADDRESS_SPACE, timeout=90)
        assert run.returncode == 0, (args, run.stderr)
    shutil.rmtree(conv)
    require_fuse()
    mnt = site / "mnt"
    pid = None
    with watchdog(90):
        try:
            run = layerfs(site, "mount", "--lazy", "--read-only", dst, str(mnt), timeout=60)
            for rec in mounts(Store(site / "store")):
                if rec.mountpoint == str(mnt):
                    pid = rec.pid
                    track(mnt, pid)
            assert run.returncode == 0, run.stderr
            with open(mnt / "zeros", "rb") as f:
                f.seek(size - 4096)
                assert f.read() == bytes(4096)
            status = Path(f"/proc/{pid}/status").read_text()
            hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) << 10
            print(f"lazy eStargz chunk of {size >> 20} MiB: mount daemon peak RSS {hwm >> 20} MiB")
            assert hwm < PEAK_RSS, hwm
        finally:
            force_unmount(mnt, pid)
    assert_nothing_escaped(site)
