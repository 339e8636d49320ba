"""Safety flags: items an operator has ruled out of every list, whatever the data says.

The data contract has no safety column, so the flags live in an operator-managed, append-only JSON-lines file
(``$RECSYS_HOME/serving/<registered model>/safety_flags.jsonl``; ``RECSYS_SAFETY_FLAGS`` overrides the path), one
event per line: ``{"item_id": "42", "flagged": true, "reason": "...", "at": "2024-05-01T12:00:00+00:00"}``. The
current state is the fold of the file in line order: an item is flagged when its last event says so
(flag, unflag, flag again: flagged). Nothing is ever rewritten, so the file is also the audit trail.

``recsys flag`` appends (one ``write`` on an ``O_APPEND`` descriptor under an exclusive ``flock``, then
``fsync``: concurrent writers never interleave and a reader never sees half a line); the service re-reads the
file when its size, mtime or inode change (:class:`FlagsFile`, polled about every second) and makes the
flagged items unservable, as unavailable ones (:func:`pipeline_tasks.online.two_stage.with_blocked_items`, once per
change, nothing per request); ``recsys recommend`` applies the same flags by default.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline_tasks.core.settings import Settings, load_settings

FLAGS_FILE = "safety_flags.jsonl"
POLL_S = 1.0  # how often a service checks the file for changes


class SafetyFlagsError(ValueError):
    """A line of the flags file is not a flag event (the message names the file and the line)."""


@dataclass(frozen=True)
class FlagEvent:
    """One line of the flags file."""

    item_id: str
    flagged: bool
    reason: str
    at: str  # ISO-8601, UTC


def flags_path(model: str, settings: Settings | None = None) -> Path:
    """``RECSYS_SAFETY_FLAGS``, else ``$RECSYS_HOME/serving/<model>/safety_flags.jsonl`` (shared by every version
    of the registered model, so a challenger obeys the champion's flags)."""
    override = os.environ.get("RECSYS_SAFETY_FLAGS")
    return Path(override).expanduser() if override else (settings or load_settings()).home / "serving" / model / \
        FLAGS_FILE


def parse_events(lines: Iterable[str], source: str = "<flags>") -> list[FlagEvent]:
    """The flag events of ``lines`` (blank lines skipped); raises :class:`SafetyFlagsError` naming the first bad
    line."""
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SafetyFlagsError(f"{where} is not JSON ({exc.msg}): {line.strip()[:120]!r}; fix or delete the "
                                   f"line (use `recsys flag` to add flags)") from None
        if not isinstance(record, dict):
            raise SafetyFlagsError(f"{where} is a JSON {type(record).__name__}, not an object with item_id and flagged")
        item, flagged = record.get("item_id"), record.get("flagged")
        if isinstance(item, bool) or not isinstance(item, str | int) or not str(item).strip():
            raise SafetyFlagsError(f"{where}: item_id {item!r} is not an item id (a non-empty string)")
        if not isinstance(flagged, bool):
            raise SafetyFlagsError(f"{where}: flagged {flagged!r} is not true or false (item {item})")
        reason, at = record.get("reason") or "", record.get("at") or ""
        if not isinstance(reason, str) or not isinstance(at, str):
            raise SafetyFlagsError(f"{where}: reason and at must be strings (item {item})")
        events.append(FlagEvent(str(item).strip(), flagged, reason, at))
    return events


def fold(events: Iterable[FlagEvent]) -> dict[str, FlagEvent]:
    """The items flagged after ``events`` (in order), each with the event that flagged it last."""
    current: dict[str, FlagEvent] = {}
    for event in events:
        if event.flagged:
            current[event.item_id] = event
        else:
            current.pop(event.item_id, None)
    return current


def read_flags(path: str | Path) -> dict[str, FlagEvent]:
    """The current flags of the file at ``path`` (none when it does not exist)."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)  # never half of a line being appended
            text = fh.read()
    except FileNotFoundError:
        return {}
    return fold(parse_events(text.splitlines(), str(p)))


def append_flags(path: str | Path, item_ids: Sequence[str], flagged: bool, reason: str = "",
                 at: datetime | None = None) -> list[FlagEvent]:
    """Append one event per item (flag or unflag) in a single atomic write; returns the events written."""
    ids = [str(i).strip() for i in item_ids]
    if not ids or not all(ids):
        raise ValueError(f"item ids {list(item_ids)!r}: give at least one non-empty item id")
    moment = (at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    events = [FlagEvent(i, flagged, reason, moment) for i in ids]
    data = "".join(json.dumps(asdict(e), separators=(",", ":")) + "\n" for e in events).encode()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    return events


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class FlagsFile:
    """The flagged items of a flags file, re-read when the file changes (:meth:`poll`).

    ``items`` is a frozenset replaced in one assignment, so readers on other threads need no lock. A file that
    fails to parse keeps the last good set (raised from :meth:`poll`, for the caller to report); it is read again
    at the next change.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.items: frozenset[str] = frozenset()
        self._seen: tuple[int, int, int] | None = None

    def poll(self) -> bool:
        """Re-read the file if it changed since the last call; True when the flagged set changed."""
        signature = _signature(self.path)
        if signature == self._seen:
            return False
        self._seen = signature  # a bad file is reported once per change, not once per poll
        items = frozenset(read_flags(self.path)) if signature is not None else frozenset()
        changed, self.items = items != self.items, items
        return changed
