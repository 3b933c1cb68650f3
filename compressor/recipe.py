"""Recipes: a strict, versioned YAML schema, loaded by built-in name or path, with `--set key=value` overrides.

    version: 1
    name: svd-llm-20
    description: SVD-LLM whitened truncation, 20% of every decoder linear's parameters removed
    method: svd-llm
    options: {param_ratio: 0.8}          # validated by the method's own Options model
    targets: ["*"]                       # globs or "re:<regex>" over module names, inside decoder layers only
    ignore: []
    calibration: {nsamples: 64, seqlen: 256, seed: 0}
    sequential: {inputs: compressed}     # or "dense": feed each layer the uncompressed layer's outputs
    allocation: uniform                  # or energy / global (one parameter budget for the whole model)

Unknown keys anywhere are errors that name the key. `--set param_ratio=0.7` finds a bare option name in the
method's options; dotted keys (`calibration.nsamples=32`) address any field.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compressor import registry
from compressor.errors import UserError
from compressor.resources import recipes_dir

SCHEMA_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Calibration(Strict):
    nsamples: int = Field(64, gt=0)
    seqlen: int = Field(256, gt=1)
    seed: int = 0
    # Attention sinks: the first token(s) of every window carry activations orders of magnitude larger than the
    # rest and would dominate the Grams, the eigenvalue floor and the refinement loss.
    skip_first: int = Field(0, ge=0, description="leave the first k positions of every window out of the "
                                                 "statistics and the refinement loss (attention sinks)")


class Sequential(Strict):
    inputs: Literal["compressed", "dense"] = "compressed"
    # `group`: inside a decoder layer, the targets that share an input ([q,k,v] → [o] → [gate,up] → [down], in
    # execution order) are calibrated one group at a time, each on inputs produced with the earlier groups of
    # the same layer already compressed (GPTQ's true-sequential). `layer`: every group on the dense layer.
    granularity: Literal["layer", "group"] = "layer"


class Refinement(Strict):
    """Block refinement (AA-SVD-style): after a decoder layer's targets are compressed, Adam on only the new
    modules' refinable parameters (low-rank factors), and their quantised codes, scales and zero points on their
    grid (`quant`), so the layer's outputs match `target` on the calibration windows. epochs: 0 turns it off."""

    epochs: int = Field(0, ge=0, description="passes over the calibration windows per decoder layer (0: off)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    relative_lr: bool = Field(False, description="scale each factor's learning rate by its RMS (Adam's step is "
                                                 "otherwise the same absolute size for every entry)")
    batch_size: int = Field(8, gt=0, description="calibration windows per Adam step")
    target: Literal["compressed", "dense"] = Field(
        "compressed", description="match the dense layer's outputs on the compressed model's inputs (compressed) "
                                  "or the dense model's own outputs (dense: a second activation stream)")
    seed: int = 0
    quant: bool = Field(True, description="also refine quantised encodings: codes, scales and zero points on their "
                                          "grid (AutoRound-style)")
    quant_lr: Optional[float] = Field(None, gt=0, description="the rounding offsets' step (in codes, decaying "
                                                              "linearly to 0; default 0.7 / steps)")


class Allocation(Strict):
    energy: float = Field(0.95, gt=0, le=1, description="`energy`: kept fraction of each matrix's spectral energy")
    # `global`: how errors of different modules are compared (compressor/budget/allocation.py). `raw`: as they
    # are; `relative`: relative to each module's ‖W X‖²; `loss`: weighted by the mean squared LM-loss gradient of
    # the module's outputs (a Fisher / Gauss-Newton estimate of the loss increase; one extra backward pass).
    # None: the method's default, `default_weight`.
    weight: Optional[Literal["raw", "relative", "loss"]] = None
    min_rank: int = Field(1, gt=0, description="`global`: floor on every module's rank")

    def weight_for(self, method: str) -> str:
        """The weight `global` uses with the method named `method`: the recipe's, else `default_weight`."""
        return self.weight if self.weight is not None else self.default_weight(registry.get(method))

    @staticmethod
    def default_weight(method: registry.Method) -> str:
        """`loss` where the method's errors are output errors (svd-llm's spectrum, a byte budget's candidates),
        else `relative`. Never `raw`: raw output errors are on different scales at different depths (the residual
        stream grows) and say nothing of their effect on the loss (SmolLM2, svd-llm-40: perplexity 1331 against
        151.8 uniform; docs/methods.md has the figures)."""
        return "loss" if method.choices is not None or method.spectrum_units == "output" else "relative"


