"""The shard layout recorded in the store itself, and the check against the configured one.

Why record it: routing is a pure function of the target set, so a process started with a
different target list (one shard more, a typo, a changed weight) would silently look for
pieces on the wrong shards. The engine stores this layout as an object and every process
compares its configuration with it first (``check_matches``), failing with a message that
says what differs and what to do. Pure data + JSON; no I/O here.

Recorded URLs are target identities (credentials stripped), so the object never holds secrets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from piecestore.errors import ConfigError, CorruptionError, LayoutMismatchError, UnsupportedError
from piecestore.sharding.router import (
    ROUTING_SCHEME,
    Router,
    ShardTarget,
    coerce_targets,
    targets_fingerprint,
)

__all__ = ["LAYOUT_FORMAT", "LayoutDiff", "ShardLayout", "check_matches", "diff_targets"]

#: Version of the JSON document's shape (not the layout's generation, which is ``version``).
LAYOUT_FORMAT = 1
LAYOUT_OBJECT = "shard-layout.json"  # the object every shard of a sharded store holds
_KIND = "piecestore.shard-layout"
_STATES = ("stable", "resharding")
_MAX_LISTED = 8


@dataclass(frozen=True)
class ShardLayout:
    """Targets in use, and during a reshard the ones being left (``previous``).

    ``version`` is the layout's generation: every change (begin or finish of a reshard)
    increments it, so the engine can swap layouts with compare-and-swap and tell which is newer.
    """

    version: int
    targets: tuple[ShardTarget, ...]
    previous: tuple[ShardTarget, ...] | None = None
    state: Literal["stable", "resharding"] = "stable"

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ConfigError(f"shard layout version must be an integer >= 1, got {self.version!r}")
        if self.state not in _STATES:
            raise ConfigError(f"shard layout state must be 'stable' or 'resharding', got {self.state!r}")
        object.__setattr__(self, "targets", coerce_targets(self.targets))
        if self.previous is not None:
            object.__setattr__(self, "previous", coerce_targets(self.previous))
        if (self.state == "resharding") != (self.previous is not None):
            raise ConfigError("a shard layout has previous targets exactly while it is 'resharding'")

    @classmethod
    def initial(cls, targets: Sequence[ShardTarget | str]) -> ShardLayout:
        """The first layout of a new sharded store."""
        return cls(1, coerce_targets(targets))

    @property
    def fingerprint(self) -> str:
        """Digest of the routing scheme, target identities and weights (order-free)."""
        return targets_fingerprint(self.targets)

    def router(self) -> Router:
        return Router(self.targets)

    def previous_router(self) -> Router | None:
        """Where keys lived before the reshard in progress (None when stable)."""
        return None if self.previous is None else Router(self.previous)

    def begin_reshard(self, new_targets: Sequence[ShardTarget | str]) -> ShardLayout:
        """The layout while moving pieces from the current targets to ``new_targets``."""
        if self.state != "stable":
            raise ConfigError(f"a reshard is already in progress (layout v{self.version}); finish it first")
        new = coerce_targets(new_targets)
        if targets_fingerprint(new) == self.fingerprint:
            raise ConfigError("the new shard targets are the same as the current ones; nothing to reshard")
        return ShardLayout(self.version + 1, new, previous=self.targets, state="resharding")

    def finish_reshard(self) -> ShardLayout:
        """The stable layout once every moved piece has been copied to its new target."""
        if self.state != "resharding":
            raise ConfigError(f"no reshard is in progress (layout v{self.version} is stable)")
        return replace(self, version=self.version + 1, previous=None, state="stable")

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON (sorted keys), with the scheme and fingerprint for checking on load."""
        doc: dict[str, Any] = {
            "kind": _KIND,
            "format": LAYOUT_FORMAT,
            "scheme": ROUTING_SCHEME,
            "version": self.version,
            "state": self.state,
            "targets": _targets_doc(self.targets),
            "previous": None if self.previous is None else _targets_doc(self.previous),
            "fingerprint": self.fingerprint,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | bytearray | memoryview) -> ShardLayout:
        """Parse ``to_json`` output; CorruptionError on anything malformed or inconsistent."""
        try:
            doc = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, TypeError) as e:
            raise CorruptionError(f"shard layout is not valid UTF-8 JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("kind") != _KIND:
            raise CorruptionError("shard layout object is not a piecestore shard layout document")
        fmt = doc.get("format")
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
            raise CorruptionError(f"shard layout has a bad format field: {fmt!r}")
        if fmt > LAYOUT_FORMAT:
            raise UnsupportedError(
                f"shard layout format {fmt} was written by a newer piecestore (this one reads "
                f"{LAYOUT_FORMAT}); upgrade piecestore"
            )
        if doc.get("scheme") != ROUTING_SCHEME:
            raise UnsupportedError(
                f"shard layout uses routing scheme {doc.get('scheme')!r}, this piecestore routes with "
                f"{ROUTING_SCHEME!r}; use the piecestore version that wrote it"
            )
        try:
            layout = cls(
                version=doc["version"],
                targets=_targets_from_doc(doc["targets"]),
                previous=None if doc["previous"] is None else _targets_from_doc(doc["previous"]),
                state=doc["state"],
            )
        except (KeyError, TypeError, ConfigError) as e:
            raise CorruptionError(f"shard layout is malformed: {e!r}") from e
        if doc.get("fingerprint") != layout.fingerprint:
            raise CorruptionError(
                "shard layout fingerprint does not match its targets (edited by hand or damaged)"
            )
        return layout


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _targets_doc(targets: Sequence[ShardTarget]) -> list[dict[str, Any]]:
    return [{"url": t.identity, "weight": t.weight} for t in targets]


def _targets_from_doc(rows: object) -> tuple[ShardTarget, ...]:
    if not isinstance(rows, list):
        raise TypeError(f"targets must be a list, got {type(rows).__name__}")
    out: list[ShardTarget] = []
    for row in rows:
        if not isinstance(row, dict) or set(row) != {"url", "weight"}:
            raise TypeError(f"a target must be {{'url': ..., 'weight': ...}}, got {row!r}")
        if not isinstance(row["url"], str):
            raise TypeError(f"target url must be a string, got {row['url']!r}")
        out.append(ShardTarget(row["url"], row["weight"]))
    return tuple(out)


@dataclass(frozen=True)
class LayoutDiff:
    """How a configured target set differs from a recorded one (identities, as recorded)."""

    missing: tuple[str, ...]  # recorded, not configured
    extra: tuple[str, ...]  # configured, not recorded
    reweighted: tuple[tuple[str, float, float], ...]  # (identity, recorded, configured)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.reweighted)


def diff_targets(recorded: Sequence[ShardTarget], configured: Sequence[ShardTarget]) -> LayoutDiff:
    """Order-free comparison by identity: routing ignores order and credentials too."""
    rec = {t.identity: t.weight for t in recorded}
    conf = {t.identity: t.weight for t in configured}
    return LayoutDiff(
        missing=tuple(i for i in rec if i not in conf),
        extra=tuple(i for i in conf if i not in rec),
        reweighted=tuple((i, rec[i], conf[i]) for i in rec if i in conf and rec[i] != conf[i]),
    )


def _listed(items: Sequence[str], quote: bool = True) -> str:
    shown = ", ".join(repr(i) if quote else i for i in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _describe(diff: LayoutDiff) -> str:
    parts = []
    if diff.missing:
        parts.append(f"recorded but missing from the configuration: {_listed(diff.missing)}")
    if diff.extra:
        parts.append(f"configured but not in the recorded layout: {_listed(diff.extra)}")
    if diff.reweighted:
        rows = [f"{i!r} recorded {r!r}, configured {c!r}" for i, r, c in diff.reweighted]
        parts.append(f"weight changed: {_listed(rows, quote=False)}")
    return "; ".join(parts)


_WHAT_TO_DO = (
    "Routing with this configuration would read and write pieces on the wrong shards, so "
    "nothing was done. Either fix the configuration to list exactly the recorded targets and "
    "weights, or move the pieces to the new targets with store.reshard(...) "
    "(CLI: `piecestore reshard`)."
)


def check_matches(recorded: ShardLayout | None, configured: Sequence[ShardTarget | str] | None) -> None:
    """Raise LayoutMismatchError unless ``configured`` routes exactly like the recorded layout.

    ``recorded`` None means the store records no layout (it is not sharded); ``configured``
    None or empty means no sharding is configured. Order and credentials inside URLs are
    ignored (they do not change routing); during a reshard the configuration must name the
    new targets.
    """
    conf = coerce_targets(configured) if configured else ()
    if recorded is None:
        if conf:
            raise LayoutMismatchError(
                f"shard layout mismatch: the store is not sharded, but the configuration lists "
                f"{len(conf)} shard targets ({_listed([t.identity for t in conf])}). "
                "To spread an existing store over shards use store.reshard(...) (CLI: "
                "`piecestore reshard`); otherwise remove the sharding settings."
            )
        return
    head = (
        f"shard layout mismatch: the store records layout v{recorded.version} "
        f"({len(recorded.targets)} targets, {recorded.state}, fingerprint {recorded.fingerprint[:12]})"
    )
    if not conf:
        raise LayoutMismatchError(
            f"{head} but the configuration has no sharding. Configure the recorded targets "
            f"({_listed([t.identity for t in recorded.targets])}), or, to go back to one store, "
            "reshard with store.reshard(...) (CLI: `piecestore reshard`)."
        )
    diff = diff_targets(recorded.targets, conf)
    if not diff:
        return
    if recorded.previous is not None and not diff_targets(recorded.previous, conf):
        raise LayoutMismatchError(
            f"{head}: a reshard from the configured targets to "
            f"{_listed([t.identity for t in recorded.targets])} is in progress. Configure the new "
            "targets, or finish or abort the reshard with store.reshard(...) "
            "(CLI: `piecestore reshard`)."
        )
    raise LayoutMismatchError(f"{head}, and the configuration differs: {_describe(diff)}. {_WHAT_TO_DO}")
