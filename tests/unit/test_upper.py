"""The upper directory format (layerfs.fs.upper): the override value's one rule, whiteout predicates, records."""
from __future__ import annotations

import logging
import os
import stat

import pytest

from layerfs.fs.upper import (
    OPAQUE_MARKER,
    OVERRIDE_XATTR,
    Override,
    format_whiteout_record,
    is_device_whiteout,
    is_opaque_marker,
    is_opaque_xattr,
    is_reserved_name,
    make_device_whiteout,
    parse_override,
    parse_whiteout_record,
    whiteout_file_fits,
    whiteout_file_name,
    whiteout_target,
    work_dir_for,
)

REG, DIR = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755


@pytest.mark.parametrize("ov", [
    Override(0, 0, 0o755),
    Override(1000, 1000, 0o4750),
    Override(2**32 - 1, 2**32 - 1, 0o7777),
    Override(0, 5, 0o620, stat.S_IFCHR, os.makedev(4, 1)),
    Override(0, 6, 0o660, stat.S_IFBLK, os.makedev(259, 1 << 20)),
    Override(0, 0, 0o600, stat.S_IFIFO, 0),
    Override(0, 0, 0o600, stat.S_IFSOCK, 0),
])
def test_override_round_trips(ov, caplog):
    raw = ov.encode()
    with caplog.at_level(logging.WARNING):
        back = parse_override(raw, file_mode=REG)
    assert back == ov and back.encode() == raw and not caplog.records


def test_override_spelling():
    assert Override(0, 0, 0o4755).encode() == b"0:0:4755"
    assert Override(1, 2, 0o7).encode() == b"1:2:0007"
    assert Override(0, 5, 0o620, stat.S_IFCHR, os.makedev(4, 1)).encode() == b"0:5:0620:c:4:1"
    assert parse_override(b"0:5:0620:c:4:1").type_char == "c"
    assert parse_override(b" 1:2:644\n") == Override(1, 2, 0o644)    # surrounding blanks are no harm


@pytest.mark.parametrize("raw", [
    b"", b"0:0", b"0:0:644:c", b"0:0:644:c:1", b"0:0:644:c:1:2:3", b"x:0:644", b"0:-1:644", b"+0:0:644",
    b"0: 0:644", b"0:0:9999", b"0:0:17777", b"0:0:0o644", b"0:0:644:z:1:1", b"0:0:644:c:x:1",
    b"4294967296:0:644", b"0:4294967296:644", b"0:0:644:c:4294967296:0", b"\xff:0:644", b"0:0:\xd9\xa4",
])
def test_malformed_override_is_ignored_whole_with_a_warning(raw, caplog):
    """The one rule: a malformed value counts for nothing (the entry keeps its real attributes), said once."""
    with caplog.at_level(logging.WARNING, logger="layerfs.fs.upper"):
        assert parse_override(raw, where="/u/etc/f") is None
    [rec] = caplog.records
    assert "/u/etc/f" in rec.getMessage() and OVERRIDE_XATTR in rec.getMessage()


def test_a_file_type_override_fits_a_regular_file_only(caplog):
    raw = b"0:0:0600:c:1:3"
    assert parse_override(raw, file_mode=REG) == Override(0, 0, 0o600, stat.S_IFCHR, os.makedev(1, 3))
    assert parse_override(raw) is not None                      # type of the carrier unknown: not judged
    with caplog.at_level(logging.WARNING, logger="layerfs.fs.upper"):
        assert parse_override(raw, file_mode=DIR, where="d") is None
    assert len(caplog.records) == 1
    assert parse_override(b"0:0:0700", file_mode=DIR) == Override(0, 0, 0o700)   # owner/mode fit anything


def test_whiteout_names():
    assert whiteout_target(".wh.motd") == "motd" and whiteout_target(".wh.motd", REG) == "motd"
    assert whiteout_target(".wh.motd", DIR) is None                  # only a regular file is a whiteout
    assert whiteout_target(".wh. x") == " x" and whiteout_target(".wh....") == "..."
    for name in ("motd", ".wh", ".wh.", ".wh..", ".wh...", OPAQUE_MARKER, ".wh..wh.plnk", ".wh..wh..x"):
        assert whiteout_target(name) is None, name
    assert is_opaque_marker(OPAQUE_MARKER) and is_opaque_marker(OPAQUE_MARKER, REG)
    assert not is_opaque_marker(OPAQUE_MARKER, DIR) and not is_opaque_marker(".wh.x")
    assert all(is_reserved_name(n) for n in (".wh.", ".wh.x", OPAQUE_MARKER, ".wh..wh.plnk"))
    assert not is_reserved_name(".wh") and not is_reserved_name("a.wh.b")


def test_device_whiteout_and_long_names(tmp_path):
    assert is_device_whiteout(stat.S_IFCHR, 0)
    assert not is_device_whiteout(stat.S_IFCHR, os.makedev(1, 3)) and not is_device_whiteout(stat.S_IFBLK, 0)
    assert not is_device_whiteout(stat.S_IFREG, 0)
    assert whiteout_file_fits("a" * 251) and not whiteout_file_fits("a" * 252)
    assert not whiteout_file_fits("é" * 126)             # bytes count, not characters
    assert whiteout_file_name("motd") == ".wh.motd" and whiteout_target(whiteout_file_name("motd"), REG) == "motd"
    if os.geteuid() == 0:                                # mknod of a device needs CAP_MKNOD
        fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
        try:
            make_device_whiteout("x" * 255, fd)
        finally:
            os.close(fd)
        st = os.lstat(tmp_path / ("x" * 255))
        assert is_device_whiteout(st.st_mode, st.st_rdev)


def test_whiteout_record_round_trip():
    names = ["a" * 255, "b" * 252, "ünï"]
    raw = format_whiteout_record(names)
    assert raw == b"/".join(os.fsencode(n) for n in names) and parse_whiteout_record(raw) == names
    assert parse_whiteout_record(b"/x//./../y/") == ["x", "y"] and format_whiteout_record([]) == b""


def test_opaque_xattr_and_work_dir():
    assert is_opaque_xattr("trusted.overlay.opaque", b"y") and is_opaque_xattr("user.overlay.opaque", b"y")
    assert not is_opaque_xattr("trusted.overlay.opaque", b"n") and not is_opaque_xattr("user.x", b"y")
    assert work_dir_for("/var/lib/u/upper/") == "/var/lib/u/.upper.work"
