"""Rerouter and ttadapt.generate: adapt at prefill and every ``interval`` tokens, decode with HF generate.

Decoding is the model's own ``generate`` run in chunks of ``interval`` tokens (so GenerationConfig,
greedy/sampling, logits processors, stopping criteria and streamers behave as usual); between
chunks an adaptation round updates ``delta`` and hands ``generate`` a cache that matches it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from ttadapt.adapt import RoundResult, RoundRunner
from ttadapt.config import RerouteConfig
from ttadapt.handle import PatchHandle, get_handle, patch
from ttadapt.hf_compat import CACHE_KW, output_cache
from ttadapt.layer_skip import expand_rows, repeat_rows
from ttadapt.state import RouterState
from ttadapt.static_decode import StaticDecodeCache, wants_static
from ttadapt.trace import AdaptationTrace, RoundTrace


class _FinishedRows:
    """Logits processor forcing the pad token for rows that ended in an earlier chunk."""

    def __init__(self, finished: torch.Tensor, pad_id: int) -> None:
        self.finished = finished
        self.pad_id = pad_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not bool(self.finished.any()):
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.pad_id] = 0.0
        return torch.where(self.finished[:, None].to(scores.device), forced, scores)


class _RecordStops(StoppingCriteria):
    """The caller's stopping criteria, also marking the rows they stop as finished: a row a stop string
    ended stays padded in later chunks and leaves later rounds, as a row that emitted EOS does."""

    def __init__(self, inner: Any, finished: torch.Tensor) -> None:
        self.inner = StoppingCriteriaList(inner) if isinstance(inner, (list, tuple)) else inner
        self.finished = finished

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.as_tensor(self.inner(input_ids, scores, **kwargs), dtype=torch.bool, device=input_ids.device)
        done = done.expand(input_ids.shape[0])
        self.finished |= done.to(self.finished.device)
        return done


class _ChunkStreamer:
    """Forwards one continuous stream to a user streamer across chunked ``generate`` calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.skip_next_put = False

    def put(self, value: torch.Tensor) -> None:
        if self.skip_next_put:
            self.skip_next_put = False
            return
        self.inner.put(value)

    def end(self) -> None:
        self.skip_next_put = True  # the next chunk starts by re-putting its prompt

    def finish(self) -> None:
        self.inner.end()


