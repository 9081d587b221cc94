"""Evaluate examples under one method and return their JSON records.

For the reroute methods the reference NLL (and multiple-choice log-probs) use a state adapted on the
prompt only, never on the reference: the base and rerouted NLL of the same tokens are both recorded,
with per-layer expert usage under each, so the shift is paired per item. With HF generation that
state comes from ``Rerouter.adapt`` and is handed to ``ttadapt.generate``; with the vLLM backend it
is the state the first chunk was decoded under (the prompt is adapted once either way).

An example goes through :func:`prepare_example` (prompt; the reroute methods' prompt adaptation),
generation (one call per batch of examples, ``EvalConfig.batch_size``) and :func:`finish_example`
(scores, NLL, record). With HF generation every prompt is adapted alone, never in a batch, so the
reference NLL and routing counts do not depend on the batch size; the states are stacked per row
for the batched ``ttadapt.generate`` call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import EvalConfig
from .datasets import Example, TaskData
from .likelihood import Encoder, continuation_logprobs, fit_left
from .methods import Generation, example_seed, generate_batch, stops_for, summarize_trace
from .prompts import Prompt, build_prompt, render, select_shots
from .routing import RouterSite, count_usage, find_routers
from .scoring import score_code, score_math, score_mc_generate, score_mc_loglik

RECORD_SCHEMA = "ttadapt.eval.record/1"


@dataclass
class EvalContext:
    """What every example of a run shares: model, tokenizer, task data, config and router sites.

    ``generator``: the vLLM backend's :class:`~ttadapt.eval.vllm_backend.VLLMGenerator` (None: HF generation).
    """

    model: Any
    tokenizer: Any
    data: TaskData
    cfg: EvalConfig
    reroute_config: Any = None
    generator: Any = None
    encoder: Encoder = field(init=False)
    max_len: int | None = field(init=False)
    routers: list[RouterSite] = field(init=False)

    def __post_init__(self) -> None:
        self.encoder = Encoder(self.tokenizer)
        limits = [
            getattr(getattr(self.model, "config", None), "max_position_embeddings", None),
            self.cfg.max_model_len,
        ]
        self.max_len = min((n for n in limits if n is not None), default=None)
        self.routers = find_routers(self.model) if self.cfg.routing and self.cfg.method.rerouting else []

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def _continuation(ex: Example, template: str, prompt: Prompt, mc_mode: str) -> str | None:
    """The reference as a continuation of ``prompt`` (the part its shot-style render adds after the item)."""
    if ex.reference_text is None:
        return None
    try:
        full = render(ex, template, with_answer=True, mc_mode=mc_mode)  # type: ignore[arg-type]
    except ValueError:
        return None
    head = render(ex, template, with_answer=False, mc_mode=mc_mode)  # type: ignore[arg-type]
    return (prompt.stripped + full[len(head) :]).rstrip("\n") or None


def _fit_prompt(ctx: EvalContext, ex: Example, shots: list[Example], reserve: int) -> tuple[Prompt, list[int], bool]:
    """Build the prompt, dropping trailing shots (then left-truncating) until it leaves ``reserve`` tokens."""
    cfg = ctx.cfg
    while True:
        prompt = build_prompt(
            ex, ctx.data.template, shots, mc_mode=cfg.mc_mode, strip_trailing_newline=cfg.strip_trailing_newline
        )
        ids = ctx.encoder.encode(prompt.text)
        budget = None if ctx.max_len is None else ctx.max_len - reserve
        if budget is None or len(ids) <= budget or not shots:
            break
        shots = shots[:-1]
    truncated = False
    if budget is not None and len(ids) > budget:
        keep = len(ctx.encoder.prefix)
        if budget <= keep + 1:
            raise ValueError(f"max_new_tokens={reserve} leaves no room for the prompt in a {ctx.max_len}-token model")
        ids = ids[:keep] + ids[len(ids) - (budget - keep) :]
        truncated = True
    return prompt, ids, truncated


@contextlib.contextmanager
def _maybe(cm: Any) -> Iterator[Any]:
    if cm is None:
        yield None
    else:
        with cm as v:
            yield v


def _adapt(ctx: EvalContext, ids: list[int]) -> tuple[Any, dict[str, Any] | None, float]:
    """Prefill adaptation on the prompt (for NLL / MC scoring); returns the state and its trace summary."""
    import ttadapt

    t0 = time.perf_counter()
    rerouter = ttadapt.Rerouter(ctx.model, ctx.reroute_config)
    x = torch.tensor([ids], dtype=torch.long, device=next(ctx.model.parameters()).device)
    try:
        out = rerouter.adapt(x, return_trace=True)
    except TypeError:
        out = rerouter.adapt(x)
    state, trace = out if isinstance(out, tuple) else (out, None)
    return state, summarize_trace(trace), time.perf_counter() - t0


def _score_pairs(
    ctx: EvalContext, pairs: list[tuple[list[int], int]], state: Any
) -> tuple[list[tuple[float, int]], list[list[int]] | None]:
    """Log-probs of continuations, under ``state`` when given; expert usage when routers are known."""
    usage_cm = count_usage(ctx.model, ctx.routers) if ctx.routers else None
    with _maybe(usage_cm) as usage, _maybe(state.apply(ctx.model) if state is not None else None):
        lps = continuation_logprobs(ctx.model, pairs, ctx.pad_id)
    return lps, (usage.table() if usage is not None else None)


@dataclass
class Pending:
    """An example between :func:`prepare_example` and :func:`finish_example`."""

    index: int
    ex: Example
    prompt: Prompt
    ids: list[int]
    record: dict[str, Any]
    loglik_mc: bool
    prep_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    state: Any = None
    adapt_trace: dict[str, Any] | None = None


def prepare_example(ctx: EvalContext, index: int, ex: Example) -> Pending:
    """Build the example's prompt and record head; adapt on the prompt when no generator will (see module doc)."""
    cfg, spec = ctx.cfg, ctx.cfg.method
    t_start = time.perf_counter()
    shots = select_shots(ctx.data, ex, spec.shots, cfg.seed) if spec.shots else []
    loglik_mc = ex.kind == "mc" and cfg.mc_mode == "loglik"
    reserve = 64 if loglik_mc else cfg.max_new_tokens
    prompt, ids, truncated = _fit_prompt(ctx, ex, shots, reserve)
    record: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "index": index,
        "id": ex.id,
        "task": ctx.data.name,
        "method": spec.label,
        "prompt": prompt.text,
        "shot_ids": list(prompt.shot_ids),
        "prompt_tokens": len(ids),
        "truncated": truncated,
    }
    p = Pending(index, ex, prompt, ids, record, loglik_mc)
    # With HF generation this state is also generate's prefill state (the prompt is adapted once). In
    # batches it is always adapted here, alone: a prefill round inside the batched call would see the
    # other rows (RerouteConfig.min_tokens and early_stop look at the whole batch).
    hf_adapts = ctx.generator is None and (cfg.nll or cfg.batch_size > 1)
    if spec.rerouting and (loglik_mc or hf_adapts):
        p.state, p.adapt_trace, p.timings["adapt_s"] = _adapt(ctx, ids)
    p.prep_s = time.perf_counter() - t_start
    return p


