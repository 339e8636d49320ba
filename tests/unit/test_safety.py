"""Safety flags: the file's fold (flag, unflag, flag again), a bad line named in the error, atomic appends, the
path (default and override), the service's re-read on change, and `recsys flag`."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from pipeline_tasks.cli import app
from pipeline_tasks.online.safety import (
    FLAGS_FILE,
    FlagEvent,
    FlagsFile,
    SafetyFlagsError,
    append_flags,
    flags_path,
    fold,
    parse_events,
    read_flags,
)


def _line(item: str, flagged: bool, reason: str = "r") -> str:
    return json.dumps({"item_id": item, "flagged": flagged, "reason": reason, "at": "2024-05-01T00:00:00+00:00"})


def test_the_current_flags_are_the_fold_of_the_lines_in_order():
    lines = [_line("a", True, "spam"), _line("b", True), _line("a", False), _line("c", True), "",
             _line("c", False), _line("c", True, "again"), _line("d", False)]  # unflag of a never-flagged item
    current = fold(parse_events(lines))
    assert set(current) == {"b", "c"}
    assert current["c"] == FlagEvent("c", True, "again", "2024-05-01T00:00:00+00:00")  # the last flag's reason


@pytest.mark.parametrize(("bad", "message"), [
    ("{not json", "is not JSON"),
    ('["a", true]', "not an object"),
    ('{"item_id": "", "flagged": true}', "item_id"),
    ('{"flagged": true}', "item_id"),
    ('{"item_id": "a", "flagged": "yes"}', "flagged 'yes' is not true or false"),
    ('{"item_id": "a"}', "flagged None"),
])
def test_a_malformed_line_is_an_error_naming_the_file_and_line(tmp_path, bad, message):
    path = tmp_path / FLAGS_FILE
    path.write_text("\n".join([_line("a", True), "", bad, _line("b", True)]) + "\n")
    with pytest.raises(SafetyFlagsError, match=message) as err:
        read_flags(path)
    assert f"{path}, line 3" in str(err.value)


def test_appends_are_whole_lines_and_a_missing_file_has_no_flags(tmp_path):
    path = tmp_path / "nested" / FLAGS_FILE
    assert read_flags(path) == {}
    at = datetime(2024, 5, 1, 12, tzinfo=UTC)
    written = append_flags(path, ["x", "y"], flagged=True, reason="recall", at=at)
    assert [e.at for e in written] == ["2024-05-01T12:00:00+00:00"] * 2
    threads = [threading.Thread(target=lambda n=n: [append_flags(path, [f"i{n}-{j}", f"j{n}-{j}"], n % 2 == 0,
                                                                 "x" * 500) for j in range(25)])
               for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 + 4 * 25 * 2
    current = read_flags(path)  # every line parses: no two appends interleaved
    assert set(current) == {"x", "y"} | {f"{p}{n}-{j}" for p in "ij" for n in (0, 2) for j in range(25)}
    append_flags(path, ["x"], flagged=False)
    assert "x" not in read_flags(path) and "y" in read_flags(path)
    with pytest.raises(ValueError, match="item id"):
        append_flags(path, [" "], flagged=True)


def test_flags_path_is_per_model_under_the_home_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv("RECSYS_SAFETY_FLAGS", raising=False)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    assert flags_path("recsys_m") == tmp_path / "serving" / "recsys_m" / FLAGS_FILE
    monkeypatch.setenv("RECSYS_SAFETY_FLAGS", str(tmp_path / "other.jsonl"))
    assert flags_path("recsys_m") == tmp_path / "other.jsonl"


def test_flags_file_rereads_on_change_and_keeps_the_last_good_set(tmp_path):
    path = tmp_path / FLAGS_FILE
    flags = FlagsFile(path)
    assert not flags.poll() and flags.items == frozenset()  # no file: nothing flagged
    append_flags(path, ["a"], flagged=True, reason="r")
    assert flags.poll() and flags.items == {"a"}
    assert not flags.poll()  # unchanged
    with open(path, "a") as fh:
        fh.write("{oops\n")
    with pytest.raises(SafetyFlagsError, match="line 2"):
        flags.poll()
    assert flags.items == {"a"}  # the flags in force stay
    assert not flags.poll()  # reported once per change
    path.write_text(_line("a", True) + "\n" + _line("b", True) + "\n" + _line("a", False) + "\n")
    assert flags.poll() and flags.items == {"b"}
    path.unlink()
    assert flags.poll() and flags.items == frozenset()


def test_recsys_flag_flags_lifts_and_lists(monkeypatch, tmp_path):
    path = tmp_path / "flags.jsonl"
    monkeypatch.setenv("RECSYS_SAFETY_FLAGS", str(path))
    runner = CliRunner()
    res = runner.invoke(app, ["flag", "--model", "recsys_m", "10", "11"])
    assert res.exit_code == 2 and "--reason is required" in res.output
    res = runner.invoke(app, ["flag", "--model", "recsys_m", "10", "11", "--reason", "legal hold"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["now_flagged"] == 2
    res = runner.invoke(app, ["flag", "--model", "recsys_m", "--remove", "10"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["flag", "--model", "recsys_m", "--list"])
    listed = json.loads(res.output)
    assert listed["file"] == str(path) and [f["item_id"] for f in listed["flagged"]] == ["11"]
    assert listed["flagged"][0]["reason"] == "legal hold"
    assert runner.invoke(app, ["flag", "--model", "recsys_m"]).exit_code == 2
    assert runner.invoke(app, ["flag", "--model", "recsys_m", "--list", "12"]).exit_code == 2
    path.write_text(path.read_text() + "garbage\n")
    res = runner.invoke(app, ["flag", "--model", "recsys_m", "--list"])
    assert res.exit_code == 2 and "line 4" in res.output
