"""Fixtures shared by the registry-facing test modules."""
import pytest
from lazyimages import make_estargz_store


@pytest.fixture(scope="module")
def estargz_store(tmp_path_factory):
    """A store holding an eStargz image (lazyimages.DST, converted with a small chunk size) to push."""
    return make_estargz_store(tmp_path_factory.mktemp("lazy-faults") / "store")
