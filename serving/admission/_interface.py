"""The contract of a replica's admission core (in the shape of vLLM's scheduler interface).

All methods are synchronous, do no I/O and take the caller's clock as ``now`` (seconds, monotonic).
The caller (the async shell) feeds events in and acts on what comes out:

1. ``submit`` a request. ``Admitted``: start it now. ``Queued``: wait until ``release`` returns its id
   or ``expire`` refuses it. ``Refused``: answer the client at once (429/503 + Retry-After).
2. After any event that may free capacity (a finish, a cancel, a submit that queued) call ``release``
   and start every id it returns. The core counts them as in flight from then on. Where
   ``releases_on_tokens`` is true, tokens may free capacity too (a core sharing its batch by
   served tokens releases as the others catch up): call ``release`` after ``on_tokens`` as well.
3. Feed measurements of every started request: ``on_first_token`` (optional if ``on_tokens`` comes
   with the first token), ``on_tokens`` per chunk, and exactly one ``on_finish`` (also on error or
   abort, with the tokens actually produced).
4. Call ``expire`` at ``next_deadline()`` and after each ``submit``: it returns the queued requests
   refused since the last call (deadline missed, or displaced from a full queue).
5. ``cancel`` a queued request whose client went away (a started one ends with ``on_finish``).
"""

from __future__ import annotations

import abc

from serving.admission._types import AdmissionStats, Decision, LoadSnapshot, Refused


class AdmissionPolicy(abc.ABC):
    """Fair queueing (by organization, then project), an in-flight limit and back-pressure for one
    engine."""

    @abc.abstractmethod
    def submit(
        self,
        req_id: str,
        tenant_id: str,
        weight: float,
        prompt_tokens: int,
        max_tokens: int,
        now: float,
        project_id: str | None = None,
        project_weight: float = 1.0,
    ) -> Decision:
        """Admit, queue or refuse a new request. ``req_id`` must be unique among live requests.

        ``tenant_id``/``weight`` are the organization and its weight, ``project_id``/
        ``project_weight`` the project within it and its weight there (None: the organization's
        one implicit project; fair order is then flat over organizations)."""

    @property
    def releases_on_tokens(self) -> bool:
        """Whether ``on_tokens`` may let queued requests start (then call ``release`` after it)."""
        return False

    @abc.abstractmethod
    def release(self, now: float) -> list[str]:
        """Queued requests that may start now, in fair order; they count as in flight."""

    @abc.abstractmethod
    def on_first_token(self, req_id: str, now: float) -> None:
        """The request's first output token was produced at ``now``."""

    @abc.abstractmethod
    def on_tokens(self, req_id: str, n: int, now: float) -> None:
        """``n`` more output tokens were produced (counting the first)."""

    @abc.abstractmethod
    def on_finish(self, req_id: str, prompt_tokens: int, completion_tokens: int, now: float) -> None:
        """The request ended (finished, failed or aborted) with these exact usage counts."""

    @abc.abstractmethod
    def cancel(self, req_id: str, now: float) -> bool:
        """Drop a queued request; False if it is not queued."""

    @abc.abstractmethod
    def expire(self, now: float) -> list[tuple[str, Refused]]:
        """Queued requests refused since the last call (deadline passed or displaced)."""

    @abc.abstractmethod
    def next_deadline(self) -> float | None:
        """The earliest queue deadline (or, sharing the batch, an earlier time a held request may
        start at), or None if nothing is queued."""

    @abc.abstractmethod
    def snapshot(self, now: float) -> LoadSnapshot:
        """The load as routing sees it."""

    @abc.abstractmethod
    def stats(self) -> AdmissionStats:
        """Numbers for the metrics exporter."""
