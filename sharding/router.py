"""Route piece keys to shard targets with weighted rendezvous (highest-random-weight) hashing.

Why rendezvous and not ``hash % N``: every key scores every target independently and goes to
the best score, so adding a target moves only the keys the new target now wins (about
1/(N+1) of them) and removing one moves only its own keys; ``hash % N`` moves almost all.

The assignment must be the same in every process and on every machine, forever, for a given
target set: pieces would otherwise be looked for on the wrong shard. So nothing here uses
Python's ``hash()``, and the score avoids ``numpy.log`` (whose last bit differs between its
SIMD and libm code paths, i.e. between CPUs): the logarithm is computed with IEEE-754 basic
operations only, which round identically everywhere. ``ROUTING_SCHEME`` names this exact
function; it is recorded with the shard layout so a changed scheme can never misroute
silently.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import numpy as np
import numpy.typing as npt
import xxhash

from piecestore.errors import ConfigError, InvalidKeyError

__all__ = [
    "ROUTING_SCHEME",
    "Router",
    "ShardTarget",
    "coerce_targets",
    "from_template",
    "hash_keys",
    "owners_changed",
    "strip_url_secrets",
    "targets_fingerprint",
    "targets_from_config",
]

#: Names the routing function (key hash, target seed, mix, score). Change it if any bit of
#: the assignment changes; layouts recorded under another scheme are refused.
ROUTING_SCHEME = "hrw-xxh3-splitmix64-v1"

# Weights are relative. The bounds keep w / -ln(u) finite and normal for every u we produce.
MIN_WEIGHT = 1e-300
MAX_WEIGHT = 1e280

_SEED_DOMAIN = b"piecestore/shard-target\x00"
_U64 = np.uint64
_MIX1_INT = 0xBF58476D1CE4E5B9
_MIX2_INT = 0x94D049BB133111EB
_M64 = (1 << 64) - 1
_MIX1 = _U64(_MIX1_INT)  # splitmix64 finalizer constants (Stafford's mix13)
_MIX2 = _U64(_MIX2_INT)
_MANTISSA = _U64((1 << 52) - 1)
_ONE_BITS = _U64(1023 << 52)
# Literals, not math.log/sqrt: the constants must not depend on the platform's libm.
_SQRT2 = 1.4142135623730951
_LN2 = 0.6931471805599453
# ln(f) = 2s(1 + z/3 + z^2/5 + ...), s = (f-1)/(f+1), z = s^2 <= 0.0295 for f in [1/sqrt2, sqrt2):
# eight terms leave a relative error near 1e-15 (checked against math.log in the tests).
_ATANH_COEFS = tuple(1.0 / (2 * k + 1) for k in range(8, 0, -1))  # 1/17 ... 1/3, Horner order
# Keys scored per chunk times targets: keeps the temporaries in the CPU cache.
_CHUNK_CELLS = 1 << 16
# route() of one key: pure Python up to this many targets (faster), numpy beyond.
_SCALAR_MAX_TARGETS = 32

_SECRET_PARAM_WORDS = ("secret", "passw", "token", "signature", "credential", "access_key", "accesskey")
_SECRET_PARAM_NAMES = frozenset({"key", "sig", "sas", "auth", "authorization", "pwd", "apikey", "api_key"})
_SHARD_FIELD = re.compile(r"\{shard(?::([^{}]*))?\}")


def _is_secret_param(name: str) -> bool:
    n = unquote_plus(name).strip().lower().replace("-", "_")
    return n in _SECRET_PARAM_NAMES or any(word in n for word in _SECRET_PARAM_WORDS)


def strip_url_secrets(url: str) -> str:
    """The URL without userinfo and credential-like query parameters, else unchanged.

    Why: a target's identity (its routing seed, what the layout records, what errors print)
    must not depend on, nor reveal, the credentials used to reach it.
    """
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ConfigError(f"shard target URL {url!r} cannot be parsed: {e}") from e
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(p for p in parts.query.split("&") if p and not _is_secret_param(p.partition("=")[0]))
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _seed_of(identity: str) -> int:
    return xxhash.xxh3_64_intdigest(_SEED_DOMAIN + identity.encode("utf-8"))


@dataclass(frozen=True)
class ShardTarget:
    """One place pieces can live: any store URL, with a relative weight (share of keys).

    ``identity`` (the URL without secrets) and ``seed`` (its 64-bit hash) are what routing
    uses, so changing credentials in a URL never moves keys.
    """

    url: str
    weight: float = 1.0
    identity: str = field(init=False, repr=False, compare=False)
    seed: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise ConfigError(f"shard target URL must be a non-empty string, got {self.url!r}")
        if self.url != self.url.strip():
            raise ConfigError(f"shard target URL {self.url!r} has leading or trailing whitespace")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"shard target weight must be a number, got {w!r}")
        w = float(w)
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(
                f"shard target {strip_url_secrets(self.url)!r}: weight must be finite and > 0, got {w!r}"
            )
        if not MIN_WEIGHT <= w <= MAX_WEIGHT:
            raise ConfigError(
                f"shard target {strip_url_secrets(self.url)!r}: weight {w!r} is outside "
                f"[{MIN_WEIGHT:g}, {MAX_WEIGHT:g}]; weights are relative, e.g. 1..1000"
            )
        identity = strip_url_secrets(self.url)
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "identity", identity)
        object.__setattr__(self, "seed", _seed_of(identity))

    def __repr__(self) -> str:  # the URL may carry credentials: show only the identity
        return f"ShardTarget(url={self.identity!r}, weight={self.weight!r})"


def coerce_targets(targets: Iterable[ShardTarget | str]) -> tuple[ShardTarget, ...]:
    """Validate a target list: non-empty, each a ShardTarget or URL, no identity twice."""
    if isinstance(targets, (str, bytes)):
        raise ConfigError("shard targets must be a list of URLs, not one string")
    out: list[ShardTarget] = []
    for t in targets:
        if isinstance(t, ShardTarget):
            out.append(t)
        elif isinstance(t, str):
            out.append(ShardTarget(t))
        else:
            raise ConfigError(f"shard target must be a URL string or ShardTarget, got {type(t).__name__}")
    if not out:
        raise ConfigError("shard target list is empty; give at least one target, or disable sharding")
    seen: dict[str, int] = {}
    seeds: dict[int, str] = {}
    for i, t in enumerate(out):
        if t.identity in seen:
            raise ConfigError(
                f"shard target {t.identity!r} is listed twice (positions {seen[t.identity]} and {i}); "
                "each target must appear once (use weight for a bigger share)"
            )
        if t.seed in seeds:  # a 64-bit collision: astronomically unlikely, but never route ambiguously
            raise ConfigError(f"shard targets {seeds[t.seed]!r} and {t.identity!r} collide; rename one")
        seen[t.identity] = i
        seeds[t.seed] = t.identity
    return tuple(out)


def from_template(template: str, count: int, weight: float = 1.0) -> tuple[ShardTarget, ...]:
    """Targets ``template`` with ``{shard}`` (or ``{shard:03d}``) replaced by 0..count-1."""
    if not isinstance(template, str) or not _SHARD_FIELD.search(template):
        raise ConfigError(
            f"shard template {template!r} must contain '{{shard}}', e.g. 's3://pieces-{{shard}}'"
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"shard count must be an integer >= 1 for a template, got {count!r}")

    def expand(i: int) -> str:
        def one(m: re.Match[str]) -> str:
            try:
                return format(i, m.group(1) or "")
            except ValueError as e:
                raise ConfigError(f"shard template {template!r}: bad format {m.group(0)!r}: {e}") from e

        return _SHARD_FIELD.sub(one, template)

    return coerce_targets(ShardTarget(expand(i), weight) for i in range(count))


def targets_from_config(
    targets: Sequence[ShardTarget | str] | None = None,
    shards: int | None = None,
    template: str | None = None,
) -> tuple[ShardTarget, ...] | None:
    """The configured targets, or None for "no sharding" (shards unset or 0, no target list).

    Either an explicit target list, or a count with a ``{shard}`` template; both at once is
    ambiguous and refused, as is a template with the count unset (it would silently not shard).
    """
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 0):
        raise ConfigError(f"shards must be an integer >= 0 (0 = no sharding), got {shards!r}")
    if targets is not None:
        if shards or template:
            raise ConfigError("give either an explicit list of shard targets or shards + template, not both")
        return coerce_targets(targets)
    if shards is None:
        if template:
            raise ConfigError(
                f"shard template {template!r} is set but shards is not; set shards=N, "
                "or shards=0 / remove the template for no sharding"
            )
        return None
    if shards == 0:
        return None
    if not template:
        raise ConfigError(
            f"shards={shards} needs a template such as 's3://pieces-{{shard}}', or give a target list"
        )
    return from_template(template, shards)


def targets_fingerprint(targets: Iterable[ShardTarget]) -> str:
    """A digest of (scheme, identities, weights), independent of order: equal iff routing is equal."""
    rows = sorted((t.identity, repr(t.weight)) for t in targets)
    doc = json.dumps({"scheme": ROUTING_SCHEME, "targets": rows}, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(doc.encode("utf-8"))


def hash_keys(keys: Iterable[str]) -> npt.NDArray[np.uint64]:
    """xxh3-64 of each key's UTF-8 bytes; the only per-key Python work in routing.

    ``fromiter(map(...))`` is the fastest form measured (about 0.07 us/key, vs about 0.1 us for a
    list comprehension plus ``np.array``).
    """
    if isinstance(keys, (str, bytes)):
        raise InvalidKeyError("route_many takes a sequence of keys, not one string")
    if not isinstance(keys, Sequence):
        keys = list(keys)
    try:
        return np.fromiter(
            map(xxhash.xxh3_64_intdigest, map(str.encode, keys)), dtype=np.uint64, count=len(keys)
        )
    except (TypeError, UnicodeEncodeError) as e:
        for k in keys:
            _check_key(k)
        raise InvalidKeyError(f"cannot hash piece keys: {e}") from e


def _check_key(key: object) -> bytes:
    if not isinstance(key, str):
        raise InvalidKeyError(f"piece key must be str, got {type(key).__name__}")
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidKeyError(f"piece key {key[:60]!r} is not valid UTF-8 (lone surrogate?)") from e


def _ln_unit(u: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Natural log of u in (0, 1), from IEEE basic operations only, so bit-identical on every CPU.

    Split u = f * 2^e with f in [1/sqrt2, sqrt2); ln u = e ln2 + 2 atanh((f-1)/(f+1)).
    """
    bits = u.view(np.uint64)
    e = (bits >> _U64(52)).astype(np.int64)
    e -= 1023
    f = ((bits & _MANTISSA) | _ONE_BITS).view(np.float64)  # in [1, 2)
    big = f > _SQRT2
    f[big] *= 0.5
    e += big
    s = f - 1.0
    f += 1.0
    s /= f
    z = s * s
    p = np.full_like(z, _ATANH_COEFS[0])
    for c in _ATANH_COEFS[1:]:
        p *= z
        p += c
    p *= z
    s *= 2.0
    p *= s
    p += s  # ln f = 2s + 2s * z * P(z)
    ln = e.astype(np.float64)
    ln *= _LN2
    ln += p
    return ln


