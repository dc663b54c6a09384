#!/usr/bin/env bash
# The evaluation runs behind docs/results.md, on the built-in model and its shipped profile
# (with the 2 SRHs per layer that the records were made with; it ships with 3 since the NIAH run at 1K-7K).
# Each step is resumable: killed and started again, it continues; with larger grids
# (e.g. --lengths 1000,2000,4000,7000) it adds only the missing records.
# Usage: bash scripts/results.sh [niah|pyramidkv|uniform|firstk|chunked|coverage|ablation|mixed|agnostic|followup|gemma_niah|
#                                 gemma_32k_profile|gemma_32k_niah|gemma_32k_niah_low|gemma_reading|kv_bits|
#                                 facts_dev|facts_coverage|facts_held_out|span_niah]...
# (default: all sixteen but the four gemma steps at 32K, hours each)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
PG=../shared/reference/compresskv/haystack/paul_graham_essays
LENGTHS=${LENGTHS:-1000}  # niah, mixed, agnostic and followup; docs/results.md says which each used
SHIPPED=profiles/smollm2-135m-instruct.json
CKV=compresskv,compresskv-gqa  # the two CompressKV methods, for the profile-variant runs
TWO_SRH=runs/smollm2-2-srh.json  # the shipped profile with 2 SRHs per layer (defaults.first_k), as it was shipped
                                 # when every record of docs/eval/ except niah-first-k-3* was made

variant() {  # OUT PYTHON: the shipped profile changed by PYTHON (acting on p), written to OUT
    mkdir -p runs
    $PY -c "import json, sys; p = json.load(open(sys.argv[1])); $2; json.dump(p, open(sys.argv[2], 'w'))" "$SHIPPED" "$1"
}
variant "$TWO_SRH" 'p["defaults"]["first_k"] = 2'

niah_eval() {  # PROFILE OUT EVAL-ARGS...: NIAH with PROFILE, query-aware, budgets 32-256, 8 answer tokens, records in OUT
    local profile=$1 out=$2; shift 2
    $PY -m ckv_mlx.eval --tasks niah --haystack "$PG" --profile "$profile" --budgets 32,64,128,256 --modes query-aware \
        --max-tokens 8 --no-fidelity --out "$out" "$@"
}

niah() {  # NIAH, completion style, Paul Graham haystack, 10 depths x NEEDLES needles (default 3), query-aware;
          # pyramidkv on the first 3 needles only: its records predate the levelled budgets (docs/results.md marks them)
    local methods=full,compresskv,compresskv-gqa,snapkv,streamingllm,keydiff
    niah_eval "$TWO_SRH" docs/eval/niah --lengths "$LENGTHS" --needle-count 3 --methods "$methods,pyramidkv"
    niah_eval "$TWO_SRH" docs/eval/niah --lengths "$LENGTHS" --needle-count "${NEEDLES:-3}" --methods "$methods"
}

pyramidkv() {  # PyramidKV with budgets levelled to exactly B x L on the 240 NIAH samples of niah (needles 1-6, 1K-7K);
               # its full-cache answers seeded from docs/eval/niah (same settings, same prompts)
    local out=docs/eval/niah-pyramidkv
    if [ ! -s $out/records.jsonl ]; then
        mkdir -p $out
        $PY -c "import json, sys; rows = open(sys.argv[1]).read().splitlines(); open(sys.argv[2], 'w').write('\\n'.join(
            [rows[0]] + [r for r in rows[1:] if json.loads(r).get('method') == 'full']) + '\\n')" docs/eval/niah/records.jsonl $out/records.jsonl
    fi
    niah_eval "$TWO_SRH" $out --lengths 1000,2000,4000,7000 --needle-count 6 --methods full,pyramidkv
}

uniform() {  # compresskv with uniform budgets: the 2-SRH profile without its layer errors, NIAH at 2K
    variant runs/smollm2-uniform-budgets.json 'p.pop("layer_errors"); p["defaults"]["first_k"] = 2'
    niah_eval runs/smollm2-uniform-budgets.json docs/eval/niah-uniform --methods "$CKV" --lengths 2000
}

