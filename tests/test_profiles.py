"""Profile format, importer and CLI, checked against the paper's reference files."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ckv_mlx.policy.budgets import error_aware
from ckv_mlx.errors import CKVError
from ckv_mlx.model.models import ModelShape
from ckv_mlx.profiles import (
    Defaults,
    Profile,
    check_profile_matches,
    default_profile_path,
    load_profile,
    profiles_dir,
    save_profile,
)
from ckv_mlx.profiles.importer import import_head_idx, import_raw_scores
from reference_data import reference_file

REPO = Path(__file__).resolve().parents[1]
MODELS = ["Llama-3.1-8B-Instruct", "Mistral-7B-Instruct-v0.3"]
LLAMA_SHAPE = ModelShape("Llama-3.1-8B-Instruct", "llama", 32, 32, 8, 128)
SMOLLM = ModelShape("smollm2-135m-instruct", "llama", 30, 9, 3, 64)


def _tiny() -> dict:
    """A valid profile: 4 layers x 8 query heads / 2 KV heads."""
    return {
        "format": "ckv-profile",
        "version": 2,
        "model": {"name": "Tiny-Model", "architecture": "llama", "layers": 4,
                  "query_heads": 8, "kv_heads": 2, "head_dim": 16, "compressed_layers": [0, 1, 2, 3],
                  "total_layers": 4},
        "srh": [[0, 1, 2, 3], [7, 6, 5, 4, 3, 2, 1, 0], [4, 0, 5, 1], [2, 3, 6, 7, 0]],
        "srh_scores": [[0.9, 0.5, 0.4, 0.1], [8, 7, 6, 5, 4, 3, 2, 1], [1, 1, 0, 0],
                       [5, 4, 3, 2, 1]],
        "layer_errors": [0.1, 0.2, 0.3, 0.4],
        "defaults": {"window": 8, "kernel": 5, "pooling": "max", "first_k": 4},
        "provenance": {"how": "profiled", "source": "unit test", "data": "none",
                       "command": "pytest", "created": "2025-06-01", "notes": ""},
    }


def _write(tmp_path: Path, data, name="p.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# --- format ------------------------------------------------------------------------------

def test_load_valid_profile(tmp_path):
    profile = load_profile(_write(tmp_path, _tiny()))
    assert profile.shape == ModelShape("Tiny-Model", "llama", 4, 8, 2, 16)
    assert profile.srh_heads(1) == [7, 6, 5, 4]
    assert profile.srh_heads(3) == [2, 3, 6, 7]
    assert profile.defaults == Defaults(8, 5, "max", 4)
    assert profile.layer_errors == [0.1, 0.2, 0.3, 0.4]
    assert profile.provenance.how == "profiled"


def test_optional_parts_may_be_left_out(tmp_path):
    data = _tiny()
    for key in ("srh_scores", "layer_errors", "defaults"):
        del data[key]
    data["provenance"] = {"how": "imported"}
    profile = load_profile(_write(tmp_path, data))
    assert profile.srh_scores is None and profile.layer_errors is None
    assert profile.defaults == Defaults(window=8, kernel=5, pooling="avg", first_k=4)


def test_save_load_round_trip(tmp_path):
    original = load_profile(_write(tmp_path, _tiny(), "in.json"))
    out = tmp_path / "out.json"
    save_profile(original, out)
    assert load_profile(out) == original
    assert json.loads(out.read_text()) == _tiny()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "out.json"]


def test_save_refuses_a_bad_profile_and_keeps_the_old_file(tmp_path):
    out = _write(tmp_path, _tiny(), "out.json")
    before = out.read_text()
    bad = load_profile(out)
    bad.srh[0] = [0, 1, 2, 99]
    with pytest.raises(CKVError, match="out of range"):
        save_profile(bad, out)
    assert out.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def _drop(*keys):
    def edit(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return edit


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


MALFORMED = [
    ("not json", "{'format': ", "not valid JSON"),
    ("a list", "[1, 2]", "must be a JSON object"),
    ("no format", _drop("format"), "missing key 'format'"),
    ("other format", _set("format", "kv-profile"), "'format' must be 'ckv-profile'"),
    ("no version", _drop("version"), "missing key 'version'"),
    ("version 3", _set("version", 3), "unsupported version 3"),
    ("version text", _set("version", "1"), "unsupported version '1'"),
    ("unknown key", _set("layer_error", [1]), "unknown key 'layer_error'"),
    ("no model", _drop("model"), "missing key 'model'"),
    ("model not object", _set("model", "llama"), "'model' must be a JSON object"),
    ("no name", _drop("model", "name"), "missing key 'name'"),
    ("empty name", _set("model", "name", " "), "model.name must not be empty"),
    ("layers text", _set("model", "layers", "4"), "model.layers must be an integer"),
    ("no layer indices", _drop("model", "compressed_layers"), "missing key 'compressed_layers'"),
    ("layer indices short", _set("model", "compressed_layers", [0, 1, 2]), "must be 4 distinct layer indices"),
    ("layer indices unsorted", _set("model", "compressed_layers", [0, 2, 1, 3]), "must be 4 distinct layer indices"),
    ("layer index too big", _set("model", "compressed_layers", [0, 1, 2, 4]), "each below model.total_layers 4"),
    ("fewer total layers", _set("model", "total_layers", 3), "model.total_layers must be at least 4"),
    ("layers bool", _set("model", "layers", True), "model.layers must be an integer"),
    ("layers zero", _set("model", "layers", 0), "model.layers must be at least 1"),
    ("bad groups", _set("model", "kv_heads", 3), "not a multiple of model.kv_heads 3"),
    ("no srh", _drop("srh"), "missing key 'srh'"),
    ("srh layers", _set("srh", [[0, 1, 2, 3]] * 3), "srh has 3 entries but the model has 4"),
    ("srh row", _set("srh", 2, "0 1 2 3"), "srh[2] must be a list"),
    ("head out of range", _set("srh", 2, [0, 1, 2, 8]),
     "srh[2][3]: head id 8 is out of range 0..7"),
    ("negative head", _set("srh", 0, [0, -1, 2, 3]), "srh[0][1] must be at least 0"),
    ("float head", _set("srh", 0, [0, 1.0, 2, 3]), "srh[0][1] must be an integer"),
    ("duplicate head", _set("srh", 0, [0, 1, 1, 3]), "srh[0] lists a head twice"),
    ("too few heads", _set("srh", 0, [0, 1]), "srh[0] lists 2 heads"),
    ("too many heads", _set("srh", 0, list(range(9))), "srh[0] lists 9 heads"),
    ("scores layers", _set("srh_scores", [[1, 2, 3, 4]]), "srh_scores has 1 entries"),
    ("scores length", _set("srh_scores", 0, [1, 2]), "srh_scores[0] has 2 scores for 4 heads"),
    ("scores text", _set("srh_scores", 0, [1, 2, "x", 4]), "srh_scores[0][2] must be a number"),
    ("errors layers", _set("layer_errors", [0.5, 0.5]), "layer_errors has 2 entries"),
    ("errors sum", _set("layer_errors", [0.1, 0.1, 0.1, 0.1]), "must sum to 1"),
    ("errors negative", _set("layer_errors", [-0.1, 0.4, 0.3, 0.4]), "must not be negative"),
    ("errors not list", _set("layer_errors", 1.0), "layer_errors must be a list"),
    ("pooling", _set("defaults", "pooling", "mean"), "defaults.pooling must be one of"),
    ("kernel even", _set("defaults", "kernel", 4), "defaults.kernel must be odd"),
    ("first_k big", _set("defaults", "first_k", 9), "defaults.first_k 9 is more than"),
    ("window text", _set("defaults", "window", "8"), "defaults.window must be an integer"),
    ("defaults typo", _set("defaults", "windows", 8), "unknown key 'windows' in 'defaults'"),
    ("no provenance", _drop("provenance"), "missing key 'provenance'"),
    ("no how", _drop("provenance", "how"), "missing key 'how'"),
    ("how", _set("provenance", "how", "guessed"), "provenance.how must be one of"),
    ("created", _set("provenance", "created", "yesterday"), "not an ISO date"),
    ("source type", _set("provenance", "source", 3), "provenance.source must be a string"),
]


@pytest.mark.parametrize(("edit", "expected"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_profile_is_one_line_naming_file_and_problem(tmp_path, edit, expected):
    if isinstance(edit, str):
        path = _write(tmp_path, edit)
    else:
        data = copy.deepcopy(_tiny())
        edit(data)
        path = _write(tmp_path, data)
    with pytest.raises(CKVError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def version_1(data: dict) -> dict:
    """``data`` as a version-1 file was written (before models whose layers mix kinds)."""
    old = json.loads(json.dumps(data))
    old["version"] = 1
    for key in ("compressed_layers", "total_layers"):
        old["model"].pop(key)
    return old


@pytest.mark.parametrize("source", ["tiny", "shipped"])
def test_a_version_1_profile_loads_as_every_layer_compressing(tmp_path, source):
    data = _tiny() if source == "tiny" else json.loads(
        (REPO / "profiles/smollm2-135m-instruct.json").read_text())
    old = load_profile(_write(tmp_path, version_1(data)))
    layers = data["model"]["layers"]
    assert old.shape.compressed_layers == tuple(range(layers)) and old.shape.total_layers == layers
    assert old == load_profile(_write(tmp_path, data, "v2.json"))
    save_profile(old, tmp_path / "saved.json")  # saved again, it is version 2
    assert json.loads((tmp_path / "saved.json").read_text()) == data


def test_version_1_knows_no_layer_indices(tmp_path):
    old = version_1(_tiny())
    old["model"]["total_layers"] = 4
    with pytest.raises(CKVError, match="unknown key 'total_layers'"):
        load_profile(_write(tmp_path, old))


def test_a_profile_of_the_global_layers_fits_only_a_model_with_those_layers():
    gemma = ModelShape("gemma3-270m", "gemma3_text", 3, 4, 1, 256, (5, 11, 17), 18)
    assert gemma.dims() == "3 of 18 layers (5, 11, 17) x 4 query heads / 1 KV heads, head_dim 256"
    assert not gemma.same_geometry(ModelShape("other", "gemma3_text", 3, 4, 1, 256, (3, 7, 11), 12))


def test_documented_example_is_a_valid_profile(tmp_path):
    doc = (REPO / "docs/profile-format.md").read_text()
    example = doc.split("```json\n", 1)[1].split("```", 1)[0]
    profile = load_profile(_write(tmp_path, example))
    assert profile.srh_heads(3) == [7, 6, 3, 1]
    out = tmp_path / "saved.json"
    save_profile(profile, out)
    assert out.read_text() == example


def test_missing_file(tmp_path):
    with pytest.raises(CKVError, match="nope.json: cannot read"):
        load_profile(tmp_path / "nope.json")


# --- matching a model --------------------------------------------------------------------

def _llama_profile(tmp_path) -> Profile:
    data = _tiny()
    data["model"] = {"name": "Llama-3.1-8B-Instruct", "architecture": "llama", "layers": 32,
                     "query_heads": 32, "kv_heads": 8, "head_dim": 128,
                     "compressed_layers": list(range(32)), "total_layers": 32}
    data["srh"] = [list(range(32))] * 32
    for key in ("srh_scores", "layer_errors"):
        del data[key]
    return load_profile(_write(tmp_path, data, "llama.json"))


def test_geometry_mismatch_names_both_shapes(tmp_path):
    with pytest.raises(CKVError) as info:
        check_profile_matches(_llama_profile(tmp_path), SMOLLM)
    message = str(info.value)
    for text in ("Llama-3.1-8B-Instruct", LLAMA_SHAPE.dims(), "smollm2-135m-instruct",
                 SMOLLM.dims()):
        assert text in message


def test_same_geometry_other_name_warns_naming_both(tmp_path):
    other = ModelShape("Meta-Llama-3-8B-Instruct", "llama", 32, 32, 8, 128)
    warnings = check_profile_matches(_llama_profile(tmp_path), other)
    assert len(warnings) == 1
    assert "Llama-3.1-8B-Instruct" in warnings[0] and "Meta-Llama-3-8B-Instruct" in warnings[0]


def test_same_model_has_no_warnings(tmp_path):
    profile = _llama_profile(tmp_path)
    assert check_profile_matches(profile, LLAMA_SHAPE) == []
    assert check_profile_matches(profile, ModelShape("llama-3.1-8b-instruct", "llama",
                                                     32, 32, 8, 128)) == []


def test_default_profiles_dir_is_the_package_folder(monkeypatch):
    monkeypatch.delenv("CKV_PROFILES_DIR", raising=False)
    assert profiles_dir() == REPO / "ckv_mlx" / "profiles" / "data" and profiles_dir().resolve() == REPO / "profiles"


def test_default_profile_path_by_file_name_and_by_model_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CKV_PROFILES_DIR", str(tmp_path))
    smol = _write(tmp_path, "{}", "smollm2-135m-instruct.json")
    tiny = _write(tmp_path, _tiny(), "profile-a.json")
    _write(tmp_path, "not json", "broken.json")
    assert default_profile_path("SmolLM2-135M-Instruct") == smol
    assert default_profile_path("HuggingFaceTB/SmolLM2-135M-Instruct") == smol
    assert default_profile_path("tiny-model") == tiny
    assert default_profile_path("Unknown-Model") is None
    monkeypatch.setenv("CKV_PROFILES_DIR", str(tmp_path / "absent"))
    assert default_profile_path("SmolLM2-135M-Instruct") is None


def test_default_profile_path_by_model_name_inside_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CKV_PROFILES_DIR", str(tmp_path))
    data = _tiny()
    data["model"]["name"] = "Llama-3.1-8B-Instruct"
    path = _write(tmp_path, data, "llama31.json")
    assert default_profile_path("meta-llama/Llama-3.1-8B-Instruct") == path
    assert default_profile_path("LLAMA-3.1-8B-INSTRUCT") == path


# --- importer ----------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_import_head_idx_matches_reference_files(model):
    head_idx = reference_file(f"scores/{model}_head_idx.json")
    layer_score = reference_file(f"scores/{model}_layer_score.jsonl")
    profile = import_head_idx(head_idx, layer_score)
    raw = json.loads(head_idx.read_text())
    assert profile.shape == ModelShape(model, model.split("-")[0].lower(), 32, 32, 8, 128)
    assert profile.srh == [raw[str(layer)] for layer in range(32)]
    assert [profile.srh_heads(layer) for layer in range(32)] == [
        raw[str(layer)][:4] for layer in range(32)]
    assert profile.layer_errors == json.loads(layer_score.read_text())["avg_score"]
    assert profile.srh_scores is None
    assert profile.provenance.how == "imported"


def test_import_llama_head_idx_first_heads_and_budgets():
    profile = import_head_idx(reference_file("scores/Llama-3.1-8B-Instruct_head_idx.json"),
                              reference_file("scores/Llama-3.1-8B-Instruct_layer_score.jsonl"))
    assert profile.srh_heads(0) == [11, 25, 23, 27]
    assert error_aware(profile.layer_errors, 128)[:4] == [89, 90, 143, 118]


@pytest.mark.parametrize("model", MODELS)
def test_import_raw_scores_ranks_by_mean_over_trials(model):
    path = reference_file(f"head_score/{model}_retrieval.json")
    raw = json.loads(path.read_text())
    means = np.zeros((32, 32))
    for key, values in raw.items():
        layer, head = map(int, key.split("-"))
        means[layer, head] = np.mean(values)
    profile = import_raw_scores(path)
    for layer in range(32):
        # lexsort: last key is primary (-mean, descending); head id breaks ties.
        expected = np.lexsort((np.arange(32), -means[layer])).tolist()
        assert profile.srh[layer] == expected
        np.testing.assert_allclose(profile.srh_scores[layer], means[layer, expected])
    assert profile.shape == ModelShape(model, model.split("-")[0].lower(), 32, 32, 8, 128)


def test_import_raw_scores_breaks_ties_by_lower_head(tmp_path):
    scores = {"0-0": [1, 1], "0-1": [2, 0], "0-2": [0.5], "0-3": [3],
              "1-0": [0], "1-1": [0], "1-2": [0], "1-3": [0]}
    profile = import_raw_scores(_write(tmp_path, scores, "toy.json"), name="Toy",
                                architecture="llama", kv_heads=2, head_dim=8, first_k=2)
    assert profile.srh == [[3, 0, 1, 2], [0, 1, 2, 3]]
    assert profile.srh_scores == [[3.0, 1.0, 1.0, 0.5], [0.0] * 4]
    assert profile.shape == ModelShape("Toy", "llama", 2, 4, 2, 8)


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ({"0-0": [1], "0-1": [1], "1-0": [1]}, "no scores for 1-1"),
        ({"0-0": [1], "layer0": [1]}, "is not 'layer-head'"),
        ({"0-0": []}, "non-empty list"),
        ({"0-0": ["x"]}, "non-empty list"),
    ],
)
def test_import_raw_scores_rejects_bad_files(tmp_path, scores, expected):
    path = _write(tmp_path, scores, "toy.json")
    with pytest.raises(CKVError, match=expected):
        import_raw_scores(path, name="Toy", architecture="llama", kv_heads=1, head_dim=8)


def test_import_needs_shape_flags_without_a_preset(tmp_path):
    path = _write(tmp_path, {"0": [1, 0], "1": [0, 1]}, "mine_head_idx.json")
    with pytest.raises(CKVError, match="--name is needed"):
        import_head_idx(path)
    profile = import_head_idx(path, name="Mine", architecture="qwen2", kv_heads=1, head_dim=4,
                              first_k=1)
    assert profile.shape == ModelShape("Mine", "qwen2", 2, 2, 1, 4)
    assert profile.srh_heads(0) == [1]


def test_import_rejects_geometry_that_contradicts_the_preset(tmp_path):
    path = _write(tmp_path, {"0": [1, 0]}, "Llama-3.1-8B-Instruct_head_idx.json")
    with pytest.raises(CKVError, match="preset Llama-3.1-8B-Instruct has 32 x 32"):
        import_head_idx(path)


@pytest.mark.parametrize(
    ("head_idx", "expected"),
    [
        ({"0": [0, 1], "2": [1, 0]}, "keys must be the layer numbers"),
        ({"0": [0, 1], "1": [0, 0]}, "layer 1 must rank every query head 0..1"),
        ({"0": [0, 1], "1": [0, 1, 2]}, "layer 1 must rank every query head 0..1"),
        ({"0": "0 1"}, "layer 0 must be a non-empty list"),
    ],
)
def test_import_head_idx_rejects_bad_files(tmp_path, head_idx, expected):
    with pytest.raises(CKVError, match=expected):
        import_head_idx(_write(tmp_path, head_idx), name="x", architecture="llama",
                        kv_heads=1, head_dim=4, first_k=1)


def test_import_layer_score_length_must_match(tmp_path):
    heads = _write(tmp_path, {"0": [1, 0], "1": [0, 1]}, "h.json")
    scores = _write(tmp_path, {"avg_score": [1.0]}, "s.jsonl")
    with pytest.raises(CKVError, match="'avg_score' has 1 values but the head file has 2"):
        import_head_idx(heads, scores, name="x", architecture="llama", kv_heads=1, head_dim=4,
                        first_k=1)


# --- CLI ---------------------------------------------------------------------------------

def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ckv_mlx.profiles", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_cli_import_show_validate(tmp_path):
    out = tmp_path / "llama.json"
    done = _cli("import", "--head-idx", reference_file("scores/Llama-3.1-8B-Instruct_head_idx.json"),
                "--layer-score", reference_file("scores/Llama-3.1-8B-Instruct_layer_score.jsonl"),
                "--out", out)
    assert done.returncode == 0, done.stderr
    profile = load_profile(out)
    assert profile.srh_heads(0) == [11, 25, 23, 27]
    assert "ckv_mlx.profiles import --head-idx" in profile.provenance.command

    done = _cli("validate", out)
    assert done.returncode == 0 and done.stdout.startswith("ok: ")

    done = _cli("show", out)
    assert done.returncode == 0
    assert "Llama-3.1-8B-Instruct" in done.stdout and "11  25  23  27" in done.stdout


def test_cli_import_raw_scores_with_flags(tmp_path):
    raw = _write(tmp_path, {"0-0": [0.1], "0-1": [0.9], "1-0": [0.5], "1-1": [0.2]}, "r.json")
    out = tmp_path / "toy.json"
    done = _cli("import", "--raw-scores", raw, "--out", out, "--name", "Toy",
                "--architecture", "llama", "--kv-heads", "1", "--head-dim", "4", "--first-k", "1")
    assert done.returncode == 0, done.stderr
    assert load_profile(out).srh == [[1, 0], [0, 1]]


def test_cli_errors_are_one_line_exit_2(tmp_path):
    bad = _write(tmp_path, {"format": "ckv-profile", "version": 7})
    done = _cli("validate", bad)
    assert done.returncode == 2
    assert done.stderr == f"error: {bad}: unsupported version 7: this ckv-mlx reads versions 1 and 2\n"

    heads = _write(tmp_path, {"0": [1, 0]}, "mine.json")
    done = _cli("import", "--head-idx", heads, "--out", tmp_path / "x.json")
    assert done.returncode == 2
    assert done.stderr.startswith("error: --name is needed") and "Traceback" not in done.stderr
    assert not (tmp_path / "x.json").exists()
