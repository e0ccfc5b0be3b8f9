"""The overload and flood tiers share one deployment (``loadtests/overload.py``): one gateway
replica, an overloadable ``sim-a10`` pool and a fast ``sim-h100`` pool, in a namespace of their own
on the session's Ray (a new local one when the tier runs alone)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtests.overload import Fleet, deployed


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with deployed(tmp_path_factory.mktemp("overload")) as f:
        yield f
