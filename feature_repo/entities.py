"""Entities: the keys features are looked up by (DATA_CONTRACT.md ids are strings)."""

from feast import Entity, ValueType

# A person who interacts with items; the ranker and the user tower key on it.
user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A user of the catalog (contract column user_id).",
)

# A catalog item (movie, product, ...); candidates and the item tower key on it.
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalog item (contract column item_id).",
)
