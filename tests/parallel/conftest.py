import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pool, cases (run by the pool's processes too)
from pool import Pool  # noqa: E402

_pools: dict = {}


def _pool(world: int) -> Pool:
    p = _pools.get(world)
    if p is None or p.broken:
        p = _pools[world] = Pool(world)
    return p


@pytest.fixture(scope="session")
def pools():
    yield _pool
    for p in _pools.values():
        p.close()
