"""Order-independent digests of ids: what the listing, the unit files and verify agree on."""

from __future__ import annotations

import hashlib


def id_hash(item_id: str) -> int:
    """A 64-bit hash of one id: the terms of the order-independent digests."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little")


def ids_digest(ids) -> str:
    """Order-independent digest of a set of ids: the sum of their 64-bit hashes mod 2**64 (hex).
    Digests of disjoint sets add up (``add_digests``) to the digest of their union."""
    return f"{sum(map(id_hash, ids)) % 2**64:016x}"


def add_digests(digests) -> str:
    return f"{sum(int(d, 16) for d in digests) % 2**64:016x}"


def sequence_digest(parts) -> str:
    """A digest of a sequence of strings, order included (which item is in which unit)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()
