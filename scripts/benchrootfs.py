"""The image of the mount benchmarks (scripts/bench.py, scripts/bench_read.py): a real rootfs base
(the host's /usr), a big incompressible file, small files, whiteouts, opaque directories and changes,
in six gzip layers; see bench.py's docstring."""
from __future__ import annotations

import os
import random
import stat
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchimage as bi  # noqa: E402

BIG = "opt/big/blob.bin"


BASE_SOURCES = ["usr/lib/python3.11", "usr/lib/python3", "usr/sbin", "usr/bin", "usr/lib/gcc", "usr/share"]


def image_spec(quick: bool) -> dict:
    M = 1 << 20
    if quick:
        return {"version": 2, "base_bytes": 6 * M, "big": 16 * M, "small": 1500, "small_per_dir": 100}
    return {"version": 2, "base_bytes": 200 * M, "big": 200 * M, "small": 20000, "small_per_dir": 200}


def _walk_host(rel_root: str):
    """(arcname, host path) for rel_root and everything below it, sorted, directories first."""
    host = Path("/") / rel_root
    if not host.is_dir() or host.is_symlink():
        return
    stack = [rel_root]
    while stack:
        rel = stack.pop()
        yield rel, Path("/") / rel
        try:
            names = sorted(os.listdir(Path("/") / rel))
        except OSError:
            continue
        subdirs = []
        for n in names:
            p = Path("/") / rel / n
            try:
                st = p.lstat()
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(f"{rel}/{n}")
            else:
                yield f"{rel}/{n}", p
        stack.extend(reversed(subdirs))


