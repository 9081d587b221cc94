"""Held-out continuation-NLL eval: snippet corpora, the adaptation loss on real text, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ttadapt.eval import corpora, heldout

MODEL = Path("/work/shared/models/tiny-olmoe")
needs_model = pytest.mark.skipif(not MODEL.exists(), reason="needs /work/shared/models/tiny-olmoe")


@pytest.fixture(scope="module")
def model_tok():
    torch.set_num_threads(1)
    return heldout.load_model(MODEL)


# ---------------------------------------------------------------------- corpora
def test_corpus_files_have_the_documented_schema():
    domains = corpora.available_domains()
    assert set(corpora.DOMAINS) <= set(domains)
    sources = json.loads((corpora.DATA_DIR / "SOURCES.json").read_text())
    total = 0
    for d in corpora.DOMAINS:
        path = corpora.DATA_DIR / f"{d}.jsonl"
        total += path.stat().st_size
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert d in sources
        ids = [r["id"] for r in rows]
        assert len(set(ids)) == len(ids)
        for r in rows:
            assert set(r) == {"id", "source", "split", "text"}
            assert r["id"].startswith(f"{d}/{r['split']}/") and r["split"] in corpora.SPLITS
            assert isinstance(r["text"], str) and len(r["text"]) > 500
        test = corpora.load_snippets(d, split="test")
        tune = corpora.load_snippets(d, split="tune")
        assert len(test) >= 12 and len(tune) >= 12 and len(test) + len(tune) == len(rows)
        # no source document feeds both splits
        doc = lambda r: r["source"].rsplit("#L", 1)[0]  # noqa: E731
        assert not {doc(r) for r in test} & {doc(r) for r in tune}
    assert total < 1.5 * 2**20


def test_load_snippets_rejects_bad_rows(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"id": "x/test/000", "source": "s", "text": ""}) + "\n")
    with pytest.raises(ValueError, match="text"):
        corpora.load_snippets("x", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="corpora"):
        corpora.load_snippets("missing", data_dir=tmp_path)


@needs_model
def test_every_test_snippet_is_long_enough(model_tok):
    _, tok = model_tok
    for d in corpora.DOMAINS:
        for r in corpora.load_snippets(d, split=None):
            assert heldout.encode(tok, r["text"], 512) is not None, r["id"]


# ---------------------------------------------------------------------- configs and summaries
def test_parse_config():
    assert heldout.parse_config("base") is None
    cfg = heldout.parse_config("default:lr=0.1:steps=8:max_abs=null:selection=all")
    assert (cfg.lr, cfg.steps, cfg.max_abs, cfg.selection) == (0.1, 8, None, "all")
    assert heldout.parse_config("paper").guard is False
    with pytest.raises(ValueError):
        heldout.parse_config("default:lr")
    with pytest.raises(ValueError):
        heldout.parse_config("nope")


def test_summary_and_target_on_synthetic_records():
    def rec(domain, base, adapted):
        s = {
            "nll": adapted,
            "adapt_s": 0.1,
            "fit_loss": [2.0, 1.9],
            "val_loss": [1.0, 0.9],
            "chosen": 1,
            "skipped": None,
            "layers": [0],
            "delta_mean_abs": 0.1,
            "routing_changed": 0.0,
        }
        return {"domain": domain, "id": "x", "source": "s", "scores": {"base": {"nll": base}, "default": s}}

    records = [rec("code", 2.0, 2.002), rec("code", 2.0, 2.0), rec("go", 4.0, 3.9), rec("go", 4.0, 3.94)]
    summary = heldout.summarise(records, ["base", "default"])
    assert summary["code"]["n"] == 2 and summary["code"]["kind"] == "in-distribution"
    c = summary["code"]["configs"]["default"]
    assert c["rel_change_pct"] == pytest.approx(0.05) and (c["wins"], c["losses"], c["ties"]) == (0, 1, 1)
    g = summary["go"]["configs"]["default"]
    assert g["rel_change_pct"] == pytest.approx(-2.0) and g["wins"] == 2
    target = heldout.check_target(summary)
    assert not target["met"] and target["shifted_met"] == 1  # one shifted domain is not enough
    assert target["domains"]["go"]["limit_pct"] == -1.0 and target["domains"]["go"]["met"]
    two = heldout.summarise([*records, rec("c", 3.0, 2.9)], ["base", "default"])
    assert heldout.check_target(two)["met"]
    bad_in = heldout.summarise([*records, rec("c", 3.0, 2.9), rec("prose", 2.0, 2.01)], ["base", "default"])
    assert not heldout.check_target(bad_in)["met"]  # prose +0.5% > +0.2%
    md = heldout.markdown(
        {
            "summary": summary,
            "target": target,
            "settings": {
                "configs": ["base", "default"],
                "context": 256,
                "continuation": 256,
                "model_name": "m",
                "split": "test",
            },
        }
    )
    assert "| go | shifted | 2 | 4.0000 | 3.9200 | -2.00% | 2/0 |" in md


# ---------------------------------------------------------------------- the model
@needs_model
@pytest.mark.parametrize("preset", ["default", "paper"])
def test_adaptation_loss_falls_on_a_real_snippet(model_tok, preset):
    from ttadapt.config import RerouteConfig
    from ttadapt.generation import Rerouter

    model, tok = model_tok
    snippet = corpora.load_snippets("shakespeare", split="test")[0]
    ids = heldout.encode(tok, snippet["text"], 160)
    cfg = RerouteConfig.preset(preset, early_stop=None)
    _, trace = Rerouter(model, cfg).adapt(ids, return_trace=True)
    loss = trace.rounds[0].fit_loss
    assert len(loss) == cfg.steps >= 2
    assert loss[-1] < loss[0]
    assert all(b < a for a, b in zip(loss, loss[1:]))


@needs_model
def test_zero_state_scores_like_the_unpatched_model(model_tok):
    import ttadapt

    model, tok = model_tok
    ids = heldout.encode(tok, corpora.load_snippets("code", split="test")[0]["text"], 96)
    plain = heldout.continuation_nll(model, ids, 64)
    with ttadapt.patch(model) as handle, handle.new_state().apply(handle):
        assert heldout.continuation_nll(model, ids, 64) == plain


@needs_model
def test_cli_runs_end_to_end(tmp_path, capsys):
    from ttadapt.config import RerouteConfig

    out = tmp_path / "run"
    rc = heldout.main(
        [
            "--model",
            str(MODEL),
            "--domains",
            "code,shakespeare",
            "--snippets",
            "1",
            "--context",
            "48",
            "--continuation",
            "16",
            "--configs",
            "base,default,fast:steps=1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    result = json.loads((out / "heldout.json").read_text())
    assert set(result["summary"]) == {"code", "shakespeare"}
    for d, e in result["summary"].items():
        assert e["n"] == 1 and e["base_nll"] > 0
        assert set(e["configs"]) == {"default", "fast:steps=1"}
        assert len(e["configs"]["default"]["fit_loss_per_step"]) == RerouteConfig.preset("default").steps
        c = e["configs"]["default"]
        assert c["wins"] + c["losses"] + c["ties"] == 1
    assert len(result["records"]) == 2 and result["target"]["config"] == "default"
    md = (out / "heldout.md").read_text()
    assert "| code | in-distribution | 1 |" in md and "| shakespeare | shifted | 1 |" in md
    assert md in capsys.readouterr().out


@needs_model
def test_online_rounds_readapt_without_peeking(model_tok):
    """Online scoring re-adapts every `interval` tokens on what came before, never on what it scores."""
    from ttadapt.config import RerouteConfig

    model, tok = model_tok
    ids = heldout.encode(tok, corpora.load_snippets("kjv", split="test")[0]["text"], 96)
    cfg = {"a": RerouteConfig.preset("fast", interval=16, steps=1, guard=False, lr=50.0)}
    online = heldout.score_snippet(model, ids, 64, cfg, rounds="online")["a"]
    prefill = heldout.score_snippet(model, ids, 64, cfg, rounds="prefill")["a"]
    assert online["rounds"] == 2 and prefill["rounds"] == 1
    # round 1 scores tokens 64..79 under the context-only state: the same numbers as prefill scoring
    first_prefill = heldout.score_snippet(model, ids[:, :80], 64, cfg, rounds="prefill")["a"]["nll"]
    assert online["nll_per_round"][0] == pytest.approx(first_prefill, abs=1e-6)
    # round 2 adapted on tokens 64..79 as well, so it scores 80..95 differently from prefill
    assert online["nll"] != pytest.approx(prefill["nll"], abs=1e-6)
    # changing the tokens of round 2 changes nothing that round 1 saw
    ids2 = ids.clone()
    ids2[:, 80:] = torch.flip(ids[:, 80:], dims=[1])
    again = heldout.score_snippet(model, ids2, 64, cfg, rounds="online")["a"]
    assert again["nll_per_round"][0] == pytest.approx(online["nll_per_round"][0], abs=1e-6)
    assert again["nll_per_round"][1] != pytest.approx(online["nll_per_round"][1], abs=1e-6)
