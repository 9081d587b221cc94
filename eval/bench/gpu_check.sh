#!/usr/bin/env bash
# Issue 6's GPU numbers in one device run (about 8 minutes on an H100/H200): the paper-default time table and
# the 4k-context memory pass at OLMoE-1B-7B shape (random bf16 weights; speed does not depend on them).
#
# Here (the device has no package index; the wheel carries ttadapt.eval and ttadapt.patches; .gpu/ and build/
# are git-ignored, so only the carried wheel travels, about 50 MiB with the tree):
#   pip wheel -q --no-deps . -w .gpu
# Then, with the tool library's device entry:
#   run(command="bash eval/bench/gpu_check.sh", carry=[".gpu"], timeout_s=600)
# Results come back under $OUT (unit/, time/ and memory/: bench.json, bench.md, bench.png); paste the tables into
# eval/bench/README.md, "GPU". MODEL, DEVICE, NEW and REPEATS override the defaults (a CPU dry run:
# DEVICE=cpu MODEL=tiny NEW=8 REPEATS=1 OUT=/tmp/g bash eval/bench/gpu_check.sh).
set -euo pipefail
MODEL=${MODEL:-olmoe-1b-7b} DEVICE=${DEVICE:-cuda} NEW=${NEW:-256} REPEATS=${REPEATS:-3} OUT=${OUT:-runs/gpu}
export PYTHONUNBUFFERED=1
if [ -d .gpu ]; then python3 -m pip install -q --no-deps --force-reinstall .gpu/ttadapt-*.whl; fi
python3 - <<'PY'
import platform, torch, transformers, ttadapt
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
print(f"device {dev}; torch {torch.__version__}; transformers {transformers.__version__}; ttadapt {ttadapt.__file__}")
PY
# first the cost model alone (under a minute): the device's fwd+bwd / decode-step quotient, even if a later step runs out of time
python3 -m ttadapt.eval.bench.cli unit --model "$MODEL" --device "$DEVICE" --context 200 2048 --new-tokens "$NEW" \
    --out "$OUT/unit"
python3 -m ttadapt.eval.bench.cli time --model "$MODEL" --device "$DEVICE" --context 200 --new-tokens "$NEW" \
    --repeats "$REPEATS" --methods plain paper paper-naive fast default --out "$OUT/time"
python3 -m ttadapt.eval.bench.cli memory --model "$MODEL" --device "$DEVICE" --context 4096 --new-tokens 32 \
    --methods plain paper default --out "$OUT/memory"