firstk() {  # 3 SRHs per layer instead of 2 (what the profile now ships): compresskv and compresskv-gqa at 2K and 4K
             # and at 7K on the two depths where compresskv loses the password needle (see coverage); then
             # compresskv-gqa on all 240 NIAH samples of the niah step (in docs/ its first 66 samples were copied from those runs)
    variant runs/smollm2-first-k-3.json 'p["defaults"]["first_k"] = 3'
    niah_eval runs/smollm2-first-k-3.json docs/eval/niah-first-k-3 --methods "$CKV" --lengths 2000
    niah_eval runs/smollm2-first-k-3.json docs/eval/niah-first-k-3-4k --methods "$CKV" --lengths 4000
    niah_eval runs/smollm2-first-k-3.json docs/eval/niah-first-k-3-7k --methods "$CKV" --lengths 7000 --depths 11,22
    niah_eval runs/smollm2-first-k-3.json docs/eval/niah-first-k-3-all --methods full,compresskv-gqa \
        --lengths 1000,2000,4000,7000 --needle-count 6
}

span_niah() {  # the exact-fact choices (compresskv-gqa+span8, then +word48, the default) back on the 240 essay NIAH
               # samples of firstk, beside compresskv-gqa's records (same profile, prompts and settings); LENGTHS_SPAN
               # picks lengths (default all four), SPAN_METHODS the methods
    variant runs/smollm2-first-k-3.json 'p["defaults"]["first_k"] = 3'
    niah_eval runs/smollm2-first-k-3.json docs/eval/niah-first-k-3-all \
        --methods "full,compresskv-gqa,${SPAN_METHODS:-compresskv-gqa+span8,compresskv-gqa+span8+word48}" \
        --lengths "${LENGTHS_SPAN:-1000,2000,4000,7000}" --needle-count 6
}

chunked() {  # bounded-memory prefill: NIAH at 2K, the document read in chunks of 512 kept to 256 tokens per layer,
             # each chunk scored by its own last tokens (no question known), then by the question read after it
    for scoring in window question; do
        out=docs/eval/niah-chunked; [ $scoring = question ] && out=docs/eval/niah-chunked-question
        $PY -m ckv_mlx.eval --tasks niah --haystack "$PG" --profile "$TWO_SRH" --lengths 2000 --methods compresskv \
            --budgets 32,64,128,256 \
            --modes query-aware --max-tokens 8 --no-fidelity --working-budget 256 --prefill-chunk 512 \
            --chunk-scoring $scoring --out $out
    done
}

ablation() {  # SRH masking vs random and classic retrieval heads
    $PY scripts/srh_ablation.py --trials docs/profiling/smollm2-135m-instruct.srh.jsonl \
        --lengths 500,1500 --depths 0,50,100 --heads 10,20 --seeds 3
}

mixed() {  # both modes, fidelity and RULER-style QA on a smaller grid
    $PY -m ckv_mlx.eval --tasks niah,multikey,multivalue,variable-tracking,frequent-words --haystack "$PG" --profile "$TWO_SRH" \
        --lengths "$LENGTHS" --depths 50 --samples 2 --budgets 64,256 --max-tokens 12 --out docs/eval/mixed
}

agnostic() {  # NIAH with the question outside the window (query-agnostic) and in it, KeyDiff beside the window methods
    $PY -m ckv_mlx.eval --tasks niah --haystack "$PG" --profile "$TWO_SRH" --lengths "$LENGTHS" --depths 25,50,75 \
        --methods full,compresskv-gqa,snapkv,keydiff --budgets 64,256 --max-tokens 8 --no-fidelity --out docs/eval/agnostic
}

coverage() {  # which needle tokens each method keeps, layer by layer, on the two 7K samples compresskv misses at 64
    for depth in 11 22; do
        $PY scripts/needle_coverage.py --profile "$TWO_SRH" --length 7000 --depth $depth --needle 2 --budget 64 --span sentence
    done
}

followup() {  # a second question about another needle, under each multi-turn policy
    $PY -m ckv_mlx.eval --tasks followup --haystack "$PG" --profile "$TWO_SRH" --lengths "$LENGTHS" --depths 25 \
        --methods full,compresskv,compresskv-gqa,snapkv,streamingllm,keydiff --budgets 64,256 --max-tokens 8 \
        --out docs/eval/followup
}

gemma_niah() {  # Gemma 3 270M (base, 1 KV head, 3 global layers of 18): NIAH at 1K-4K, 5 depths x 3 needles
    $PY -m ckv_mlx.eval --model gemma3-270m --tasks niah --haystack "$PG" --lengths 1000,2000,4000 \
        --depths 0,25,50,75,100 --methods full,compresskv,compresskv-gqa,snapkv,streamingllm \
        --budgets 32,64,128,256 --modes query-aware --max-tokens 8 --no-fidelity --out docs/eval/gemma3-niah
}

