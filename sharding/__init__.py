"""Sharding: route piece keys over several stores (rendezvous hashing) and record the layout."""

from __future__ import annotations

from piecestore.sharding.layout import (
    LAYOUT_FORMAT,
    LayoutDiff,
    ShardLayout,
    check_matches,
    diff_targets,
)
from piecestore.sharding.router import (
    ROUTING_SCHEME,
    Router,
    ShardTarget,
    coerce_targets,
    from_template,
    hash_keys,
    owners_changed,
    strip_url_secrets,
    targets_fingerprint,
    targets_from_config,
)

__all__ = [
    "LAYOUT_FORMAT",
    "ROUTING_SCHEME",
    "LayoutDiff",
    "Router",
    "ShardLayout",
    "ShardTarget",
    "check_matches",
    "coerce_targets",
    "diff_targets",
    "from_template",
    "hash_keys",
    "owners_changed",
    "strip_url_secrets",
    "targets_fingerprint",
    "targets_from_config",
]