class Rerouter:
    """Online rerouting for one model: ``adapt`` a state on a context, or ``generate`` with it.

    The model is patched on first use if it is not already (and unpatched again afterwards when
    ttadapt patched it), so a Rerouter never leaves a model patched by surprise.
    """

    def __init__(self, model: nn.Module, config: RerouteConfig | str | None = None) -> None:
        if isinstance(config, str):
            config = RerouteConfig.preset(config)
        self.model = model
        self.config = config or RerouteConfig.preset("default")
        self._persist: RouterState | None = None

    # ------------------------------------------------------------------ helpers
    def _handle(self) -> tuple[PatchHandle, bool]:
        handle = get_handle(self.model)
        return (handle, False) if handle is not None else (patch(self.model), True)

    def _start_state(self, handle: PatchHandle, rows: int) -> RouterState:
        if not self.config.reset_per_prompt and self._persist is not None:
            base = self._persist
            return base.per_row(rows) if rows > 1 else base.row(0) if base.batch_size else base.clone()
        state = handle.new_state(batch_size=rows if rows > 1 else None)
        cur = handle.state  # keep the user's steering (delta starts from zero)
        with torch.no_grad():
            state.steer.copy_(cur.steer)
            state.force.copy_(cur.force)
        state.refresh()
        return state

    def _remember(self, state: RouterState) -> None:
        if not self.config.reset_per_prompt:
            self._persist = state.clone() if state.batch_size is None else state.row(0)

    # ------------------------------------------------------------------ adapt
    def adapt(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        prompt_len: int | None = None,
        start: Sequence[RouterState | None] | None = None,
        return_trace: bool = False,
    ) -> RouterState | tuple[RouterState, AdaptationTrace]:
        """Run one adaptation round on the context and return the resulting state (per-row if B > 1).

        ``prompt_len`` (padded length of the prompt part of ``input_ids``; default: all of it) tells
        ``loss_mask="prompt"``/``"generated"`` where generated tokens start. ``start``: per row, a state
        whose ``delta`` that row warm-starts from (None: the usual start); steering is the usual start's.
        """
        ids, mask = _check_inputs(input_ids, attention_mask)
        if start is not None and len(start) != ids.shape[0]:
            raise ValueError(
                f"start has {len(start)} entries for {ids.shape[0]} rows; give one per row (None: no warm start)"
            )
        handle, owned = self._handle()
        trace = AdaptationTrace(config=self.config.to_dict())
        try:
            state = self._start_state(handle, ids.shape[0])
            if start is not None:
                _warm_rows(state, start)
            with handle.use_state(state):
                boundary = ids.shape[1] if prompt_len is None else int(prompt_len)
                res = RoundRunner(self.model, handle, self.config).run(ids, mask, boundary, want_cache=False)
            trace.rounds.append(res.trace)
            self._remember(state)
        finally:
            if owned:
                handle.unpatch()
        return (state, trace) if return_trace else state

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        generation_config: Any = None,
        return_trace: bool = False,
        prefill_state: RouterState | None = None,
        **kwargs: Any,
    ) -> Any:
        """Like ``model.generate`` with rerouting; with ``return_trace=True`` returns ``(output, trace)``.

        ``prefill_state``: a state already adapted on this prompt (e.g. by ``adapt`` for scoring); the
        prefill round then uses it instead of adapting again (later rounds warm-start from it).
        """
        ids, mask = _check_inputs(input_ids, attention_mask)
        cfg = self.config
        gen = copy.deepcopy(generation_config or self.model.generation_config)
        streamer = kwargs.pop("streamer", None)
        logits_processor = list(kwargs.pop("logits_processor", None) or [])
        stopping = kwargs.pop("stopping_criteria", None)
        gen.update(**{k: kwargs.pop(k) for k in list(kwargs) if hasattr(gen, k)})
        if kwargs:
            unknown = ", ".join(sorted(kwargs))
            raise TypeError(f"ttadapt.generate got unknown arguments: {unknown}")
        max_new = gen.max_new_tokens
        if max_new is None:
            max_new = max(0, (gen.max_length or 20) - ids.shape[1])
        gen.max_length = None
        want_dict = bool(gen.return_dict_in_generate)
        gen.return_dict_in_generate = True
        min_new = gen.min_new_tokens or 0
        if gen.min_length:
            min_new = max(min_new, gen.min_length - ids.shape[1])
        gen.min_length = None
        n_ret = gen.num_return_sequences or 1
        beams = gen.num_beams or 1
        chunked = cfg.steps > 0 and cfg.interval is not None and cfg.interval < max_new
        if beams > 1 and chunked:
            raise ValueError(
                "beam search cannot be re-adapted mid-generation; use interval=None (prefill-only "
                "adaptation) with num_beams > 1"
            )
        eos = gen.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad_id = gen.pad_token_id if gen.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        gen.pad_token_id = pad_id
        static = StaticDecodeCache(self.model, max(1, ids.shape[1] + max_new - 1)) if wants_static(gen.cache_implementation) else None
        gen.cache_implementation = None

        handle, owned = self._handle()
        trace = AdaptationTrace(config=cfg.to_dict())
        runner = RoundRunner(self.model, handle, cfg)
        prompt_len = ids.shape[1]
        stream = _ChunkStreamer(streamer) if streamer is not None else None
        try:
            given = prefill_state is not None
            state = _given_state(prefill_state, ids.shape[0]) if given else self._start_state(handle, ids.shape[0])
            with handle.use_state(state):
                if given:
                    res = RoundResult(cache=None, trace=RoundTrace(position=prompt_len, skipped="prefill_state given"))
                else:
                    res = runner.run(ids, mask, prompt_len, want_cache=True)
                trace.rounds.append(res.trace)
                cache = res.cache
                if n_ret > 1 and beams == 1:
                    ids, mask, cache = _expand(ids, mask, cache, n_ret)
                    if state.batch_size is not None or n_ret > 1:
                        handle.load_state(_expand_state(state, ids.shape[0], n_ret))
                    gen.num_return_sequences = 1
                elif beams > 1:  # beam search runs rows x beams over the prompt (generate expands the ids only)
                    cache = _repeat_cache(cache, beams)
                    if state.batch_size is not None:
                        handle.load_state(_expand_state(state, ids.shape[0] * beams, beams))
                finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
                procs = [_FinishedRows(finished, pad_id), *logits_processor]
                record_stops = stopping and beams == 1  # beams: one call, no rows to carry into later chunks
                criteria = StoppingCriteriaList([_RecordStops(stopping, finished)]) if record_stops else stopping
                produced, out = 0, None
                steps_out: dict[str, list[Any]] = {}  # per-token outputs of every chunk (scores, logits, ...)
                while True:
                    chunk = min(cfg.interval, max_new - produced) if chunked else max_new - produced
                    t0 = time.perf_counter()
                    gen.max_new_tokens = chunk
                    gen.min_new_tokens = min(chunk, max(0, min_new - produced)) or None
                    if static is not None:  # every router through the edit: no recompiles as rounds change layers
                        cache = static.load(cache)
                        handle.state.mark_active()
                    out = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=gen,
                        logits_processor=procs,
                        stopping_criteria=criteria,
                        streamer=stream,
                        **{CACHE_KW: cache},
                    )
                    trace.decode_time += time.perf_counter() - t0
                    for key in _PER_STEP_OUTPUTS:
                        if getattr(out, key, None) is not None:
                            steps_out.setdefault(key, []).extend(getattr(out, key))
                    new = out.sequences[:, ids.shape[1] :]
                    got = new.shape[1]
                    produced += got
                    if not chunked:  # one call (beam search may return several rows per prompt): done
                        ids = out.sequences
                        break
                    if eos_ids and got:
                        hit = torch.zeros_like(finished)
                        for e in eos_ids:
                            hit |= (new == e).any(dim=1)
                        finished |= hit
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], got)], dim=1)
                    ids = out.sequences
                    if produced >= max_new or got < chunk or bool(finished.all()):
                        break
                    stale = output_cache(out) if cfg.kv_policy == "stale" else None
                    prior = [output_cache(out)]  # a skipped round continues from it; a window reads its prefix
                    cache = out = None  # the round rebuilds the cache: do not hold two
                    res = _round(runner, handle, ids, mask, prompt_len, stale, finished, prior)
                    trace.rounds.append(res.trace)
                    cache = res.cache
                trace.generated = produced
                self._remember(handle.state)
            if stream is not None:
                stream.finish()
        finally:
            if owned:
                handle.unpatch()
        if want_dict and out is not None:
            for key, values in steps_out.items():
                setattr(out, key, tuple(values))  # every chunk's steps, not only the last chunk's
        result = out if want_dict else ids
        return (result, trace) if return_trace else result