class Recipe(Strict):
    version: Literal[1]
    name: str
    description: str = ""
    method: str
    options: dict[str, Any] = {}
    targets: list[str] = ["*"]
    ignore: list[str] = []

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value  # `--set targets='*q_proj'`
    calibration: Calibration = Calibration()
    sequential: Sequential = Sequential()
    # How ranks are chosen for factorising methods: the same kept fraction everywhere (`uniform`), the rank
    # keeping a fraction of each matrix's whitened energy (`energy`), or one budget for all targets (`global`).
    allocation: Literal["uniform", "energy", "global"] = "uniform"
    allocation_options: Allocation = Allocation()
    refine: Refinement = Refinement()

    def method_options(self) -> BaseModel:
        """The method's validated options (a frozen pydantic model)."""
        return registry.get(self.method).Options(**self.options)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> "Recipe":
        """This recipe with more `--set` assignments applied, validated as `load_recipe` validates them (the
        YAML is not read again)."""
        return _build(copy.deepcopy(self.model_dump(mode="json")), overrides, f"recipe '{self.name}'")

    def with_defaults(self) -> "Recipe":
        """The same recipe with every method option written out (`lrc recipes show`): each default the method
        would use, except unset alternatives (`rank` next to `param_ratio`) and options the recipe's choices make
        invalid (GPTQ-only options under an RTN base). Compresses exactly like the original."""
        options_cls = registry.get(self.method).Options
        current = self.method_options()
        resolved = current.model_dump(mode="json")
        alternatives = {k for group in getattr(options_cls, "exclusive_options", ()) for k in group}
        filled = dict(self.options)
        for key, value in resolved.items():
            if key in filled or (value is None and key in alternatives):
                continue
            try:
                if options_cls(**{**filled, key: value}).model_dump(mode="json") == resolved:
                    filled[key] = value
            except ValidationError:
                pass  # not settable next to the recipe's own choices
        ordered = {k: filled[k] for k in resolved if k in filled}
        weight = self.allocation_options.weight_for(self.method)  # the default, written out
        return self.model_copy(update={"options": ordered,
                                       "allocation_options": self.allocation_options.model_copy(update={"weight": weight})})


def builtin_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key '{loc}'"
    return f"{where}: invalid value for '{loc}': {first['msg']}"


def _read(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        source = str(path)
    else:
        path = recipes_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown recipe '{name_or_path}'; built-in recipes: {', '.join(builtin_names())}")
        source = f"recipe '{name_or_path}'"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read {source}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe must be a YAML mapping")
    return data, source


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `key=value` to raw recipe data (before validation, so the schema judges the result)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set expects key=value, got '{assignment}'")
    value = _parse_value(raw)
    parts = key.split(".")
    if len(parts) == 1 and key not in Recipe.model_fields:
        # A bare name is one of the method's own options (rank, param_ratio, bits, group_size, ...).
        method = data.get("method")
        try:
            fields = registry.get(method).Options.model_fields if isinstance(method, str) else {}
        except KeyError:
            fields = {}
        if key not in fields:
            known = sorted(set(Recipe.model_fields) | set(fields))
            raise UserError(f"--set {key}: unknown key; use one of {', '.join(known)} or a dotted path")
        parts = ["options", key]
        # Setting one of mutually exclusive options (rank vs param_ratio) replaces the recipe's other one.
        options_cls = registry.get(method).Options
        for group in getattr(options_cls, "exclusive_options", ()):
            if key in group and isinstance(data.get("options"), dict):
                for other in group:
                    if other != key:
                        data["options"].pop(other, None)
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe by built-in name or YAML path, with `--set` overrides applied before validation."""
    data, source = _read(name_or_path)
    return _build(data, overrides, source)


def as_recipe(recipe, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """`recipe` itself when it is a Recipe (with `overrides` applied), else loaded by name or path: the one place
    the Python API turns what a caller passed into a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe.with_overrides(overrides) if overrides else recipe
    return load_recipe(recipe, overrides)


def _build(data: dict, overrides, source: str) -> Recipe:
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        recipe = Recipe(**data)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, source)) from None
    except TypeError as err:
        raise UserError(f"{source}: {err}") from None
    try:
        recipe.method_options()
    except KeyError as err:
        raise UserError(f"{source}: {err.args[0]}") from None
    except ValidationError as err:
        msg = _format_validation_error(err, source).replace("key '", "key 'options.").replace("for '", "for 'options.")
        raise UserError(msg) from None
    return recipe


SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
              "gib": 2**30, "tib": 2**40}


def parse_target_size(text: str) -> tuple[str, float | int]:
    """'0.4' -> ("fraction", 0.4); '4.5GB' / '800 MiB' / '123456789' (bytes) -> ("bytes", n). Both bound the whole
    checkpoint's weights: a fraction of the dense checkpoint's bytes, known once the model is loaded."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in SIZE_UNITS and match.group(2) != "":
        raise UserError(f"--target-size {text!r}: give a fraction such as 0.4 or a size such as 4.5GB / 800MiB")
    number, unit = float(match.group(1)), match.group(2)
    if not unit and 0 < number < 1:
        return "fraction", number
    if not unit and number.is_integer() and number >= 1:
        return "bytes", int(number)
    if unit and number > 0:
        return "bytes", int(number * SIZE_UNITS[unit])
    raise UserError(f"--target-size {text!r}: a fraction must lie strictly between 0 and 1; a size needs a unit "
                    "(4.5GB, 800MiB) or a whole number of bytes")
