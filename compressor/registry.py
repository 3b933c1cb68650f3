"""Method registry: name -> Method. The pipeline asks a method what it needs; it never branches on names.

A method is a pure function on tensors (see `compressor/methods/`). It declares
- `needs`: which calibration statistics the pipeline must collect for its targets ("gram", "abs_mean",
  "fisher": per-module squared LM-loss gradients, see compressor/pipeline/fisher.py; "cross": Σ x x̂ᵀ between the dense
  model's inputs x and the compressed model's x̂, see compressor/pipeline/stats.py), plus `extra_needs(options)` for
  statistics that only some option values use,
- `Options`: a strict pydantic model of its recipe options (unknown key -> error),
- `factorizes`: True when the method *replaces* W by rank-r factors, so the pipeline resolves the rank from
  `rank`/`param_ratio` with rank.py and skips targets where factoring would grow the layer. Methods whose rank
  is an addition (EoRA's residual) or that have no rank (RTN) set it False and read their options directly.
- `spectrum` and `spectrum_units`: what rank allocation optimises, and in which units its error is measured (see
  SPECTRUM_UNITS). Only commensurate units can be compared raw across modules by `allocation: global`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

KNOWN_STATS = frozenset({"gram", "abs_mean", "fisher", "cross"})

# What the squared tail Σ_{i>r} σᵢ² of a method's spectrum measures (`spectrum_units`):
SPECTRUM_UNITS = {
    # ‖(W − Ŵ)X‖_F² on the calibration inputs X: the same units in every module. The rows of W are the output
    # channels, so the spectrum of diag(c)·W weighs each channel's output error by c² (allocation `weight: loss`).
    "output": "output error on the calibration inputs",
    # ‖W − Ŵ‖_F²: the same units in every module (though blind to the inputs).
    "weight": "weight error",
    # an error under a scaling normalised per module (ASVD, FWSVD): its scale is arbitrary per module, so only
    # scale-free comparisons (energy, `weight: relative`) are meaningful.
    "scaled": "per-module scaled error",
}


@dataclass(frozen=True)
class Method:
    name: str
    decompose: Callable  # (W[b,m,n], stats: Stats, options, rank: int | None) -> list[Factors]
    needs: frozenset
    Options: type[BaseModel]
    factorizes: bool
    summary: str
    # (W[b,m,n], stats, options) -> singular values [b, min(m,n)] whose squared tail Σ_{i>r} σᵢ² is the
    # method's own error at rank r: what rank allocation (energy / global) optimises. None: no allocation.
    spectrum: Callable | None = None
    extra_needs: Callable | None = None  # options -> further statistics names (validated when asked)
    spectrum_units: str | None = None  # one of SPECTRUM_UNITS; required with a spectrum
    # (W[m,n], stats, options, row_weight) -> [byte_budget.Choice]: the encodings a method can build for one target
    # with exact bytes and predicted output error (row_weight: √h per output channel, or None), for
    # `allocation: global` under a byte budget (compressor/budget/byte_budget.py); the chosen Choice.encoding comes back
    # to `decompose` as its `rank`. None: no byte allocation.
    choices: Callable | None = None

    def needs_for(self, options) -> frozenset:
        """The statistics this method needs with these options."""
        extra = frozenset(self.extra_needs(options)) if self.extra_needs is not None else frozenset()
        if extra - KNOWN_STATS:
            raise ValueError(f"method {self.name!r} needs unknown statistics {sorted(extra - KNOWN_STATS)}")
        return self.needs | extra


_METHODS: dict[str, Method] = {}


def register(name: str, *, needs=(), options: type[BaseModel], factorizes: bool, summary: str, spectrum=None,
             spectrum_units: str | None = None, extra_needs=None, choices=None):
    unknown = set(needs) - KNOWN_STATS
    if unknown:
        raise ValueError(f"method {name!r} needs unknown statistics {sorted(unknown)}")
    if spectrum is not None and spectrum_units not in SPECTRUM_UNITS:
        raise ValueError(f"method {name!r}: a spectrum needs spectrum_units, one of {sorted(SPECTRUM_UNITS)}")
    if spectrum is None and spectrum_units is not None:
        raise ValueError(f"method {name!r}: spectrum_units without a spectrum")

    def wrap(fn):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = Method(name, fn, frozenset(needs), options, factorizes, summary, spectrum, extra_needs,
                                spectrum_units, choices)
        return fn

    return wrap


def get(name: str) -> Method:
    import compressor.methods  # noqa: F401  (registers the built-in methods)

    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}") from None


def names() -> list[str]:
    import compressor.methods  # noqa: F401

    return sorted(_METHODS)