def _round(
    runner: RoundRunner, handle: PatchHandle, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
    stale: Any, finished: torch.Tensor, prior: list[Any] | None = None,
) -> RoundResult:
    """A round between chunks on the unfinished rows only: finished ones keep their state, cost nothing and
    get zero KV (their tokens are forced to padding). Where the cache cannot be regrown to every row, the
    round returns none and ``generate`` prefills all rows under the new state (exact, one forward more)."""
    state = handle.state
    if not bool(finished.any()) or state.batch_size != ids.shape[0]:
        return runner.run(ids, mask, prompt_len, want_cache=True, stale_cache=stale, prior=prior)
    if prior:
        prior.clear()  # its rows do not match the live rows: the window's prefix is recomputed
    live = (~finished).nonzero().flatten()
    with handle.use_state(state.select_rows(live)):
        res = runner.run(ids[live], mask[live], prompt_len, want_cache=True, stale_cache=stale)
        adapted = handle.state.delta.detach()
    with torch.no_grad():
        state.delta.index_copy_(1, live.to(state.device), adapted)
    state.refresh()
    res.trace.rows = live.tolist()
    if res.cache is not None and res.cache is not stale and not expand_rows(res.cache, live, ids.shape[0]):
        res.cache = None
    return res


def _warm_rows(state: RouterState, start: Sequence[RouterState | None]) -> None:
    """Copy each given start's ``delta`` into its row of ``state`` (one shared row when unbatched)."""
    with torch.no_grad():
        for j, s in enumerate(start):
            if s is None:
                continue
            if s.batch_size not in (None, 1) or s.delta.shape[0] != state.delta.shape[0]:
                raise ValueError(f"start[{j}] must be a one-row state of this model, got delta {tuple(s.delta.shape)}")
            d = s.delta.detach().reshape(state.delta.shape[0], -1).to(state.device)
            (state.delta[:, j] if state.batch_size is not None else state.delta).copy_(d)
    state.refresh()


def _check_inputs(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, seq] LongTensor (tokenizer(..., return_tensors='pt'))")
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids is empty: give at least one token")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("batched inputs must be LEFT-padded (tokenizer.padding_side = 'left')")
    return input_ids, attention_mask.to(input_ids.device)


# GenerateOutput fields holding one entry per generated token; they are concatenated across chunks.
_PER_STEP_OUTPUTS = ("scores", "logits", "attentions", "hidden_states")


def _given_state(state: RouterState, rows: int) -> RouterState:
    """A private copy of a caller's prefill state, one row per sequence when the batch has several."""
    if state.batch_size is None:
        return state.per_row(rows) if rows > 1 else state.clone()
    if state.batch_size != rows:
        raise ValueError(f"prefill_state has {state.batch_size} rows but the batch has {rows} sequences")
    return state.clone()


def _expand(ids: torch.Tensor, mask: torch.Tensor, cache: Any, n: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Each prompt ``n`` times for its samples, with its cache (:func:`_repeat_cache`)."""
    return ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0), _repeat_cache(cache, n)


def _repeat_cache(cache: Any, n: int) -> Any:
    """Every row of ``cache`` ``n`` times; a cache that cannot be repeated is dropped (``generate`` then prefills
    the repeated prompts under the same state, which gives the same keys and values)."""
    return cache if cache is not None and repeat_rows(cache, n) else None


def _expand_state(state: RouterState, rows: int, n: int) -> RouterState:
    src = state.per_row(rows // n) if state.batch_size is None else state
    return src.select_rows(torch.arange(rows // n).repeat_interleave(n))


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reroute: RerouteConfig | str | None = None,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate`` with online rerouting (``reroute``: a RerouteConfig or preset name)."""
    return Rerouter(model, reroute).generate(input_ids, attention_mask, **generate_kwargs)


def rounds_for(generated: int, interval: int | None) -> int:
    """Adaptation rounds of a generation: 1 at prefill + one before each later chunk of ``interval``."""
    if interval is None or generated <= 0:
        return 1
    return 1 + (generated - 1) // interval


__all__: Sequence[str] = ("Rerouter", "generate", "rounds_for")
