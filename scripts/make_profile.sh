#!/usr/bin/env bash
# Makes a built-in model's shipped profile, profiles/$MODEL.json, from a clean
# start: the SRH needle sweep, then the layer eviction errors. Run logs go to docs/profiling/.
# A killed run continues where it stopped when started again; extra arguments (e.g.
# --restart) go to both sweeps.
#   bash scripts/make_profile.sh                                   # smollm2-135m-instruct, as shipped
#   MODEL=gemma3-270m LENGTHS=500,1500 DEPTHS=0,50,100 bash scripts/make_profile.sh   # as shipped
#   MODEL=gemma3-270m LENGTHS=8000,16000,32000 OUT=profiles/gemma3-270m-32k.json SRH_ARGS="--skip-needles 3" \
#       LAYER_ARGS="--words 12000" bash scripts/make_profile.sh     # beside it, at the lengths it is used at
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-smollm2-135m-instruct}
LENGTHS=${LENGTHS:-500,1500,2500}
DEPTHS=${DEPTHS:-0,25,50,75,100}
export HF_HUB_OFFLINE=1
OUT=${OUT:-profiles/$MODEL.json}
RUN=docs/profiling/$(basename "$OUT" .json)
$PY -m ckv_mlx.profile srh --model "$MODEL" --lengths "$LENGTHS" --depths "$DEPTHS" \
    --out "$OUT" --trials "$RUN.srh.jsonl" ${SRH_ARGS:-} "$@"
$PY -m ckv_mlx.profile layers --model "$MODEL" --profile "$OUT" --trials "$RUN.layers.jsonl" ${LAYER_ARGS:-} "$@"
$PY -m ckv_mlx.profile validate "$OUT" --model "$MODEL"
