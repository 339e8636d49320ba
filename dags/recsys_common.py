"""What the recsys DAG files share: the permanent-error rule and task timeouts (no DAG is defined here).

Listed in `.airflowignore`, so the DAG processor does not parse it as a DAG file; the DAG files import it
(Airflow puts the DAGs folder on `sys.path`). Nothing heavy is imported here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException

from pipeline_tasks.core.errors import PermanentError  # a plain exception module: no heavy import

F = TypeVar("F", bound=Callable[..., Any])

RETRY_ARGS = {
    "owner": "recsys",
    "retries": 2,  # transient failures only (I/O, a busy store); permanent errors fail at once
    "retry_delay": timedelta(minutes=1),
    "execution_timeout": timedelta(hours=1),  # tasks that may take longer set their own
}


# `register` of recsys_training updates it; it schedules recsys_canary where a scheduler runs.
CHALLENGER_ASSET = Asset("recsys_challenger")


def fail_fast(fn: F) -> F:
    """Run a task body; a :class:`PermanentError` fails the task at once (no retry), anything else may retry.

    The one place where the pipeline's permanent errors become ``AirflowFailException``.
    """

    @functools.wraps(fn)
    def body(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PermanentError as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc

    body.recsys_fail_fast = True  # type: ignore[attr-defined]  # checked by tests/dags
    return body  # type: ignore[return-value]
