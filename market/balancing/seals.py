"""EAF balancing: seals anyone holding an epoch's transactions can check."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from typing import Any

from market.balancing.state import Balance

# -- seals -----------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: what `seal_of` hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal_of(asset: str, epoch: int, transactions: Iterable[Mapping[str, Any]]) -> str:
    """sha256 hex over the canonical JSON of `{"assetId", "epoch", "transactions": [{"from", "to", "energy"}]}`."""
    body = {
        "assetId": asset,
        "epoch": epoch,
        "transactions": [{"from": t["from"], "to": t["to"], "energy": t["energy"]} for t in transactions],
    }
    return hashlib.sha256(canonical_json(body)).hexdigest()


def verify_seal(balance: Mapping[str, Any] | Balance) -> bool:
    """True when `balance` (a `balancing.seal`/`get` reply's `balance`, or a `Balance`) is
    sealed and its `seal` matches its assetId, epoch and transactions."""
    data = balance.wire() if isinstance(balance, Balance) else balance
    try:
        seal = data["seal"]
        if not isinstance(seal, str):
            return False
        expected = seal_of(data["assetId"], data["epoch"], data["transactions"])
    except (KeyError, TypeError, ValueError):
        return False
    return hmac.compare_digest(seal.encode(), expected.encode())
