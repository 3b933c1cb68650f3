"""Layer-by-layer runner: capture the first decoder layer's inputs once, then walk the layers.

Lifecycle for each decoder layer i (only this layer is on the compute device; activations wait on the offload
device between layers):
  1. move layer i to the device, add statistics hooks to its targets, run every calibration batch through it;
  2. remove the hooks, call `on_layer(i, collector)` (decompose + swap modules — the caller's business);
  3. the next layer's inputs are this layer's outputs: recomputed with the compressed layer
     (`propagate="compressed"`, the default: later layers see the errors of earlier ones) or the outputs of
     the uncompressed layer from step 1 (`propagate="dense"`: statistics then equal the dense model's);
  4. move layer i back to the offload device.
When the statistics include "cross" (Σ x x̂ᵀ, dense vs compressed inputs) and inputs are compressed, a second
stream of activations — the dense model's — walks beside the first: in step 1 each batch first runs through the
still-dense layer i on its dense inputs (recording every target's input x and giving the next dense inputs), then
on its compressed inputs (the collector pairs x̂ with the recorded x). Twice the activations on the offload device
and one more forward per layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from compressor.stats import StatsCollector
from compressor.targets import find_decoder_layers, layers_detached


class _Captured(Exception):
    """Raised by the catcher to stop the forward pass once the first layer's inputs are recorded."""


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.calls: list[tuple[tuple, dict]] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        raise _Captured

    def __getattr__(self, name):
        # Some decoder loops read attributes of the layer (e.g. its attention type): answer for the layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


def move(obj, device):
    """Tensors (also inside tuples, lists and dicts) to `device`; anything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def hidden_of(call) -> torch.Tensor:
    """The hidden states of a recorded decoder-layer call (args, kwargs): first positional, else the keyword."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(call, hidden):
    """The same call with other hidden states (the next layer's inputs)."""
    args, kwargs = call
    return ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})


@torch.no_grad()
def capture_layer_inputs(model, layers: nn.ModuleList, batches: torch.Tensor, *, device, offload, batch_size: int):
    """Run the model up to the first decoder layer for each calibration batch; return [(args, kwargs)]."""
    layers[0] = catcher = _Catcher(layers[0])
    try:
        for start in range(0, batches.shape[0], batch_size):
            chunk = batches[start : start + batch_size].to(device)
            try:
                model(input_ids=chunk, use_cache=False)
            except _Captured:
                pass
    finally:
        layers[0] = catcher.layer
    return [move(call, offload) for call in catcher.calls]


def _run_layer(layer, calls, device, offload) -> list:
    """Run `layer` on each recorded call; return the calls for the next layer (same kwargs, new hidden states)."""
    outs = []
    for args, kwargs in calls:
        out = move(layer_output(layer(*move(args, device), **move(kwargs, device))), offload)
        outs.append(with_hidden((args, kwargs), out))
    return outs


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    batches: torch.Tensor,
    layer_targets: list[dict[str, nn.Linear]],
    needs: frozenset,
    on_layer: Callable[[int, StatsCollector], None],
    *,
    device: torch.device | str = "cpu",
    offload: torch.device | str = "cpu",
    batch_size: int = 8,
    propagate: str = "compressed",
    progress: Callable[[int], None] | None = None,
    layer_io=None,
) -> None:
    """`layer_io` (see compressor/streaming.py): an object with `load(index, layer)`, called before a layer is
    used, and `done(index, layer)`, called once the runner no longer needs it — for weights that live on disk
    until needed (the decoder layers are then on the meta device until loaded)."""
    path, layers = find_decoder_layers(model)
    was_training = model.training
    model.eval()
    # Everything but the decoder layers (embeddings, rotary tables, final norm) goes to the device now.
    move_all_but_layers(model, device)
    if layer_io is None:
        for layer in layers:
            layer.to(offload)

    calls = capture_layer_inputs(model, layers, batches, device=device, offload=offload, batch_size=batch_size)
    # The dense model's own activations, kept beside the compressed ones only when "cross" asks for them.
    dense_calls = list(calls) if "cross" in needs and propagate == "compressed" else None
    for index, layer in enumerate(layers):
        if layer_io is not None:
            layer_io.load(index, layer)
        layer.to(device)
        collector = StatsCollector(layer_targets[index], needs)
        try:
            outs, dense_outs = [], []
            for b, call in enumerate(calls):
                reference = None
                if dense_calls is not None:
                    collector.paused = True
                    with _recorded_inputs(layer_targets[index]) as reference:
                        dense_outs.extend(_run_layer(layer, [dense_calls[b]], device, offload))
                    collector.paused = False
                collector.start_batch(reference)
                outs.extend(_run_layer(layer, [call], device, offload))
                del reference
        finally:
            collector.remove()
        if layer_targets[index]:
            on_layer(index, collector)
        del collector  # its Grams and kept inputs are dead weight from here on (hundreds of MB for 1B-sized layers)
        if propagate == "compressed" and layer_targets[index]:
            outs = _run_layer(layer, calls, device, offload)
        calls = outs
        if dense_calls is not None:
            dense_calls = dense_outs
        layer.to(offload)
        if layer_io is not None:
            layer_io.done(index, layer)
        if progress is not None:
            progress(index)
    # The embeddings and head follow the layers back: one place for the whole model.
    move_all_but_layers(model, offload)
    model.train(was_training)


@contextmanager
def _recorded_inputs(modules: dict[str, nn.Module]):
    """Inside the block, {name: the input tensor of its latest call} for `modules` (hooks removed on exit)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        return lambda module, args, output: seen.__setitem__(name, args[0].detach())

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def move_all_but_layers(model: nn.Module, device) -> None:
    with layers_detached(model):  # parts released to the meta device (compressor/streaming.py) stay there
        model._apply(lambda t: t if t.is_meta else t.to(device))
