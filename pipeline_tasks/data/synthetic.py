"""Seeded synthetic event data in the canonical contract, with optional injected faults.

The generator models a small e-commerce site: long-tail (Zipf-like) item popularity, per-user
category taste, a view -> click -> add_to_cart -> purchase funnel (plus favorites), a daily and a
weekly rhythm, and items that arrive over time. Faults (nulls, duplicates, future / too-old
timestamps, unknown event types, bad ids, a bot, a volume spike) can be switched on; the row
positions of every injected fault are returned so that validation can be tested exactly.

Everything is vectorised: no Python loop runs per event. Separate random streams are used for
the clean events, the spike, the bot and the faults, so switching faults on never changes the
clean rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from pipeline_tasks.core import constants
from pipeline_tasks.data.contract import ContractTables, normalise_interactions, normalise_items, normalise_users

log = logging.getLogger(__name__)

DAY_SECONDS = 86_400
HOUR_SECONDS = 3_600

FAULT_CLASSES = ("null", "duplicate", "future", "too_old", "unknown_event", "bad_id", "bot")
UNKNOWN_EVENT_TYPES = ("hover", "share")
# Ids breaking the id rule: empty, blank, too long, control character.
BAD_IDS = ("", "   ", "u" + "9" * 199, "u\x07x")

# Funnel conversion rates (per parent event) and mean delays in seconds after the parent.
CLICK_RATE = 0.30
CART_RATE = 0.30
PURCHASE_RATE = 0.50
FAVORITE_RATE = 0.03
MEAN_DELAY_S = {"click": 20.0, "add_to_cart": 90.0, "purchase": 300.0, "favorite": 15.0}
# Expected events per view; used to hit ``n_events``.
EVENTS_PER_VIEW = 1 + CLICK_RATE * (1 + CART_RATE * (1 + PURCHASE_RATE)) + FAVORITE_RATE

TASTE_CONCENTRATION = 0.3  # Dirichlet concentration: < 1 gives users a few favourite categories
EXPLORE_SHARE = 0.1  # share of a user's views drawn from global popularity instead of taste
DAILY_NOISE_SIGMA = 0.03  # log-normal day-to-day volume noise
BOT_NORMAL_EVENTS = 5  # the bot user's ordinary events on other days

DEVICES = ("mobile", "desktop", "tablet")
DEVICE_P = (0.55, 0.35, 0.10)
COUNTRIES = ("US", "GB", "DE", "FR", "ES", "PL", "IN", "BR", "JP", "CA")
COUNTRY_P = (0.30, 0.12, 0.12, 0.09, 0.07, 0.05, 0.10, 0.07, 0.04, 0.04)
GENDERS = ("F", "M", "X")
GENDER_P = (0.49, 0.48, 0.03)
OCCUPATIONS = ("student", "engineer", "teacher", "artist", "healthcare", "sales", "retired", "other")
REGIONS = ("US|CA", "GB", "DE|FR|ES|PL", "IN", "BR")
ADJECTIVES = ("compact", "classic", "bright", "durable", "light", "premium", "handy", "soft")
NOUNS = ("set", "kit", "pack", "edition", "model", "bundle", "piece", "collection")

_CODE = {name: i for i, name in enumerate((*constants.EVENT_TYPES, *UNKNOWN_EVENT_TYPES))}
_VIEW, _CLICK, _CART, _PURCHASE, _FAVORITE = (_CODE[e] for e in constants.EVENT_TYPES)
_NULL_CODE = -1  # id code of a null id; bad ids are -2, -3, ...
_NAT = np.iinfo(np.int64).min  # seconds value of a null timestamp


@dataclass(frozen=True)
class FaultConfig:
    """Which faults to inject; each ``*_rate`` is a share of the clean event count.

    Every fault row is an extra row (a corrupted copy of a clean row) that breaks exactly one
    contract rule, so ``input rows = clean rows + fault rows``.
    """

    null_rate: float = 0.0
    duplicate_rate: float = 0.0
    future_rate: float = 0.0
    too_old_rate: float = 0.0
    unknown_event_rate: float = 0.0
    bad_id_rate: float = 0.0
    bot: bool = False
    bot_events: int = 1500
    spike: bool = False
    spike_factor: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.endswith("_rate") and not 0.0 <= getattr(self, f.name) < 1.0:
                raise ValueError(f"FaultConfig.{f.name}={getattr(self, f.name)}: must be in [0, 1)")
        if self.bot and not 1 <= self.bot_events <= DAY_SECONDS:
            raise ValueError(f"FaultConfig.bot_events={self.bot_events}: must be in [1, {DAY_SECONDS}]")
        if self.spike and self.spike_factor <= 1.0:
            raise ValueError(f"FaultConfig.spike_factor={self.spike_factor}: must be > 1")

    @classmethod
    def all(cls, rate: float = 0.004) -> FaultConfig:
        """Every fault class on, each ``*_rate`` equal to ``rate``, bot and spike on."""
        rates = {f.name: rate for f in fields(cls) if f.name.endswith("_rate")}
        return cls(**rates, bot=True, spike=True)


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of the synthetic data; ``n_events`` counts clean events only."""

    n_users: int = 1000
    n_items: int = 2000
    n_days: int = 60
    n_events: int = 100_000
    n_categories: int = 12
    zipf_alpha: float = 1.0
    weekend_boost: float = 1.3
    new_item_share: float = 0.2
    start: str = "2025-01-06"
    seed: int = constants.SEED
    faults: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_days", "n_categories"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig.{name}={getattr(self, name)}: must be >= 1")
        if self.n_events < 0:
            raise ValueError(f"SyntheticConfig.n_events={self.n_events}: must be >= 0")
        if not 0.0 <= self.new_item_share < 1.0:
            raise ValueError(f"SyntheticConfig.new_item_share={self.new_item_share}: must be in [0, 1)")
        if self.zipf_alpha < 0 or self.weekend_boost <= 0:
            raise ValueError("SyntheticConfig: zipf_alpha must be >= 0 and weekend_boost > 0")
        if self.faults.spike and self.n_days <= constants.DEFAULT_SPIKE_WINDOW_DAYS:
            raise ValueError(
                f"SyntheticConfig.n_days={self.n_days}: a spike needs more than "
                f"{constants.DEFAULT_SPIKE_WINDOW_DAYS} days (the trailing window it is measured against)"
            )
        if self.faults.bot and self.n_days < 2:
            raise ValueError("SyntheticConfig.n_days: the bot needs at least 2 days (bot day + normal days)")


