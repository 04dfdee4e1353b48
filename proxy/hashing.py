"""One hashing helper for keys and fingerprints (cache keys, idempotency records,
credential hashes): sha256 over length-prefixed parts, so no two different part lists
hash alike ("ab", "c" and "a", "bc" differ)."""

from __future__ import annotations

import hashlib


def digest(*parts: str | bytes | int | None) -> str:
    """sha256 (hex) over `parts`, each encoded unambiguously (8-byte length prefix).

    str parts are UTF-8 (lone surrogates kept), ints their decimal text, None the empty
    string. The type is not part of the encoding: "1" and 1 hash alike.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            data = part
        else:
            data = ("" if part is None else str(part)).encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()
