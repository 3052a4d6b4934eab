"""fate-replay TRACE [--capacity 25%,50%] [--policies arc,lru,lfru,s3fifo] [--json]

Replays a routing trace (fate-run --trace) through every eviction policy, with one global pool and
with per-layer quotas, with and without prefetching what was predicted, and through Belady's optimal
cache, at the traced run's own capacity or at shares of all experts: MB read per decode token each,
and each against Belady's at the same capacity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import click
from fate.artifacts import FateError
from fate.artifacts.budget import parse_budget
from fate.artifacts.errors import USER_ERRORS, exit_with

from .clihelp import command
from .experts.eviction import POLICIES
from .experts.replay import Access, ReplayResult, accesses_of, belady, simulate
from .experts.trace import TraceHeader, read_trace


@dataclass(frozen=True)
class Capacity:
    """Slots per layer (quotas) and per slot size (the global pool's groups) at one budget."""

    label: str
    per_layer: dict[int, int]
    cost: dict[int, int]

    @property
    def bytes(self) -> int:
        return sum(n * self.cost[layer] for layer, n in self.per_layer.items())

    def groups(self, pool: str) -> tuple[dict, dict]:
        """(capacity by group, group of each layer) for `pool`."""
        if pool == "per-layer":
            return dict(self.per_layer), {layer: layer for layer in self.per_layer}
        group_of = {layer: self.cost[layer] for layer in self.per_layer}
        capacity: dict = {}
        for layer, n in self.per_layer.items():
            capacity[group_of[layer]] = capacity.get(group_of[layer], 0) + n
        return capacity, group_of


def capacities(header: TraceHeader, shares: list[str]) -> list[Capacity]:
    """The run's own slots, or each budget: the run's quotas scaled to it (at least top-k, at most
    every expert)."""
    cost = {l.layer: l.slot_bytes for l in header.layers}
    own = {l.layer: l.slots for l in header.layers}
    if not shares:
        return [Capacity("as traced", own, cost)]
    total = sum(l.experts * l.slot_bytes for l in header.layers)
    run = sum(own[l] * cost[l] for l in own) or 1
    out = []
    for share in shares:
        target = parse_budget(share).bytes_of(total)
        slots = {l.layer: max(l.top_k, min(l.experts, round(own[l.layer] * target / run))) for l in header.layers}
        out.append(Capacity(share.strip(), slots, cost))
    return out


def decode_tokens(accesses: list[Access], records) -> int:
    return len({r.step for r in records if r.phase == "decode"})


def replay_all(accesses: list[Access], capacity: Capacity, policies: list[str]) -> list[ReplayResult]:
    rows = []
    for pool in ("global", "per-layer"):
        groups, group_of = capacity.groups(pool)
        rows.append(belady(accesses, groups, group_of, capacity.cost, name=f"belady {pool}"))
        for policy in policies:
            for prefetch in (False, True):
                rows.append(simulate(accesses, policy, groups, group_of, capacity.cost, prefetch=prefetch,
                                     name=f"{policy} {pool}{' + prefetch' if prefetch else ''}"))
    return rows


@command("fate-replay", examples=(
    ("fate-run model.fate -p \"...\" --memory-budget 25% --trace run.trace && fate-replay run.trace",
     "record a run's routing, then compare cache policies and Belady's optimum on it"),
))
@click.argument("trace")
@click.option("--capacity", default=None,
              help="Comma-separated budgets as shares of all experts (25%) or bytes (300MB); default: the traced "
                   "run's own slots.")
@click.option("--policies", default=",".join(sorted(POLICIES)), show_default=True,
              help="Comma-separated eviction policies to replay.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def main(trace: str, capacity: str | None, policies: str, as_json: bool) -> None:
    """Replay a routing TRACE (fate-run --trace) through every cache policy and Belady's optimal cache."""
    try:
        chosen = [p.strip() for p in policies.split(",") if p.strip()]
        unknown = [p for p in chosen if p not in POLICIES]
        if unknown or not chosen:
            raise FateError(f"unknown policy {', '.join(unknown) or '(none)'}; choose from {', '.join(sorted(POLICIES))}")
        header, records = read_trace(trace)
        accesses = accesses_of(records)
        tokens = decode_tokens(accesses, records)
        if not tokens:
            raise FateError(f"{trace} has no decode tokens to replay")
        results = []
        for cap in capacities(header, [s for s in (capacity or "").split(",") if s.strip()]):
            rows = replay_all(accesses, cap, chosen)
            best = next(r for r in rows if r.name == "belady global").bytes_read["decode"] or 1
            results.append({"capacity": cap.label, "capacity_mb": cap.bytes / 1e6, "rows": [
                {"name": r.name, "decode_mb_per_token": r.bytes_read["decode"] / tokens / 1e6,
                 "prefill_mb": r.bytes_read["prefill"] / 1e6, "hit_rate": r.hit_rate,
                 "prefetched": r.prefetched, "x_belady": r.bytes_read["decode"] / best} for r in rows]})
        if as_json:
            click.echo(json.dumps({"trace": trace, "decode_tokens": tokens, "results": results}))
            return
        for result in results:
            click.echo(f"capacity {result['capacity']} ({result['capacity_mb']:.1f} MB), {tokens} decode tokens:")
            click.echo(f"  {'cache':32s} {'MB/token':>9s} {'x Belady':>9s} {'hit rate':>9s} {'prefill MB':>11s}")
            for row in result["rows"]:
                hit = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.3f}"
                click.echo(f"  {row['name']:32s} {row['decode_mb_per_token']:9.2f} {row['x_belady']:9.2f} "
                           f"{hit:>9s} {row['prefill_mb']:11.1f}")
    except USER_ERRORS as e:
        exit_with("fate-replay", e)


if __name__ == "__main__":
    main()