@dataclass
class SyntheticData:
    """Generated contract tables and the row positions of every injected fault.

    ``injected`` maps each name in :data:`FAULT_CLASSES` to the sorted positions in
    ``tables.interactions`` carrying that fault, and ``"spike_day"`` to the spike's day index
    (days since ``start``; empty when the spike is off).
    """

    tables: ContractTables
    injected: dict[str, np.ndarray]


@dataclass
class _Events:
    """Interactions in code space: ids as ints, timestamps as seconds since ``start``."""

    user: np.ndarray
    item: np.ndarray
    sec: np.ndarray
    etype: np.ndarray
    fault: np.ndarray  # -1 = clean, else index into FAULT_CLASSES

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx: np.ndarray) -> _Events:
        return _Events(self.user[idx], self.item[idx], self.sec[idx], self.etype[idx], self.fault[idx])

    @staticmethod
    def concat(parts: list[_Events]) -> _Events:
        return _Events(*(np.concatenate([getattr(p, a) for p in parts]) for a in _Events.__annotations__))


def _ids(prefix: str, n: int) -> np.ndarray:
    """``prefix`` + zero-padded number, e.g. ``u000123``, as an object array."""
    return np.char.add(prefix, np.char.zfill(np.arange(n).astype(str), 6)).astype(object)


def _hour_profile() -> np.ndarray:
    """Share of a day's events per UTC hour: low at night, a lunch bump, an evening peak."""
    h = np.arange(24) + 0.5

    def bump(centre: float, width: float) -> np.ndarray:
        d = np.abs(h - centre)
        d = np.minimum(d, 24 - d)  # circular: 23:00 is close to 01:00
        return np.exp(-0.5 * (d / width) ** 2)

    p = 0.12 + bump(20.5, 2.5) + 0.45 * bump(12.5, 2.0)
    return p / p.sum()


