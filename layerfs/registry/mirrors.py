"""Registry mirrors and pull-through caches, configured as in containers' ``registries.conf``.

The configuration is the first of ``$LAYERFS_CONFIG`` (a path; empty: none),
``$XDG_CONFIG_HOME/layerfs/config.toml`` (``~/.config`` when unset) and
``/etc/layerfs/config.toml``, in the ``registries.conf`` (v2) form, so the
same mirror list can serve podman and layerfs::

    [[registry]]
    location = "docker.io"            # a registry, or a registry/namespace prefix
    [[registry.mirror]]
    location = "mirror.example:5000"  # tried first ...
    [[registry.mirror]]
    location = "10.0.0.7:5000/hub"    # ... then this one (with a namespace of its own) ...
    insecure = true                   # (HTTPS without verification, or plain HTTP)
                                      # ... then docker.io itself

``prefix`` may stand for ``location`` as in ``registries.conf``; the entry
whose prefix matches most of ``registry/repository`` applies, and the mirror's
location replaces that prefix. ``LAYERFS_MIRRORS="PREFIX=MIRROR[,MIRROR...]
[;PREFIX=...]"`` adds entries that take precedence over the file's.

:class:`MirroredClient` stands for the upstream registry's client: each read
(manifest, blob, range, referrers) goes to the mirrors in order and then to
the upstream, on to the next on any failure (logged). A mirror that
answers a Range request with the whole blob (a pull-through cache on a miss)
is not read further for that blob: the range comes from the next one, and
that mirror is tried again for the blob after :data:`RANGE_RETRY` seconds (by
then it has it cached). An unreachable mirror is skipped for :data:`DOWN_FOR`
seconds. Mirror clients do not retry (the next candidate is the retry).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from layerfs.errors import LayerfsError, RangeNotHonoured, RegistryUnreachable, UsageError

log = logging.getLogger(__name__)

__all__ = ["Mirror", "MirrorRule", "MirrorConfig", "MirroredClient", "load_mirrors", "parse_mirrors",
           "config_paths"]

#: seconds a mirror that answered a range with the whole blob is not asked for ranges of that blob
RANGE_RETRY = 300.0
#: seconds an unreachable mirror is skipped
DOWN_FOR = 30.0


@dataclass(frozen=True)
class Mirror:
    location: str               # host[:port][/namespace]
    insecure: bool = False

    @property
    def host(self) -> str:
        return self.location.partition("/")[0]

    @property
    def namespace(self) -> str:
        return self.location.partition("/")[2]


@dataclass(frozen=True)
class MirrorRule:
    prefix: str                 # registry[/namespace]
    mirrors: tuple[Mirror, ...]

    @property
    def registry(self) -> str:
        return self.prefix.partition("/")[0]


@dataclass(frozen=True)
class MirrorConfig:
    rules: tuple[MirrorRule, ...]
    source: str = ""

    def registries(self) -> set[str]:
        return {r.registry for r in self.rules if r.mirrors}

    def mirrors_for(self, registry: str, repository: str) -> list[tuple[Mirror, str]]:
        """(mirror, repository on that mirror) for ``registry/repository``, in the order to try them."""
        name = f"{registry}/{repository}"
        best = None
        for rule in self.rules:
            p = rule.prefix
            if (name == p or name.startswith(p + "/")) and (best is None or len(p) > len(best.prefix)):
                best = rule
        if best is None:
            return []
        rest = name[len(best.prefix):].lstrip("/")
        out = [(m, "/".join(x for x in (m.namespace, rest) if x)) for m in best.mirrors]
        return [(m, repo) for m, repo in out if repo]


def _location(value: object, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or "://" in value or " " in value.strip():
        raise UsageError(f"{where}: {what} must be a registry location like host[:port][/namespace], "
                         f"not {value!r}", hint="see containers-registries.conf(5)")
    return value.strip().rstrip("/")


def parse_mirrors(doc: Mapping, where: str) -> MirrorConfig:
    """The mirror rules of a parsed ``registries.conf``-style document."""
    regs = doc.get("registry", [])
    if not isinstance(regs, list):
        raise UsageError(f"{where}: [[registry]] must be an array of tables", hint="write [[registry]]")
    rules = []
    for i, r in enumerate(regs):
        if not isinstance(r, dict):
            raise UsageError(f"{where}: registry #{i + 1} is not a table")
        prefix = _location(r.get("prefix") or r.get("location"), f"registry #{i + 1} location", where)
        mirrors = []
        ms = r.get("mirror", [])
        if not isinstance(ms, list):
            raise UsageError(f"{where}: registry {prefix}: [[registry.mirror]] must be an array of tables")
        for m in ms:
            if not isinstance(m, dict):
                raise UsageError(f"{where}: registry {prefix}: a mirror is not a table")
            insecure = m.get("insecure", False)
            if not isinstance(insecure, bool):
                raise UsageError(f"{where}: registry {prefix}: mirror insecure must be true or false")
            mirrors.append(Mirror(_location(m.get("location"), f"a mirror of {prefix}", where), insecure))
        rules.append(MirrorRule(prefix, tuple(mirrors)))
    return MirrorConfig(tuple(rules), where)


def _env_rules(text: str) -> list[MirrorRule]:
    rules = []
    for part in text.split(";"):
        if not part.strip():
            continue
        prefix, eq, mirrors = part.partition("=")
        if not eq:
            raise UsageError(f"LAYERFS_MIRRORS: {part.strip()!r} is not PREFIX=MIRROR[,MIRROR...]",
                             hint='e.g. LAYERFS_MIRRORS="docker.io=mirror.example:5000"')
        ms = tuple(Mirror(_location(m, "a mirror", "LAYERFS_MIRRORS")) for m in mirrors.split(",") if m.strip())
        rules.append(MirrorRule(_location(prefix, "a prefix", "LAYERFS_MIRRORS"), ms))
    return rules


def config_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if env is None else env
    if "LAYERFS_CONFIG" in env:
        return [Path(env["LAYERFS_CONFIG"])] if env["LAYERFS_CONFIG"] else []
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
    return [Path(xdg) / "layerfs" / "config.toml", Path("/etc/layerfs/config.toml")]


def load_mirrors(env: Mapping[str, str] | None = None) -> MirrorConfig | None:
    """The mirror configuration (see the module docs), or None when there is none."""
    env = os.environ if env is None else env
    config = None
    for path in config_paths(env):
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if "LAYERFS_CONFIG" in env:
                raise UsageError(f"LAYERFS_CONFIG={path}: no such file") from None
            continue
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: not valid TOML: {e}", hint="see containers-registries.conf(5)") from None
        config = parse_mirrors(doc, str(path))
        break
    extra = _env_rules(env.get("LAYERFS_MIRRORS", ""))
    if extra:
        rules = tuple(extra) + (config.rules if config else ())
        config = MirrorConfig(rules, "LAYERFS_MIRRORS" + (f" and {config.source}" if config else ""))
    if config is not None and not config.registries():
        return None
    return config


class MirroredClient:
    """The client of a registry with mirrors (see the module docs); other methods are the upstream's."""

    def __init__(self, upstream, config: MirrorConfig, mirror_client: Callable[[Mirror], object]):
        self.upstream = upstream
        self.registry = upstream.registry
        self.config = config
        self._mirror_client = mirror_client
        self._lock = threading.Lock()
        self._no_range: dict[tuple[str, str], float] = {}
        self._down: dict[str, float] = {}

    def __getattr__(self, name: str):
        return getattr(self.upstream, name)

    def _candidates(self, repository: str) -> list[tuple[Mirror | None, str]]:
        now = time.monotonic()
        out: list[tuple[Mirror | None, str]] = []
        for m, repo in self.config.mirrors_for(self.registry, repository):
            with self._lock:
                if self._down.get(m.location, 0) > now:
                    continue
            out.append((m, repo))
        return out + [(None, repository)]

    def _each(self, repository: str, what: str, call: Callable, *, skip: Callable[[Mirror], bool] | None = None):
        """``call(client, repository, mirror)`` on each mirror in turn (those *skip* names skipped), then on
        the upstream (``mirror`` None): the first answer. A mirror that fails (or raises :class:`_Next`)
        passes to the next source; the upstream's errors are the caller's."""
        cands = self._candidates(repository)
        for i, (m, repo) in enumerate(cands):
            if m is None:
                return call(self.upstream, repo, None)
            if skip is not None and skip(m):
                continue
            try:
                return call(self._mirror_client(m), repo, m)
            except _Next:
                continue
            except LayerfsError as e:
                self._failed(m, e)
                log.info("mirror %s: %s: %s; trying %s", m.location, what, e.one_line(),
                         "the next mirror" if cands[i + 1][0] is not None else f"the upstream {self.registry}")
        raise AssertionError("unreachable")   # the upstream is always the last candidate

    def _failed(self, m: Mirror, e: LayerfsError) -> None:
        if isinstance(e, RegistryUnreachable):
            with self._lock:
                self._down[m.location] = time.monotonic() + DOWN_FOR

    def get_manifest(self, repository: str, identifier: str):
        return self._each(repository, f"manifest {identifier}",
                          lambda c, repo, _m: c.get_manifest(repo, identifier))

    def get_blob_bytes(self, repository: str, desc, *args, **kw):
        return self._each(repository, f"blob {desc.digest.short}",
                          lambda c, repo, _m: c.get_blob_bytes(repo, desc, *args, **kw))

    def open_blob(self, repository: str, desc, *args, **kw):
        return self._each(repository, f"blob {desc.digest.short}",
                          lambda c, repo, _m: c.open_blob(repo, desc, *args, **kw))

    def get_referrers(self, repository: str, digest, *args, **kw):
        return self._each(repository, f"referrers of {digest.short}",
                          lambda c, repo, _m: c.get_referrers(repo, digest, *args, **kw))

    def read_range(self, repository: str, desc, start: int, end: int, **kw):
        key = str(desc.digest)

        def no_range(m: Mirror) -> bool:
            with self._lock:
                return self._no_range.get((m.location, key), 0) > time.monotonic()

        def call(c, repo, m):
            if m is None:
                return c.read_range(repo, desc, start, end, **kw)
            try:
                return c.read_range(repo, desc, start, end, **{**kw, "require_partial": True})
            except RangeNotHonoured as e:
                with self._lock:
                    self._no_range[(m.location, key)] = time.monotonic() + RANGE_RETRY
                log.warning("mirror %s does not serve ranges of blob %s (yet): reading them from the next "
                            "source", m.location, desc.digest.short)
                raise _Next(e) from None

        return self._each(repository, f"blob {desc.digest.short}", call, skip=no_range)


class _Next(Exception):
    def __init__(self, error: LayerfsError):
        super().__init__(str(error))
        self.error = error
