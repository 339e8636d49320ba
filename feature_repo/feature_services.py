"""Feature services: the versioned feature sets models are trained and served with.

A model bundle records its service name; changing a service's features means a new version
(``ranker_v2``), never an edit of ``ranker_v1``, so a deployed model keeps getting what it was
trained on.
"""

from feast import FeatureService
from feature_views import item_stats_fv, user_stats_fv

# Everything the LightGBM ranker scores a (user, item) pair with: all user and item stats.
ranker_v1 = FeatureService(
    name="ranker_v1",
    features=[user_stats_fv, item_stats_fv],
    description="Ranker (LightGBM lambdarank): all user and item stats.",
    tags={"model": "ranker", "version": "1"},
)

# What the two-tower retrieval model embeds: recent items, taste, activity; item category/popularity/age.
two_tower_v1 = FeatureService(
    name="two_tower_v1",
    features=[
        user_stats_fv[
            [
                "user_last_items",
                "user_top1_category",
                "user_top2_category",
                "user_top3_category",
                "user_top1_share",
                "user_top2_share",
                "user_top3_share",
                "user_total_interactions",
                "user_days_since_last_event",
            ]
        ],
        item_stats_fv[["item_category", "item_popularity", "item_age_days", "item_trending_score"]],
    ],
    description="Two-tower retrieval: user history and taste, item category, popularity and age.",
    tags={"model": "two_tower", "version": "1"},
)
