#!/usr/bin/env bash
# Makes ckv_mlx/profiles/data/smollm2-135m-instruct.json from a clean start, as shipped:
# the SRH needle sweep, then the layer eviction errors. Run logs go to docs/profiling/.
# A killed run continues where it stopped when started again; extra arguments (e.g.
# --restart) go to both sweeps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
$PY -m ckv_mlx.profile srh --lengths 500,1500,2500 --depths 0,25,50,75,100 \
    --out ckv_mlx/profiles/data/smollm2-135m-instruct.json --trials docs/profiling/smollm2-135m-instruct.srh.jsonl "$@"
$PY -m ckv_mlx.profile layers --profile ckv_mlx/profiles/data/smollm2-135m-instruct.json \
    --trials docs/profiling/smollm2-135m-instruct.layers.jsonl "$@"
$PY -m ckv_mlx.profile validate ckv_mlx/profiles/data/smollm2-135m-instruct.json
