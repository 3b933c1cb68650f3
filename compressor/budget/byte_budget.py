"""One encoding per module under a global byte budget: a multiple-choice knapsack solved greedily on each module's
lower convex hull of (bytes, predicted error).

Each module offers a list of `Choice`s (an encoding with its exact stored bytes and its predicted error, in units
comparable across modules: the output error on the calibration inputs, optionally weighted by the loss). Minimise
Σ_k error_k subject to Σ_k bytes_k ≤ budget, one choice per module:

1. Per module, keep the lower convex hull of its points (a point above the hull is never the best use of bytes
   at any exchange rate between bytes and error).
2. Start every module at its cheapest point; repeatedly take the hull step with the largest error removed per
   byte that still fits (a heap over the modules' next steps). Along a convex hull these steps have falling
   slopes, so this is the exact solution of the Lagrangian relaxation at every budget the steps hit exactly.
3. Spend what is left: while some module has a point (on or off its hull) that lowers its error and fits in the
   remaining bytes, take the one removing the most error per byte.

A budget below the sum of every module's cheapest point is the user's error: one line, never an overshoot.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Hashable

from compressor.errors import UserError


@dataclass(frozen=True)
class Choice:
    encoding: Hashable  # what the method builds (passed back to it as the module's "rank")
    bytes: int  # exact stored bytes of the module's weight in this encoding (biases excluded: the same for all)
    error: float  # what the allocation minimises (comparable across modules)
    predicted: float | None = None  # the relative output error to report next to the measured one


def lower_hull(choices: list[Choice]) -> list[Choice]:
    """The points on the lower convex hull of (bytes, error), by increasing bytes and strictly decreasing error."""
    by_bytes: dict[int, Choice] = {}
    for c in choices:  # at equal bytes only the least error matters
        if c.bytes not in by_bytes or c.error < by_bytes[c.bytes].error:
            by_bytes[c.bytes] = c
    hull: list[Choice] = []
    for c in sorted(by_bytes.values(), key=lambda c: c.bytes):
        if hull and c.error >= hull[-1].error:
            continue  # more bytes for no less error
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]  # drop b when it lies on or above the segment a -> c
            if (b.error - a.error) * (c.bytes - a.bytes) >= (c.error - a.error) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def allocate_bytes(options: dict[str, list[Choice]], budget: float) -> dict[str, Choice]:
    """name -> the chosen Choice, with Σ bytes ≤ budget and Σ error (greedily) minimal."""
    empty = [name for name, c in options.items() if not c]
    if empty:
        raise ValueError(f"no encoding offered for {empty[0]}")
    hulls = {name: lower_hull(c) for name, c in options.items()}
    at = {name: 0 for name in hulls}
    spent = sum(h[0].bytes for h in hulls.values())
    if spent > budget:
        raise UserError(f"the byte budget ({budget:,.0f} bytes) is below the smallest encoding of every target "
                        f"({spent:,} bytes); raise the size")

    def push(heap, name):
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            gain = (h[i].error - h[i + 1].error) / (h[i + 1].bytes - h[i].bytes)
            heapq.heappush(heap, (-gain, name))

    heap: list = []
    for name in hulls:
        push(heap, name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        cost = h[i + 1].bytes - h[i].bytes
        if spent + cost <= budget:
            at[name], spent = i + 1, spent + cost
            push(heap, name)
        # else: this module's next step does not fit; its later steps cost more still (bytes grow along the hull)

    chosen = {name: hulls[name][at[name]] for name in hulls}
    while True:  # spend the remainder on any point that fits, off the hull included
        best, best_gain = None, 0.0
        for name, current in chosen.items():
            for c in options[name]:
                extra = c.bytes - current.bytes
                if c.error < current.error and spent + extra <= budget:
                    gain = (current.error - c.error) / max(extra, 1)
                    if best is None or gain > best_gain:
                        best, best_gain = (name, c), gain
        if best is None:
            return chosen
        name, c = best
        spent += c.bytes - chosen[name].bytes
        chosen[name] = c
