"""Inside a Serve replica, Tokenweir's loggers write where Serve's replica logger writes."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from serving.logs import route_logs_to_serve


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def loggers() -> Iterator[tuple[logging.Logger, logging.Logger]]:
    ours, serve = logging.getLogger("tokenweir"), logging.getLogger("ray.serve")
    saved = (list(ours.handlers), ours.level, ours.propagate, list(serve.handlers))
    yield ours, serve
    ours.handlers[:], ours.level, ours.propagate = saved[0], saved[1], saved[2]
    serve.handlers[:] = saved[3]


def test_tokenweir_records_reach_serves_replica_handler(
    loggers: tuple[logging.Logger, logging.Logger],
) -> None:
    ours, serve = loggers
    sink = _Collect()
    serve.handlers[:] = [sink]  # what Serve installs in a replica: its log file
    route_logs_to_serve()
    route_logs_to_serve()  # idempotent: no second copy of the handler
    logging.getLogger("tokenweir.gateway").warning("stream %s failed", "r1")
    logging.getLogger("tokenweir.pool").debug("below INFO: dropped")
    assert sink.messages == ["stream r1 failed"]
    assert ours.handlers.count(sink) == 1


def test_outside_serve_nothing_changes(loggers: tuple[logging.Logger, logging.Logger]) -> None:
    ours, serve = loggers
    serve.handlers[:] = []
    before = (list(ours.handlers), ours.level, ours.propagate)
    route_logs_to_serve()
    assert (list(ours.handlers), ours.level, ours.propagate) == before