def _generate(ctx: EvalContext, items: Sequence[Pending]) -> list[Generation]:
    """The method's samples for each example: one vLLM call, or one left-padded HF call, for the batch."""
    cfg = ctx.cfg
    stops = stops_for(ctx.data.template)
    seeds = [example_seed(cfg.seed, p.ex.id) for p in items]
    if ctx.generator is not None:
        return ctx.generator.generate([p.ids for p in items], seeds, stops)
    return generate_batch(
        ctx.model,
        ctx.tokenizer,
        [p.ids for p in items],
        cfg.method,
        max_new_tokens=cfg.max_new_tokens,
        stops=stops,
        seeds=seeds,
        reroute_config=ctx.reroute_config,
        prefill_states=[p.state for p in items],  # adapted once for the NLL record: generation reuses them
    )


def evaluate_batch(
    ctx: EvalContext, items: Sequence[tuple[int, Example]], keep: Container[int] | None = None
) -> list[dict[str, Any]]:
    """Run the method on a batch of (index, example) and score each; records in the given order.

    ``keep``: the indices to score and return (default: all). The others are only generated, as
    companions, so that a batch can be re-formed exactly (a resumed run's partly recorded batch).
    """
    keep = {i for i, _ in items} if keep is None else keep
    pending = [prepare_example(ctx, i, ex) for i, ex in items]
    generating = [p for p in pending if not p.loglik_mc]
    gens = dict(zip((p.index for p in generating), _generate(ctx, generating) if generating else []))
    return [finish_example(ctx, p, gens.get(p.index)) for p in pending if p.index in keep]


