"""The two-tower model's input encoding: id vocabularies, categories, numeric scaling, catalog and tower inputs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline_tasks.core.constants import ITEM_ID, TIMESTAMP, UNKNOWN_CATEGORY, USER_ID
from pipeline_tasks.online.arrays import count_after, first_of, utc_ns

# Feast service two_tower_v1's columns the towers read (user_last_items is replaced by the exact
# event history; item_category by the catalog's category, which a new item has before any snapshot).
USER_NUMERIC = ["user_total_interactions", "user_days_since_last_event", "user_top1_share", "user_top2_share",
                "user_top3_share"]


USER_CATEGORIES = ["user_top1_category", "user_top2_category", "user_top3_category"]


ITEM_NUMERIC = ["item_popularity", "item_age_days", "item_trending_score"]


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


def user_histories(history: pd.DataFrame, user_ids: Sequence[str], encoder: Encoder, history_len: int) -> np.ndarray:
    """Each user's last ``history_len`` distinct items in ``history`` (events up to the query), newest first.

    Items are ordered by their first interaction (as :func:`first_interactions`): a repeated event on an item
    does not move it."""
    out = np.zeros((len(user_ids), history_len), dtype=np.int64)
    if not len(history) or not len(user_ids):
        return out
    rows = pd.Index([str(u) for u in user_ids]).get_indexer(history[USER_ID].astype(str).to_numpy())
    mine = rows >= 0
    stamps = utc_ns(history[TIMESTAMP])[mine]
    rows = rows[mine]
    items = history[ITEM_ID].astype(str).to_numpy()[mine]
    order = np.argsort(stamps, kind="stable")
    rows, items = rows[order], items[order]
    item_codes, _ = pd.factorize(items)
    first = first_of(rows.astype(np.int64) * (int(item_codes.max(initial=0)) + 1) + item_codes)
    rows, items = rows[first], items[first]  # each (user, item) at its first event, in time order
    position = count_after(rows)  # newest first: how many of the user's distinct items came after this one
    keep = position < history_len
    out[rows[keep], position[keep]] = encoder.item_index(items[keep].tolist())
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


def first_interactions(interactions: pd.DataFrame) -> pd.DataFrame:
    """Each (user, item) pair once, at its first event, in time order (the retrieval task: find new items)."""
    df = interactions.sort_values(TIMESTAMP, kind="stable")
    return df.drop_duplicates([USER_ID, ITEM_ID], keep="first").reset_index(drop=True)
