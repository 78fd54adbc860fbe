"""WWW-Authenticate parsing and docker config.json credentials (incl. credential helpers)."""
import base64
import json
import os
import stat

import pytest

from layerfs.registry import CredentialStore, Credentials, Token, parse_www_authenticate
from layerfs.errors import CredentialsError


def test_bearer_challenge():
    [c] = parse_www_authenticate('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                                 'scope="repository:library/alpine:pull"')
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.params["service"] == "registry.docker.io"
    assert c.params["scope"] == "repository:library/alpine:pull"


def test_basic_and_multiple_challenges():
    cs = parse_www_authenticate('Basic realm="Registry Realm", Bearer realm="http://x/t",service="s"')
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[0].realm == "Registry Realm"
    assert cs[1].params == {"realm": "http://x/t", "service": "s"}


def test_quoted_escapes_and_unquoted_values():
    [c] = parse_www_authenticate('Bearer realm=http://x/t, error="invalid_token", error_description="a \\"b\\""')
    assert c.realm == "http://x/t"
    assert c.params["error_description"] == 'a "b"'


def test_tokens_are_renewed_shortly_before_they_expire():
    t = Token.lasting("a", 300, now=1000.0)            # the usual: 5 s early
    assert t.valid(1294.9) and not t.valid(1295.0)
    short = Token.lasting("b", 3, now=1000.0)          # a short-lived token is still used: 0.3 s early
    assert short.valid(1000.0) and short.valid(1002.6) and not short.valid(1002.7)


def test_empty_header():
    assert parse_www_authenticate(None) == []
    assert parse_www_authenticate("") == []


def write_config(tmp_path, doc):
    (tmp_path / "config.json").write_text(json.dumps(doc))
    return CredentialStore(tmp_path)


def test_config_auths_base64_and_hub_keys(tmp_path):
    auth = base64.b64encode(b"alice:s3cret:with:colons").decode()
    store = write_config(tmp_path, {"auths": {"https://index.docker.io/v1/": {"auth": auth},
                                              "127.0.0.1:5000": {"username": "bob", "password": "pw"},
                                              "https://ghcr.io": {"identitytoken": "refresh"}}})
    c = store.get("docker.io")
    assert c.basic == ("alice", "s3cret:with:colons")
    assert store.get("127.0.0.1:5000").basic == ("bob", "pw")
    assert store.get("ghcr.io").identity_token == "refresh"
    assert store.get("quay.io") is None


def test_bad_base64_is_a_clear_error(tmp_path):
    store = write_config(tmp_path, {"auths": {"r.example": {"auth": "!!!notbase64"}}})
    with pytest.raises(CredentialsError) as ei:
        store.get("r.example")
    assert "layerfs login" in str(ei.value)


def test_malformed_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(CredentialsError):
        CredentialStore(tmp_path).get("x.io")


def test_store_and_erase_roundtrip(tmp_path):
    store = CredentialStore(tmp_path)
    store.store("127.0.0.1:5000", Credentials("u", "p"))
    assert stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode) == 0o600
    assert store.get("127.0.0.1:5000").basic == ("u", "p")
    assert store.erase("127.0.0.1:5000")
    assert store.get("127.0.0.1:5000") is None
    assert not store.erase("127.0.0.1:5000")


@pytest.fixture
def fake_helper(tmp_path, monkeypatch):
    """A docker-credential-fake program that keeps its secrets in a JSON file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    db = tmp_path / "helper-db.json"
    db.write_text(json.dumps({"127.0.0.1:5000": {"Username": "helperuser", "Secret": "helperpw"}}))
    prog = bindir / "docker-credential-fake"
    prog.write_text(f"""#!/usr/bin/env python3
import json, sys
db = json.load(open({str(db)!r}))
cmd = sys.argv[1]
if cmd == "get":
    server = sys.stdin.read().strip()
    if server not in db:
        print("credentials not found in native keychain"); sys.exit(1)
    print(json.dumps(dict(ServerURL=server, **db[server])))
elif cmd == "store":
    d = json.load(sys.stdin); db[d["ServerURL"]] = dict(Username=d["Username"], Secret=d["Secret"])
    json.dump(db, open({str(db)!r}, "w"))
elif cmd == "erase":
    server = sys.stdin.read().strip(); db.pop(server, None); json.dump(db, open({str(db)!r}, "w"))
""")
    prog.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return db


def test_cred_helpers(tmp_path, fake_helper):
    store = write_config(tmp_path, {"credHelpers": {"127.0.0.1:5000": "fake"}})
    assert store.get("127.0.0.1:5000").basic == ("helperuser", "helperpw")
    assert store.get("other.io") is None   # no helper for it, no auths
    store.store("127.0.0.1:5000", Credentials("new", "pw2"))
    assert json.loads(fake_helper.read_text())["127.0.0.1:5000"]["Username"] == "new"
    assert store.erase("127.0.0.1:5000")
    assert store.get("127.0.0.1:5000") is None


def test_creds_store_default_helper(tmp_path, fake_helper):
    store = write_config(tmp_path, {"credsStore": "fake"})
    assert store.get("127.0.0.1:5000").username == "helperuser"


def test_missing_helper_is_a_clear_error(tmp_path):
    store = write_config(tmp_path, {"credsStore": "doesnotexist"})
    with pytest.raises(CredentialsError) as ei:
        store.get("x.io")
    assert "docker-credential-doesnotexist" in str(ei.value)


def test_helper_name_cannot_inject_paths(tmp_path):
    store = write_config(tmp_path, {"credsStore": "../../bin/sh"})
    with pytest.raises(CredentialsError):
        store.get("x.io")
