"""Generation for every method: plain ``model.generate`` (base, icl, sc) or ``ttadapt.generate`` (reroute*).

Sampling is seeded per example (``torch.manual_seed``) right before the call, so results do not
depend on the order examples run in (resumable runs reproduce) and ``reroute+sc`` with 0 steps can
be compared sample-for-sample with ``sc``. ``reroute+sc`` makes ONE ``ttadapt.generate`` call with
the single prompt row and ``num_return_sequences=k``: the core adapts once at prefill (the prefill
round depends only on the prompt, so k identical rounds would be wasted work and an extra source of
nondeterminism), expands that state to the k rows, and each row then adapts on its own sample every
``interval`` tokens.
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
    """HF stopping criterion: a row is done once its generated text contains a stop string."""

    def __init__(self, tokenizer: Any, prompt_len: int, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stops = tuple(stops)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.prompt_len :]:
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            done.append(truncate_at_stops(text, self.stops) != text)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


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
    tokenizer: Any, tokens: Sequence[int], stops: Sequence[str], pad: int | None = None
) -> tuple[str, int]:
    """A sample's stop-truncated text and its new-token count (trailing ``pad`` dropped, cut after EOS)."""
    toks = [int(t) for t in tokens]
    n = len(toks)
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
    """Generate ``spec.samples`` continuations of one prompt with the method's decoder.

    ``prefill_state``: the prompt's already-adapted state (reroute methods), used instead of adapting again.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    from transformers import StoppingCriteriaList

    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad,
        "eos_token_id": eos,
        "stopping_criteria": StoppingCriteriaList([StopOnStrings(tokenizer, ids.shape[1], stops)]),
    }
    if spec.sampling:
        kwargs.update(
            do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0, num_return_sequences=spec.samples
        )
    else:
        kwargs.update(do_sample=False, num_return_sequences=1)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    trace = None
    if spec.rerouting:
        if prefill_state is not None:
            kwargs["prefill_state"] = prefill_state
        out = core_generate()(
            model, input_ids=ids, attention_mask=mask, reroute=reroute_config, return_trace=True, **kwargs
        )
        seqs, tr = out
        trace = summarize_trace(tr)
    else:
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    seconds = time.perf_counter() - t0
    if hasattr(seqs, "sequences"):
        seqs = seqs.sequences
    texts, counts = zip(*(decode_sample(tokenizer, row.tolist(), stops, pad) for row in seqs[:, ids.shape[1] :]))
    return Generation(list(texts), list(counts), trace, seconds)


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