gemma_32k_profile() {  # Gemma 3 270M's profile made at the lengths it is used at (8K-32K; the needles the NIAH
                      # below asks for left out), beside the shipped one made at 500-1,500; resumable
    MODEL=gemma3-270m LENGTHS=8000,16000,32000 DEPTHS=0,50,100 OUT=profiles/gemma3-270m-32k.json \
        SRH_ARGS="--skip-needles 3" LAYER_ARGS="--words 12000" bash scripts/make_profile.sh
}

gemma_niah_grid() {  # BUDGETS MODES: Gemma 3 270M at 8K-32K, every method (the shipped default too), 5 depths x 3
                    # needles, with the 32K profile; resumable (LENGTHS_32K to run a part)
    $PY -m ckv_mlx.eval --model gemma3-270m --tasks niah --haystack "$PG" --lengths "${LENGTHS_32K:-8000,16000,32000}" \
        --profile profiles/gemma3-270m-32k.json --depths 0,25,50,75,100 \
        --methods full,compresskv,compresskv-gqa,compresskv-gqa+span8,compresskv-gqa+span8+word48,snapkv,pyramidkv,\
streamingllm,keydiff --budgets "$1" --modes "$2" --max-tokens 8 --no-fidelity --out docs/eval/gemma3-niah-32k
}

gemma_32k_niah() {  # the issue's grid: 64-512 tokens per layer, query-aware and query-agnostic
    gemma_niah_grid 64,128,256,512 query-aware,query-agnostic
}

gemma_32k_niah_low() {  # the same samples at 32 tokens per layer (the least error-aware budget)
    gemma_niah_grid 32 query-aware  # 64 up: ceiling
}

gemma_reading() {  # beyond question answering: a summary and a list of every thing of a kind over real documents at
                 # 8K-32K, every method at 128-512, scored by fidelity to the full cache's answer (alone: the
                 # compressed answers are not generated); resumable
    $PY -m ckv_mlx.eval --model gemma3-270m --tasks summary,list --lengths "${LENGTHS_32K:-8000,16000,32000}" \
        --profile profiles/gemma3-270m-32k.json \
        --methods full,compresskv,compresskv-gqa+span8+word48,snapkv,pyramidkv,streamingllm,keydiff \
        --budgets 128,256,512 --modes query-aware,query-agnostic --fidelity-only --out docs/eval/gemma3-reading
}

kv_bits() {  # kept rows quantized: NIAH and fidelity, compresskv at 64-512 tokens with 16, 8 and 4 bits per value
    $PY -m ckv_mlx.eval --tasks niah --haystack "$PG" --profile "$TWO_SRH" --lengths "$LENGTHS" --depths "${DEPTHS:-0,25,50,75,100}" \
        --methods full,compresskv --budgets 64,128,256,512 --kv-bits 16,8,4 --modes query-aware --max-tokens 8 \
        --out docs/eval/kv-bits
}

facts_eval() {  # OUT BUDGETS EVAL-ARGS...: exact facts at 2K with the shipped profile, every kind (essays: the
               # paper's), query-aware; SAMPLES per kind and form (default 1)
    local out=$1 budgets=$2; shift 2
    $PY -m ckv_mlx.eval --tasks facts --essays "$PG" --lengths 2000 --samples "${SAMPLES:-1}" --budgets "$budgets" \
        --modes query-aware --no-fidelity --out "$out" "$@"
}

facts_dev() {  # the development split, where the choice is made: the window baselines (ChunkKV among them) and the
               # fixes tried, at 32-256 tokens per layer
    facts_eval docs/eval/facts-dev 32,64,128,256 --split dev --methods full,compresskv,compresskv-gqa,snapkv,snapkv+chunk20,\
compresskv-gqa+span8,compresskv-gqa+span32,compresskv-gqa+chunk16,compresskv+span8
}

facts_coverage() {  # where the digits go: which tokens of a 7-digit value each layer and KV head keeps at 64
    $PY scripts/needle_coverage.py --fact financial/number7/0 --length 2000 --budget 64 \
        --methods compresskv,compresskv-gqa,snapkv,compresskv-gqa+span8,compresskv-gqa+chunk16
}

facts_held_out() {  # the held-out split, evaluated once after the choice: every baseline and the shipped default,
                    # at 32-1024 tokens per layer
    facts_eval docs/eval/facts-held-out 32,64,128,256,512,1024 --split held-out \
        --methods "full,compresskv,compresskv-gqa,snapkv,pyramidkv,streamingllm,keydiff,snapkv+chunk20,${FACT_CHOICE:-compresskv-gqa+span8}"
}

for step in "${@:-niah pyramidkv uniform firstk chunked coverage ablation mixed agnostic followup gemma_niah kv_bits facts_dev facts_coverage facts_held_out span_niah}"; do
    for s in $step; do $s; done
done
