"""The open-loop client: sends each planned request at its time, streams it, and records what it saw.

One aiohttp session, an unbounded connection pool, one task per request. The dispatcher sleeps until
each request's scheduled time and starts it whatever earlier requests are doing; closed-loop streams run
``concurrency`` workers. An agent session (``PlannedSession``) is one task that sends its turns one
after another, each with the whole conversation so far (the answers as the server gave them). Times come from ``time.perf_counter``; a request's *lateness* is
how long after its scheduled time it actually went out, which measures the client, not the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loadtests.plan import ClosedStream, Plan, PlannedRequest, PlannedSession
from loadtests.scenario import BoundsSpec

__all__ = ["LiveStats", "RequestRecord", "RunResult", "Target", "run_plan"]

_START_LEAD_S = 0.05
"""The schedule starts this long after setup, so the first requests are not late by construction."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send."""

    base_url: str
    model: str
    endpoint: str
    """``chat`` or ``completions``."""
    api_keys: dict[str, str]
    """Tenant name to bearer key."""
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestRecord:
    """Everything the client measured for one request (seconds; relative to the run's start)."""

    index: int
    tenant: str
    scheduled_s: float | None
    """None for closed-loop requests."""
    sent_s: float
    lateness_s: float | None
    """Actual send time minus scheduled time (open loop only)."""
    prompt_tokens_target: int
    max_tokens: int
    status: int | None = None
    """HTTP status; None when no response arrived."""
    ok: bool = False
    error_code: str | None = None
    """OpenAI error ``code`` (or ``type``), ``http_<status>``, ``timeout``, ``connection_error``, ``cancelled``."""
    error_message: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    """Gaps between consecutive chunks that carried generated text."""
    tpot_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    """From the server's ``usage``."""
    completion_tokens: int | None = None
    """From the server's ``usage``."""
    content_chunks: int = 0
    cached_tokens: int | None = None
    """``usage.prompt_tokens_details.cached_tokens`` when the server reports it (OpenAI's field)."""
    session: int | None = None
    """Agent sessions: the session's number in this run (None for single requests)."""
    agent: str | None = None
    """Agent sessions: ``<tenant>/<agent index>``."""
    turn: int | None = None
    """Agent sessions: the turn, from 1."""


@dataclass(slots=True)
class LiveStats:
    """Counters the live display reads while the run goes."""

    started_at: float = 0.0
    """Loop time of the schedule's start."""
    sent: int = 0
    finished: int = 0
    failed: int = 0
    in_flight: int = 0
    output_tokens: int = 0
    max_lateness_s: float = 0.0
    late_over_10ms: int = 0


@dataclass(slots=True)
class RunResult:
    """The records of one run, ordered by send time, and its measured duration."""

    records: list[RequestRecord]
    duration_s: float
    """From the schedule's start until the last request ended."""
    send_window_s: float
    """How long requests were being sent."""