def build_layers(spec: dict):
    def build(blobdir: Path):
        rng = random.Random(42)
        text = bi.TextSource(pool=(1 << 20) if spec["small"] < 5000 else (4 << 20))
        layers: list[bi.LayerBlob] = []
        meta: dict = {}

        # 1. base: the host's /usr, real metadata, until the byte budget is reached
        base_files: list[str] = []
        base_dirs: dict[str, int] = {}          # dir -> number of entries below it
        with bi.LayerWriter(blobdir, comment="rootfs base from the host's /usr") as w:
            w.tar.dereference = False
            added_dirs: set[str] = set()
            total = 0

            def add_parents(rel: str):
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i])
                    if d not in added_dirs:
                        ti = w.tar.gettarinfo(str(Path("/") / d), arcname=d)
                        w.add(ti)
                        added_dirs.add(d)
                        base_dirs.setdefault(d, 0)

            done = False
            for src in BASE_SOURCES:
                if done:
                    break
                for rel, host in _walk_host(src):
                    try:
                        ti = w.tar.gettarinfo(str(host), arcname=rel)
                    except OSError:
                        continue
                    if ti is None or not (ti.isreg() or ti.isdir() or ti.issym() or ti.islnk()):
                        continue  # sockets, devices: not in a base image
                    add_parents(rel)
                    if ti.isdir():
                        if rel in added_dirs:
                            continue
                        added_dirs.add(rel)
                        base_dirs.setdefault(rel, 0)
                        w.add(ti)
                    elif ti.isreg():
                        if total + ti.size > spec["base_bytes"]:
                            done = True
                            break
                        try:
                            with open(host, "rb") as f:
                                w.add(ti, f)
                        except OSError:
                            continue
                        total += ti.size
                        base_files.append(rel)
                    else:
                        w.add(ti)
                    d = rel.rpartition("/")[0]
                    while d:
                        base_dirs[d] = base_dirs.get(d, 0) + 1
                        d = d.rpartition("/")[0]
        layers.append(w.blob)

        # 2. the big incompressible file
        with bi.LayerWriter(blobdir, comment="a 200 MB incompressible file") as w:
            w.dir("opt")
            w.dir("opt/big")
            w.stream_file(BIG, spec["big"], bi.random_chunks(spec["big"], seed=2024))
        layers.append(w.blob)

        # 3. small files
        per = spec["small_per_dir"]
        ndirs = (spec["small"] + per - 1) // per
        small: list[str] = []
        with bi.LayerWriter(blobdir, comment="20k small files") as w:
            w.dir("srv")
            w.dir("srv/small")
            for d in range(ndirs):
                w.dir(f"srv/small/d{d:03d}")
                for i in range(per):
                    n = d * per + i
                    if n >= spec["small"]:
                        break
                    p = f"srv/small/d{d:03d}/f{n:05d}.txt"
                    w.file(p, text.take(rng.randint(16, 3000)), mode=rng.choice([0o644, 0o644, 0o600, 0o755]))
                    small.append(p)
        layers.append(w.blob)

        # choose directories: one to delete, one to make opaque (both real base dirs with content)
        cands = sorted((d for d, n in base_dirs.items() if 15 <= n <= 400 and d.count("/") >= 3),
                       key=lambda d: (-base_dirs[d], d))
        del_dir = cands[len(cands) // 3] if cands else None
        opq_dir = next((d for d in cands if del_dir is None or not (d == del_dir or d.startswith(del_dir + "/")
                                                                     or del_dir.startswith(d + "/"))), None)

        def under(p: str, d: str | None) -> bool:
            return d is not None and (p == d or p.startswith(d + "/"))

        # 4. whiteouts
        deleted: list[str] = []
        with bi.LayerWriter(blobdir, comment="whiteouts") as w:
            seen_dirs: set[str] = set()

            def parent(p: str):
                d = p.rpartition("/")[0]
                parts = d.split("/")
                for i in range(1, len(parts) + 1):
                    x = "/".join(parts[:i])
                    if x not in seen_dirs:
                        seen_dirs.add(x)
                        w.dir(x)
            if del_dir:
                parent(del_dir)
                w.whiteout(del_dir)
                deleted.append(del_dir)
            for p in base_files[::20]:
                if under(p, del_dir) or under(p, opq_dir):
                    continue
                parent(p)
                w.whiteout(p)
                deleted.append(p)
            sd = f"srv/small/d{min(7, ndirs - 1):03d}"
            for p in small[::50]:
                if under(p, sd):  # no directory entry in the layer that whites the directory out
                    continue
                parent(p)
                w.whiteout(p)
                deleted.append(p)
            parent(sd)
            w.whiteout(sd)
            deleted.append(sd)
        layers.append(w.blob)

        # 5. opaque directories with new content
        opq_small = f"srv/small/d{min(10, ndirs - 1):03d}"
        with bi.LayerWriter(blobdir, comment="opaque directories") as w:
            for d in (opq_dir, opq_small):
                if d is None:
                    continue
                parts = d.split("/")
                for i in range(1, len(parts) + 1):
                    w.dir("/".join(parts[:i]))
                w.opaque(d)
                for i in range(5):
                    w.file(f"{d}/new-{i}.txt", text.take(500 + 100 * i))
        layers.append(w.blob)

        # 6. changes on top
        with bi.LayerWriter(blobdir, comment="changes: overwrites, type changes, /etc") as w:
            w.dir("usr")
            w.dir("usr/sbin", mode=0o750)  # a mode change of a base directory
            done_dirs: set[str] = {"usr", "usr/sbin"}

            def dirs_for(p: str):
                parts = p.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    x = "/".join(parts[:i])
                    if x not in done_dirs:
                        done_dirs.add(x)
                        w.dir(x)
            over = [p for p in base_files[7::37] if not any(under(p, d) for d in deleted) and not under(p, opq_dir)]
            for p in over[:100]:
                dirs_for(p)
                w.file(p, text.take(rng.randint(100, 4000)), mode=0o644)
            # a file replacing a directory, a directory replacing a file
            dir_victim = next((d for d in sorted(base_dirs) if d.count("/") >= 3 and base_dirs[d] >= 3
                               and not any(under(d, x) or under(x, d) for x in deleted + [opq_dir or "-"])
                               and not any(under(p, d) for p in over[:100])), None)
            if dir_victim:
                dirs_for(dir_victim)
                w.file(dir_victim, b"a file now\n")
            file_victim = next((p for p in base_files[3::41] if not any(under(p, d) for d in deleted)
                                and not under(p, opq_dir) and not under(p, dir_victim) and p not in over), None)
            if file_victim:
                dirs_for(file_victim)
                w.dir(file_victim, mode=0o750)
                w.file(file_victim + "/inside.txt", b"a directory now\n")
            w.dir("etc")
            for i in range(50):
                w.file(f"etc/conf-{i:02d}.conf", text.take(rng.randint(50, 2000)), mode=0o640)
            w.hardlink("etc/conf-hardlink.conf", "etc/conf-00.conf")
            w.symlink("etc/python3", "/usr/lib/python3.11")
            w.symlink("etc/big", "../opt/big/blob.bin")
        layers.append(w.blob)
        meta.update(big=BIG, deleted_dir=del_dir, opaque_dir=opq_dir, opaque_small=opq_small,
                    dir_replaced_by_file=dir_victim, file_replaced_by_dir=file_victim,
                    base_files=len(base_files), small_files=len(small), whiteouts=len(deleted))
        return layers, meta
    return build
