"""images, history, inspect, rmi, prune and search: docker's screens, from a real store."""
from __future__ import annotations

import contextlib

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from clirun import run_cli as run
from layerfs.cli.main import main
from imagebuild import LayerBuilder, build_image
from layerfs.store import Store
from registryclient import push_image


@pytest.fixture
def store_root(tmp_path, monkeypatch):
    root = tmp_path / "store"
    monkeypatch.setenv("LAYERFS_ROOT", str(root))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    return root


def layer(name: str, size: int) -> bytes:
    b = LayerBuilder()
    b.add_file(name, b"x" * size)
    return b.build()


HISTORY = [
    {"created": "2020-01-01T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD file:abc in / "},
    {"created": "2020-01-01T00:00:01Z", "created_by": "/bin/sh -c #(nop)  CMD [\"nginx\" \"-g\" \"daemon off;\"]",
     "empty_layer": True},
    {"created": "2020-01-02T00:00:00Z", "created_by": "COPY /app/build /usr/share/nginx/html # buildkit",
     "comment": "buildkit.dockerfile.v0"},
]


@pytest.fixture
def pulled(registry, unique_repo, store_root, capsys):
    img = build_image([layer("a", 100_000), layer("b", 2_000_000)], history=HISTORY,
                      created="2020-01-02T00:00:00Z")
    push_image(registry.host, unique_repo, "v1", img)
    ref = f"{registry.host}/{unique_repo}:v1"
    code, out, err = run(["pull", "-q", ref], capsys)
    assert code == 0, err
    return ref, img