class _Runner:
    def __init__(self, plan: Plan, target: Target, bounds: BoundsSpec, live: LiveStats) -> None:
        self.plan, self.target, self.bounds, self.live = plan, target, bounds, live
        path = "/v1/chat/completions" if target.endpoint == "chat" else "/v1/completions"
        self.url = target.base_url.rstrip("/") + path
        self.headers = {
            name: {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            for name, key in target.api_keys.items()
        }
        self.records: list[RequestRecord] = []
        self.budget = bounds.max_requests
        self.next_index = 0
        self.next_session = 0
        self.t0 = 0.0
        self.send_deadline = 0.0

    def _body(self, req: PlannedRequest) -> bytes:
        body: dict[str, Any] = {
            "model": self.target.model,
            "max_tokens": req.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "temperature": 0.0,
        }
        if self.target.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        body.update(self.target.extra_body)
        return json.dumps(body).encode()

    def _chat_body(self, messages: list[dict[str, str]], max_tokens: int) -> bytes:
        body: dict[str, Any] = {
            "model": self.target.model,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "temperature": 0.0,
            "messages": messages,
        }
        body.update(self.target.extra_body)
        return json.dumps(body).encode()

    def _take(self) -> int | None:
        if self.budget <= 0:
            return None
        self.budget -= 1
        idx = self.next_index
        self.next_index += 1
        return idx

    async def one(
        self,
        session: aiohttp.ClientSession,
        req: PlannedRequest,
        index: int,
        at: float | None,
        body: bytes | None = None,
        *,
        turn: tuple[int, str, int] | None = None,
        text: list[str] | None = None,
    ) -> RequestRecord:
        """Send one request and record it; ``turn`` is (session, agent, turn) for an agent's turn,
        and ``text`` collects the generated text."""
        body = body if body is not None else self._body(req)
        live = self.live
        start = _now()
        lateness = None if at is None else max(0.0, start - at)
        rec = RequestRecord(
            index, req.tenant, None if at is None else at - self.t0, start - self.t0, lateness,
            req.prompt_tokens_target, req.max_tokens,
        )  # fmt: skip
        if turn is not None:
            rec.session, rec.agent, rec.turn = turn
        live.sent += 1
        live.in_flight += 1
        if lateness is not None:
            live.max_lateness_s = max(live.max_lateness_s, lateness)
            live.late_over_10ms += lateness > 0.010
        try:
            async with asyncio.timeout(self.bounds.request_timeout_s):
                await self._stream(session, req, body, rec, start, text)
        except TimeoutError:
            rec.ok, rec.error_code = False, "timeout"
        except asyncio.CancelledError:
            rec.ok, rec.error_code = False, "cancelled"
            raise
        except (aiohttp.ClientError, OSError) as e:
            rec.ok, rec.error_code, rec.error_message = False, "connection_error", f"{type(e).__name__}: {e}"
        except (ValueError, TypeError, AttributeError, KeyError) as e:  # malformed stream: bad JSON or shape
            rec.ok, rec.error_code, rec.error_message = False, "bad_stream", str(e)[:300]
        finally:
            if rec.e2e_s is None:
                rec.e2e_s = _now() - start
                rec.ok = False
            live.in_flight -= 1
            live.finished += 1
            live.failed += not rec.ok
            live.output_tokens += rec.completion_tokens or 0
            self.records.append(rec)
        return rec

    async def run_session(self, http: aiohttp.ClientSession, ps: PlannedSession, at: float | None) -> None:
        """An agent session: each turn sends the conversation so far plus a new user message; no new
        turn after the send deadline, when the request budget is spent, or after a failed turn."""
        sid = self.next_session
        self.next_session += 1
        messages = [{"role": "system", "content": ps.system_prompt}]
        approx = ps.system_prompt_tokens
        for turn, (user, max_tokens) in enumerate(zip(ps.user_prompts, ps.max_tokens, strict=True), 1):
            if turn > 1:
                if ps.think_time_s > 0:
                    await asyncio.sleep(ps.think_time_s)
                if _now() >= self.send_deadline:
                    return
            index = self._take()
            if index is None:
                return
            messages.append({"role": "user", "content": user})
            approx += len(user.split())
            req = PlannedRequest(ps.tenant, None, "", approx, max_tokens)
            text: list[str] = []
            rec = await self.one(
                http, req, index, at if turn == 1 else None, self._chat_body(messages, max_tokens),
                turn=(sid, ps.agent, turn), text=text,
            )  # fmt: skip
            if not rec.ok:
                return
            messages.append({"role": "assistant", "content": "".join(text)})
            approx += rec.completion_tokens or 0

    async def _stream(
        self,
        session: aiohttp.ClientSession,
        req: PlannedRequest,
        body: bytes,
        rec: RequestRecord,
        start: float,
        text: list[str] | None = None,
    ) -> None:
        chat = self.target.endpoint == "chat"
        async with session.post(self.url, data=body, headers=self.headers[req.tenant]) as resp:
            rec.status = resp.status
            if resp.status != 200:
                raw = await resp.read()
                rec.error_code, rec.error_message = _error_of(resp.status, raw)
                rec.e2e_s = _now() - start
                return
            st = _StreamState(chat, start, rec, text)
            buf = b""
            # Read what the socket has, then split into SSE lines: every event in one read shares its time.
            async for data in resp.content.iter_any():
                now = _now()
                lines = (buf + data).split(b"\n")
                buf = lines.pop()
                if st.feed(lines, now):
                    break
            error = st.error
            end = _now()
            rec.e2e_s = end - start
            if error is not None:
                rec.error_code = str(error.get("code") or error.get("type") or "stream_error")
                rec.error_message = str(error.get("message", ""))[:300]
                return
            out = rec.completion_tokens if rec.completion_tokens is not None else rec.content_chunks
            if rec.ttft_s is not None and out > 1:
                rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (out - 1)
            rec.ok = rec.ttft_s is not None
            if not rec.ok:
                rec.error_code = "empty_stream"

    async def dispatch_open(self, session: aiohttp.ClientSession, tasks: set[asyncio.Task[None]]) -> None:
        for req in self.plan.open_requests:
            assert req.send_at_s is not None
            at = self.t0 + req.send_at_s
            if at >= self.send_deadline:
                break
            if isinstance(req, PlannedSession):
                delay = at - _now()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.budget <= 0:
                    break
                run: Any = self.run_session(session, req, at)
            else:
                body = self._body(req)  # built while waiting, not on the clock
                delay = at - _now()
                if delay > 0:
                    await asyncio.sleep(delay)
                index = self._take()
                if index is None:
                    break
                run = self.one(session, req, index, at, body)
            task = asyncio.create_task(run)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def worker(self, session: aiohttp.ClientSession, stream: ClosedStream) -> None:
        while _now() < self.send_deadline:
            if self.budget <= 0:
                return
            item = next(stream.requests)
            if isinstance(item, PlannedSession):
                await self.run_session(session, item, None)
            else:
                index = self._take()
                if index is None:
                    return
                await self.one(session, item, index, None)
            if stream.think_time_s > 0:
                await asyncio.sleep(stream.think_time_s)

    async def run(self) -> RunResult:
        # Collector pauses of a few ms would show up as send lateness: park setup objects, collect rarely.
        gc.collect()
        gc.freeze()
        threshold = gc.get_threshold()
        gc.set_threshold(100_000, 50, 100)
        try:
            return await self._run()
        finally:
            gc.set_threshold(*threshold)
            gc.unfreeze()

    async def _run(self) -> RunResult:
        tasks: set[asyncio.Task[None]] = set()
        outcomes: list[object] = []
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self.t0 = _now() + _START_LEAD_S
            self.live.started_at = self.t0
            self.send_deadline = self.t0 + self.bounds.duration_s
            senders = [asyncio.create_task(self.dispatch_open(session, tasks))]
            for stream in self.plan.closed_streams:
                senders += [
                    asyncio.create_task(self.worker(session, stream)) for _ in range(stream.concurrency)
                ]
            # Closed-loop workers end by themselves at the deadline; the open dispatcher when its list ends.
            remaining = (
                self.send_deadline - _now() + self.bounds.drain_timeout_s + self.bounds.request_timeout_s
            )
            await asyncio.wait(senders, timeout=max(0.0, remaining))
            send_end = _now()
            pending = set(tasks) | {s for s in senders if not s.done()}
            if pending:
                await asyncio.wait(pending, timeout=self.bounds.drain_timeout_s)
            for t in list(tasks) + senders:
                if not t.done():
                    t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                outcomes = await asyncio.gather(*tasks, *senders, return_exceptions=True)
            end = _now()
        bugs = [o for o in outcomes if isinstance(o, Exception)]
        if bugs:
            raise bugs[0]
        self.records.sort(key=lambda r: (r.sent_s, r.index))
        return RunResult(self.records, end - self.t0, min(send_end, self.send_deadline) - self.t0)


class _StreamState:
    """Parses OpenAI SSE lines into a record's timings and usage."""

    __slots__ = ("chat", "error", "last", "rec", "start", "text")

    def __init__(self, chat: bool, start: float, rec: RequestRecord, text: list[str] | None = None) -> None:
        self.chat, self.start, self.rec = chat, start, rec
        self.text = text
        """When given, the generated text is appended to it."""
        self.last = 0.0
        self.error: dict[str, Any] | None = None

    def feed(self, lines: list[bytes], now: float) -> bool:
        """Consume complete lines received at ``now``; True at ``[DONE]``."""
        rec = self.rec
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return True
            obj = json.loads(data)
            if "error" in obj:
                err = obj["error"]
                self.error = err if isinstance(err, dict) else {"message": str(err)}
                continue
            choices = obj.get("choices")
            if choices:
                c0 = choices[0]
                text = (c0.get("delta") or {}).get("content") if self.chat else c0.get("text")
                if text:
                    if self.text is not None:
                        self.text.append(text)
                    if rec.content_chunks == 0:
                        rec.ttft_s = now - self.start
                    else:
                        rec.itl_s.append(now - self.last)
                    self.last = now
                    rec.content_chunks += 1
            usage = obj.get("usage")
            if usage:
                rec.prompt_tokens = usage.get("prompt_tokens")
                rec.completion_tokens = usage.get("completion_tokens")
                details = usage.get("prompt_tokens_details")
                if isinstance(details, dict) and details.get("cached_tokens") is not None:
                    rec.cached_tokens = int(details["cached_tokens"])
        return False


def _now() -> float:
    """Measurement clock: ``perf_counter`` (uvloop's ``loop.time()`` only ticks in milliseconds)."""
    return time.perf_counter()


def _error_of(status: int, raw: bytes) -> tuple[str, str]:
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict):
            code = err.get("code") or err.get("type") or f"http_{status}"
            return str(code), str(err.get("message", ""))[:300]
    except (ValueError, AttributeError):
        pass
    return f"http_{status}", raw[:300].decode(errors="replace")


async def run_plan(
    plan: Plan, target: Target, bounds: BoundsSpec, live: LiveStats | None = None
) -> RunResult:
    """Send ``plan`` to ``target`` within ``bounds``; returns when every request ended or was cancelled."""
    return await _Runner(plan, target, bounds, live or LiveStats()).run()
