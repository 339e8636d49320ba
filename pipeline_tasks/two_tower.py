"""Two-tower retrieval model (PyTorch) and the team's matrix-factorisation model, trained the same way.

User tower: user id embedding, demographics (age, gender, occupation), the user's recent history
(up to ``history_len`` items before the moment of the query, mean-pooled item id and content
embeddings), taste and activity features (Feast service ``two_tower_v1``). Item tower: item id
embedding, category, genres, content embedding of the item text, popularity/age features. Both
end in an MLP (Linear, BatchNorm, ReLU, Dropout) and an L2-normalised output; scores are dot
products scaled by a learnable temperature. Training: in-batch sampled softmax with log-Q
(sampling-bias) correction and accidental-hit masking; id embeddings are dropped at random so the
towers also learn from features alone (how a new item is embedded); early stopping on
validation recall@K; fixed seeds.

The user tower reads the history as input, never a stored per-user vector, so events after
training still change a user's embedding; an item with no interactions is embedded from its
content, category and genres (id index 0 = unknown).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (torch convention)

from pipeline_tasks.constants import ITEM_ID, SEED, TIMESTAMP, UNKNOWN_CATEGORY, USER_ID

log = logging.getLogger(__name__)

# Feast service two_tower_v1's columns the towers read (user_last_items is replaced by the exact
# event history; item_category by the catalog's category, which a new item has before any snapshot).
USER_NUMERIC = ["user_total_interactions", "user_days_since_last_event", "user_top1_share", "user_top2_share",
                "user_top3_share"]
USER_CATEGORIES = ["user_top1_category", "user_top2_category", "user_top3_category"]
ITEM_NUMERIC = ["item_popularity", "item_age_days", "item_trending_score"]
MODEL_FILE = "model.pt"
SPEC_FILE = "model.json"
ENCODER_FILE = "encoder.json"
ITEM_INPUTS_FILE = "item_inputs.npz"


@dataclass(frozen=True)
class TwoTowerConfig:
    """Hyper-parameters of one training run."""

    model: str = "two_tower"  # two_tower | mf
    dim: int = 64
    id_dim: int = 64
    cat_dim: int = 16
    content_proj_dim: int = 64
    hidden: tuple[int, ...] = (256,)
    dropout: float = 0.2
    id_dropout: float = 0.3
    history_len: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-6
    init_temperature: float = 0.05
    max_epochs: int = 30
    patience: int = 3
    eval_k: int = 100
    logq: str = "batch"  # log-Q correction: batch (P(item in batch)) | sample (log q) | none
    seed: int = SEED

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TwoTowerConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "hidden" in known:
            known["hidden"] = tuple(known["hidden"])
        return cls(**known)


def seed_everything(seed: int) -> None:
    """Fix the seeds of numpy and torch (CPU and GPU) for a reproducible run."""
    np.random.seed(seed)
    torch.manual_seed(seed)


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _split_genres(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [g.strip() for g in str(value).split("|") if g.strip()]


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    s = str(value).strip()
    return s or None


@dataclass
class Encoder:
    """Vocabularies and normalisation statistics: turns ids, catalog rows and feature rows into tensors.

    Index 0 of every vocabulary means unknown (a new user, a new item, an unseen category).
    """

    item_ids: list[str]
    user_ids: list[str]
    categories: list[str]
    genres: list[str]
    genders: list[str]
    occupations: list[str]
    content_method: str
    content_dim: int
    max_genres: int = 6
    user_numeric: list[str] = field(default_factory=list)
    item_numeric: list[str] = field(default_factory=list)
    user_categories: list[str] = field(default_factory=list)
    stats: dict[str, list[float]] = field(default_factory=dict)  # column -> [mean, std] after signed log

    def __post_init__(self) -> None:
        self._item_index = {v: i + 1 for i, v in enumerate(self.item_ids)}
        self._user_index = {v: i + 1 for i, v in enumerate(self.user_ids)}
        self._cat_index = {v: i + 1 for i, v in enumerate(self.categories)}
        self._genre_index = {v: i + 1 for i, v in enumerate(self.genres)}
        self._gender_index = {v: i + 1 for i, v in enumerate(self.genders)}
        self._occ_index = {v: i + 1 for i, v in enumerate(self.occupations)}

    # -- construction / persistence -------------------------------------------------------------
    @classmethod
    def fit(cls, items: pd.DataFrame, train: pd.DataFrame, users: pd.DataFrame | None, content_method: str,
            content_dim: int, features: pd.DataFrame | None = None) -> Encoder:
        """Vocabularies from the catalog and the training window; statistics from the training features."""
        cats = sorted({c for c in items.get("category", pd.Series(dtype=str)).map(_text) if c})
        genres = sorted({g for v in items.get("genres", pd.Series(dtype=str)) for g in _split_genres(v)})
        users = users if users is not None else pd.DataFrame({USER_ID: []})
        genders = sorted({g for g in users.get("gender", pd.Series(dtype=str)).map(_text) if g})
        occs = sorted({g for g in users.get("occupation", pd.Series(dtype=str)).map(_text) if g})
        user_numeric = [c for c in USER_NUMERIC if features is not None and c in features]
        item_numeric = [c for c in ITEM_NUMERIC if features is not None and c in features]
        user_categories = [c for c in USER_CATEGORIES if features is not None and c in features]
        stats: dict[str, list[float]] = {}
        for col in user_numeric + item_numeric:
            stats[col] = _mean_std(features[col])
        if "age" in users:
            stats["age"] = _mean_std(users["age"], log=False)
        return cls(item_ids=[str(i) for i in items[ITEM_ID]], user_ids=sorted(train[USER_ID].astype(str).unique()),
                   categories=cats, genres=genres, genders=genders, occupations=occs,
                   content_method=content_method, content_dim=content_dim, user_numeric=user_numeric,
                   item_numeric=item_numeric, user_categories=user_categories, stats=stats)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Encoder:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    # -- lookups ------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self, ids: Sequence[Any]) -> np.ndarray:
        return np.fromiter((self._item_index.get(str(i), 0) for i in ids), dtype=np.int64, count=len(ids))

    def user_index(self, ids: Sequence[Any]) -> np.ndarray:
        return np.fromiter((self._user_index.get(str(i), 0) for i in ids), dtype=np.int64, count=len(ids))

    def category_index(self, values: Sequence[Any]) -> np.ndarray:
        return np.fromiter((self._cat_index.get(_text(v) or UNKNOWN_CATEGORY, 0) for v in values), dtype=np.int64,
                           count=len(values))

    def numeric(self, frame: pd.DataFrame | None, columns: Sequence[str], n: int) -> np.ndarray:
        """Signed-log, standardised columns plus one missing flag per column (missing -> 0 and flag 1)."""
        out = np.zeros((n, 2 * len(columns)), dtype=np.float32)
        for j, col in enumerate(columns):
            values = (pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
                      if frame is not None and col in frame else np.full(n, np.nan))
            mean, std = self.stats[col]
            z = (_signed_log(values) - mean) / std
            missing = np.isnan(z)
            out[:, j] = np.where(missing, 0.0, z)
            out[:, len(columns) + j] = missing
        return out

    def catalog_inputs(self, items: pd.DataFrame, content: np.ndarray) -> dict[str, np.ndarray]:
        """Static item inputs (category, genres, content) for the rows of ``items``."""
        genres = np.zeros((len(items), self.max_genres), dtype=np.int64)
        for r, value in enumerate(items.get("genres", pd.Series([None] * len(items))).tolist()):
            idx = [self._genre_index[g] for g in _split_genres(value) if g in self._genre_index][: self.max_genres]
            genres[r, : len(idx)] = idx
        return {"category": self.category_index(items.get("category", pd.Series([None] * len(items))).tolist()),
                "genres": genres, "content": np.asarray(content, dtype=np.float32)}

    def demographics(self, users: pd.DataFrame | None, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Gender, occupation (indices) and standardised age (+ missing flag) for each user id."""
        n = len(user_ids)
        gender = np.zeros(n, dtype=np.int64)
        occ = np.zeros(n, dtype=np.int64)
        age = np.zeros((n, 2), dtype=np.float32)
        age[:, 1] = 1.0
        if users is not None and len(users):
            u = users.drop_duplicates(USER_ID).set_index(USER_ID)
            u.index = u.index.astype(str)
            rows = u.reindex([str(x) for x in user_ids])
            if "gender" in rows:
                gender = np.array([self._gender_index.get(_text(v) or "", 0) for v in rows["gender"]], dtype=np.int64)
            if "occupation" in rows:
                occ = np.array([self._occ_index.get(_text(v) or "", 0) for v in rows["occupation"]], dtype=np.int64)
            if "age" in rows and "age" in self.stats:
                a = pd.to_numeric(rows["age"], errors="coerce").to_numpy(dtype=np.float64)
                mean, std = self.stats["age"]
                z = (a - mean) / std
                age[:, 0] = np.where(np.isnan(z), 0.0, z)
                age[:, 1] = np.isnan(z)
        return {"gender": gender, "occupation": occ, "age": age}


