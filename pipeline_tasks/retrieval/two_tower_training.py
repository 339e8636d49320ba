"""Training the two-tower (and MF) retrieval model: examples, in-batch softmax with log-Q, early stopping, grid.

The model itself (encoder, towers, embedding, persistence) lives in :mod:`pipeline_tasks.online.two_tower`,
which a serving process imports; this module is what only training needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F  # noqa: N812 (torch convention)

from pipeline_tasks.core.constants import ITEM_ID, USER_ID
from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.online.encoder import (
    ITEM_NUMERIC,
    USER_NUMERIC,
    Catalog,
    Encoder,
    first_interactions,
    item_inputs,
    user_inputs,
)
from pipeline_tasks.online.two_tower import TwoTowerConfig, TwoTowerModel, TwoTowerNet, _spec

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Fix the seeds of numpy and torch (CPU and GPU) for a reproducible run."""
    np.random.seed(seed)
    torch.manual_seed(seed)


def in_batch_softmax_loss(user: torch.Tensor, item: torch.Tensor, item_idx: torch.Tensor, scale: torch.Tensor,
                          log_q: torch.Tensor | None) -> torch.Tensor:
    """Sampled softmax over the batch's items with log-Q correction; other rows holding the same item
    (accidental hits) are masked out of each row's negatives."""
    logits = scale * user @ item.T
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    same = item_idx.unsqueeze(0) == item_idx.unsqueeze(1)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(user), device=user.device)
    return F.cross_entropy(logits, labels)


LOGQ_MODES = ("batch", "sample", "none")


def sampling_log_q(item_idx: np.ndarray, n: int, batch_size: int, mode: str) -> torch.Tensor | None:
    """The log-Q correction per item index, from each item's share q of the training examples.

    ``batch``: log P(item in a batch) = log(1 - (1 - q)^B). With accidental hits masked an item is a
    negative when it appears at least once: ~ log(B*q) for rare items, -> 0 for items so popular that
    nearly every batch holds them (small catalogs), where ``sample`` (plain log q) over-corrects and
    pushes popular items up. ``none``: no correction (in-batch softmax alone demotes popular items).
    """
    if mode not in LOGQ_MODES:
        raise ValueError(f"logq={mode!r}: use one of {LOGQ_MODES}")
    if mode == "none":
        return None
    counts = np.bincount(item_idx, minlength=n).astype(np.float64)
    q = np.maximum(counts, 1) / max(counts.sum(), 1)
    log_q = np.log(q) if mode == "sample" else np.log(-np.expm1(batch_size * np.log1p(-np.minimum(q, 1 - 1e-12))))
    return torch.from_numpy(log_q.astype(np.float32))


def example_histories(examples: pd.DataFrame, encoder: Encoder, history_len: int) -> np.ndarray:
    """For each (time-ordered) example, the item indices the user met before it, newest first, 0-padded."""
    n = len(examples)
    order = np.lexsort((np.arange(n), examples[USER_ID].astype(str).to_numpy()))
    users = examples[USER_ID].astype(str).to_numpy()[order]
    items = encoder.item_index(examples[ITEM_ID].tolist())[order]
    pos = pd.Series(users).groupby(users).cumcount().to_numpy()
    hist = np.zeros((n, history_len), dtype=np.int64)
    for lag in range(1, history_len + 1):
        ok = pos >= lag
        hist[np.flatnonzero(ok), lag - 1] = items[np.flatnonzero(ok) - lag]
    out = np.empty_like(hist)
    out[order] = hist
    return out


@dataclass
class Window:
    """A query moment for evaluation: the events before it, the truth after it, the features valid at it."""

    history: pd.DataFrame
    truth: dict[str, set[str]]
    user_rows: pd.DataFrame | None = None
    item_rows: pd.DataFrame | None = None


