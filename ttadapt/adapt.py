"""One adaptation round: confidence pass -> layer selection -> gradient steps on delta -> KV cache.

The round works on ``ids`` (left-padded ``[B, T]``); every forward runs over ``ids[:, :-1]`` so
that its logits score every target and its cache is exactly what ``generate`` continues from.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttadapt.chunked_loss import LossHead, LossOutput
from ttadapt.config import RerouteConfig
from ttadapt.handle import PatchHandle
from ttadapt.hf_compat import CACHE_KW, output_cache
from ttadapt.layer_skip import (
    LayerInputs,
    check_replay,
    checkpoint_from,
    skip_below,
    splice_cache,
    supports_partial,
    truncate_cache,
)
from ttadapt.selection import needs_confidence, select_layers
from ttadapt.trace import RoundTrace
from ttadapt.window import Window, covers, open_window


@dataclass
class RoundResult:
    """The cache over ``ids[:, :-1]`` under the kept state (None: let ``generate`` prefill) and the trace."""

    cache: Any
    trace: RoundTrace


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions as ``generate`` computes them for left-padded batches."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy ``[B, T]`` in fp32."""
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), reduction="none").view(B, T)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def target_masks(cfg: RerouteConfig, mask: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit mask, held-out mask) over the targets ``[B, T-1]`` of a round on a context with ``mask``."""
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    idx = torch.arange(1, mask.shape[1], device=mask.device)[None, :]
    if cfg.loss_mask == "prompt":
        valid &= idx < prompt_len
    elif cfg.loss_mask == "generated":
        valid &= idx >= prompt_len
    if cfg.max_context is not None:
        valid &= idx > mask.shape[1] - 1 - cfg.max_context
    if not cfg.guard:
        return valid, torch.zeros_like(valid)
    n = valid.sum(dim=1, keepdim=True)
    n_val = torch.clamp((n.float() * cfg.val_fraction).round().long(), min=1)
    rank_from_end = valid.flip(1).cumsum(1).flip(1)  # 1 for the last valid target
    held = valid & (rank_from_end <= n_val)
    return valid & ~held, held


class RoundRunner:
    """Runs adaptation rounds for one patched model and config."""

    def __init__(self, model: nn.Module, handle: PatchHandle, cfg: RerouteConfig) -> None:
        self.model = model
        self.handle = handle
        self.cfg = cfg
        self.layers = handle.model.get_submodule(handle.info.spec.layers_path)
        self.loss_head: LossHead | None = None

    # ------------------------------------------------------------------ forwards
    def _forward(
        self, x: torch.Tensor, xm: torch.Tensor, pos: torch.Tensor, *, use_cache: bool, **past: Any
    ) -> Any:
        return self.model(input_ids=x, attention_mask=xm, position_ids=pos, use_cache=use_cache, return_dict=True, **past)

    def _losses(
        self, x: torch.Tensor, xm: torch.Tensor, pos: torch.Tensor, y: torch.Tensor, *, use_cache: bool,
        past: Window | None = None,
    ) -> LossOutput:
        """Per-token next-token losses (and the cache if asked), through the chunked head on long contexts.

        With ``past``, ``x`` is the window and ``xm`` the whole context's mask; the prefix cache is
        restored after the forward (no cache is returned then).
        """
        kw = {} if past is None else {CACHE_KW: past.past}  # read (and appended to) without use_cache
        if past is not None:
            past.restore()  # a checkpointed backward since the last forward re-appended the window
        try:
            if self.loss_head is not None:
                out = self.loss_head(y, input_ids=x, attention_mask=xm, position_ids=pos, use_cache=use_cache, **kw)
            else:
                o = self._forward(x, xm, pos, use_cache=use_cache, **kw)
                out = LossOutput(token_losses(o.logits, y), output_cache(o))
        finally:
            if past is not None:
                past.restore()
        return LossOutput(out.losses, out.past_key_values if use_cache and past is None else None)

    def run(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        prompt_len: int,
        *,
        want_cache: bool,
        stale_cache: Any = None,
        prior: list[Any] | None = None,
    ) -> RoundResult:
        """Adapt ``handle.state`` on the context ``ids`` and return the cache to continue from.

        ``prior``: a list holding the decode cache over ``ids[:, :-1]`` under the current state, if any;
        a skipped round returns it (the state did not change), and with ``RerouteConfig.window`` the round
        reads the prefix's keys/values from it instead of recomputing them. The round takes the cache out of
        the list, so it can free it before building its own.
        """
        old = prior.pop() if prior else None
        cfg, handle = self.cfg, self.handle
        state = handle.state
        trace = RoundTrace(position=int(ids.shape[1]))
        if cfg.straight_through and handle.uses_generic:
            trace.events.append("straight_through ignored: generic-interception routers pass only the top-k gradient")
        x, y, xm = ids[:, :-1], ids[:, 1:], mask[:, :-1]
        pos = position_ids(mask)[:, :-1]
        masks_cfg = cfg if cfg.window is None else cfg.replace(max_context=min(cfg.max_context or cfg.window, cfg.window))
        fit_m, val_m = target_masks(masks_cfg, mask, prompt_len)
        fit_f, val_f = fit_m.float(), val_m.float()
        policy = cfg.kv_policy
        # rows with too few fit targets keep their state; a shared state (one for all rows) waits for all
        short = fit_m.sum(dim=1) < cfg.min_tokens
        if cfg.steps == 0 or bool(short.all()) or (bool(short.any()) and state.delta.dim() != 3):
            trace.skipped = "steps=0" if cfg.steps == 0 else f"fewer than {cfg.min_tokens} fit tokens"
            return RoundResult(cache=stale_cache if policy == "stale" else old, trace=trace)
        if cfg.window is None:
            old = None  # only a window reads it: free it before the round builds its own cache
        if bool(short.any()):
            trace.events.append(f"rows {short.nonzero().flatten().tolist()} have fewer than {cfg.min_tokens} fit tokens: kept their state")
        if not cfg.warm_start:
            with torch.no_grad():
                if state.delta.dim() == 3:
                    state.delta[:, ~short.to(state.delta.device)] = 0
                else:
                    state.delta.zero_()
            old = None
        if policy == "stale" and old is None:
            old = stale_cache
        t0 = time.perf_counter()  # the confidence phase includes building the window's prefix cache
        win = open_window(cfg.window, x, old, lambda s: self._hidden_only(x)(
            x[:, :s], xm[:, :s], pos[:, :s], y[:, :s], use_cache=True).past_key_values)
        s0 = win.start if win is not None else 0
        trace.window_start = win.start if win is not None else None
        # what the confidence pass and the steps run on: the window (whole context without one)
        wx, wy, wpos, fit_w, val_w = x[:, s0:], y[:, s0:], pos[:, s0:], fit_f[:, s0:], val_f[:, s0:]

        # 1. confidence pass (also: held-out loss of "no change", layer inputs, cache under the start state).
        #    It doubles as the first step's forward (run with grad) unless checkpointing is on.
        conf_cache_wanted = want_cache and policy != "stale" and win is None
        B = ids.shape[0]
        # memory mode: the loss in token chunks from a long context on (the refresh scores all of it);
        # layer checkpointing where the steps' gradient covers that many tokens (the window, with one)
        long = cfg.checkpoint_min_tokens is not None and x.shape[1] >= cfg.checkpoint_min_tokens
        self.loss_head = LossHead.for_model(self.model, x) if long else None
        ckpt = long and wx.shape[1] >= cfg.checkpoint_min_tokens
        share = cfg.share_first_forward and not ckpt
        known = not needs_confidence(cfg)
        if known:
            picks = _unless_short([select_layers(cfg, state.layer_ids, None)] * B, short)
            slots = sorted({s for sl, _ in picks for s in sl})
        descent: _Descent | None = None
        with contextlib.ExitStack() as session:
            if share:  # layers not known yet: every slot trainable, the gradient mask keeps the selected ones
                descent = _Descent(self, wx, wy, xm, wpos, slots if known else list(range(len(state.layer_ids))), ckpt, win)
                session.enter_context(descent.session())
            wanted = {state.layer_ids[min(slots)]} if known else None  # layer inputs to keep for replay
            with handle.record() as rec, LayerInputs(self.layers, wanted) as cap:
                with contextlib.nullcontext() if share else torch.no_grad():
                    out = self._losses(wx, xm, wpos, wy, use_cache=conf_cache_wanted, past=win)
            conf_cache = _detached(out.past_key_values) if conf_cache_wanted else None
            ce_first = out.losses
            ce0 = ce_first.detach()
            del out
            conf = rec.confidence_rows(B, mask=xm[:, s0:]) if needs_confidence(cfg) else None  # [L, B]
            before = rec.selection_sets()
            if not known:
                picks = _unless_short([select_layers(cfg, state.layer_ids, conf[:, b]) for b in range(B)], short)
                slots = sorted({s for sl, _ in picks for s in sl})
            first = state.layer_ids[min(slots)]
            reuse = check_replay(self.model, self.layers, first, B)
            if not reuse.replay:
                trace.events.append(f"layers below {first} recomputed: replaying them is not exact for this model")
                first = 0
            hidden = cap.inputs.get(first)  # over the window only, with one
            cap.inputs.clear()
            conf_full = conf_cache is not None
            if ckpt and conf_cache is not None:  # memory mode: keep only the layers the refresh splices
                conf_full = False
                conf_cache = conf_cache if policy == "partial" and truncate_cache(conf_cache, first) else None
            trace.selected_layers = [state.layer_ids[s] for s in slots]
            if B > 1:
                trace.rows_selected = [[state.layer_ids[s] for s in sl] for sl, _ in picks]
            trace.confidence = [] if conf is None else [round(float(c), 5) for c in conf.mean(dim=1)]
            trace.times["confidence"] = time.perf_counter() - t0

            # 2. gradient steps on the selected layers' delta (layers below `first` replayed)
            t0 = time.perf_counter()
            val0 = _masked_mean(ce0, val_w)
            candidates: list[tuple[torch.Tensor, torch.Tensor | None]] = [(state.delta.detach().clone(), val0)]
            if descent is None:
                descent = _Descent(self, wx, wy, xm, wpos, slots, ckpt, win)
                descent.select(picks, first)  # before the session: checkpointing starts at `first`
                session.enter_context(descent.session())
            else:
                descent.select(picks, first)
            descent.replay_from(hidden)
            descent.run(fit_w, val_w, cfg.steps, candidates, trace.fit_loss, trace.events, first_ce=ce_first)
            del ce_first
        trace.times["steps"] = time.perf_counter() - t0

        # 3. refresh: cache (and held-out loss) under the final delta
        t0 = time.perf_counter()
        partial = (
            policy == "partial" and (conf_cache is None or supports_partial(conf_cache)) and win is None and reuse.splice
        )
        deferred = cfg.guard and cfg.refit  # the guard decides first, so the cache is built once, after it
        whole = hidden if win is None else None  # a window's layer input does not cover the context
        build = want_cache and policy != "stale" and not deferred
        if build and win is not None:  # no refit follows: free the prefix and the old cache before building
            win = old = descent.past = None
        cache, ce_final, after = self._refresh(
            x, y, xm, pos, first, whole, build=build,
            partial=partial, conf_cache=conf_cache, losses=cfg.guard,
        )
        if ce_final is not None and len(candidates) > 1:
            candidates[-1] = (candidates[-1][0], _masked_mean(ce_final, val_f))
        if win is not None and after is not None:  # compare on the window, where `before` was recorded
            after = [None if a is None else a.view(B, x.shape[1], -1)[:, s0:].reshape(-1, a.shape[-1]) for a in after]
        trace.routing_changed = _changed(before, after)

        # 4. guard: keep the candidate with the lowest held-out loss (per row); optionally refit
        if cfg.guard:
            kept = self._choose(candidates, state, short)
            trace.chosen = kept[0] if len(set(kept)) == 1 else None
            trace.val_loss = [float(v.mean()) for _, v in candidates if v is not None]
            rebuild = deferred or kept != [len(candidates) - 1] * len(kept)
            if cfg.refit and max(kept) > 0:
                t1 = time.perf_counter()
                self._refit(descent, candidates[0][0], kept, fit_w + val_w, trace)
                trace.times["refit"] = time.perf_counter() - t1
                t0 += trace.times["refit"]
                rebuild = True
            if rebuild and want_cache and policy != "stale":
                if max(kept) == 0 and conf_full:
                    cache = conf_cache
                elif max(kept) == 0 and win is not None and covers(old, x):
                    cache = old  # "no change": the decode cache already matches the start state
                else:
                    win = old = descent.past = None
                    cache, _, _ = self._refresh(
                        x, y, xm, pos, first, whole, build=True, partial=partial, conf_cache=conf_cache, record=False,
                        losses=False,
                    )
        else:
            trace.chosen = len(candidates) - 1
        trace.times["refresh"] = time.perf_counter() - t0
        state.refresh()
        trace.delta_mean_abs = float(state.delta.detach().abs().mean())
        if policy == "stale":
            cache = stale_cache if stale_cache is not None else None
        return RoundResult(cache=cache, trace=trace)

    def _refresh(
        self, x, y, xm, pos, first, hidden, *, build: bool, partial: bool, conf_cache: Any, record: bool = True,
        losses: bool = True,
    ) -> tuple[Any, torch.Tensor | None, list[torch.Tensor | None] | None]:
        """No-grad forward under the current state: (cache or None, per-token CE if ``losses``, selections).

        Without ``losses`` (no guard to score) the forward stops before the LM head where the model splits.
        """
        skip = first if (partial or not build) else 0
        run = self._losses if losses else self._hidden_only(x)
        with torch.no_grad(), skip_below(self.layers, skip, hidden):
            if record:
                with self.handle.record() as rec:
                    out = run(x, xm, pos, y, use_cache=build)
                after = rec.selection_sets(missing_ok=True)
            else:
                out = run(x, xm, pos, y, use_cache=build)
                after = None
        cache = out.past_key_values if build else None
        if build and skip > 0 and not splice_cache(cache, conf_cache, skip):
            with torch.no_grad():
                cache = self._hidden_only(x)(x, xm, pos, y, use_cache=True).past_key_values
        return cache, out.losses if losses else None, after

    def _hidden_only(self, probe: torch.Tensor) -> Any:
        """A forward without the LM head (for its cache), where the model verifiably splits into decoder +
        head (:class:`LossHead`, checked on ``probe`` outside any layer hooks); else the whole model's."""
        head = LossHead.for_model(self.model, probe)

        def run(x: torch.Tensor, xm: torch.Tensor, pos: torch.Tensor, y: torch.Tensor, *, use_cache: bool) -> LossOutput:
            if head is None:
                out = self._forward(x, xm, pos, use_cache=use_cache)
            else:
                out = head.decoder(input_ids=x, attention_mask=xm, position_ids=pos, use_cache=use_cache, return_dict=True)
            return LossOutput(torch.empty(0), output_cache(out) if use_cache else None)

        return run

    def _choose(
        self, candidates: list[tuple[torch.Tensor, torch.Tensor | None]], state: Any, short: torch.Tensor
    ) -> list[int]:
        """Set ``state.delta`` to the best held-out candidate per row; return each row's candidate index
        ("no change" for the ``short`` rows, which did not adapt)."""
        scored = [(i, d, v) for i, (d, v) in enumerate(candidates) if v is not None]
        vals = torch.stack([v for _, _, v in scored])  # [N, B]
        base = vals[0]
        best = vals.argmin(dim=0)
        ok = (vals.gather(0, best[None]).squeeze(0) < base * (1 - self.cfg.min_gain)) & ~short.to(best.device)
        best = torch.where(ok, best, torch.zeros_like(best))
        picks = [scored[int(b)][0] for b in best]
        _set_rows(state, [candidates[i][0] for i in picks])
        return picks

    def _refit(self, descend: _Descent, start: torch.Tensor, picks: list[int], all_f: torch.Tensor, trace: Any) -> None:
        """Re-run each row's chosen number of steps from the round's start on every target (head and tail)."""
        state = self.handle.state
        with torch.no_grad():
            state.delta.copy_(start)
        path: list[tuple[torch.Tensor, torch.Tensor | None]] = [(start, None)]
        with descend.session():
            descend.replay_from(descend.hidden)
            descend.run(all_f, None, max(picks), path, trace.refit_loss, trace.events)
        _set_rows(state, [path[min(k, len(path) - 1)][0] for k in picks])


