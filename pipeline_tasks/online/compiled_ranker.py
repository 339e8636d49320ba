"""The ranker as compiled trees for serving: the same LightGBM model, scored by machine code (lleaves).

A LightGBM ``Booster`` walks its trees in a generic interpreter; lleaves compiles the model file with LLVM into
one function per model, which scores a request's candidates several times faster with the same output
(``tests/benchmarks/bench_ranker_levers.py``: largest difference 4e-16, every list identical). A service
compiles its bundle's ranker once at load (:func:`compile_ranker`), checks that it gives the Booster's scores
on real feature rows (:func:`verified`), and otherwise keeps the Booster: compiled trees are an optimisation
of the one ranker, never a second model. The machine code is cached under ``cache_dir`` by the model file's
hash, the lleaves version and the CPU's features, so a restarted worker loads it in milliseconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TOLERANCE = 1e-9  # largest score difference accepted between the compiled model and the Booster


class CompiledRanker:
    """A compiled model with the part of the ``Booster`` interface the request path uses (``predict``)."""

    def __init__(self, model: Any, booster: Any) -> None:
        self.model, self.booster = model, booster

    def predict(self, data: np.ndarray, num_threads: int = 1) -> np.ndarray:
        """Raw scores of the rows of ``data`` (what ``Booster.predict`` returns for lambdarank)."""
        return self.model.predict(np.ascontiguousarray(data, dtype=np.float64), n_jobs=max(1, num_threads))

    def __getattr__(self, name: str) -> Any:  # everything else (feature names, importance, ...) is the Booster's
        return getattr(self.booster, name)


def _cpu_key() -> str:
    """What the machine code depends on besides the model: the CPU's architecture and feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{flags}".encode()).hexdigest()[:12]


def compile_ranker(booster: Any, cache_dir: str | Path | None = None) -> CompiledRanker | None:
    """``booster`` compiled by lleaves, or None (lleaves missing, or the compile failed: logged)."""
    try:
        import lleaves
    except ImportError:
        log.info("lleaves is not installed: the ranker runs as a LightGBM Booster")
        return None
    text = booster.model_to_string()
    version = importlib.metadata.version("lleaves")
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache_root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "recsys-lleaves"
    cache = cache_root / f"ranker-{key}-lleaves{version}-{_cpu_key()}.o"
    t0 = time.perf_counter()
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            model_file = Path(tmp) / "ranker.txt"
            model_file.write_text(text)
            model = lleaves.Model(model_file=str(model_file))
            # Compile to a private file and move it into place, so two workers never read a half-written one.
            target = cache if cache.exists() else cache_root / f".{cache.name}.{os.getpid()}.tmp"
            model.compile(cache=str(target))
            if target != cache:
                os.replace(target, cache)
    except Exception as exc:  # noqa: BLE001 - compiled trees are an optimisation: any failure keeps the Booster
        log.warning("compiling the ranker with lleaves failed (%s: %s): the ranker runs as a LightGBM Booster",
                    type(exc).__name__, exc)
        return None
    log.info("ranker compiled by lleaves %s in %.1f s (%s)", version, time.perf_counter() - t0, cache.name)
    return CompiledRanker(model, booster)


def verified(compiled: CompiledRanker, booster: Any, rows: np.ndarray) -> bool:
    """Whether ``compiled`` gives ``booster``'s scores on ``rows`` (feature rows of real candidates)."""
    if not len(rows):
        return False
    want = booster.predict(rows, num_threads=1)
    got = compiled.predict(rows, num_threads=1)
    diff = float(np.max(np.abs(np.asarray(want, float) - np.asarray(got, float))))
    if not np.isfinite(diff) or diff > TOLERANCE:
        log.warning("the compiled ranker differs from the Booster by %.3g on %d rows: serving the Booster",
                    diff, len(rows))
        return False
    log.info("the compiled ranker gives the Booster's scores on %d rows (largest difference %.3g)", len(rows), diff)
    return True