def _day_weights(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Relative volume of each day: weekend boost and a little log-normal noise."""
    dates = pd.date_range(cfg.start, periods=cfg.n_days, freq="D")
    weekend = dates.dayofweek.to_numpy() >= 5
    return np.where(weekend, cfg.weekend_boost, 1.0) * rng.lognormal(0.0, DAILY_NOISE_SIGMA, cfg.n_days)


def _cdf(bin_weights: np.ndarray) -> np.ndarray:
    cum = np.concatenate([[0.0], np.cumsum(bin_weights)])
    return cum / cum[-1]


def _cdf_at(cum: np.ndarray, sec: np.ndarray, offset_hours: int) -> np.ndarray:
    """Continuous CDF (uniform within an hour bin) evaluated at ``sec`` seconds since start."""
    x = np.clip(sec / HOUR_SECONDS - offset_hours, 0, len(cum) - 1)
    return np.interp(x, np.arange(len(cum)), cum)


def _sample_times(
    rng: np.random.Generator, lower: np.ndarray, bin_weights: np.ndarray, offset_hours: int
) -> np.ndarray:
    """Seconds since start drawn from hourly bins, each conditional on ``>= lower`` (inverse CDF).

    Conditioning by inverse CDF keeps the daily and weekly rhythm for items created mid-period.
    """
    cum = _cdf(bin_weights)
    low = _cdf_at(cum, lower, offset_hours)
    u = low + rng.random(len(lower)) * (1.0 - low)
    pos = np.interp(u, cum, np.arange(len(cum)))
    sec = np.floor((pos + offset_hours) * HOUR_SECONDS).astype(np.int64)
    return np.clip(np.maximum(sec, lower), None, (offset_hours + len(bin_weights)) * HOUR_SECONDS - 1)


def _segment_sampler(
    rng: np.random.Generator, group: np.ndarray, cum_by_group: np.ndarray, order: np.ndarray | None = None
) -> np.ndarray:
    """Draw one index per element of ``group`` from per-group CDFs stored back to back.

    ``cum_by_group`` holds, for group g, values in (g, g + 1] (CDF + g), non-decreasing overall.
    """
    idx = np.searchsorted(cum_by_group, group + rng.random(len(group)), side="right")
    idx = np.minimum(idx, len(cum_by_group) - 1)
    return idx if order is None else order[idx]


def _sample_views(
    rng: np.random.Generator,
    n: int,
    user_p: np.ndarray,
    taste: np.ndarray,
    item_cat: np.ndarray,
    item_w: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw (user, item) pairs: user by activity, category by taste x supply, item by popularity."""
    n_users, n_cat = taste.shape
    user = np.minimum(np.searchsorted(np.cumsum(user_p), rng.random(n) * user_p.sum(), side="right"),
                      n_users - 1)
    # Category mass on offer; weighting taste by it keeps the item marginals close to Zipf.
    supply = np.bincount(item_cat, weights=item_w, minlength=n_cat)
    tilted = taste * supply
    q = (1 - EXPLORE_SHARE) * tilted / tilted.sum(1, keepdims=True) + EXPLORE_SHARE * supply / supply.sum()
    cum = np.cumsum(q, axis=1)
    cum /= cum[:, -1:]
    cat = _segment_sampler(rng, user, (cum + np.arange(n_users)[:, None]).ravel()) - user * n_cat
    cat = np.clip(cat, 0, n_cat - 1)
    # Items within a category by popularity: per-category CDFs back to back.
    order = np.argsort(item_cat, kind="stable")
    w = item_w[order]
    cats = item_cat[order]
    seg_start = np.searchsorted(cats, np.arange(n_cat))
    cw = np.cumsum(w)
    base = np.concatenate([[0.0], cw])[seg_start][cats]
    tot = np.where(supply > 0, supply, 1.0)[cats]
    within = np.clip((cw - base) / tot, 0.0, 1.0)
    last = np.r_[cats[1:] != cats[:-1], True]
    within[last & (supply[cats] > 0)] = 1.0
    item = _segment_sampler(rng, cat, within + cats, order)
    return user, item


def _funnel(rng: np.random.Generator, view: _Events, end_sec: int) -> _Events:
    """Clicks, carts, purchases and favorites following ``view`` (same user and item)."""

    def follow(parent: _Events, rate: float, code: int, name: str) -> _Events:
        keep = np.flatnonzero(rng.random(len(parent)) < rate)
        child = parent.take(keep)
        delay = np.floor(rng.exponential(MEAN_DELAY_S[name], len(keep))).astype(np.int64)
        child.sec = np.minimum(child.sec + delay, max(end_sec - 1, 0))
        child.sec = np.maximum(child.sec, parent.sec[keep])
        child.etype = np.full(len(keep), code, dtype=np.int8)
        return child

    click = follow(view, CLICK_RATE, _CLICK, "click")
    cart = follow(click, CART_RATE, _CART, "add_to_cart")
    purchase = follow(cart, PURCHASE_RATE, _PURCHASE, "purchase")
    favorite = follow(view, FAVORITE_RATE, _FAVORITE, "favorite")
    return _Events.concat([view, click, cart, purchase, favorite])


def _views(
    rng: np.random.Generator,
    n: int,
    user_p: np.ndarray,
    taste: np.ndarray,
    item_cat: np.ndarray,
    item_w: np.ndarray,
    created: np.ndarray,
    bin_weights: np.ndarray,
    offset_hours: int,
) -> _Events:
    user, item = _sample_views(rng, n, user_p, taste, item_cat, item_w)
    sec = _sample_times(rng, created[item], bin_weights, offset_hours)
    return _Events(user, item, sec, np.full(n, _VIEW, np.int8), np.full(n, -1, np.int8))


def _sort_unique(ev: _Events) -> _Events:
    """Time order (view before click at equal seconds); drop accidental key collisions."""
    ev = ev.take(np.lexsort((ev.etype, ev.sec)))
    key = pd.DataFrame({"u": ev.user, "i": ev.item, "s": ev.sec, "e": ev.etype})
    dup = key.duplicated().to_numpy()
    if dup.any():
        log.debug("dropped %d accidental duplicate events", int(dup.sum()))
    return ev.take(np.flatnonzero(~dup))


def _make_users(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Users table: demographics and a home country."""
    ages = np.clip(np.round(rng.normal(36, 12, n)), 16, 80).astype(int)
    return pd.DataFrame(
        {
            constants.USER_ID: _ids("u", n),
            "age": ages,
            "gender": rng.choice(GENDERS, n, p=GENDER_P).astype(object),
            "occupation": rng.choice(OCCUPATIONS, n).astype(object),
            "zip": np.char.zfill(rng.integers(0, 100_000, n).astype(str), 5).astype(object),
            constants.LOCATION: rng.choice(COUNTRIES, n, p=COUNTRY_P).astype(object),
        }
    )


def _make_items(
    cfg: SyntheticConfig, rng: np.random.Generator, start: pd.Timestamp
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Items table plus category codes, Zipf weights and created_at in seconds since start."""
    n, n_cat = cfg.n_items, cfg.n_categories
    cat_names = np.char.add("cat_", np.char.zfill(np.arange(n_cat).astype(str), 2)).astype(object)
    cat = rng.choice(n_cat, n, p=rng.dirichlet(np.full(n_cat, 5.0)))
    rank = rng.permutation(n) + 1
    weight = rank.astype(float) ** -cfg.zipf_alpha
    # Old items exist before the first day; new ones arrive spread over the period.
    n_new = min(int(round(cfg.new_item_share * n)), n - 1)
    is_new = np.zeros(n, bool)
    is_new[rng.choice(n, n_new, replace=False)] = True
    old_sec = -rng.integers(DAY_SECONDS, 365 * DAY_SECONDS, n)
    margin = min(DAY_SECONDS, cfg.n_days * DAY_SECONDS // 4)
    new_sec = rng.integers(margin, cfg.n_days * DAY_SECONDS - margin, n)
    created = np.where(is_new, new_sec, old_sec).astype(np.int64)
    # Genres: the category first, then up to two other categories.
    genres = cat_names[cat]
    if n_cat > 1:
        g2 = (cat + rng.integers(1, n_cat, n)) % n_cat
        g3 = (cat + rng.integers(1, n_cat, n)) % n_cat
        has2 = rng.random(n) < 0.6
        has3 = has2 & (rng.random(n) < 0.4) & (g3 != g2)
        genres = np.where(has2, genres + "|" + cat_names[g2], genres)
        genres = np.where(has3, genres + "|" + cat_names[g3], genres)
    cat_price = rng.lognormal(3.0, 0.7, n_cat)
    price = np.round(np.maximum(cat_price[cat] * rng.lognormal(0.0, 0.5, n), 0.99), 2)
    adjective = rng.choice(ADJECTIVES, n).astype(object)
    noun = rng.choice(NOUNS, n).astype(object)
    title = adjective + " " + noun + " " + np.arange(n).astype(str).astype(object)
    items = pd.DataFrame(
        {
            constants.ITEM_ID: _ids("i", n),
            "title": title,
            "category": cat_names[cat],
            "genres": genres,
            "created_at": start + pd.to_timedelta(created, unit="s"),
            "description": "A " + adjective + " " + noun + " from " + cat_names[cat] + ".",
            "price": price,
            "available": rng.random(n) >= 0.02,
            "regions": np.where(rng.random(n) < 0.1, rng.choice(REGIONS, n).astype(object), None),
        }
    )
    return items, cat, weight, created


def _bot_events(
    cfg: SyntheticConfig, rng: np.random.Generator, bot: int, created: np.ndarray, avoid_day: int
) -> tuple[_Events, _Events]:
    """The bot's burst on one day (a fault) and its few ordinary views on other days (clean)."""
    old_items = np.flatnonzero(created <= 0)
    bot_day = int(rng.choice(np.setdiff1d(np.arange(cfg.n_days), [avoid_day])))
    n = cfg.faults.bot_events
    sec = bot_day * DAY_SECONDS + np.sort(rng.choice(DAY_SECONDS, n, replace=False))
    burst = _Events(np.full(n, bot), rng.choice(old_items, n), sec.astype(np.int64),
                    np.full(n, _VIEW, np.int8), np.full(n, FAULT_CLASSES.index("bot"), np.int8))
    other_days = np.setdiff1d(np.arange(cfg.n_days), [bot_day])
    k = min(BOT_NORMAL_EVENTS, len(other_days))
    normal_sec = rng.choice(other_days, k, replace=False) * DAY_SECONDS + rng.integers(0, DAY_SECONDS, k)
    normal = _Events(np.full(k, bot), rng.choice(old_items, k), normal_sec.astype(np.int64),
                     np.full(k, _VIEW, np.int8), np.full(k, -1, np.int8))
    return burst, normal


def _fault_rows(
    cfg: SyntheticConfig, rng: np.random.Generator, clean: _Events, start_epoch: int
) -> tuple[_Events, np.ndarray, np.ndarray]:
    """Corrupted copies of clean rows, one fault each, and the clean rows to duplicate.

    Returns:
        The fault rows, the positions in ``clean`` of the rows to copy as exact duplicates, and
        for each fault row the clean position it is inserted before.
    """
    f = cfg.faults
    n_clean = len(clean)
    counts = {
        name: int(round(getattr(f, f"{name}_rate") * n_clean))
        for name in ("null", "duplicate", "future", "too_old", "unknown_event", "bad_id")
    }
    total = sum(counts.values())
    if total > n_clean:
        raise ValueError(f"fault rates ask for {total} fault rows but there are only {n_clean} clean rows")
    src = rng.permutation(n_clean)[:total]
    parts, cursor = {}, 0
    for name, k in counts.items():
        parts[name] = src[cursor:cursor + k]
        cursor += k

    rows = []
    # Null: cycle over user_id, item_id, timestamp.
    ev = clean.take(parts["null"])
    kind = np.arange(len(ev)) % 3
    ev.user = np.where(kind == 0, _NULL_CODE, ev.user)
    ev.item = np.where(kind == 1, _NULL_CODE, ev.item)
    ev.sec = np.where(kind == 2, _NAT, ev.sec)
    rows.append((ev, "null"))
    # Future: year 2100 or later, whatever the wall clock says.
    ev = clean.take(parts["future"])
    y2100 = int(pd.Timestamp("2100-01-01", tz="UTC").timestamp()) - start_epoch
    ev.sec = y2100 + rng.integers(0, 365 * DAY_SECONDS, len(ev))
    rows.append((ev, "future"))
    # Too old: more than horizon + 30 days before the first day.
    ev = clean.take(parts["too_old"])
    min_age = (constants.DEFAULT_HORIZON_DAYS + 31) * DAY_SECONDS
    ev.sec = -min_age - rng.integers(0, 365 * DAY_SECONDS, len(ev))
    rows.append((ev, "too_old"))
    # Unknown event type.
    ev = clean.take(parts["unknown_event"])
    ev.etype = rng.choice([_CODE[e] for e in UNKNOWN_EVENT_TYPES], len(ev)).astype(np.int8)
    rows.append((ev, "unknown_event"))
    # Bad id: cycle over the bad values, and over user_id / item_id.
    ev = clean.take(parts["bad_id"])
    i = np.arange(len(ev))
    bad_code = -2 - (i % len(BAD_IDS))
    on_user = (i // len(BAD_IDS)) % 2 == 0
    ev.user = np.where(on_user, bad_code, ev.user)
    ev.item = np.where(~on_user, bad_code, ev.item)
    rows.append((ev, "bad_id"))

    for ev, name in rows:
        ev.fault = np.full(len(ev), FAULT_CLASSES.index(name), np.int8)
    faults = _Events.concat([ev for ev, _ in rows])
    # A fault row must not collide with another row's key (it would then also be a duplicate).
    both = _Events.concat([clean, faults])
    key = pd.DataFrame({"u": both.user, "i": both.item, "s": both.sec, "e": both.etype})
    collide = key.duplicated().to_numpy()[n_clean:]
    if collide.any():
        log.debug("dropped %d fault rows whose key collided with another row", int(collide.sum()))
        faults = faults.take(np.flatnonzero(~collide))
    return faults, parts["duplicate"], rng.integers(0, n_clean + 1, len(faults))


def _assemble(clean: _Events, faults: _Events, fault_pos: np.ndarray, dup_src: np.ndarray) -> _Events:
    """Clean rows in time order; each duplicate right after its original; faults at random places."""
    dups = clean.take(dup_src)
    dups.fault = np.full(len(dups), FAULT_CLASSES.index("duplicate"), np.int8)
    key = np.concatenate([np.arange(len(clean)), dup_src + 0.5, fault_pos - 0.25])
    return _Events.concat([clean, dups, faults]).take(np.argsort(key, kind="stable"))


def _to_frame(
    ev: _Events, user_ids: np.ndarray, item_ids: np.ndarray, user_device: np.ndarray,
    user_country: np.ndarray, item_price: np.ndarray, start_epoch: int,
) -> pd.DataFrame:
    """Raw interactions frame, ready for :func:`contract.normalise_interactions`.

    String columns are categoricals and timestamps float epoch seconds (NaN = null): normalisation
    then works per distinct value instead of per row (about 4x faster at 1M rows) and returns
    exactly what object strings and datetimes would give.
    """

    def strings(code: np.ndarray, categories: np.ndarray) -> pd.Categorical:
        # Category codes: the id index for real ids, after them the bad ids; -1 = null.
        categories = np.concatenate([categories, np.array(BAD_IDS, dtype=object)])
        code = np.where(code <= -2, len(categories) - len(BAD_IDS) - code - 2, code)
        return pd.Categorical.from_codes(code, categories=pd.Index(categories, dtype=object))

    user_ok = ev.user >= 0
    uidx = np.maximum(ev.user, 0)
    priced = np.isin(ev.etype, [_CART, _PURCHASE]) & (ev.item >= 0)
    # Float seconds are exact here: every value is an integer well below 2**53.
    sec = np.where(ev.sec == _NAT, np.nan, (ev.sec + start_epoch).astype(float))
    event_names = np.array([*constants.EVENT_TYPES, *UNKNOWN_EVENT_TYPES], dtype=object)
    # Ids that are not real users have no device or location.
    device = pd.Categorical(user_device, categories=DEVICES).codes.astype(np.int64)
    country = pd.Categorical(user_country, categories=COUNTRIES).codes.astype(np.int64)
    return pd.DataFrame(
        {
            constants.USER_ID: strings(ev.user, user_ids),
            constants.ITEM_ID: strings(ev.item, item_ids),
            constants.TIMESTAMP: sec,
            constants.EVENT_TYPE: pd.Categorical.from_codes(ev.etype, categories=event_names),
            constants.VALUE: np.where(priced, item_price[np.maximum(ev.item, 0)], np.nan),
            constants.DEVICE: pd.Categorical.from_codes(np.where(user_ok, device[uidx], -1), DEVICES),
            constants.LOCATION: pd.Categorical.from_codes(np.where(user_ok, country[uidx], -1), COUNTRIES),
        }
    )


def generate(config: SyntheticConfig = SyntheticConfig()) -> SyntheticData:  # noqa: B008 (frozen)
    """Generate the three contract tables, with the faults ``config.faults`` asks for.

    Args:
        config: sizes, shape and faults.

    Returns:
        The normalised tables and the positions of every injected fault.

    Raises:
        ValueError: the fault rates ask for more fault rows than there are clean rows.
    """
    cfg = config
    f = cfg.faults
    if f.bot and f.bot_events <= constants.DEFAULT_BOT_EVENTS_PER_DAY:
        log.warning("bot_events=%d is not above the default bot threshold (%d events a day): the bot "
                    "rows will pass validation unless its threshold is lowered",
                    f.bot_events, constants.DEFAULT_BOT_EVENTS_PER_DAY)
    base_ss, spike_ss, bot_ss, fault_ss = np.random.SeedSequence(cfg.seed).spawn(4)
    rng = np.random.default_rng(base_ss)
    start = pd.Timestamp(cfg.start, tz="UTC").normalize()
    start_epoch = int(start.timestamp())
    end_sec = cfg.n_days * DAY_SECONDS

    n_users_total = cfg.n_users + int(f.bot)  # the bot is an extra, real-looking account
    users = _make_users(rng, n_users_total)
    taste = rng.dirichlet(np.full(cfg.n_categories, TASTE_CONCENTRATION), cfg.n_users)
    activity = rng.lognormal(0.0, 1.0, cfg.n_users)
    user_device = rng.choice(DEVICES, n_users_total, p=DEVICE_P).astype(object)
    user_country = users[constants.LOCATION].to_numpy()
    items, item_cat, pop, created = _make_items(cfg, rng, start)

    # Hourly bins over the period: day volume x hour-of-day profile. Divided by the popularity
    # mass already on offer, so that arriving items do not add a trend: the expected volume of
    # each hour is then exactly proportional to day weight x hour weight.
    bins = np.outer(_day_weights(cfg, rng), _hour_profile()).ravel()
    created_bin = np.clip(created // HOUR_SECONDS, 0, len(bins) - 1)
    bins = bins / np.cumsum(np.bincount(created_bin, weights=pop, minlength=len(bins)))
    # An item can only draw events after it exists: weight popularity by its remaining time mass.
    available = 1.0 - _cdf_at(_cdf(bins), created, 0)
    n_views = int(round(cfg.n_events / EVENTS_PER_VIEW))
    views = _views(rng, n_views, activity, taste, item_cat, pop * available, created, bins, 0)
    parts = [_funnel(rng, views, end_sec)]

    spike_day = np.array([], dtype=np.int64)
    if f.spike:
        srng = np.random.default_rng(spike_ss)
        day = int(srng.integers(constants.DEFAULT_SPIKE_WINDOW_DAYS, cfg.n_days))  # has a full window
        spike_day = np.array([day], dtype=np.int64)
        normal = int(np.count_nonzero(parts[0].sec // DAY_SECONDS == day))
        n_extra = int(round((f.spike_factor - 1.0) * normal / EVENTS_PER_VIEW))
        w = pop * (created <= day * DAY_SECONDS)
        extra = _views(srng, n_extra, activity, taste, item_cat, w, created, _hour_profile(), day * 24)
        parts.append(_funnel(srng, extra, end_sec))

    burst = None
    if f.bot:
        brng = np.random.default_rng(bot_ss)
        burst, bot_normal = _bot_events(cfg, brng, cfg.n_users, created, int(spike_day[0]) if f.spike else -1)
        parts.append(bot_normal)
    clean = _sort_unique(_Events.concat(parts))

    frng = np.random.default_rng(fault_ss)
    faults, dup_src, fault_pos = _fault_rows(cfg, frng, clean, start_epoch)
    if burst is not None:
        # The burst joins the time-ordered stream: its rows go where their timestamps belong.
        burst_pos = np.searchsorted(clean.sec, burst.sec, side="right")
        faults = _Events.concat([faults, burst])
        fault_pos = np.concatenate([fault_pos, burst_pos])
    ev = _assemble(clean, faults, fault_pos, np.sort(dup_src))

    frame = _to_frame(ev, users[constants.USER_ID].to_numpy(), items[constants.ITEM_ID].to_numpy(),
                      user_device, user_country, items["price"].to_numpy(), start_epoch)
    injected = {name: np.flatnonzero(ev.fault == k) for k, name in enumerate(FAULT_CLASSES)}
    injected["spike_day"] = spike_day
    tables = ContractTables(normalise_interactions(frame), normalise_items(items), normalise_users(users))
    log.info(
        "synthetic data: %d interactions (%d clean), %d items, %d users; injected %s",
        len(frame), len(clean), len(items), len(users),
        {k: len(v) if k != "spike_day" else v.tolist() for k, v in injected.items()},
    )
    return SyntheticData(tables=tables, injected=injected)
