"""`airflow dags test` output (JSON log lines) routed to the task log files the Airflow UI reads."""

from __future__ import annotations

import io
import json

from pipeline_tasks.core.task_logs import DagTestLog, task_log_path

RUN = "manual__2026-11-30T19:52:25.813795+00:00"


def _event(message: str, ts: str, **extra) -> str:
    return json.dumps({"timestamp": f"2026-11-30T19:{ts}Z", "level": extra.pop("level", "info"), "event": message,
                       "logger": extra.pop("logger", "airflow.sdk.definitions.dag"), **extra})


def _task(task: str, ts: tuple[str, str], state: str, body: list[str]) -> list[str]:
    return [_event(f"[DAG TEST] starting task_id={task} map_index=-1", ts[0]),
            _event(f"[DAG TEST] running task <TaskInstance: recsys_training.{task} {RUN} [TaskInstanceState.SCHEDULED]"
                   " ti_id=01a2>", ts[0]),
            *body,
            _event("Task instance state updated", ts[1], new_state=state, logger="airflow.api_fastapi"),
            _event(f"[DAG TEST] end task task_id={task} map_index=-1", ts[1])]


FAILURE = _event("Task failed with exception", "53:00.5", level="error", logger="task", exception=[
    {"exc_type": "AirflowFailException", "exc_value": "ContractError: x.csv: the file is empty", "frames": [
        {"filename": "/dags/recsys_common.py", "lineno": 39, "name": "body"}]},
    {"exc_type": "ContractError", "exc_value": "x.csv: the file is empty", "is_cause": True, "frames": [
        {"filename": "/pipeline_tasks/data/ingest.py", "lineno": 57, "name": "load_source"}]}])

OUTPUT = [
    _event("creating dag run", "52:26.1", run_id=RUN),
    *_task("ingest", ("52:26.2", "52:30.2"), "up_for_retry", [
        _event("reading the source", "52:27.0", logger="pipeline_tasks.data.ingest"),
        "a line a library printed, not JSON",
        _event("Task failed with exception", "52:30.0", level="error", logger="task",
               exception=[{"exc_type": "OSError", "exc_value": "disk busy", "frames": []}])]),
    "No tasks to run (not in a task)",
    *_task("ingest", ("53:00.0", "53:01.0"), "failed", [FAILURE]),
    _event("[DAG TEST] Marking success for <Task(_PythonDecoratedOperator): split> on 2026-11-30", "53:02.0"),
]


def test_each_task_attempt_gets_its_airflow_log_file(tmp_path):
    full = io.StringIO()
    finished = []
    log = DagTestLog("recsys_training", tmp_path, full, on_task=finished.append)
    for line in OUTPUT:
        log.feed(line + "\n")
    log.close()
    assert log.run_id == RUN
    first = task_log_path(tmp_path, "recsys_training", RUN, "ingest", 1)
    second = task_log_path(tmp_path, "recsys_training", RUN, "ingest", 2)
    assert first == tmp_path / "dag_id=recsys_training" / f"run_id={RUN}" / "task_id=ingest" / "attempt=1.log"
    events = [json.loads(line) for line in first.read_text().splitlines()]  # JSON lines, as a worker writes
    assert [e["event"] for e in events][2:4] == ["reading the source", "a line a library printed, not JSON"]
    assert events[3]["logger"] == "stdout" and events[3]["timestamp"]
    assert "No tasks to run (not in a task)" not in first.read_text()
    assert "ContractError: x.csv: the file is empty" in second.read_text()
    # the progress: each attempt with its state, seconds and error; marked tasks too
    assert [(a.task_id, a.attempt, a.state) for a in finished] == [
        ("ingest", 1, "up_for_retry"), ("ingest", 2, "failed"), ("split", 0, "marked_success")]
    assert finished[0].seconds == 4.0 and finished[0].error == "OSError: disk busy"
    assert finished[1].error == "AirflowFailException: ContractError: x.csv: the file is empty"
    # the full log has every line, as readable text with the traceback, cause first
    text = full.getvalue()
    assert "No tasks to run (not in a task)" in text and "[info   ] reading the source" in text
    cause = text.index('File "/pipeline_tasks/data/ingest.py", line 57, in load_source')
    assert cause < text.index("direct cause of the following exception") < text.index("AirflowFailException: ")


def test_echo_prints_every_line_and_a_task_left_running_is_closed(tmp_path):
    echoed = []
    finished = []
    log = DagTestLog("recsys_training", tmp_path, io.StringIO(), echo=echoed.append, on_task=finished.append)
    for line in OUTPUT[:3]:  # stopped inside the first task
        log.feed(line)
    log.close()
    assert len(echoed) == 3 and "creating dag run" in echoed[0]
    assert [(a.task_id, a.state) for a in finished] == [("ingest", None)]
    assert task_log_path(tmp_path, "recsys_training", RUN, "ingest", 1).exists()