def _mean_std(values: pd.Series, log: bool = True) -> list[float]:
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    x = _signed_log(x) if log else x
    x = x[~np.isnan(x)]
    if not len(x):
        return [0.0, 1.0]
    std = float(x.std())
    return [float(x.mean()), std if std > 1e-9 else 1.0]


class _MLP(nn.Sequential):
    def __init__(self, d_in: int, hidden: Sequence[int], d_out: int, dropout: float) -> None:
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(d_in, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
            d_in = h
        layers.append(nn.Linear(d_in, d_out))
        super().__init__(*layers)


class TwoTowerNet(nn.Module):
    """The towers. ``model='mf'`` keeps only the id embeddings (matrix factorisation)."""

    def __init__(self, spec: Mapping[str, int], config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.mf = config.model == "mf"
        c = config
        # Sparse gradients: an optimizer step touches the batch's rows, not a million-item table.
        self.item_id = nn.Embedding(spec["n_items"] + 1, c.id_dim if not self.mf else c.dim, padding_idx=0,
                                    sparse=True)
        self.user_id = nn.Embedding(spec["n_users"] + 1, c.id_dim if not self.mf else c.dim, padding_idx=0,
                                    sparse=True)
        nn.init.normal_(self.item_id.weight, std=0.05)
        nn.init.normal_(self.user_id.weight, std=0.05)
        self.log_inv_temp = nn.Parameter(torch.tensor(math.log(1.0 / c.init_temperature)))
        if self.mf:
            return
        self.category = nn.Embedding(spec["n_categories"] + 1, c.cat_dim, padding_idx=0)
        self.genre = nn.EmbeddingBag(spec["n_genres"] + 1, c.cat_dim, mode="sum", padding_idx=0)
        self.gender = nn.Embedding(spec["n_genders"] + 1, 4, padding_idx=0)
        self.occupation = nn.Embedding(spec["n_occupations"] + 1, 8, padding_idx=0)
        self.content = nn.Linear(spec["content_dim"], c.content_proj_dim)
        # Static catalog inputs, indexed by item index (row 0 = padding / unknown).
        self.register_buffer("item_category", torch.zeros(spec["n_items"] + 1, dtype=torch.long))
        self.register_buffer("item_content", torch.zeros(spec["n_items"] + 1, spec["content_dim"]))
        d_user = c.id_dim + c.id_dim + c.content_proj_dim + 2 * c.cat_dim + 4 + 8 + 2 + spec["user_numeric"]
        d_item = c.id_dim + c.cat_dim + c.cat_dim + c.content_proj_dim + spec["item_numeric"]
        self.user_mlp = _MLP(d_user, c.hidden, c.dim, c.dropout)
        self.item_mlp = _MLP(d_item, c.hidden, c.dim, c.dropout)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_inv_temp.clamp(max=math.log(100.0)).exp()

    def _drop_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training and self.config.id_dropout > 0:
            keep = torch.rand(ids.shape, device=ids.device) >= self.config.id_dropout
            return ids * keep
        return ids

    def user_vectors(self, b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised user embeddings for a batch of user inputs."""
        uid = self.user_id(self._drop_ids(b["user"]) if not self.mf else b["user"])
        if self.mf:
            return F.normalize(uid, dim=-1)
        hist = b["history"]
        mask = (hist > 0).float().unsqueeze(-1)
        denom = mask.sum(1).clamp(min=1.0)
        hist_id = (self.item_id(hist) * mask).sum(1) / denom
        # Mean of the raw content vectors, then one projection (a linear map commutes with the mean).
        has_history = (mask.sum(1) > 0).float()
        hist_content = self.content((self.item_content[hist] * mask).sum(1) / denom) * has_history
        # The categories of the history, in the item tower's category space: taste aligned with items.
        hist_category = (self.category(self.item_category[hist]) * mask).sum(1) / denom
        taste = self.category(b["user_categories"]).sum(1)
        x = torch.cat([uid, hist_id, hist_content, hist_category, taste, self.gender(b["gender"]),
                       self.occupation(b["occupation"]), b["age"], b["user_numeric"]], dim=-1)
        return F.normalize(self.user_mlp(x), dim=-1)

    def item_vectors(self, b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised item embeddings for a batch of item inputs."""
        if self.mf:
            return F.normalize(self.item_id(b["item"]), dim=-1)
        x = torch.cat([self.item_id(self._drop_ids(b["item"])), self.category(b["category"]),
                       self.genre(b["genres"]), self.content(b["content"]), b["item_numeric"]], dim=-1)
        return F.normalize(self.item_mlp(x), dim=-1)


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


# -- data preparation -------------------------------------------------------------------------------


def first_interactions(interactions: pd.DataFrame) -> pd.DataFrame:
    """Each (user, item) pair once, at its first event, in time order (the retrieval task: find new items)."""
    df = interactions.sort_values(TIMESTAMP, kind="stable")
    return df.drop_duplicates([USER_ID, ITEM_ID], keep="first").reset_index(drop=True)


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


def user_histories(history: pd.DataFrame, user_ids: Sequence[str], encoder: Encoder, history_len: int) -> np.ndarray:
    """Each user's last ``history_len`` distinct items in ``history`` (events up to the query), newest first."""
    first = first_interactions(history)
    first = first.assign(_idx=encoder.item_index(first[ITEM_ID].tolist()))
    tails = first.groupby(first[USER_ID].astype(str))["_idx"].apply(lambda s: s.to_numpy()[::-1][:history_len])
    out = np.zeros((len(user_ids), history_len), dtype=np.int64)
    for r, u in enumerate(user_ids):
        h = tails.get(str(u))
        if h is not None:
            out[r, : len(h)] = h
    return out


@dataclass
class Catalog:
    """The catalog's static item inputs, aligned to the encoder's item index (row 0 = unknown)."""

    category: np.ndarray
    genres: np.ndarray
    content: np.ndarray

    @classmethod
    def build(cls, encoder: Encoder, items: pd.DataFrame, content: np.ndarray) -> Catalog:
        rows = encoder.catalog_inputs(items, content)
        order = encoder.item_index(items[ITEM_ID].tolist())
        if (order == 0).any():
            raise ValueError("catalog items missing from the encoder's vocabulary")
        n = encoder.n_items + 1
        cat = np.zeros(n, dtype=np.int64)
        gen = np.zeros((n, encoder.max_genres), dtype=np.int64)
        con = np.zeros((n, encoder.content_dim), dtype=np.float32)
        cat[order], gen[order], con[order] = rows["category"], rows["genres"], rows["content"]
        return cls(cat, gen, con)

    def save(self, path: Path) -> None:
        np.savez(path, category=self.category, genres=self.genres, content=self.content)

    @classmethod
    def load(cls, path: Path) -> Catalog:
        z = np.load(path)
        return cls(z["category"], z["genres"], z["content"])


def _spec(encoder: Encoder) -> dict[str, int]:
    return {"n_items": encoder.n_items, "n_users": len(encoder.user_ids), "n_categories": len(encoder.categories),
            "n_genres": len(encoder.genres), "n_genders": len(encoder.genders),
            "n_occupations": len(encoder.occupations), "content_dim": encoder.content_dim,
            "user_numeric": 2 * len(encoder.user_numeric), "item_numeric": 2 * len(encoder.item_numeric)}


def _frame_by(rows: pd.DataFrame | None, key: str, ids: Sequence[str]) -> pd.DataFrame | None:
    if rows is None or not len(rows):
        return None
    r = rows.drop_duplicates(key, keep="last")
    r = r.set_index(r[key].astype(str))
    return r.reindex([str(i) for i in ids]).reset_index(drop=True)


def user_inputs(encoder: Encoder, user_ids: Sequence[str], histories: np.ndarray, user_rows: pd.DataFrame | None,
                users: pd.DataFrame | None) -> dict[str, torch.Tensor]:
    """User-tower inputs: ids, histories (item indices), taste categories, demographics, features.

    ``user_rows`` holds one feature row per user (by position when it has no ``user_id`` column)."""
    n = len(user_ids)
    feats = user_rows if user_rows is None or USER_ID not in user_rows else _frame_by(user_rows, USER_ID, user_ids)
    cats = np.zeros((n, max(1, len(encoder.user_categories))), dtype=np.int64)
    for j, col in enumerate(encoder.user_categories):
        if feats is not None and col in feats:
            vals = feats[col].tolist()
            cats[:, j] = [encoder._cat_index.get(_text(v) or "", 0) for v in vals]
    demo = encoder.demographics(users, list(user_ids))
    return {"user": torch.from_numpy(encoder.user_index(list(user_ids))), "history": torch.from_numpy(histories),
            "user_categories": torch.from_numpy(cats), "gender": torch.from_numpy(demo["gender"]),
            "occupation": torch.from_numpy(demo["occupation"]), "age": torch.from_numpy(demo["age"]),
            "user_numeric": torch.from_numpy(encoder.numeric(feats, encoder.user_numeric, n))}


def item_inputs(encoder: Encoder, catalog: Catalog, item_idx: np.ndarray, item_rows: pd.DataFrame | None,
                static: Mapping[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Item-tower inputs. ``static`` overrides the catalog's category/genres/content (new items)."""
    n = len(item_idx)
    st = static or {"category": catalog.category[item_idx], "genres": catalog.genres[item_idx],
                    "content": catalog.content[item_idx]}
    return {"item": torch.from_numpy(item_idx), "category": torch.from_numpy(st["category"]),
            "genres": torch.from_numpy(st["genres"]),
            "content": torch.from_numpy(np.asarray(st["content"], np.float32)),
            "item_numeric": torch.from_numpy(encoder.numeric(item_rows, encoder.item_numeric, n))}


def _batched(fn: Any, inputs: Mapping[str, torch.Tensor], batch: int = 8192) -> np.ndarray:
    n = len(next(iter(inputs.values())))
    out = []
    with torch.no_grad():
        for s in range(0, n, batch):
            out.append(fn({k: v[s: s + batch] for k, v in inputs.items()}).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class TwoTowerModel:
    """A trained model with everything needed to embed users and items."""

    net: TwoTowerNet
    encoder: Encoder
    catalog: Catalog
    config: TwoTowerConfig
    info: dict[str, Any] = field(default_factory=dict)

    def item_embeddings(self, item_rows: pd.DataFrame | None = None) -> np.ndarray:
        """Embeddings of every catalog item (row i = encoder.item_ids[i]) with their features at a moment."""
        ids = self.encoder.item_ids
        idx = np.arange(1, len(ids) + 1, dtype=np.int64)
        self.net.eval()
        return _batched(self.net.item_vectors, item_inputs(self.encoder, self.catalog, idx,
                                                           _frame_by(item_rows, ITEM_ID, ids)))

    def new_item_embeddings(self, items: pd.DataFrame, content: np.ndarray,
                            item_rows: pd.DataFrame | None = None) -> np.ndarray:
        """Embeddings of items given as catalog rows (e.g. items added after training: content, category, genres)."""
        static = self.encoder.catalog_inputs(items, content)
        idx = self.encoder.item_index(items[ITEM_ID].tolist())
        self.net.eval()
        return _batched(self.net.item_vectors, item_inputs(self.encoder, self.catalog, idx,
                                                           _frame_by(item_rows, ITEM_ID, items[ITEM_ID].tolist()),
                                                           static))

    def user_embeddings(self, user_ids: Sequence[str], history: pd.DataFrame, user_rows: pd.DataFrame | None = None,
                        users: pd.DataFrame | None = None) -> np.ndarray:
        """Embeddings of users from their events in ``history`` (all events up to the query moment)."""
        hist = user_histories(history, user_ids, self.encoder, self.config.history_len)
        self.net.eval()
        return _batched(self.net.user_vectors, user_inputs(self.encoder, user_ids, hist, user_rows, users))

    def save(self, out_dir: str | Path) -> dict[str, str]:
        """Write the model (weights, config, vocabularies, catalog inputs) to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), out / MODEL_FILE)
        (out / SPEC_FILE).write_text(json.dumps({"config": self.config.to_dict(), "spec": _spec(self.encoder),
                                                 "info": self.info}, indent=2, default=str))
        (out / ENCODER_FILE).write_text(json.dumps(self.encoder.to_dict()))
        self.catalog.save(out / ITEM_INPUTS_FILE)
        return {"model_dir": str(out)}


def load_model(model_dir: str | Path) -> TwoTowerModel:
    """Load a model written by :meth:`TwoTowerModel.save` (CPU; moved to nothing else)."""
    d = Path(model_dir)
    meta = json.loads((d / SPEC_FILE).read_text())
    config = TwoTowerConfig.from_dict(meta["config"])
    encoder = Encoder.from_dict(json.loads((d / ENCODER_FILE).read_text()))
    net = TwoTowerNet(meta["spec"], config)
    net.load_state_dict(torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True))
    net.eval()
    return TwoTowerModel(net, encoder, Catalog.load(d / ITEM_INPUTS_FILE), config, meta.get("info", {}))


# -- training -----------------------------------------------------------------------------------------

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
    from pipeline_tasks.metrics import top_k_unseen

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
    from pipeline_tasks.metrics import per_user_metrics

    recs = recommend(model, window, users, k)
    return float(per_user_metrics(recs, window.truth, ks=(k,))[f"recall@{k}"].mean()) if window.truth else 0.0


def fit(examples: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame | None, content: np.ndarray,
        content_method: str, config: TwoTowerConfig, validation: Window | None = None,
        epochs: int | None = None, on_epoch: Any = None) -> TwoTowerModel:
    """Train on ``examples`` (interactions, optionally with point-in-time feature columns).

    With ``validation``: early stopping on recall@``eval_k`` (patience ``patience``), keeping the best
    epoch's weights. Without: exactly ``epochs`` epochs (the refit of the protocol).
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
        if validation is None:
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
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    model.info = {"history": history, "epochs": len(history), "best_epoch": best_epoch or len(history),
                  "best_val_recall": best if validation is not None else None, "examples": n,
                  "seconds_per_epoch": float(np.median([h["seconds"] for h in history])) if history else None}
    return model


def grid_configs(base: TwoTowerConfig, grid: Sequence[Mapping[str, Any]]) -> list[TwoTowerConfig]:
    """The configs to try: ``base`` with each grid entry's overrides (unknown keys are an error)."""
    out = []
    for g in grid or [{}]:
        unknown = set(g) - set(base.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown two-tower hyper-parameters {sorted(unknown)}; "
                             f"known: {sorted(base.__dataclass_fields__)}")
        out.append(replace(base, **{k: (tuple(v) if k == "hidden" else v) for k, v in g.items()}))
    return out