def _best(
    hashes: npt.NDArray[np.uint64], seeds: npt.NDArray[np.uint64], weights: npt.NDArray[np.float64]
) -> npt.NDArray[np.intp]:
    """Index (into seeds) of the highest score -w / ln(u(key, target)) for each key hash.

    u comes from the splitmix64 finalizer of key_hash XOR target_seed, top 52 bits, shifted by
    half a step so that 0 < u < 1 exactly. One formula for all weights: equal weights are
    just w = 1 everywhere.
    """
    x = hashes[:, None] ^ seeds[None, :]
    x ^= x >> _U64(30)
    x *= _MIX1
    x ^= x >> _U64(27)
    x *= _MIX2
    x ^= x >> _U64(31)
    x >>= _U64(12)
    u = x.astype(np.float64)
    u += 0.5
    u *= 2.0**-52
    ln = _ln_unit(u)
    np.negative(ln, out=ln)
    score = np.divide(weights[None, :], ln)
    best: npt.NDArray[np.intp] = np.argmax(score, axis=1)
    return best


class Router:
    """Maps piece keys to indexes into ``targets`` (weighted rendezvous hashing).

    The answer depends only on the key and the *set* of (identity, weight) pairs, not on the
    order of ``targets`` nor on credentials inside URLs: ties are broken by target seed.
    """

    def __init__(self, targets: Sequence[ShardTarget | str]) -> None:
        self._targets = coerce_targets(targets)
        order = sorted(range(len(self._targets)), key=lambda i: self._targets[i].seed)
        self._order = np.array(order, dtype=np.intp)  # internal (seed-sorted) index -> caller's index
        self._seeds = np.array([self._targets[i].seed for i in order], dtype=np.uint64)
        self._weights = np.array([self._targets[i].weight for i in order], dtype=np.float64)
        self._chunk = max(1, _CHUNK_CELLS // len(self._targets))
        self._index = {t.identity: i for i, t in enumerate(self._targets)}
        self._pairs = list(zip(self._seeds.tolist(), self._weights.tolist(), strict=True))

    @classmethod
    def from_template(cls, template: str, count: int, weight: float = 1.0) -> Router:
        return cls(from_template(template, count, weight))

    @property
    def targets(self) -> tuple[ShardTarget, ...]:
        return self._targets

    @property
    def fingerprint(self) -> str:
        return targets_fingerprint(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"Router({len(self._targets)} targets, fingerprint={self.fingerprint[:12]})"

    def index_of(self, target: ShardTarget | str) -> int | None:
        """Position of a target (matched by identity), or None if it is not routed to."""
        ident = target.identity if isinstance(target, ShardTarget) else strip_url_secrets(target)
        return self._index.get(ident)

    def route(self, key: str) -> int:
        """Index of the target that owns ``key``: the same answer as route_many, bit for bit.

        One key through numpy costs about 50 us of call overhead; the same operations on
        Python floats (IEEE doubles, rounded identically) cost about 1 us per target.
        """
        h = xxhash.xxh3_64_intdigest(_check_key(key))
        if len(self._pairs) > _SCALAR_MAX_TARGETS:
            return int(self.route_hashes(np.array([h], dtype=np.uint64))[0])
        best_score = -1.0
        best = 0
        coefs = _ATANH_COEFS[1:]
        for j, (seed, weight) in enumerate(self._pairs):
            # Inlined scalar twin of _best/_ln_unit: same IEEE operations in the same order.
            x = h ^ seed
            x ^= x >> 30
            x = (x * _MIX1_INT) & _M64
            x ^= x >> 27
            x = (x * _MIX2_INT) & _M64
            x ^= x >> 31
            m, e = math.frexp(((x >> 12) + 0.5) * 2.0**-52)  # exact split: u = m * 2^e
            f = m * 2.0
            e -= 1
            if f > _SQRT2:
                f *= 0.5
                e += 1
            s = (f - 1.0) / (f + 1.0)
            z = s * s
            p = _ATANH_COEFS[0]
            for c in coefs:
                p = p * z + c
            p *= z
            s *= 2.0
            score = weight / -(e * _LN2 + (p * s + s))
            if score > best_score:  # strict: the first (lowest seed) wins a tie, as np.argmax
                best_score = score
                best = j
        return int(self._order[best])

    def route_many(self, keys: Sequence[str]) -> npt.NDArray[np.intp]:
        """Indexes of the owning targets, one per key, vectorized (about 0.5 us/key, see benchmarks)."""
        return self.route_hashes(hash_keys(keys))

    def route_hashes(self, hashes: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """route_many for keys already hashed with ``hash_keys`` (hash once, route many times)."""
        hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        if hashes.ndim != 1:
            raise ValueError("hashes must be a 1-d array")
        out = np.empty(len(hashes), dtype=np.intp)
        step = self._chunk
        for start in range(0, len(hashes), step):
            stop = start + step
            out[start:stop] = _best(hashes[start:stop], self._seeds, self._weights)
        return self._order[out]


def owners_changed(
    old: Router, new: Router, keys: Sequence[str] | npt.NDArray[np.uint64]
) -> npt.NDArray[np.bool_]:
    """Mask of keys whose owning target (by identity) differs between two routers.

    For resharding plans: exactly these keys must be copied. Accepts keys or their
    ``hash_keys`` array (hashed once for both routers).
    """
    hashes = keys if isinstance(keys, np.ndarray) and keys.dtype == np.uint64 else hash_keys(keys)
    old_idx = old.route_hashes(hashes)
    new_idx = new.route_hashes(hashes)
    remap = np.array([-1 if (j := new.index_of(t)) is None else j for t in old.targets], dtype=np.intp)
    changed: npt.NDArray[np.bool_] = remap[old_idx] != new_idx
    return changed
