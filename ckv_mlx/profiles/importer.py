"""Make profiles from SRH and layer-error files computed elsewhere (e.g. the paper's repo).

Two head inputs: a ranked `{model}_head_idx.json` (`{"0": [ranked head ids], ...}`) or a raw
per-trial score file (`{"layer-head": [score per trial, ...]}`), which is averaged over
trials and ranked per layer. Layer errors come from `{model}_layer_score.jsonl` (`avg_score`).
The files give layers and query heads; the rest of the shape comes from a preset or flags.
"""

from __future__ import annotations

import json
import math
import re
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CKVError
from ..model.models import ModelShape
from . import Defaults, Profile, Provenance, parse_profile, slug

PRESETS = {
    shape.name: shape
    for shape in (
        ModelShape("Llama-3.1-8B-Instruct", "llama", 32, 32, 8, 128),
        ModelShape("Mistral-7B-Instruct-v0.3", "mistral", 32, 32, 8, 128),
    )
}
_RAW_KEY = re.compile(r"(\d+)-(\d+)")


def import_head_idx(
    head_idx: str | Path, layer_score: str | Path | None = None, **options: Any
) -> Profile:
    """Profile from a ranked head-index file (+ optional layer-score file)."""
    srh = read_head_idx(head_idx)
    notes = f"ranked head ids from {Path(head_idx).name} (no head scores)"
    return _build(srh, None, head_idx, layer_score, notes, **options)


def import_raw_scores(
    raw_scores: str | Path, layer_score: str | Path | None = None, **options: Any
) -> Profile:
    """Profile from raw per-trial head scores: mean over trials, ranked per layer."""
    srh, scores, trials = read_raw_scores(raw_scores)
    notes = (f"mean of {trials} trials per head from {Path(raw_scores).name}, "
             "ranked per layer (ties: lower head id first)")
    return _build(srh, scores, raw_scores, layer_score, notes, **options)


def read_head_idx(path: str | Path) -> list[list[int]]:
    """Per layer, all query heads ranked best first; checks each layer ranks every head once."""
    data = _read_json(path)
    rows = [_layer_entry(data, layer, path) for layer in range(_count_layers(data, path))]
    query_heads = len(rows[0])
    for layer, row in enumerate(rows):
        if sorted(row) != list(range(query_heads)):
            raise CKVError(
                f"{path}: layer {layer} must rank every query head 0..{query_heads - 1} "
                "exactly once"
            )
    return rows


def read_raw_scores(path: str | Path) -> tuple[list[list[int]], list[list[float]], str]:
    """Ranked heads per layer, their mean scores, and the number of trials per head."""
    data = _read_json(path)
    means: dict[tuple[int, int], float] = {}
    trials = set()
    for key, values in data.items():
        match = _RAW_KEY.fullmatch(key)
        if not match:
            raise CKVError(f"{path}: key {key!r} is not 'layer-head' (like '0-12')")
        if not isinstance(values, list) or not values or not all(_is_number(v) for v in values):
            raise CKVError(f"{path}: {key!r} must be a non-empty list of finite numbers")
        means[int(match[1]), int(match[2])] = float(np.mean(np.asarray(values, np.float64)))
        trials.add(len(values))
    layers = max(layer for layer, _ in means) + 1
    heads = max(head for _, head in means) + 1
    missing = [f"{l}-{h}" for l in range(layers) for h in range(heads) if (l, h) not in means]
    if missing:
        raise CKVError(f"{path}: no scores for {missing[0]} ({len(missing)} keys missing)")
    srh, scores = [], []
    for layer in range(layers):
        ranked = sorted(range(heads), key=lambda h: (-means[layer, h], h))
        srh.append(ranked)
        scores.append([means[layer, h] for h in ranked])
    counts = sorted(trials)
    return srh, scores, str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def read_layer_score(path: str | Path, layers: int) -> list[float]:
    """The `avg_score` vector (one eviction-error share per layer) of a layer-score file."""
    data = _read_json(path)
    if "avg_score" not in data:
        raise CKVError(f"{path}: no 'avg_score' key (keys: {', '.join(sorted(data)) or 'none'})")
    errors = data["avg_score"]
    if not isinstance(errors, list) or not all(_is_number(v) for v in errors):
        raise CKVError(f"{path}: 'avg_score' must be a list of finite numbers")
    if len(errors) != layers:
        raise CKVError(
            f"{path}: 'avg_score' has {len(errors)} values but the head file has {layers} layers"
        )
    return [float(v) for v in errors]


def resolve_shape(
    layers: int,
    query_heads: int,
    head_file: str | Path,
    preset: str | None = None,
    name: str | None = None,
    architecture: str | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
) -> ModelShape:
    """Model shape: geometry from the files, the rest from flags, else from a preset."""
    base = _preset(preset) if preset else _preset_for(Path(head_file))
    if base is not None and (base.layers, base.query_heads) != (layers, query_heads):
        raise CKVError(
            f"{head_file} has {layers} layers x {query_heads} query heads, but preset "
            f"{base.name} has {base.layers} x {base.query_heads}"
        )
    given = {"name": name, "architecture": architecture, "kv_heads": kv_heads,
             "head_dim": head_dim}
    for key, value in given.items():
        if value is None and base is None:
            raise CKVError(
                f"--{key.replace('_', '-')} is needed: no preset matches {Path(head_file).name} "
                f"(presets: {', '.join(PRESETS)}; or give --preset)"
            )
        if value is None:
            given[key] = getattr(base, key)
    return ModelShape(given["name"], given["architecture"], layers, query_heads,
                      given["kv_heads"], given["head_dim"])


def _build(
    srh: list[list[int]],
    scores: list[list[float]] | None,
    head_file: str | Path,
    layer_score: str | Path | None,
    auto_notes: str,
    *,
    first_k: int = 4,
    source: str | None = None,
    data: str = "",
    command: str = "",
    notes: str = "",
    **model: Any,
) -> Profile:
    shape = resolve_shape(len(srh), len(srh[0]), head_file, **model)
    files = [head_file] + ([layer_score] if layer_score else [])
    errors = read_layer_score(layer_score, shape.layers) if layer_score else None
    provenance = Provenance(
        how="imported",
        source=source if source is not None else ", ".join(str(f) for f in files),
        data=data,
        command=command,
        created=date.today().isoformat(),
        notes="; ".join(n for n in (auto_notes, notes) if n),
    )
    profile = Profile(shape, srh, provenance, Defaults(first_k=first_k), scores, errors)
    return parse_profile(json.loads(json.dumps(profile.to_dict())), str(head_file))


def _preset(name: str) -> ModelShape:
    for key, shape in PRESETS.items():
        if slug(key) == slug(name):
            return shape
    raise CKVError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")


def _preset_for(path: Path) -> ModelShape | None:
    stem = slug(path.stem)
    for key, shape in PRESETS.items():
        if stem.startswith(slug(key)):
            return shape
    return None


def _read_json(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CKVError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CKVError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise CKVError(f"{path}: expected a non-empty JSON object")
    return data


def _count_layers(data: dict, path: str | Path) -> int:
    expected = {str(layer) for layer in range(len(data))}
    if set(data) != expected:
        raise CKVError(f"{path}: keys must be the layer numbers 0..{len(data) - 1}")
    return len(data)


def _layer_entry(data: dict, layer: int, path: str | Path) -> list[int]:
    row = data[str(layer)]
    if not isinstance(row, list) or not row or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in row
    ):
        raise CKVError(f"{path}: layer {layer} must be a non-empty list of head ids")
    return row


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
