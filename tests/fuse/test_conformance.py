"""Conformance of writable mounts: the fsx exerciser and pjdfstest (harnesses in tests/support/conformance.py).

fsx (tests/support/fsx.c, built here with cc) runs a seeded random sequence of
reads, writes past EOF, truncates, mapped reads and writes, fallocate modes,
copy_file_range, syncs and reopens on one file and checks every byte against
its model: on a new file and on a file copied up from a lower layer, on
layerfs and, as the oracle, on kernel overlayfs over the same layers.

pjdfstest runs only when a checkout is given (``PJDFSTEST_DIR``); it is slow
(several minutes). Every assertion that passes on kernel overlayfs must pass
on layerfs (with an upstream checkout the kernel's count is 0, so layerfs must
have none).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conformance import (LOWER_DATA, LOWER_FILE, PJDFSTEST_ENV, SetupError, build_fsx, build_pjdfstest,
                         pjdfstest_dir, pjdfstest_report, run_fsx, run_pjdfstest_all, targets)
from mounthelpers import require_fuse, watchdog
from prereqs import require_root

FSX_SECONDS = 10          # per file on layerfs: 2 files, ~20 s
KERNEL_FSX_SECONDS = 4    # per file on kernel overlayfs (the oracle)


@pytest.fixture(scope="session")
def fsx(tmp_path_factory) -> Path:
    try:
        return build_fsx(tmp_path_factory.mktemp("fsx-build"))
    except SetupError as e:
        pytest.fail(str(e))


@pytest.fixture
def root_fuse():
    require_fuse()
    require_root("kernel overlayfs and allow_other")


def _check_clean(runs) -> None:
    for run in runs:
        assert run.returncode == 0, f"fsx on {run.target} ({run.kind}) failed:\n{run.output}"
        assert ", clean" in run.summary, run.output
        ops = int(run.summary.split()[1])
        assert ops >= 1000, f"fsx on {run.target} ({run.kind}) did only {ops} operations: {run.summary}"


def test_fsx_detects_wrong_data(fsx, tmp_path):
    """The exerciser's own check: a file that does not start as its reference fails at once, with the bytes."""
    ref, f = tmp_path / "ref", tmp_path / "file"
    ref.write_bytes(b"a" * 5000)
    f.write_bytes(b"a" * 4096 + b"b" + b"a" * 903)
    r = subprocess.run([str(fsx), "-N", "100", "-I", str(ref), str(f)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "first at offset 4096" in r.stderr and "0x61     0x62" in r.stderr, r.stderr
    r = subprocess.run([str(fsx), "-N", "2000", "-S", "5", str(tmp_path / "new")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "2000 ops" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(180)
def test_fsx_on_layerfs_new_and_copied_up_file(fsx, root_fuse, tmp_path):
    with watchdog(150), targets(tmp_path, ["layerfs"]) as mounted:
        mnt = mounted["layerfs"].mountpoint
        assert (mnt / LOWER_FILE).read_bytes() == LOWER_DATA
        runs = run_fsx(fsx, mnt, "layerfs", seconds=FSX_SECONDS, seed=11, ref_dir=tmp_path)
    _check_clean(runs)
    assert [r.kind for r in runs] == ["new file", "copy-up"]


@pytest.mark.timeout(120)
def test_fsx_on_kernel_overlayfs(fsx, root_fuse, tmp_path):
    """The same runs on kernel overlayfs: the oracle must be clean too, or the exerciser is wrong."""
    with watchdog(100), targets(tmp_path, ["kernel"]) as mounted:
        runs = run_fsx(fsx, mounted["kernel"].mountpoint, "kernel", seconds=KERNEL_FSX_SECONDS, seed=11,
                       ref_dir=tmp_path)
    _check_clean(runs)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_pjdfstest_layerfs_matches_kernel(root_fuse, tmp_path):
    if not os.environ.get(PJDFSTEST_ENV):
        pytest.skip(f"set {PJDFSTEST_ENV} to a pjdfstest checkout to run pjdfstest (scripts/pjdfstest)")
    pjd = pjdfstest_dir(None)
    build_pjdfstest(pjd)
    with watchdog(3300), targets(tmp_path, ["layerfs", "kernel"]) as mounted:
        results = run_pjdfstest_all(pjd, mounted)
    report = pjdfstest_report(results)
    print(report)
    assert results["kernel"].total_run > 1000, report
    assert results["layerfs"].total_run == results["kernel"].total_run, report
    kernel_failed = results["kernel"].failed_numbers()
    only_layerfs = {f: sorted(n - kernel_failed.get(f, set()))
                    for f, n in results["layerfs"].failed_numbers().items() if n - kernel_failed.get(f, set())}
    assert not only_layerfs, f"assertions failing on layerfs only: {only_layerfs}\n{report}"
