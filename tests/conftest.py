"""Shared pytest fixtures: real registries (plain, basic auth, token auth), fault proxies, umoci images.

Helpers and classes live in tests/support (``registryproc``, ``tokenserver``, ``faultproxy``,
``producers``...).  Fixtures that need a program (docker-registry, umoci, skopeo) or an optional
package skip when it is missing — and fail instead when ``CI=true``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultproxy import FaultProxy  # noqa: E402
from mounthelpers import started_mounts  # noqa: E402
from prereqs import on_ci, require_binary  # noqa: E402
from producers import umoci_image  # noqa: E402
from registryproc import BasicAuthRegistry, Registry, RegistryFactory, TokenAuthRegistry, repo_name_for  # noqa: E402

_REGISTRY_FIXTURES = frozenset({"registry", "registry_factory", "registry_basic", "registry_token",
                                "fault_proxy", "fault_proxy_factory"})


def pytest_configure(config: pytest.Config) -> None:
    # pyproject sets a default timeout for pytest-timeout; without the plugin it would silently do nothing.
    if not config.pluginmanager.hasplugin("timeout"):
        if on_ci():
            raise pytest.UsageError("pytest-timeout is required on CI (pip install pytest-timeout)")
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (needs pytest-timeout)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use a registry fixture get the ``registry`` marker (``-m 'not registry'`` skips them)."""
    for item in items:
        if _REGISTRY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.registry)


# --- registries --------------------------------------------------------------

@pytest.fixture(scope="session")
def _registry_session_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryFactory]:
    factory = RegistryFactory(tmp_path_factory.mktemp("registries"))
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def registry(_registry_session_factory: RegistryFactory) -> Registry:
    """A plain-HTTP registry shared by the session (``.host``, ``.url``, ``.stop()``, ``.log_text()``).

    Use distinct repository names per test (see ``unique_repo``); use
    ``registry_factory`` for a registry you want to stop or reconfigure.
    """
    return _registry_session_factory.plain()


@pytest.fixture
def registry_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryFactory]:
    """Fresh registries for one test: ``.plain()``, ``.basic(users=)``, ``.token(**TokenServer kwargs)``,
    ``.proxy(target)``; all stopped after the test."""
    factory = RegistryFactory(tmp_path_factory.mktemp("fresh-registries"))
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def registry_basic(_registry_session_factory: RegistryFactory) -> BasicAuthRegistry:
    """A registry with htpasswd auth; ``.username``, ``.password``, ``.auth`` (tuple), ``.users``."""
    return _registry_session_factory.basic()


@pytest.fixture(scope="session")
def _registry_token_session(_registry_session_factory: RegistryFactory) -> TokenAuthRegistry:
    return _registry_session_factory.token()


@pytest.fixture
def registry_token(_registry_token_session: TokenAuthRegistry) -> TokenAuthRegistry:
    """A registry with bearer-token auth; ``.token_server`` (a ``TokenServer``, settings reset and
    request log cleared for every test), ``.username``, ``.password``, ``.auth``."""
    _registry_token_session.token_server.reset()
    return _registry_token_session


# --- proxies -----------------------------------------------------------------

@pytest.fixture
def fault_proxy(registry: Registry) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` in front of the session ``registry``; stopped after the test."""
    with FaultProxy(registry.host) as proxy:
        yield proxy


@pytest.fixture
def fault_proxy_factory() -> Iterator[object]:
    """``make(target_host_or_registry, **kwargs) -> FaultProxy``; all stopped after the test."""
    proxies: list[FaultProxy] = []

    def make(target: object, **kwargs: object) -> FaultProxy:
        host = target if isinstance(target, str) else target.host  # type: ignore[attr-defined]
        proxy = FaultProxy(host, **kwargs).start()  # type: ignore[arg-type]
        proxies.append(proxy)
        return proxy

    yield make
    for p in proxies:
        p.stop()


# --- images and names --------------------------------------------------------

@pytest.fixture(scope="session")
def umoci_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout built by umoci (tag ``latest``); see ``producers.UMOCI_EXPECTED``.

    Treat it as read-only: it is shared by the session.
    """
    require_binary("umoci")
    return umoci_image(tmp_path_factory.mktemp("umoci"))


@pytest.fixture
def unique_repo(request: pytest.FixtureRequest) -> str:
    """A repository name no other test uses, e.g. ``test/test-push-roundtrip-1a2b3c4d``."""
    return repo_name_for(request.node.name)


@pytest.fixture
def mounts(request: pytest.FixtureRequest) -> Iterator[list]:
    """Mount points to tear down (with their daemon pids) whatever happens; the test module's WATCHDOG
    (seconds) bounds a hung FUSE call."""
    with started_mounts(getattr(request.module, "WATCHDOG", 40.0)) as started:
        yield started


@pytest.fixture
def client_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A docker config of the test's own (no host credentials) and quick retry backoff."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    monkeypatch.setenv("LAYERFS_BACKOFF_BASE", "0.02")
