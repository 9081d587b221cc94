"""Generation for every method: plain ``model.generate`` (base, icl, sc) or ``ttadapt.generate`` (reroute*).

One call generates a batch of prompts (left-padded ``[B, T]``; ``EvalConfig.batch_size``). Sampling
draws come from one ``torch.Generator`` per example, seeded from (run seed, example id) by
:class:`SeededSampler`, so an example's samples do not depend on the order examples run in, nor on
which other examples share its batch (beyond float rounding, see eval/README.md); ``reroute+sc``
with 0 steps can be compared sample-for-sample with ``sc``. With one prompt the draws are exactly
those of HF's own sampler after ``torch.manual_seed(example seed)``.

``reroute+sc`` passes ``num_return_sequences=k`` to ``ttadapt.generate``: the prompt's prefill state
(adapted once, by the caller or by the core at prefill) is expanded to its k rows, and each row then
adapts on its own sample every ``interval`` tokens. In a batch, each prompt brings its own state
(``prefill_states``; stacked into one per-row state).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import MethodSpec

STOPS: dict[str, tuple[str, ...]] = {
    "humaneval": ("\nclass", "\nif", "\nprint", "\n#", "\n```", '\n"""', "\nassert"),
    "mbpp": ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```", "\n#"),
    "code": ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```", "\n#"),
    "gsm8k": ("Question:", "\n\n"),
    "math": ("Problem:", "\n\n\n"),
    "mc": ("\n", "Question:"),
}


def stops_for(template: str) -> tuple[str, ...]:
    """Stop strings of a template (multiple-choice templates share ``mc``)."""
    return STOPS.get(template, STOPS["mc"])


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """Cut ``text`` at the earliest stop string found after its leading whitespace."""
    start = len(text) - len(text.lstrip())
    cut = len(text)
    for s in stops:
        i = text.find(s, start)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


class StopOnStrings:
    """HF stopping criterion: a row is done once its generated text contains a stop string.

    ``ends[row]`` is the row's generated length when that first happened. A finished row of a batch
    that goes on is padded (``ttadapt.generate`` keeps it padded in later chunks and leaves it out of
    later rounds), so ``ends`` says where its own tokens end. Rows once done stay done.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stops = tuple(stops)
        self.ends: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = []
        n = input_ids.shape[1] - self.prompt_len
        for i, row in enumerate(input_ids[:, self.prompt_len :]):
            if i not in self.ends:
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                if truncate_at_stops(text, self.stops) != text:
                    self.ends[i] = n
            done.append(i in self.ends)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class SeededSampler:
    """Logits processor that samples every row itself, from its example's own ``torch.Generator``.

    Rows ``[e*k, (e+1)*k)`` are the ``k`` samples of example ``e`` (``num_return_sequences`` expands
    example-major). Per example and step it applies temperature and top-p exactly as HF's sampler
    does and draws ``torch.multinomial(probs, 1, generator=g_e)`` over the example's ``k`` rows, the
    draw HF makes for that prompt alone after ``torch.manual_seed(seed_e)``. It returns scores that
    are ``0`` at the drawn token and ``-inf`` elsewhere, so HF's own (neutral: temperature 1, top-p 1,
    top-k 0) sampling step can only pick that token.
    """

    def __init__(self, seeds: Sequence[int], samples: int, temperature: float, top_p: float, device: Any) -> None:
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.samples = samples
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.warpers: list[Any] = []  # as GenerationMixin._get_logits_processor builds them for sampling
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = self.samples
        if scores.shape[0] != k * len(self.generators):
            raise RuntimeError(f"SeededSampler: {scores.shape[0]} rows, expected {k} x {len(self.generators)} examples")
        out = torch.full_like(scores, float("-inf"))
        for e, gen in enumerate(self.generators):
            rows = slice(e * k, (e + 1) * k)
            s = scores[rows]
            for w in self.warpers:
                s = w(input_ids[rows], s)
            probs = torch.nn.functional.softmax(s, dim=-1)
            tokens = torch.multinomial(probs, num_samples=1, generator=gen)
            out[rows].scatter_(1, tokens, 0.0)
        return out


@dataclass
class Generation:
    """Decoded samples (stop-truncated), their new-token counts, the core's trace summary and timing.

    ``prefill_state``/``prefill_trace``: the prompt's adapted state and its summary when the generator
    adapted it itself (vLLM backend), for the reference NLL.
    """

    texts: list[str]
    new_tokens: list[int]
    trace: dict[str, Any] | None
    seconds: float
    prefill_state: Any = None
    prefill_trace: dict[str, Any] | None = None


def decode_sample(
    tokenizer: Any, tokens: Sequence[int], stops: Sequence[str], pad: int | None = None, end: int | None = None
) -> tuple[str, int]:
    """A sample's stop-truncated text and its new-token count (trailing ``pad`` dropped, cut after EOS).

    ``end``: the sample's own length when known (where a stop string ended it, ``StopOnStrings.ends``).
    """
    toks = [int(t) for t in tokens]
    n = len(toks) if end is None else min(end, len(toks))
    while n and pad is not None and toks[n - 1] == pad:
        n -= 1
    eos = tokenizer.eos_token_id
    if eos is not None and eos in toks[:n]:
        n = toks.index(eos) + 1
    return truncate_at_stops(tokenizer.decode(toks[:n], skip_special_tokens=True), stops), n


def example_seed(seed: int, example_id: str) -> int:
    """A per-example seed from (run seed, example id), independent of processing order."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}|{example_id}".encode()).digest()[:4], "little")