def evaluate_example(ctx: EvalContext, index: int, ex: Example) -> dict[str, Any]:
    """Run the method on one example and score it; the record is JSON-serialisable."""
    return evaluate_batch(ctx, [(index, ex)])[0]


def finish_example(ctx: EvalContext, p: Pending, gen: Generation | None) -> dict[str, Any]:
    """Score the outputs (``gen``; None for loglik multiple choice), add the reference NLL, return the record."""
    t_finish = time.perf_counter()
    cfg, spec, ex, prompt, record, timings = ctx.cfg, ctx.cfg.method, p.ex, p.prompt, p.record, p.timings
    state, adapt_trace = p.state, p.adapt_trace
    if state is None and gen is not None and cfg.nll and gen.prefill_state is not None:
        state, adapt_trace = gen.prefill_state, gen.prefill_trace  # the vLLM backend adapted the prompt

    # ---- outputs and scores
    t0 = time.perf_counter()
    if p.loglik_mc:
        conts = [" " + c for c in ex.choices]
        pairs = [
            fit_left(*ctx.encoder.encode_pair(prompt.text, c), ctx.max_len, len(ctx.encoder.prefix))[:2] for c in conts
        ]
        lps, _ = _score_pairs(ctx, pairs, state)
        scores, extra = score_mc_loglik(ex, lps, cfg.mc_norm)
        record["outputs"] = [ex.choices[extra["pred"]]]
        gen_trace = None
        timings["score_s"] = time.perf_counter() - t0
    else:
        assert gen is not None, "a generating example needs its Generation"
        timings["generate_s"] = gen.seconds
        record["outputs"], record["new_tokens"], gen_trace = gen.texts, gen.new_tokens, gen.trace
        if ex.kind == "code":
            scores, extra = score_code(ex, prompt.target_text, gen.texts, cfg.pass_ks, cfg.sandbox)
        elif ex.kind == "math":
            scores, extra = score_math(ex, gen.texts, cfg.pass_ks)
        else:
            scores, extra = score_mc_generate(ex, gen.texts, cfg.pass_ks)
        timings["score_s"] = time.perf_counter() - t0
    record["scores"], record["details"] = scores, extra
    record["trace"] = {"generate": gen_trace, "prefill_adapt": adapt_trace} if spec.rerouting else None

    # ---- reference NLL (base, and adapted for reroute methods) with expert usage
    record["ref_nll"], record["routing"] = None, None
    cont = _continuation(ex, ctx.data.template, prompt, cfg.mc_mode)
    if cfg.nll and cont:
        t2 = time.perf_counter()
        ids_p, n_ctx, _ = fit_left(*ctx.encoder.encode_pair(prompt.text, cont), ctx.max_len, len(ctx.encoder.prefix))
        lps, usage_base = _score_pairs(ctx, [(ids_p, n_ctx)], None)
        lp_base, n_tok = lps[0]
        nll: dict[str, Any] = {"tokens": n_tok, "base": round(-lp_base / n_tok, 6)}
        if state is not None:
            lps_rr, usage_rr = _score_pairs(ctx, [(ids_p, n_ctx)], state)
            lp_rr = lps_rr[0][0]
            nll["rerouted"] = round(-lp_rr / n_tok, 6)
            if usage_base is not None and usage_rr is not None:
                record["routing"] = {
                    "layers": [s.layer_id for s in ctx.routers],
                    "tokens": len(ids_p),
                    "base": usage_base,
                    "rerouted": usage_rr,
                }
        nll["value"] = nll.get("rerouted", nll["base"])
        record["ref_nll"] = nll
        timings["nll_s"] = time.perf_counter() - t2
    timings["total_s"] = p.prep_s + timings.get("generate_s", 0.0) + time.perf_counter() - t_finish
    record["timings"] = {k: round(v, 4) for k, v in timings.items()}
    return record
