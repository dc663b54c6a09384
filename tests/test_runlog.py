"""Resumable run logs: a killed run continues, other settings are refused."""

import json

import pytest

from ckv_mlx.errors import CKVError
from ckv_mlx.eval.runlog import RunLog


def test_records_survive_and_a_cut_off_line_is_dropped(tmp_path):
    path = tmp_path / "run.jsonl"
    log = RunLog(path, {"lengths": (1000, 2000)})
    log.add({"key": "a", "x": 1})
    log.add({"key": "b", "x": 2})
    with open(path, "a") as out:
        out.write('{"key": "c", "x"')  # killed mid-write
    again = RunLog(path, {"lengths": [1000, 2000]})
    assert again.done == {"a", "b"}
    again.add({"key": "c", "x": 3})
    lines = path.read_text().splitlines()
    assert [json.loads(l).get("key") for l in lines] == [None, "a", "b", "c"]


def test_other_settings_are_refused_naming_what_changed(tmp_path):
    path = tmp_path / "run.jsonl"
    RunLog(path, {"lengths": [1000], "depths": [0]}).add({"key": "a"})
    with pytest.raises(CKVError, match=r"other settings \(lengths\).*--restart"):
        RunLog(path, {"lengths": [2000], "depths": [0]})
    fresh = RunLog(path, {"lengths": [2000], "depths": [0]}, restart=True)
    assert fresh.done == set()


def test_a_file_that_is_not_a_run_log_is_refused(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("hello\n")
    with pytest.raises(CKVError, match="not a run log"):
        RunLog(path, {})


def test_unwritable_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CKVError, match="cannot write the run log"):
        RunLog(blocker / "run.jsonl", {})