def core_generate() -> Any:
    """``ttadapt.generate``, or a clear error while the core library lacks it."""
    import ttadapt

    fn = getattr(ttadapt, "generate", None)
    if fn is None:
        raise RuntimeError(
            "ttadapt.generate is not available in this build; the reroute methods need the core library"
        )
    return fn


def stack_states(states: Sequence[Any]) -> Any:
    """One per-row ``RouterState`` (``[L, B, E]``) from B prompts' own states (None when there are none)."""
    if all(s is None for s in states):
        return None
    if any(s is None for s in states):
        raise ValueError("a batch needs a prefill state for every prompt or for none")
    if len(states) == 1:
        return states[0]
    out = states[0].per_row(len(states))
    with torch.no_grad():
        for b, s in enumerate(states):
            d = s.delta.detach()
            out.delta[:, b].copy_(d if d.dim() == 2 else d[:, 0])
    out.refresh()
    return out


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    spec: MethodSpec,
    *,
    max_new_tokens: int,
    stops: Sequence[str],
    seeds: Sequence[int],
    reroute_config: Any = None,
    prefill_states: Sequence[Any] | None = None,
) -> list[Generation]:
    """Generate ``spec.samples`` continuations of each prompt in ONE left-padded decoder call.

    ``seeds``: one per prompt (its samples' generator). ``prefill_states``: each prompt's already
    adapted state (reroute methods), used instead of adapting again; all or none. Each
    :class:`Generation` gets the call's wall time divided by the number of prompts.
    """
    if not prompts or len(seeds) != len(prompts):
        raise ValueError(f"generate_batch needs one seed per prompt (got {len(prompts)} prompts, {len(seeds)} seeds)")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    n, k = len(prompts), spec.samples
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[b, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    from transformers import LogitsProcessorList, StoppingCriteriaList

    stop = StopOnStrings(tokenizer, width, stops)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad,
        "eos_token_id": eos,
        "stopping_criteria": StoppingCriteriaList([stop]),
        "num_return_sequences": k,
    }
    if spec.sampling:
        sampler = SeededSampler(seeds, k, spec.temperature, spec.top_p, device)
        # HF's own warpers neutral: the sampler has drawn the token already (see SeededSampler)
        kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        kwargs["logits_processor"] = LogitsProcessorList([sampler])
    else:
        kwargs.update(do_sample=False)
    torch.manual_seed(int(seeds[0]))  # nothing should draw from the global generator; deterministic if it does
    t0 = time.perf_counter()
    trace = None
    if spec.rerouting:
        state = stack_states(list(prefill_states)) if prefill_states is not None else None
        if state is not None:
            kwargs["prefill_state"] = state
        out = core_generate()(
            model, input_ids=ids, attention_mask=mask, reroute=reroute_config, return_trace=True, **kwargs
        )
        seqs, tr = out
        trace = summarize_trace(tr)
    else:
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    seconds = (time.perf_counter() - t0) / n
    if hasattr(seqs, "sequences"):
        seqs = seqs.sequences
    rows = [
        decode_sample(tokenizer, row.tolist(), stops, pad, stop.ends.get(r))
        for r, row in enumerate(seqs[:, width:])
    ]
    gens = []
    for e in range(n):
        texts, counts = zip(*rows[e * k : (e + 1) * k])
        gen_trace = trace
        if trace is not None and n > 1:  # the core's trace covers the whole call
            gen_trace = dict(trace, batch_examples=n)
        gens.append(Generation(list(texts), list(counts), gen_trace, seconds))
    return gens


def generate(
    model: Any,
    tokenizer: Any,
    input_ids: list[int],
    spec: MethodSpec,
    *,
    max_new_tokens: int,
    stops: Sequence[str],
    seed: int,
    reroute_config: Any = None,
    prefill_state: Any = None,
) -> Generation:
    """Generate ``spec.samples`` continuations of one prompt (:func:`generate_batch` with one prompt).

    ``prefill_state``: the prompt's already-adapted state (reroute methods), used instead of adapting again.
    """
    return generate_batch(
        model,
        tokenizer,
        [input_ids],
        spec,
        max_new_tokens=max_new_tokens,
        stops=stops,
        seeds=[seed],
        reroute_config=reroute_config,
        prefill_states=[prefill_state],
    )[0]


def _jsonable(x: Any, depth: int = 0) -> Any:
    """JSON-safe copy of a trace value (tensors become lists or shape summaries; floats rounded)."""
    if depth > 6:
        return repr(x)[:200]
    if isinstance(x, float):
        return round(x, 6) if x == x else None
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor):
        return (
            _jsonable(x.tolist(), depth + 1)
            if x.numel() <= 256
            else {"shape": list(x.shape), "mean_abs": float(x.abs().float().mean())}
        )
    if isinstance(x, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in x]
    return repr(x)[:200]


def summarize_trace(trace: Any) -> dict[str, Any] | None:
    """Compact JSON summary of the core's adaptation trace (``trace.summary()`` when it has one)."""
    if trace is None:
        return None
    if hasattr(trace, "summary"):
        return _jsonable(trace.summary())
    if hasattr(trace, "to_dict"):
        return _jsonable(trace.to_dict())
    return {"repr": repr(trace)[:500]}