def test_images_table(pulled, capsys):
    ref, img = pulled
    code, out, err = run(["images"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    repo, tag = ref.rsplit(":", 1)
    row = lines[1]
    assert row.startswith(repo + "   ")
    cols = row.split()
    assert cols[1] == "v1"
    assert cols[2] == img.config_descriptor.digest.hex[:12]
    assert cols[-1] == "2.1MB"         # uncompressed: 2 layers of tar around 0.1 MB and 2 MB
    assert "years ago" in row
    # header columns line up with the values (tabwriter)
    assert lines[0].index("TAG") == row.index("v1")
    assert lines[0].index("IMAGE ID") == row.index(cols[2])


def test_images_quiet_digests_json_and_filter(pulled, capsys):
    ref, img = pulled
    code, out, _ = run(["images", "-q"], capsys)
    assert out.split() == [img.config_descriptor.digest.hex[:12]]
    code, out, _ = run(["image", "ls", "--digests"], capsys)
    assert "DIGEST" in out.splitlines()[0] and str(img.manifest_digest) in out
    code, out, _ = run(["images", "--format", "json"], capsys)
    doc = json.loads(out.splitlines()[0])
    assert doc["Tag"] == "v1" and doc["ID"] == img.config_descriptor.digest.hex[:12]
    assert doc["Digest"] == str(img.manifest_digest)
    code, out, _ = run(["images", "nomatch*"], capsys)
    assert len(out.splitlines()) == 1


def test_history(pulled, capsys):
    ref, img = pulled
    code, out, err = run(["history", ref], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["IMAGE", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]
    assert lines[1].startswith(img.config_descriptor.digest.hex[:12])
    assert lines[2].startswith("<missing>") and lines[3].startswith("<missing>")
    assert "COPY /app/build /usr/share/nginx/html # buil…" in lines[1]
    assert "buildkit.dockerfile.v0" in lines[1]
    assert lines[2].split()[-1] == "0B"                  # empty_layer row
    assert "2MB" in lines[1] and "102kB" in lines[3]
    code, out, _ = run(["history", "--no-trunc", ref], capsys)
    assert "COPY /app/build /usr/share/nginx/html # buildkit" in out
    assert str(img.config_descriptor.digest) in out
    code, out, _ = run(["history", "-H=false", ref], capsys)
    assert "2020-01-02T00:00:00Z" in out and "2001920" in out.replace(" ", " ")


def test_inspect(pulled, capsys):
    ref, img = pulled
    code, out, err = run(["inspect", ref], capsys)
    assert code == 0, err
    [doc] = json.loads(out)
    assert doc["Id"] == str(img.config_descriptor.digest)
    assert doc["RepoTags"] == [ref]
    assert doc["RepoDigests"] == [f"{ref.rsplit(':', 1)[0]}@{img.manifest_digest}"]
    assert doc["RootFS"]["Layers"] == [str(d) for d in img.diff_ids]
    assert [l["Digest"] for l in doc["Layers"]] == [str(d.digest) for d in img.layer_descriptors]
    assert [l["UncompressedSize"] for l in doc["Layers"]] == [len(t) for t in img.uncompressed_layers]
    assert all(isinstance(l["IndexSize"], int) and 0 < l["IndexSize"] < 10_000 for l in doc["Layers"])
    assert doc["Manifest"]["MediaType"] == "application/vnd.oci.image.manifest.v1+json"
    code, out, _ = run(["inspect", "-f", "{{.Id}} {{json .RootFS.Type}}", ref], capsys)
    assert out.strip() == f'{img.config_descriptor.digest} "layers"'
    # by short image id too
    code, out, _ = run(["inspect", "-f", "{{.Id}}", img.config_descriptor.digest.hex[:12]], capsys)
    assert out.strip() == str(img.config_descriptor.digest)


def test_inspect_unknown_image(store_root, capsys):
    code, out, err = run(["inspect", "nope:1"], capsys)
    assert code == 1
    assert err.startswith("layerfs: error: no such image: nope:1") and "layerfs pull" in err


def test_rmi_and_prune(registry, pulled, unique_repo, store_root, capsys):
    ref, img = pulled
    st = Store(store_root)
    # a second tag of the same image: rmi of one tag only untags
    other = build_image([layer("c", 10)])
    push_image(registry.host, unique_repo, "other", other)
    code, out, err = run(["pull", "-q", f"{registry.host}/{unique_repo}:other"], capsys)
    assert code == 0, err
    st.tag(ref.replace(":v1", ":alias"), st.find_by_id(img.config_descriptor.digest.hex[:12])[0].descriptor)

    code, out, err = run(["rmi", img.config_descriptor.digest.hex[:12]], capsys)
    assert code == 1 and "referenced in multiple repositories" in err

    code, out, err = run(["rmi", ref], capsys)
    assert code == 0, err
    assert out.strip() == f"Untagged: {ref}"
    assert st.has_blob(img.layer_descriptors[1].digest)

    code, out, err = run(["rmi", ref.replace(":v1", ":alias")], capsys)
    assert code == 0, err
    assert f"Deleted: {img.config_descriptor.digest}" in out
    for d in img.layer_descriptors:
        assert not st.has_blob(d.digest)
    assert st.has_blob(other.layer_descriptors[0].digest)       # other image untouched

    code, out, err = run(["rmi", "nope:1"], capsys)
    assert code == 1 and "no such image" in err

    # prune: blobs nobody references, and abandoned partial downloads
    stray = st.put_blob(b"stray blob")
    (store_root / "ingest" / f"sha256-{'f' * 64}.partial").write_bytes(b"partial")
    code, out, err = run(["prune"], capsys)
    assert code == 0
    assert "Deleted blobs: 2" in out and "Total reclaimed space:" in out
    assert not st.has_blob(stray)
    assert st.has_blob(other.layer_descriptors[0].digest)
    code, out, _ = run(["images", "-q"], capsys)
    assert out.split() == [other.config_descriptor.digest.hex[:12]]


class _SearchHandler(BaseHTTPRequestHandler):
    results = []
    seen = []

    def do_GET(self):
        u = urlsplit(self.path)
        q = parse_qs(u.query)
        self.seen.append((u.path, q))
        if u.path == "/endless/v1/search":       # an answer larger than any search result list
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(64):
                    self.wfile.write(b" " * (64 << 10))
            return
        if u.path != "/v1/search":
            self.send_response(404)
            self.end_headers()
            return
        n = int(q.get("n", ["25"])[0])
        body = json.dumps({"num_results": len(self.results), "query": q.get("q", [""])[0],
                           "results": self.results[:n]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def search_index():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _SearchHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _SearchHandler.results = [
        {"name": "docker/welcome-to-docker", "description": "Docker image for new users getting started with Docker",
         "star_count": 20, "is_official": False, "is_automated": False},
        {"name": "nginx", "description": "Official build of Nginx.", "star_count": 20000, "is_official": True},
        {"name": "weird", "description": None, "star_count": "x"},
        "not an object",
    ]
    _SearchHandler.seen = []
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_search(search_index, store_root, capsys):
    code, out, err = run(["search", "--index", search_index, "docker"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "DESCRIPTION", "STARS", "OFFICIAL"]
    assert lines[1].startswith("docker/welcome-to-docker   Docker image for new users getting started w…   20")
    assert lines[2].rstrip().endswith("[OK]")
    assert lines[3].split() == ["weird", "0"]
    assert _SearchHandler.seen[-1][1] == {"q": ["docker"], "n": ["25"]}

    code, out, _ = run(["search", "--index", search_index, "--limit", "1", "--no-trunc", "docker"], capsys)
    assert "getting started with Docker" in out and len(out.splitlines()) == 2
    code, out, _ = run(["search", "--index", search_index, "-f", "is-official=true", "docker"], capsys)
    assert [l.split()[0] for l in out.splitlines()[1:]] == ["nginx"]
    code, out, _ = run(["search", "--index", search_index, "-f", "stars=100", "docker"], capsys)
    assert [l.split()[0] for l in out.splitlines()[1:]] == ["nginx"]
    code, out, err = run(["search", "--index", search_index, "--limit", "0", "docker"], capsys)
    assert code == 2 and "out of range" in err


def test_search_errors(search_index, store_root, capsys, monkeypatch):
    monkeypatch.setenv("LAYERFS_SEARCH_INDEX", search_index + "/nothere")
    code, out, err = run(["search", "x"], capsys)
    assert code == 1 and "search failed: HTTP 404" in err and err.count("\n") == 1
    from localnet import free_port
    code, out, err = run(["search", "--index", f"http://127.0.0.1:{free_port()}", "x"], capsys)
    assert code == 1 and "cannot reach" in err
    code, out, err = run(["search", "--index", search_index + "/endless", "x"], capsys)
    assert code == 1 and "the answer is too large" in err and err.count("\n") == 1, err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["pull"])
    assert ei.value.code == 2
    assert main([]) == 2
