"""Evaluate one example under one method and return its JSON record.

For the reroute methods the reference NLL (and multiple-choice log-probs) use a state adapted on the
prompt only (``Rerouter.adapt``), never on the reference: the base and rerouted NLL of the same
tokens are both recorded, with per-layer expert usage under each, so the shift is paired per item.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import EvalConfig
from .datasets import Example, TaskData
from .likelihood import Encoder, continuation_logprobs, fit_left
from .methods import example_seed, generate, stops_for, summarize_trace
from .prompts import Prompt, build_prompt, render, select_shots
from .routing import RouterSite, count_usage, find_routers
from .scoring import score_code, score_math, score_mc_generate, score_mc_loglik

RECORD_SCHEMA = "ttadapt.eval.record/1"


@dataclass
class EvalContext:
    """What every example of a run shares: model, tokenizer, task data, config and router sites."""

    model: Any
    tokenizer: Any
    data: TaskData
    cfg: EvalConfig
    reroute_config: Any = None
    encoder: Encoder = field(init=False)
    max_len: int | None = field(init=False)
    routers: list[RouterSite] = field(init=False)

    def __post_init__(self) -> None:
        self.encoder = Encoder(self.tokenizer)
        self.max_len = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
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


def evaluate_example(ctx: EvalContext, index: int, ex: Example) -> dict[str, Any]:
    """Run the method on one example and score it; the record is JSON-serialisable."""
    cfg, spec = ctx.cfg, ctx.cfg.method
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
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
    state, adapt_trace = None, None
    if spec.rerouting and (cfg.nll or loglik_mc):
        state, adapt_trace, timings["adapt_s"] = _adapt(ctx, ids)

    # ---- outputs and scores
    t0 = time.perf_counter()
    if loglik_mc:
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
        stops = stops_for(ctx.data.template)
        gen = generate(
            ctx.model,
            ctx.tokenizer,
            ids,
            spec,
            max_new_tokens=cfg.max_new_tokens,
            stops=stops,
            seed=example_seed(cfg.seed, ex.id),
            reroute_config=ctx.reroute_config,
            prefill_state=state,  # adapted once for the NLL record: generation reuses it
        )
        timings["generate_s"] = gen.seconds
        record["outputs"], record["new_tokens"], gen_trace = gen.texts, gen.new_tokens, gen.trace
        t1 = time.perf_counter()
        if ex.kind == "code":
            scores, extra = score_code(ex, prompt.target_text, gen.texts, cfg.pass_ks, cfg.sandbox)
        elif ex.kind == "math":
            scores, extra = score_math(ex, gen.texts, cfg.pass_ks)
        else:
            scores, extra = score_mc_generate(ex, gen.texts, cfg.pass_ks)
        timings["score_s"] = time.perf_counter() - t1
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
    timings["total_s"] = time.perf_counter() - t_start
    record["timings"] = {k: round(v, 4) for k, v in timings.items()}
    return record