class _Descent:
    """Gradient steps on the trainable slots of ``handle.state.delta`` for one round's context."""

    def __init__(self, runner: RoundRunner, x, y, xm, pos, slots: list[int], ckpt: bool, past: Window | None = None) -> None:
        self.r, self.x, self.y, self.xm, self.pos = runner, x, y, xm, pos
        self.slots, self.ckpt, self.past = slots, ckpt, past
        self.gmask: torch.Tensor | None = None
        self.replay = 0
        self.hidden: torch.Tensor | None = None
        self._stack: contextlib.ExitStack | None = None
        self.delta: torch.Tensor | None = None

    def select(self, picks: list[tuple[list[int], torch.Tensor]], first: int) -> None:
        """The rows' selected layers: their gradient weights, and the layer below which to replay."""
        weights = torch.stack([w for _, w in picks], dim=1)  # [L, B]
        delta = self.r.handle.state.delta
        self.gmask = (weights[:, :1] if delta.dim() == 2 else weights[:, :, None]).to(delta.device)
        self.replay = first if self.r.cfg.prefix_reuse else 0

    @contextlib.contextmanager
    def session(self) -> Iterator[torch.Tensor]:
        """Grad on, only ``delta``'s slots trainable, checkpointing and straight-through as configured."""
        r = self.r
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            self.delta = stack.enter_context(r.handle.trainable(self.slots))
            stack.enter_context(checkpoint_from(r.layers, self.replay, self.ckpt, keep_cache=self.past is not None))
            stack.enter_context(r.handle.straight_through(r.cfg.straight_through))
            self._stack = stack
            try:
                yield self.delta
            finally:
                self._stack, self.delta = None, None

    def replay_from(self, hidden: torch.Tensor | None) -> None:
        """From now on in this session, layers below the lowest adapted one return ``hidden``."""
        assert self._stack is not None
        self.hidden = hidden
        self._stack.enter_context(skip_below(self.r.layers, self.replay, hidden))

    def run(
        self,
        fit_f: torch.Tensor,
        val_f: torch.Tensor | None,
        steps: int,
        candidates: list[tuple[torch.Tensor, torch.Tensor | None]],
        losses: list[float],
        events: list[str],
        first_ce: torch.Tensor | None = None,
    ) -> None:
        """Take up to ``steps`` steps; append each new delta to ``candidates`` (with its held-out loss once known).

        ``first_ce``: per-token losses of a forward already run in this session under the current
        delta (with grad); step 0 uses them instead of running its own forward.
        """
        r, cfg, delta = self.r, self.r.cfg, self.delta
        assert delta is not None and self.gmask is not None, "run() needs select() and an open session()"
        opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)([delta], lr=cfg.lr)
        prev: float | None = None
        for step in range(steps):
            if step == 0 and first_ce is not None and first_ce.requires_grad:
                ce = first_ce
            else:
                ce = r._losses(self.x, self.xm, self.pos, self.y, use_cache=False, past=self.past).losses
            loss = _masked_mean(ce, fit_f).sum()
            if not torch.isfinite(loss):
                events.append(f"non-finite loss at step {step}: kept the last good delta")
                break
            cur = float(loss.detach())
            if step > 0 and val_f is not None:
                candidates[step] = (candidates[step][0], _masked_mean(ce.detach(), val_f))
            losses.append(cur / self.x.shape[0])
            if cfg.early_stop is not None and prev is not None and prev - cur < cfg.early_stop * abs(prev):
                events.append(f"early stop at step {step}")
                break
            prev = cur
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if delta.grad is None or not torch.isfinite(delta.grad).all():
                events.append(f"non-finite gradient at step {step}: kept the last good delta")
                break
            delta.grad.mul_(self.gmask)
            last_good = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                if cfg.max_abs is not None:
                    delta.clamp_(-cfg.max_abs, cfg.max_abs)
                if not torch.isfinite(delta).all():
                    delta.copy_(last_good)
                    events.append(f"non-finite delta after step {step}: reverted to the last good delta")
                    break
            candidates.append((delta.detach().clone(), None))


