"""Task logs of ``airflow dags test`` runs, where the Airflow UI reads them.

``airflow dags test`` runs every task inside its own process and logs to its console only: no task
log file is written, so the UI shows an empty log ("Log file not found on worker ...") for such
runs. Run with ``AIRFLOW__LOGGING__JSON_LOGS=True``, its console carries the same JSON log lines a
worker writes to its log file; :class:`DagTestLog` reads that output line by line and

- writes each task attempt's lines to ``<base_log_folder>/dag_id=.../run_id=.../task_id=.../attempt=N.log``
  (Airflow's default ``log_filename_template``), the file the API server reads;
- writes every line, rendered as text, to one full log file;
- reports each task attempt as it finishes (state, seconds, error), for a progress line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

_STARTING = re.compile(r"^\[DAG TEST\] starting task_id=(\S+) map_index=(-?\d+)")
_ENDING = re.compile(r"^\[DAG TEST\] end task task_id=(\S+)")
_MARKED = re.compile(r"^\[DAG TEST\] Marking success for <Task\([^)]*\): (\S+)>")
_RUNNING = re.compile(r"^\[DAG TEST\] running task <TaskInstance: [^.\s]+\.(\S+) (\S+) \[")
_RUN_ID = re.compile(r"run_id=(\S+?),")


@dataclass
class TaskAttempt:
    """One task attempt of the run, as its log lines told it."""

    task_id: str
    attempt: int
    started: datetime
    ended: datetime | None = None
    state: str | None = None  # success | failed | up_for_retry | marked_success (None: never reported)
    error: str | None = None  # "ExceptionType: message" of the failure

    @property
    def seconds(self) -> float:
        return ((self.ended or self.started) - self.started).total_seconds()


def task_log_path(base_folder: Path, dag_id: str, run_id: str, task_id: str, attempt: int) -> Path:
    """Where Airflow's default ``log_filename_template`` puts a task attempt's log (unmapped tasks)."""
    return base_folder / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}" / f"attempt={attempt}.log"


def _timestamp(event: dict[str, Any]) -> datetime:
    try:
        return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return datetime.now(UTC)


def format_exception(exceptions: list[dict[str, Any]]) -> str:
    """A Python-style traceback from structlog's exception dicts (the raised one first, then its causes)."""
    parts = []
    for exc in reversed(exceptions):
        frames = "".join(f'  File "{f.get("filename")}", line {f.get("lineno")}, in {f.get("name")}\n'
                         for f in exc.get("frames", []))
        parts.append(f"Traceback (most recent call last):\n{frames}{exc.get('exc_type')}: {exc.get('exc_value')}")
    return "\n\nThe above exception was the direct cause of the following exception:\n\n".join(parts)


def render(event: dict[str, Any]) -> str:
    """One JSON log event as a text line (and its traceback), like Airflow's console format."""
    skip = {"timestamp", "level", "event", "logger", "filename", "lineno", "exception"}
    extra = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
    text = f"{event.get('timestamp', '')} [{str(event.get('level', '')):<7}] {event.get('event', '')}"
    text += f" [{event['logger']}]" if event.get("logger") else ""
    text += f" {extra}" if extra else ""
    if isinstance(event.get("exception"), list):
        text += "\n" + format_exception(event["exception"])
    return text


def _error(exceptions: Any) -> str | None:
    if isinstance(exceptions, list) and exceptions:
        first = exceptions[0]
        return f"{first.get('exc_type')}: {first.get('exc_value')}"
    return None


class DagTestLog:
    """Routes ``airflow dags test`` output (JSON log lines) to task log files and a full log.

    ``echo`` (if given) gets every rendered line, e.g. for ``--verbose``; ``on_task`` gets each task
    attempt as it finishes.
    """

    def __init__(self, dag_id: str, base_folder: Path, full_log: TextIO,
                 echo: Callable[[str], None] | None = None,
                 on_task: Callable[[TaskAttempt], None] | None = None) -> None:
        self.dag_id = dag_id
        self.base_folder = base_folder
        self.full_log = full_log
        self.echo = echo
        self.on_task = on_task
        self.run_id: str | None = None
        self.attempts: list[TaskAttempt] = []
        self._current: TaskAttempt | None = None
        self._task_file: TextIO | None = None

    def feed(self, line: str) -> None:
        """Handle one line of output (a JSON event, or plain text a library printed)."""
        line = line.rstrip("\n")
        try:
            event = json.loads(line) if line.startswith("{") else None
        except ValueError:
            event = None
        if not isinstance(event, dict) or "event" not in event:
            event, raw = None, line
        else:
            raw = render(event)
        self.full_log.write(raw + "\n")
        if self.echo:
            self.echo(raw)
        if event is None:
            self._write_task_line(json.dumps({"timestamp": datetime.now(UTC).isoformat(), "level": "info",
                                              "event": line, "logger": "stdout"}))
            return
        self._follow(event, line)

    def _follow(self, event: dict[str, Any], line: str) -> None:
        message = str(event.get("event", ""))
        if self.run_id is None and event.get("run_id"):
            self.run_id = str(event["run_id"])
        if m := _STARTING.match(message):
            self._finish(None)
            previous = sum(1 for a in self.attempts if a.task_id == m.group(1))
            self._current = TaskAttempt(m.group(1), previous + 1, _timestamp(event))
            self.attempts.append(self._current)
        if (m := _RUNNING.match(message)) and self.run_id is None:
            self.run_id = m.group(2)
        self._write_task_line(line)
        current = self._current
        if current is not None:
            if event.get("new_state"):
                current.state = str(event["new_state"])
            if current.error is None and event.get("level") == "error":
                current.error = _error(event.get("exception"))
            if _ENDING.match(message):
                self._finish(_timestamp(event))
        if m := _MARKED.match(message):
            marked = TaskAttempt(m.group(1), 0, _timestamp(event), _timestamp(event), "marked_success")
            self.attempts.append(marked)
            if self.on_task:
                self.on_task(marked)
        if self.run_id is None and (m := _RUN_ID.search(message)):
            self.run_id = m.group(1)

    def _write_task_line(self, line: str) -> None:
        current = self._current
        if current is None or self.run_id is None:
            return
        if self._task_file is None:
            path = task_log_path(self.base_folder, self.dag_id, self.run_id, current.task_id, current.attempt)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._task_file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed when the attempt ends
        self._task_file.write(line + "\n")
        self._task_file.flush()

    def _finish(self, ended: datetime | None) -> None:
        current = self._current
        if current is None:
            return
        current.ended = ended or datetime.now(UTC)
        if self._task_file is not None:
            self._task_file.close()
            self._task_file = None
        self._current = None
        if self.on_task:
            self.on_task(current)

    def close(self) -> None:
        """End an attempt left open (the process was stopped) and flush the full log."""
        self._finish(None)
        self.full_log.flush()
