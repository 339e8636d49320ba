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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (torch convention)

from pipeline_tasks.core.constants import ITEM_ID, SEED
from pipeline_tasks.online.encoder import Catalog, Encoder, _frame_by, item_inputs, user_histories, user_inputs

log = logging.getLogger(__name__)

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


# -- data preparation -------------------------------------------------------------------------------


def _spec(encoder: Encoder) -> dict[str, int]:
    return {"n_items": encoder.n_items, "n_users": len(encoder.user_ids), "n_categories": len(encoder.categories),
            "n_genres": len(encoder.genres), "n_genders": len(encoder.genders),
            "n_occupations": len(encoder.occupations), "content_dim": encoder.content_dim,
            "user_numeric": 2 * len(encoder.user_numeric), "item_numeric": 2 * len(encoder.item_numeric)}


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

