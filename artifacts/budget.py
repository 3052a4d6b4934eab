"""Memory budgets as users write them: bytes with a unit ("300MB", "2GiB", "10G", "512M") or a
share of all routed experts ("25%"). A bare letter is binary, as Docker's and systemd's are
(10G = 10 GiB); a number without a unit is refused, since 10 could mean bytes or a share."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import FateError

MAX_BYTES = 2**60  # an exabyte: above any machine's memory, within int64 everywhere a size goes
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class Budget:
    share: float | None = None  # of all routed experts
    bytes: int | None = None

    def share_of(self, total_expert_bytes: int) -> float:
        if self.share is not None:
            return self.share
        return min(1.0, self.bytes / max(total_expert_bytes, 1))

    def bytes_of(self, total_expert_bytes: int) -> int:
        if self.bytes is not None:
            return self.bytes
        return int(self.share * total_expert_bytes)


def parse_budget(text: str) -> Budget:
    t = text.strip().upper().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", t)
    if m:
        share = float(m.group(1)) / 100
    else:
        if re.fullmatch(r"\d+(?:\.\d+)?|\.\d+", t):
            raise FateError(f"a budget needs a unit: {text.strip()}GB (bytes) or {text.strip()}% (of the experts), "
                            "not a bare number")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT](?:IB|B)?|B)", t)
        if not m:
            raise FateError(f"cannot read budget {text!r}: use bytes with a unit (300MB, 2GiB, 10G) or a share (25%)")
        value = float(m.group(1)) * UNITS[m.group(2)]
        if not value < MAX_BYTES:  # also inf, from a number of hundreds of digits
            raise FateError(f"budget {text[:40]!r}{'...' if len(text) > 40 else ''} is more bytes than any "
                            f"machine has (at most {MAX_BYTES // 10**15} PB)")
        return Budget(bytes=int(value))
    if not 0 < share <= 1:
        raise FateError(f"budget share {text!r} must be in (0%, 100%]")
    return Budget(share=share)
