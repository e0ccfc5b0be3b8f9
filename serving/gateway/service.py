"""The gateway's request path, independent of the HTTP framework: validate, tokenize, check length,
meter, dispatch to a pool, relay the stream, settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import ValidationError

from models.catalog import ModelEntry
from serving.admission import AdmissionRefused
from serving.api.protocol import ChatCompletionRequest, CompletionRequest, request_error
from serving.api.render import DONE_EVENT, Renderer, sse_event
from serving.engines.base import EngineChunk, SamplingSpec, TokenLogprob
from serving.errors import InvalidRequestError, NotFoundError
from serving.gateway.dispatch import map_dispatch_error, open_stream
from serving.gateway.pool_directory import PoolDirectory, PoolRef
from serving.gateway.request import Outcome, Prepared, new_request_id
from serving.gateway.tokenization import PromptTokenizer
from serving.gateway.transport import TokenStream
from serving.kvcache import organization_cache_salt
from serving.metering import Meter, TokenBudget
from serving.metrics import GatewayStats

log = logging.getLogger("tokenweir.gateway")


class GatewayService:
    """One gateway replica's request logic."""

    def __init__(
        self,
        entries: dict[str, ModelEntry],
        tokenizers: dict[str, PromptTokenizer],
        pools: PoolDirectory,
        first_token_timeout_s: float,
        meter: Meter | None = None,
        request_timeout_s: float = 600.0,
        prefix_cache_scope: Literal["fleet", "organization"] = "fleet",
    ) -> None:
        self.entries = entries
        self.tokenizers = tokenizers
        self.pools = pools
        self.first_token_timeout_s = first_token_timeout_s
        self.meter: Meter = meter or Meter(None, enabled=False)
        self.stats = GatewayStats()
        self.request_timeout_s = request_timeout_s
        self.prefix_cache_scope = prefix_cache_scope
        """``organization``: each organization's prompts carry its own ``cache_salt``, so no cached
        prefix is shared across organizations (in the engines, and in the router's index)."""
        self._settling: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- preparation
    def prepare(
        self, kind: Literal["chat", "completion"], body: Any, client_request_id: str | None = None
    ) -> Prepared:
        """Validate and tokenize; raise :class:`APIError` on bad input. The request gets a new
        internal id; ``client_request_id`` (the caller's ``x-request-id``) is kept for the logs."""
        if not isinstance(body, dict):
            raise InvalidRequestError("request body must be a JSON object")
        model_name = body.get("model")
        try:
            req: ChatCompletionRequest | CompletionRequest
            req = (
                ChatCompletionRequest.model_validate(body)
                if kind == "chat"
                else CompletionRequest.model_validate(body)
            )
        except ValidationError as e:
            message, param = request_error(e)
            raise InvalidRequestError(message, param=param) from e
        entry = self.entries.get(req.model)
        if entry is None or not self.pools.serves(req.model):
            raise NotFoundError(
                f"The model `{model_name}` does not exist.", param="model", code="model_not_found"
            )
        tok = self.tokenizers[req.model]
        if isinstance(req, ChatCompletionRequest):
            try:
                k = req.logprobs_k()
            except ValueError as e:
                raise InvalidRequestError(str(e), param="top_logprobs") from e
            ids = tok.chat(req.messages)
        else:
            k = req.logprobs_k()
            if isinstance(req.prompt, list):
                ids = [int(t) for t in req.prompt]
                bad = [t for t in ids if not 0 <= t < tok.vocab_size]
                if bad:
                    raise InvalidRequestError(
                        f"prompt token id {bad[0]} is outside the vocabulary", param="prompt"
                    )
            else:
                ids = tok.text(req.prompt)
        budget = TokenBudget.for_request(
            len(ids),
            entry.max_model_len,
            req.requested_max_tokens(),
            req.n,
            req.min_tokens,
            prompt_param="messages" if kind == "chat" else "prompt",
        )
        sampling = SamplingSpec(
            max_tokens=budget.max_tokens_per_choice,
            temperature=req.temperature,
            top_p=req.top_p,
            n=req.n,
            stop=req.stop_list(),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logprobs=k,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
        )
        return Prepared(
            request_id=new_request_id(),
            client_request_id=client_request_id,
            kind=kind,
            entry=entry,
            prompt_ids=ids,
            sampling=sampling,
            stream=req.stream,
            include_usage=req.include_usage(),
            user=req.user,
            budget=budget,
        )

    async def authorize(self, p: Prepared, api_key: str) -> None:
        """Reserve credits and rate limits for a prepared request (raises the refusal's APIError).

        The engine's ``max_tokens`` becomes each choice's share of what the reservation grants
        (:class:`TokenBudget` decides both).
        """
        budget = p.budget
        res = await self.meter.authorize(
            api_key,
            p.entry.name,
            budget.prompt_tokens,
            budget.requested_tokens,
            p.request_id,
            model_max_len=budget.reservation_max_len,
        )
        p.reservation = res
        if self.meter.enabled:
            p.extra_headers.update(res.headers)
            if self.prefix_cache_scope == "organization":
                p.cache_salt = organization_cache_salt(res.tenant_id)
        try:
            per_choice = budget.per_choice(res.max_tokens)
        except InvalidRequestError:
            await self.meter.settle(res, 0, 0, "error", "", "")
            raise
        if per_choice != p.sampling.max_tokens:
            p.sampling = dataclasses.replace(
                p.sampling, max_tokens=per_choice, min_tokens=min(p.sampling.min_tokens, per_choice)
            )

    # ----------------------------------------------------------------- dispatch
    async def _open(self, p: Prepared, outcome: Outcome) -> tuple[PoolRef, TokenStream, list[EngineChunk]]:
        request = p.engine_request()
        return await open_stream(self.pools, self.first_token_timeout_s, request, p, outcome)

    async def _open_or_settle(
        self, p: Prepared, outcome: Outcome
    ) -> tuple[PoolRef, TokenStream, list[EngineChunk]]:
        """``_open``, releasing the reservation when nothing was produced.

        A failure before the first token (a refusal by the pool's admission, a replica lost twice,
        no first token in time, the client gone) charges nothing: the client got no token, so the
        settlement carries no prompt tokens either, and the ledger treats it as a release (it joins
        the next group commit instead of having one of its own, :class:`LedgerCore`). The release
        is not awaited: the refusal is answered at once; if this gateway died first, its lease
        resolves the reservation the same way (released, nothing charged)."""
        try:
            return await self._open(p, outcome)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                outcome.status = "disconnected"
            elif isinstance(e, AdmissionRefused):
                outcome.status = "refused"
            else:
                outcome.status = "engine_error"
            outcome.prompt_tokens = outcome.completion_tokens = outcome.cached_tokens = 0
            self._settle_soon(p, outcome)
            raise

    async def stream(self, p: Prepared) -> tuple[AsyncIterator[bytes], Outcome]:
        """Open the stream (errors before the first token raise) and return the SSE body iterator."""
        outcome = p.outcome = Outcome(prompt_tokens=len(p.prompt_ids))
        pool, chunks, first = await self._open_or_settle(p, outcome)
        renderer = Renderer(p.kind, p.request_id, p.entry.name, p.include_usage)
        return self._relay(p, pool, chunks, first, renderer, outcome), outcome

    async def _relay(
        self,
        p: Prepared,
        pool: PoolRef,
        chunks: TokenStream,
        first: list[EngineChunk],
        renderer: Renderer,
        outcome: Outcome,
    ) -> AsyncIterator[bytes]:
        batch = first
        finished = False
        settled: asyncio.Future[None] | None = None
        deadline = asyncio.get_running_loop().time() + self.request_timeout_s
        try:
            while True:
                events = b""
                for chunk in batch:
                    outcome.completion_tokens = chunk.completion_tokens
                    outcome.prompt_tokens = chunk.prompt_tokens
                    outcome.cached_tokens = chunk.cached_tokens
                    events += renderer.stream_events(chunk.deltas)
                    if chunk.finished:
                        finished = True
                        if p.include_usage:
                            events += renderer.usage_event(
                                chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens
                            )
                        settled = self._settle_soon(p, outcome)  # not after the client has read it
                        yield events + DONE_EVENT
                        return
                self.meter.note_progress(p.request_id, outcome.completion_tokens)
                if events:
                    yield events
                batch = await chunks.next_batch(deadline)
        except (asyncio.CancelledError, GeneratorExit):
            outcome.status = "disconnected"
            raise
        except Exception as e:
            outcome.status = "engine_error"
            err = map_dispatch_error(e, self.first_token_timeout_s)
            outcome.error = err.code
            log.warning(
                "stream %s (x-request-id %s) failed after %d tokens: %s",
                p.request_id,
                p.client_request_id,
                outcome.completion_tokens,
                e,
            )
            yield sse_event(err.body()) + DONE_EVENT
        finally:
            pool.in_flight -= 1
            chunks.close()
            if not finished and outcome.status == "ok":
                outcome.status = "disconnected"
            await self._settle_shielded(p, outcome, settled)

    async def complete(self, p: Prepared) -> dict[str, Any]:
        """Run a non-streamed request to the end and build its body."""
        outcome = p.outcome = Outcome(prompt_tokens=len(p.prompt_ids))
        finished = False
        texts: dict[int, list[str]] = {i: [] for i in range(p.sampling.n)}
        finish: dict[int, str | None] = {}
        lps: dict[int, list[TokenLogprob]] | None = (
            {i: [] for i in range(p.sampling.n)} if p.sampling.logprobs is not None else None
        )
        pool, chunks, batch = await self._open_or_settle(p, outcome)
        deadline = asyncio.get_running_loop().time() + self.request_timeout_s
        try:
            while not finished:
                for chunk in batch:
                    for d in chunk.deltas:
                        texts.setdefault(d.index, []).append(d.text)
                        if d.finish_reason is not None:
                            finish[d.index] = d.finish_reason
                        if lps is not None and d.logprobs:
                            lps.setdefault(d.index, []).extend(d.logprobs)
                    outcome.prompt_tokens = chunk.prompt_tokens
                    outcome.cached_tokens = chunk.cached_tokens
                    outcome.completion_tokens = chunk.completion_tokens
                    finished = chunk.finished
                if not finished:
                    self.meter.note_progress(p.request_id, outcome.completion_tokens)
                    batch = await chunks.next_batch(deadline)
        except (asyncio.CancelledError, GeneratorExit):
            outcome.status = "disconnected"
            raise
        except Exception as e:
            outcome.status = "engine_error"
            raise map_dispatch_error(e, self.first_token_timeout_s) from e
        finally:
            pool.in_flight -= 1
            chunks.close()
            await self._settle_shielded(p, outcome)
        renderer = Renderer(p.kind, p.request_id, p.entry.name, False)
        return renderer.final_body(
            {i: "".join(t) for i, t in texts.items()},
            finish,
            lps,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.cached_tokens,
        )

    def _settle_soon(self, p: Prepared, outcome: Outcome) -> asyncio.Future[None]:
        """Start settling now, in a task of its own (no cancellation of the caller reaches it)."""
        task = asyncio.ensure_future(self._settle(p, outcome))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _settle_shielded(
        self, p: Prepared, outcome: Outcome, started: asyncio.Future[None] | None = None
    ) -> None:
        """Settle even while this task is being cancelled (a dropped client must still be charged);
        ``started``: the settlement already begun by :meth:`_settle_soon`."""
        task = started if started is not None else self._settle_soon(p, outcome)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    async def _settle(self, p: Prepared, outcome: Outcome) -> None:
        self.stats.count(
            p.entry.name, outcome.pool, outcome.status, outcome.completion_tokens, outcome.ttft_s
        )
        if p.reservation is None or not self.meter.enabled:
            return
        try:
            settled = await self.meter.settle(
                p.reservation,
                outcome.prompt_tokens,
                outcome.completion_tokens,
                _SETTLE_OUTCOME.get(outcome.status, "error"),
                outcome.pool,
                outcome.accelerator,
                cached_tokens=outcome.cached_tokens,
            )
            p.charged_ucredits = settled.charged_ucredits
        except Exception:  # never break the response path; the ledger's crash rule resolves it
            log.exception("settling %s failed", p.request_id)


_SETTLE_OUTCOME = {
    "ok": "completed",
    "engine_error": "error",
    "disconnected": "aborted",
    "refused": "refused",
}
