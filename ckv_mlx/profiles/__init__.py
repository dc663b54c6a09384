"""CompressKV profiles: per-model SRH rankings and layer errors, as versioned JSON files.

The format is documented in docs/profile-format.md. `load_profile` checks everything and
raises a one-line CKVError naming the file and the problem; `save_profile` writes atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import CKVError
from ..model.models import ModelShape

FORMAT = "ckv-profile"
VERSION = 2  # 2: the model's compressing layers (compressed_layers, total_layers); 1 had every layer
POOLINGS = ("avg", "max")
HOWS = ("imported", "profiled")
PROFILES_ENV = "CKV_PROFILES_DIR"
_TOP_KEYS = {"format", "version", "model", "srh", "srh_scores", "layer_errors", "defaults",
             "provenance"}
_MODEL_KEYS = ("name", "architecture", "layers", "query_heads", "kv_heads", "head_dim")
_LAYOUT_KEYS = ("compressed_layers", "total_layers")  # version 2
_PROVENANCE_TEXT = ("source", "data", "command", "created", "notes")
_ERRORS_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Defaults:
    """Selection settings the profile was made for (method doc section 2)."""

    window: int = 8
    kernel: int = 5
    pooling: str = "avg"
    first_k: int = 4


@dataclass(frozen=True)
class Provenance:
    """Where the profile came from, so a result can be traced back."""

    how: str
    source: str = ""
    data: str = ""
    command: str = ""
    created: str = ""
    notes: str = ""


@dataclass
class Profile:
    """One model's SRH ranking per layer, optional head scores and layer errors."""

    shape: ModelShape
    srh: list[list[int]]
    provenance: Provenance
    defaults: Defaults = field(default_factory=Defaults)
    srh_scores: list[list[float]] | None = None
    layer_errors: list[float] | None = None

    @property
    def name(self) -> str:
        return self.shape.name

    def srh_heads(self, layer: int) -> list[int]:
        """The layer's semantic retrieval heads: its first_k best query heads."""
        return self.srh[layer][: self.defaults.first_k]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "model": {**{key: getattr(self.shape, key) for key in _MODEL_KEYS},
                      "compressed_layers": list(self.shape.compressed_layers),
                      "total_layers": self.shape.total_layers},
            "defaults": vars(self.defaults).copy(),
            "provenance": vars(self.provenance).copy(),
            "srh": self.srh,
        }
        if self.srh_scores is not None:
            data["srh_scores"] = self.srh_scores
        if self.layer_errors is not None:
            data["layer_errors"] = self.layer_errors
        return data


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and check a profile file; any problem is a one-line CKVError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CKVError(f"{path}: cannot read the profile ({_reason(exc)})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CKVError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    return parse_profile(data, str(path))


def parse_profile(data: Any, source: str = "profile") -> Profile:
    """Build a Profile from decoded JSON, checking every field."""
    try:
        return _parse(data)
    except _Problem as problem:
        raise CKVError(f"{source}: {problem}") from None


def save_profile(profile: Profile, path: str | os.PathLike) -> None:
    """Check and write the profile: a temporary file beside `path`, then os.replace."""
    path = Path(path)
    data = profile.to_dict()
    parse_profile(json.loads(json.dumps(data)), str(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(_dumps(data) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise CKVError(f"{path}: cannot write the profile ({_reason(exc)})") from None


def check_profile_matches(profile: Profile, shape: ModelShape) -> list[str]:
    """Raise if the geometry differs; return warnings (for the caller to print) otherwise."""
    ours = profile.shape
    if not ours.same_geometry(shape):
        raise CKVError(
            f"profile for {ours.name} ({ours.dims()}) does not fit model {shape.name} "
            f"({shape.dims()}); make or import a profile for {shape.name}"
        )
    warnings = []
    if slug(ours.name) != slug(shape.name):
        warnings.append(
            f"profile was made for {ours.name} but the model is {shape.name} "
            "(same geometry, so it runs, but its heads may not be the right ones)"
        )
    if ours.head_dim != shape.head_dim:
        warnings.append(
            f"profile was made for head_dim {ours.head_dim} but the model has {shape.head_dim}"
        )
    if ours.architecture.lower() != shape.architecture.lower():
        warnings.append(
            f"profile architecture {ours.architecture} differs from the model's "
            f"{shape.architecture}"
        )
    return warnings


def profiles_dir() -> Path:
    """The shipped profiles, or $CKV_PROFILES_DIR when set. They live in the repository's
    top-level ``profiles/``; ``ckv_mlx/profiles/data`` links to it, so a wheel carries them
    inside the package (setuptools copies the linked files) and a checkout reads them in place."""
    override = os.environ.get(PROFILES_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "data"


def default_profile_path(model_name: str) -> Path | None:
    """The profile in profiles_dir() for this model: by file name slug, then by model.name."""
    folder = profiles_dir()
    if not folder.is_dir():
        return None
    wanted = {slug(model_name), slug(model_name.rstrip("/").rsplit("/", 1)[-1])}
    files = sorted(folder.glob("*.json"))
    for path in files:
        if slug(path.stem) in wanted:
            return path
    for path in files:
        name = _model_name_in(path)
        if name is not None and slug(name) in wanted:
            return path
    return None


def shipped_profile_for(shape: ModelShape) -> Profile | None:
    """The shipped profile of a model: by its name, else (a model known only by its
    geometry) the first whose architecture and geometry it has; None if none."""
    path = default_profile_path(shape.name)
    if path is not None:
        return load_profile(path)
    folder = profiles_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        profile = load_profile(path)
        if profile.shape.same_geometry(shape) and profile.shape.architecture.lower() == shape.architecture.lower():
            return profile
    return None


def slug(name: str) -> str:
    """Lower-case, runs of other characters as '-': 'SmolLM2-135M-Instruct' style file names."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def _model_name_in(path: Path) -> str | None:
    try:
        name = json.loads(path.read_text(encoding="utf-8"))["model"]["name"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


class _Problem(Exception):
    """A problem inside the profile data; parse_profile adds the file name."""


def _parse(data: Any) -> Profile:
    top = _object(data, "the profile")
    if _required(top, "format", "the profile") != FORMAT:
        raise _Problem(f"'format' must be {FORMAT!r}, got {top['format']!r}")
    version = _required(top, "version", "the profile")
    if type(version) is not int or version not in (1, VERSION):
        raise _Problem(f"unsupported version {version!r}: this ckv-mlx reads versions 1 and {VERSION}")
    _no_unknown(top, _TOP_KEYS, "the profile")
    shape = _parse_shape(_required(top, "model", "the profile"), version)
    defaults = _parse_defaults(top.get("defaults", {}), shape)
    srh = _parse_srh(_required(top, "srh", "the profile"), shape, defaults.first_k)
    return Profile(
        shape=shape,
        srh=srh,
        provenance=_parse_provenance(_required(top, "provenance", "the profile")),
        defaults=defaults,
        srh_scores=_parse_srh_scores(top.get("srh_scores"), srh),
        layer_errors=_parse_layer_errors(top.get("layer_errors"), shape.layers),
    )


def _parse_shape(value: Any, version: int) -> ModelShape:
    """The model of a profile; version 1 (before models whose layers mix kinds) meant
    every layer, which is what it migrates to."""
    model = _object(value, "'model'")
    _no_unknown(model, set(_MODEL_KEYS) | (set(_LAYOUT_KEYS) if version > 1 else set()), "'model'")
    name = _text(_required(model, "name", "'model'"), "model.name", empty=False)
    architecture = _text(_required(model, "architecture", "'model'"), "model.architecture",
                         empty=False)
    dims = [_int(_required(model, key, "'model'"), f"model.{key}", 1) for key in _MODEL_KEYS[2:]]
    layers = dims[0]
    if version == 1:
        indices, total = tuple(range(layers)), layers
    else:
        total = _int(_required(model, "total_layers", "'model'"), "model.total_layers", layers)
        indices = tuple(_int(i, "model.compressed_layers[]", 0) for i in _list(
            _required(model, "compressed_layers", "'model'"), "model.compressed_layers"))
        if len(indices) != layers or list(indices) != sorted(set(indices)) or indices[-1] >= total:
            raise _Problem(f"model.compressed_layers must be {layers} distinct layer indices in order, "
                           f"each below model.total_layers {total}")
    shape = ModelShape(name, architecture, *dims, compressed_layers=indices, total_layers=total)
    if shape.query_heads % shape.kv_heads:
        raise _Problem(
            f"model.query_heads {shape.query_heads} is not a multiple of "
            f"model.kv_heads {shape.kv_heads}"
        )
    return shape


def _parse_defaults(value: Any, shape: ModelShape) -> Defaults:
    given = _object(value, "'defaults'")
    _no_unknown(given, set(vars(Defaults())), "'defaults'")
    merged = {**vars(Defaults()), **given}
    window = _int(merged["window"], "defaults.window", 1)
    kernel = _int(merged["kernel"], "defaults.kernel", 1)
    if kernel % 2 == 0:
        raise _Problem(f"defaults.kernel must be odd, got {kernel}")
    if merged["pooling"] not in POOLINGS:
        raise _Problem(f"defaults.pooling must be one of {POOLINGS}, got {merged['pooling']!r}")
    first_k = _int(merged["first_k"], "defaults.first_k", 1)
    if first_k > shape.query_heads:
        raise _Problem(
            f"defaults.first_k {first_k} is more than the model's {shape.query_heads} query heads"
        )
    return Defaults(window, kernel, merged["pooling"], first_k)


def _parse_srh(value: Any, shape: ModelShape, first_k: int) -> list[list[int]]:
    rows = _layer_list(value, "srh", shape.layers)
    srh = []
    for layer, row in enumerate(rows):
        where = f"srh[{layer}]"
        heads = [_int(h, f"{where}[{i}]", 0) for i, h in enumerate(_list(row, where))]
        if not first_k <= len(heads) <= shape.query_heads:
            raise _Problem(
                f"{where} lists {len(heads)} heads; it needs {first_k} (first_k) to "
                f"{shape.query_heads} (all query heads)"
            )
        for i, head in enumerate(heads):
            if head >= shape.query_heads:
                raise _Problem(
                    f"{where}[{i}]: head id {head} is out of range 0..{shape.query_heads - 1}"
                )
        if len(set(heads)) != len(heads):
            raise _Problem(f"{where} lists a head twice")
        srh.append(heads)
    return srh


def _parse_srh_scores(value: Any, srh: list[list[int]]) -> list[list[float]] | None:
    if value is None:
        return None
    rows = _layer_list(value, "srh_scores", len(srh))
    scores = []
    for layer, (row, heads) in enumerate(zip(rows, srh)):
        where = f"srh_scores[{layer}]"
        numbers = [_number(x, f"{where}[{i}]") for i, x in enumerate(_list(row, where))]
        if len(numbers) != len(heads):
            raise _Problem(f"{where} has {len(numbers)} scores for {len(heads)} heads in srh")
        scores.append(numbers)
    return scores


def _parse_layer_errors(value: Any, layers: int) -> list[float] | None:
    if value is None:
        return None
    errors = [_number(x, f"layer_errors[{i}]") for i, x in
              enumerate(_layer_list(value, "layer_errors", layers))]
    if any(e < 0 for e in errors):
        raise _Problem("layer_errors must not be negative")
    if abs(sum(errors) - 1) > _ERRORS_SUM_TOLERANCE:
        raise _Problem(f"layer_errors must sum to 1, they sum to {sum(errors):.6g}")
    return errors


def _parse_provenance(value: Any) -> Provenance:
    given = _object(value, "'provenance'")
    _no_unknown(given, {"how", *_PROVENANCE_TEXT}, "'provenance'")
    how = _required(given, "how", "'provenance'")
    if how not in HOWS:
        raise _Problem(f"provenance.how must be one of {HOWS}, got {how!r}")
    text = {key: _text(given.get(key, ""), f"provenance.{key}") for key in _PROVENANCE_TEXT}
    if text["created"]:
        try:
            datetime.fromisoformat(text["created"].replace("Z", "+00:00"))
        except ValueError:
            raise _Problem(
                f"provenance.created {text['created']!r} is not an ISO date (YYYY-MM-DD)"
            ) from None
    return Provenance(how=how, **text)


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Problem(f"{where} must be a JSON object, got {_kind(value)}")
    return value


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise _Problem(f"{where} must be a list, got {_kind(value)}")
    return value


def _layer_list(value: Any, where: str, layers: int) -> list:
    rows = _list(value, where)
    if len(rows) != layers:
        raise _Problem(f"{where} has {len(rows)} entries but the model has {layers} layers")
    return rows


def _required(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise _Problem(f"missing key {key!r} in {where}")
    return obj[key]


def _no_unknown(obj: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise _Problem(f"unknown key {unknown[0]!r} in {where}")


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Problem(f"{where} must be an integer, got {_kind(value)}")
    if value < minimum:
        raise _Problem(f"{where} must be at least {minimum}, got {value}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Problem(f"{where} must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise _Problem(f"{where} must be finite, got {value}")
    return float(value)


def _text(value: Any, where: str, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _Problem(f"{where} must be a string, got {_kind(value)}")
    if not empty and not value.strip():
        raise _Problem(f"{where} must not be empty")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false",
             type(None): "null", int: "an integer", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _dumps(data: Any, indent: str = "") -> str:
    """JSON with one line per object key and per inner list: readable, diff-friendly."""
    inner = indent + "  "
    if isinstance(data, dict) and data:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(data, list) and data and all(isinstance(x, list) for x in data):
        rows = [f"{inner}{json.dumps(row)}" for row in data]
        return "[\n" + ",\n".join(rows) + f"\n{indent}]"
    return json.dumps(data)


def resolve_profile(
    path: str | os.PathLike | None, shape: ModelShape
) -> tuple[Profile | None, Path | None, list[str]]:
    """The profile for a model: ``path`` if given, else its file in :func:`profiles_dir` if any.

    Returns the profile, where it came from, and warnings for the user.
    """
    path = Path(path) if path is not None else default_profile_path(shape.name)
    if path is None:
        return None, None, []
    profile = load_profile(path)
    return profile, path, check_profile_matches(profile, shape)
