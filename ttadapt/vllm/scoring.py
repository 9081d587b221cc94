"""Context NLL under router payloads, scored by vLLM itself: one batched ``llm.generate`` call.

Each (context, payload) pair becomes one request with ``SamplingParams(max_tokens=1,
prompt_logprobs=0)``; vLLM returns the log-probability of every prompt token given the tokens before
it (``RequestOutput.prompt_logprobs``: one ``{token_id: Logprob}`` dict per position, ``None`` for the
first), so the negated values are the next-token losses the HF trainer minimises. Requests with
different payloads share the batch; the plugin salts each non-zero payload's prefix cache, and vLLM
never *reads* the prefix cache for a request that asks for prompt log-probs (it would skip positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ttadapt.vllm.payload import PAYLOAD_KEY

if TYPE_CHECKING:
    from vllm import LLM

__all__ = ["context_nll", "scoring_request"]

FlatPayload = Sequence[float | int]


def scoring_request(context: Sequence[int], payload: FlatPayload | None) -> tuple[dict[str, Any], Any]:
    """The prompt dict and ``SamplingParams`` that score ``context`` under ``payload`` (None = unedited)."""
    from vllm import SamplingParams

    extra = {PAYLOAD_KEY: list(payload)} if payload is not None else None
    params = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, extra_args=extra
    )
    return {"prompt_token_ids": [int(t) for t in context]}, params


def context_nll(
    llm: LLM,
    contexts: Sequence[Sequence[int]],
    payloads: Sequence[FlatPayload | None],
) -> list[np.ndarray]:
    """Per-target next-token NLL of each context under its payload, from ONE ``llm.generate`` call.

    ``contexts[i]`` is scored under ``payloads[i]``; entry ``t`` of the result ``i`` is
    ``-log p(contexts[i][t + 1] | contexts[i][:t + 1])`` (float64, length ``len(contexts[i]) - 1``).
    Assumes the engine's default ``logprobs_mode`` (raw log-probs of the model's logits).
    """
    if len(contexts) != len(payloads):
        raise ValueError(f"got {len(contexts)} contexts but {len(payloads)} payloads; pass one payload per context")
    for ctx in contexts:
        if len(ctx) < 2:
            raise ValueError(f"a scored context needs at least 2 tokens (one target), got {len(ctx)}")
    inputs, params = [], []
    for ctx, payload in zip(contexts, payloads):
        p, sp = scoring_request(ctx, payload)
        inputs.append(p)
        params.append(sp)
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [_target_nll(ctx, out) for ctx, out in zip(contexts, outs)]


def _target_nll(context: Sequence[int], out: Any) -> np.ndarray:
    plp = out.prompt_logprobs
    if plp is None or len(plp) != len(context):
        raise RuntimeError(
            f"vLLM returned {0 if plp is None else len(plp)} prompt log-prob positions for a {len(context)}-token "
            "context; scoring needs every position (is a logits/prompt-logprob option overriding prompt_logprobs?)"
        )
    nll = np.empty(len(context) - 1, dtype=np.float64)
    for t in range(1, len(context)):
        nll[t - 1] = -float(plp[t][int(context[t])].logprob)
    return nll
