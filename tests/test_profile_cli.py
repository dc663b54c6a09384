"""`python -m ckv_mlx.profile` on the real default model: a small sweep, resumed, validated."""

import json

import pytest

from ckv_mlx.profile.__main__ import main
from ckv_mlx.profiles import load_profile
from reference_data import reference_file

pytestmark = pytest.mark.slow


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, default_model):
    """srh then layers on tiny settings, the way the shipped profile was made."""
    folder = tmp_path_factory.mktemp("profile")
    out = folder / "smol.json"
    srh = main(["srh", "--lengths", "300", "--depths", "0,100", "--max-tokens", "8", "--out", str(out)])
    layers = main(["layers", "--profile", str(out), "--words", "120", "--max-tokens", "4"])
    return srh, layers, out


def test_srh_and_layers_write_a_valid_profile_with_provenance(profiled):
    srh, layers, out = profiled
    assert srh == 0 and layers == 0
    profile = load_profile(out)
    assert profile.provenance.how == "profiled"
    assert "ckv_mlx.profile srh" in profile.provenance.command
    assert "ckv_mlx.profile layers" in profile.provenance.command
    assert len(profile.srh) == 30 and all(sorted(row) == list(range(9)) for row in profile.srh)
    assert profile.defaults.first_k == 2
    assert abs(sum(profile.layer_errors) - 1) < 1e-6 and min(profile.layer_errors) >= 0
    trials = records(out.with_suffix(".srh.jsonl"))
    assert len(trials) == 12  # 6 needles x 1 length x 2 depths
    assert any(t["counted"] for t in trials)


def test_a_killed_run_continues_where_it_stopped(profiled, capsys, tmp_path):
    _, _, out = profiled
    log = out.with_suffix(".srh.jsonl")
    copy = tmp_path / "p.json"
    lines = log.read_text().splitlines()
    kept = lines[:4]
    (tmp_path / "p.srh.jsonl").write_text("\n".join(kept) + "\n" + lines[4][:20])  # killed mid-line
    code, *_ = run(capsys, "srh", "--lengths", "300", "--depths", "0,100", "--max-tokens", "8", "--out", copy)
    assert code == 0
    again = records(tmp_path / "p.srh.jsonl")
    assert len(again) == 12
    assert again[:3] == [json.loads(l) for l in kept[1:]]  # not run again
    assert [r["key"] for r in again] == [r["key"] for r in records(log)]


def test_changed_settings_are_refused(profiled, capsys):
    _, _, out = profiled
    code, err, _ = run(capsys, "srh", "--lengths", "400", "--depths", "0,100", "--max-tokens", "8", "--out", out)
    assert code == 2
    assert "other settings (lengths)" in err and "--restart" in err


def test_validate(profiled, capsys, tmp_path):
    _, _, out = profiled
    code, _, printed = run(capsys, "validate", out)
    assert code == 0 and "ok:" in printed
    bad = tmp_path / "bad.json"
    bad.write_text(out.read_text().replace('"layers": 30', '"layers": 31'))
    code, err, _ = run(capsys, "validate", bad)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:")


def test_runs_on_the_papers_needles_and_haystack(tmp_path, capsys, default_model):
    folder = reference_file("srh_detection")
    code, err, _ = run(capsys, "srh", "--needles", folder / "needles.jsonl", "--haystack", folder / "haystack_part1.txt",
                    "--lengths", "300", "--depths", "50", "--max-tokens", "8", "--out", tmp_path / "ref.json",
                    "--skip-needles", "1")
    trials = records(tmp_path / "ref.srh.jsonl")
    assert [t["needle"] for t in trials] == [1, 2]  # the file's lines, the first left out
    assert all(t["span"] is not None for t in trials)
    # the tiny model may answer none of them: then the one-line refusal, no profile
    assert code == 0 or ("no trial was answered" in err and code == 2)


def test_bad_input_is_one_line(tmp_path, capsys, default_model):
    code, err, _ = run(capsys, "srh", "--lengths", "9000", "--out", tmp_path / "x.json")
    assert code == 2 and "exceeds the model's context" in err
    code, err, _ = run(capsys, "srh", "--skip-needles", "6", "--out", tmp_path / "x.json")
    assert code == 2 and "has 6 needles; leave out fewer" in err and err.count("\n") == 1
    code, err, _ = run(capsys, "layers", "--profile", tmp_path / "missing.json")
    assert code == 2 and "missing.json" in err
