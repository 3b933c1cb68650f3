"""Which linears a recipe touches: decoder layers found generically, then name patterns.

Patterns are shell globs (`*q_proj`, `*.mlp.*`) or `re:<regex>` (searched), matched against the full module
name (`model.layers.3.self_attn.q_proj`) and against the name inside its layer (`self_attn.q_proj`). Only
nn.Linear modules inside decoder layers are candidates, so `lm_head` and embeddings are never touched.
"""

from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager

from torch import nn

from compressor.errors import UserError


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the one whose length is config.num_hidden_layers (else the longest)."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    same_type = [(n, m) for n, m in lists if len({type(c) for c in m}) == 1]
    exact = [(n, m) for n, m in same_type if len(m) == expected]
    candidates = exact or same_type
    if not candidates:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}")
    return max(candidates, key=lambda item: len(item[1]))


@contextmanager
def layers_detached(model: nn.Module):
    """Inside the block the model has an empty decoder-layer list: whole-model operations (`.to`, state_dict,
    loading) touch only the embeddings, norms and head. Yields (path, layers)."""
    path, layers = find_decoder_layers(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, attr, nn.ModuleList())
    try:
        yield path, layers
    finally:
        setattr(parent, attr, layers)


def _matches(pattern: str, full: str, local: str) -> bool:
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return bool(regex.search(full) or regex.search(local))
    return fnmatch.fnmatchcase(full, pattern) or fnmatch.fnmatchcase(local, pattern)


def select_targets(model: nn.Module, targets: list[str], ignore: list[str]) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, the {full name: linear} the recipe compresses (layer order, module order)."""
    prefix, layers = find_decoder_layers(model)
    for pattern in [*targets, *ignore]:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise UserError(f"invalid regex in target pattern '{pattern}': {exc}") from None
    used = {p: False for p in targets}
    selected: list[dict[str, nn.Linear]] = []
    for index, layer in enumerate(layers):
        chosen = {}
        for local, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            full = f"{prefix}.{index}.{local}"
            hits = [p for p in targets if _matches(p, full, local)]
            for p in hits:
                used[p] = True
            if hits and not any(_matches(p, full, local) for p in ignore):
                chosen[full] = module
        selected.append(chosen)
    if not any(isinstance(m, nn.Linear) for layer in layers for m in layer.modules()):
        kinds = sorted({type(m).__name__ for layer in layers for m in layer.modules() if m._parameters})
        raise UserError(f"the decoder layers of this model contain no nn.Linear (they hold {', '.join(kinds)}); "
                        "lrc compresses nn.Linear projections only")
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        raise UserError(f"target pattern '{unused[0]}' matches no linear layer in the decoder layers")
    if not any(selected):
        raise UserError("the recipe's targets and ignore patterns leave no linear layer to compress")
    return selected


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
