"""A small eStargz image for lazy-mount tests: files that span several chunks, in a store ready to push."""
from __future__ import annotations

import random
from pathlib import Path

from imagebuild import LayerBuilder, build_image

from layerfs.cli.main import main
from layerfs.image import Reference
from layerfs.store import Store

CHUNK = 64 << 10
SRC = "localhost/faults/src:1"
DST = "localhost/faults/src:estargz"
FILES = {f"data/f{i}": random.Random(i).randbytes(n) for i, n in enumerate((100, 5000, CHUNK + 7, 3 * CHUNK + 11,
                                                                             777, 2 * CHUNK))}


def make_estargz_store(root: Path) -> Store:
    """A store at *root* holding SRC (two gzip layers, FILES in the first) and DST, its eStargz conversion
    with CHUNK-sized chunks."""
    st = Store(root).init()
    a = LayerBuilder().add_dir("etc").add_file("etc/motd", b"hello\n").add_dir("data")
    for name, data in FILES.items():
        a.add_file(name, data)
    img = build_image([a.build(), LayerBuilder().add_file("etc/motd", b"hello again\n").build()])
    for d, data in img.blobs.items():
        st.put_blob(data, d)
    st.tag(str(Reference.parse(SRC)), img.manifest_descriptor)
    assert main(["--root", str(root), "convert", "--estargz", "--chunk-size", str(CHUNK), SRC, DST]) == 0
    return st