def _unless_short(picks: list[tuple[list[int], torch.Tensor]], short: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
    """Per-row layer picks, with no layer (zero gradient weights) for the rows with too few fit targets."""
    return [([], torch.zeros_like(w)) if bool(short[b]) else (sl, w) for b, (sl, w) in enumerate(picks)]


def _detached(cache: Any) -> Any:
    """The cache with its key/value tensors cut from the autograd graph (a grad-mode forward built it)."""
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.requires_grad:
                setattr(layer, name, t.detach())
    return cache


def _set_rows(state: Any, rows: list[torch.Tensor]) -> None:
    """``state.delta`` <- ``rows[b]``'s row b (or ``rows[0]`` when the state is shared by all rows)."""
    with torch.no_grad():
        if state.delta.dim() == 2:
            state.delta.copy_(rows[0])
        else:
            for b, d in enumerate(rows):
                state.delta[:, b].copy_(d[:, b])


def _changed(before: list[torch.Tensor], after: list[torch.Tensor | None] | None) -> float | None:
    """Fraction of (token, layer) top-k sets that differ between two recordings of the same tokens."""
    if after is None:
        return None
    diffs, total = 0, 0
    for b, a in zip(before, after):
        if a is None or a.shape != b.shape:
            continue
        diffs += int((a != b).any(dim=1).sum())
        total += a.shape[0]
    return diffs / total if total else None