def recommend(model: TwoTowerModel, window: Window, users: pd.DataFrame | None, k: int,
              user_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Top-k unseen catalog items per user by exact dot product (the evaluation's reference retrieval)."""
    from pipeline_tasks.evaluation.metrics import top_k_unseen

    ids = list(user_ids if user_ids is not None else window.truth)
    if not ids:
        return {}
    items = model.item_embeddings(window.item_rows)
    seen = first_interactions(window.history)
    seen = seen.assign(_i=model.encoder.item_index(seen[ITEM_ID].tolist()) - 1)
    seen_by_user = seen[seen["_i"] >= 0].groupby(seen[USER_ID].astype(str))["_i"].apply(np.asarray)
    out: dict[str, list[str]] = {}
    catalog_ids = np.asarray(model.encoder.item_ids, dtype=object)
    for s in range(0, len(ids), 2048):
        chunk = ids[s: s + 2048]
        u = model.user_embeddings(chunk, window.history, window.user_rows, users)
        top = top_k_unseen(u @ items.T, [seen_by_user.get(str(x), np.zeros(0, np.int64)) for x in chunk], k)
        for uid, row in zip(chunk, top, strict=True):
            out[str(uid)] = catalog_ids[row[row >= 0]].tolist()
    return out


def recall_at(model: TwoTowerModel, window: Window, users: pd.DataFrame | None, k: int) -> float:
    from pipeline_tasks.evaluation.metrics import per_user_metrics

    recs = recommend(model, window, users, k)
    return float(per_user_metrics(recs, window.truth, ks=(k,))[f"recall@{k}"].mean()) if window.truth else 0.0


def fit(examples: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame | None, content: np.ndarray,
        content_method: str, config: TwoTowerConfig, validation: Window | None = None,
        epochs: int | None = None, on_epoch: Any = None, deadline: float | None = None) -> TwoTowerModel:
    """Train on ``examples`` (interactions, optionally with point-in-time feature columns).

    With ``validation``: early stopping on recall@``eval_k`` (patience ``patience``), keeping the best
    epoch's weights. Without: exactly ``epochs`` epochs (the refit of the protocol). ``deadline`` (a
    ``time.monotonic()`` instant) ends training after the epoch that passes it (the grid's time budget).
    """
    seed_everything(config.seed)
    ex = first_interactions(examples)
    has_features = any(c in ex for c in USER_NUMERIC + ITEM_NUMERIC)
    encoder = Encoder.fit(items, ex, users, content_method, content.shape[1], ex if has_features else None)
    unknown = ~ex[ITEM_ID].astype(str).isin(set(encoder.item_ids))
    if unknown.any():
        log.warning("%d training interactions name items missing from the catalog; ignored", int(unknown.sum()))
        ex = ex[~unknown].reset_index(drop=True)
    catalog = Catalog.build(encoder, items, content)
    net = TwoTowerNet(_spec(encoder), config)
    if not net.mf:
        net.item_category.copy_(torch.from_numpy(catalog.category))
        net.item_content.copy_(torch.from_numpy(catalog.content))
    model = TwoTowerModel(net, encoder, catalog, config)

    item_idx = encoder.item_index(ex[ITEM_ID].tolist())
    uids = ex[USER_ID].astype(str).tolist()
    u_in = user_inputs(encoder, uids, example_histories(ex, encoder, config.history_len),
                       ex.drop(columns=[USER_ID]) if has_features else None, users)
    i_in = item_inputs(encoder, catalog, item_idx, ex if has_features else None)
    log_q = sampling_log_q(item_idx, encoder.n_items + 1, config.batch_size, config.logq)

    sparse = [net.item_id.weight, net.user_id.weight]
    dense = [p for p in net.parameters() if all(p is not q for q in sparse)]
    optimizers = [torch.optim.SparseAdam(sparse, lr=config.lr),
                  torch.optim.AdamW(dense, lr=config.lr, weight_decay=config.weight_decay, foreach=True)]
    gen = torch.Generator().manual_seed(config.seed)
    n = len(ex)
    max_epochs = epochs if epochs is not None else config.max_epochs
    best, best_epoch, best_state, bad = -1.0, 0, None, 0
    history: list[dict[str, float]] = []
    for epoch in range(1, max_epochs + 1):
        net.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total, steps = 0.0, 0
        for s in range(0, n, config.batch_size):
            b = perm[s: s + config.batch_size]
            if len(b) < 2:
                continue
            u = net.user_vectors({k: v[b] for k, v in u_in.items()})
            i = net.item_vectors({k: v[b] for k, v in i_in.items()})
            bi = i_in["item"][b]
            loss = in_batch_softmax_loss(u, i, bi, net.scale, log_q[bi] if log_q is not None else None)
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
            total += loss.item()
            steps += 1
        row = {"epoch": epoch, "loss": total / max(steps, 1), "seconds": time.perf_counter() - t0,
               "temperature": float(1.0 / net.scale.detach())}
        if validation is not None:
            row[f"val_recall@{config.eval_k}"] = recall_at(model, validation, users, config.eval_k)
        history.append(row)
        log.info("%s epoch %d: %s", config.model, epoch, {k: round(v, 4) for k, v in row.items()})
        if on_epoch is not None:
            on_epoch(row)
        out_of_time = deadline is not None and time.monotonic() >= deadline and epoch < max_epochs
        if validation is None:
            if out_of_time:
                log.warning("time budget spent: %s stops after epoch %d of %d", config.model, epoch, max_epochs)
                break
            continue
        score = row[f"val_recall@{config.eval_k}"]
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= config.patience:
                log.info("early stop after epoch %d (best epoch %d, val recall@%d %.4f)", epoch, best_epoch,
                         config.eval_k, best)
                break
        if out_of_time:
            log.warning("time budget spent: %s stops after epoch %d (best epoch %d, val recall@%d %.4f)",
                        config.model, epoch, best_epoch, config.eval_k, best)
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    model.info = {"history": history, "epochs": len(history), "best_epoch": best_epoch or len(history),
                  "stopped_by_budget": bool(deadline is not None and time.monotonic() >= deadline),
                  "best_val_recall": best if validation is not None else None, "examples": n,
                  "seconds_per_epoch": float(np.median([h["seconds"] for h in history])) if history else None}
    return model


def grid_configs(base: TwoTowerConfig, grid: Sequence[Mapping[str, Any]]) -> list[TwoTowerConfig]:
    """The configs to try: ``base`` with each grid entry's overrides (unknown keys are an error)."""
    out = []
    for g in grid or [{}]:
        unknown = set(g) - set(base.__dataclass_fields__)
        if unknown:
            raise InvalidParamsError(f"unknown two-tower hyper-parameters {sorted(unknown)}; "
                             f"known: {sorted(base.__dataclass_fields__)}")
        out.append(replace(base, **{k: (tuple(v) if k == "hidden" else v) for k, v in g.items()}))
    return out
