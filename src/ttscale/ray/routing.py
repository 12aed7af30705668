"""Prefix-aware choice of an engine replica (pure Python, no Ray).

Prefix reuse is where the engine's speed comes from, and it only happens on the replica whose
KV cache holds the prefix. So the router remembers, per chunk of prompt text, which replica
last served a prompt with that prefix: a prompt's text is cut into ``chunk_chars`` pieces,
each piece hashed together with all before it (a hash chain, as the block manager hashes full
KV blocks), and the longest chain already seen names the replica. A conversation's next turn
extends its previous prompt, so it lands where its history is cached; requests sharing a long
system prompt land together.

Falling back to the least-loaded replica (fewest requests in flight, then fewest routed so
far): when nothing matches, and when the replica holding the prefix has ``balance_slack`` more
requests in flight than the least loaded one (as SGLang's cache-aware router does: a hot
prefix must not pile every request onto one replica). A replica whose call failed is avoided
for ``down_s`` seconds and its entries are forgotten (a restarted replica's cache is empty).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RoutingConfig:
    chunk_chars: int = 32  # ~8 tokens: finer than a 16-token KV block, cheap to hash
    max_entries: int = 200_000  # prefix chunks remembered (LRU), ~40 MB at most
    balance_slack: int = 4  # in-flight requests a prefix's replica may exceed the least loaded by
    down_s: float = 5.0  # a failed replica is skipped this long
    # A live replica accepts at once (its first streamed item); one being restarted by Serve
    # holds the request until its model has loaded: past this, try another replica.
    accept_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.chunk_chars < 1 or self.max_entries < 1 or self.balance_slack < 0:
            raise ValueError("chunk_chars and max_entries must be >= 1, balance_slack >= 0")
        if self.down_s < 0 or self.accept_timeout_s <= 0:
            raise ValueError("down_s must be >= 0 and accept_timeout_s > 0")


def routing_text(path: str, body: bytes) -> str:
    """The text whose prefix decides the replica: a chat's messages in order (roles
    included), a completion's prompt; '' when the body is not a request we can read."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    if path.endswith("/chat/completions") and isinstance(data.get("messages"), list):
        parts = []
        for m in data["messages"]:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
            parts.append(f"<|{m.get('role')}|>{text}")
        return "".join(parts)
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:  # a batch routes by its first prompt
        first = prompt[0]
        return first if isinstance(first, str) else json.dumps(prompt)
    return ""


def prefix_hashes(text: str, chunk_chars: int) -> list[bytes]:
    """Hash chain over the full ``chunk_chars`` pieces of ``text``: entry k covers
    ``text[: (k + 1) * chunk_chars]``."""
    out, prev = [], b""
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        piece = text[start : start + chunk_chars].encode("utf-8", "surrogatepass")
        prev = hashlib.blake2b(prev + piece, digest_size=16).digest()
        out.append(prev)
    return out


@dataclass(frozen=True)
class Route:
    replica: int
    matched_chars: int  # prefix length found cached on that replica (0: least loaded)
    reason: str  # "prefix" | "least_loaded" | "balance" (prefix replica too busy)


class PrefixRouter:
    """Which replica gets a request. Not thread-safe: one event loop owns it."""

    def __init__(self, num_replicas: int, config: RoutingConfig | None = None) -> None:
        if num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
        self.config = config or RoutingConfig()
        self.num_replicas = num_replicas
        self.in_flight = [0] * num_replicas
        self.routed = [0] * num_replicas
        self._down_until = [0.0] * num_replicas
        self._owner: OrderedDict[bytes, int] = OrderedDict()  # prefix hash -> replica, LRU

    def available(self, exclude: Iterable[int] = (), now: float | None = None) -> list[int]:
        """Replicas not excluded, those not marked down first (all down: try them anyway)."""
        now = time.monotonic() if now is None else now
        left = [i for i in range(self.num_replicas) if i not in set(exclude)]
        up = [i for i in left if self._down_until[i] <= now]
        return up or left

    def least_loaded(self, candidates: list[int]) -> int:
        return min(candidates, key=lambda i: (self.in_flight[i], self.routed[i], i))

    def choose(self, text: str, exclude: Iterable[int] = (), now: float | None = None) -> Route:
        """The replica for a prompt with this routing text, skipping ``exclude``. Raises
        LookupError when every replica is excluded."""
        candidates = self.available(exclude, now)
        if not candidates:
            raise LookupError("no replica left to try")
        lightest = self.least_loaded(candidates)
        owner, matched = None, 0
        for k, h in enumerate(prefix_hashes(text, self.config.chunk_chars)):
            replica = self._owner.get(h)
            if replica is None:
                break
            if replica in candidates:
                owner, matched = replica, (k + 1) * self.config.chunk_chars
        if owner is None:
            return Route(lightest, 0, "least_loaded")
        if self.in_flight[owner] > self.in_flight[lightest] + self.config.balance_slack:
            return Route(lightest, 0, "balance")
        return Route(owner, matched, "prefix")

    def started(self, replica: int) -> None:
        self.in_flight[replica] += 1
        self.routed[replica] += 1

    def finished(self, replica: int, text: str, ok: bool) -> None:
        """A request ended; a served prompt's prefixes now live on ``replica``."""
        self.in_flight[replica] = max(0, self.in_flight[replica] - 1)
        if ok:
            self.remember(text, replica)

    def remember(self, text: str, replica: int) -> None:
        for h in prefix_hashes(text, self.config.chunk_chars):
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.config.max_entries:
            self._owner.popitem(last=False)

    def mark_down(self, replica: int, now: float | None = None) -> None:
        """The replica failed a call: skip it for a while and forget what it had cached."""
        now = time.monotonic() if now is None else now
        self._down_until[replica] = now + self.config.down_s
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]

    def stats(self) -> dict[str, Any]:
        return {
            "in_flight": list(self.in_flight),
            "routed": list(self.routed),
            "prefix_entries": len(self._owner),
        }


__all__ = ["PrefixRouter", "Route", "RoutingConfig", "prefix_hashes", "routing_text"]
