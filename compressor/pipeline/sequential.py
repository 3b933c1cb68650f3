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

import copy
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from compressor.pipeline import distributed
from compressor.pipeline.stats import StatsCollector
from compressor.pipeline.targets import find_decoder_layers, layers_detached


class _Captured(Exception):
    """Raised by the last layer's catcher to stop the forward pass once every layer's arguments are recorded."""


class _Catcher(nn.Module):
    """Stands in for decoder layer `index` during capture: records the call and passes the hidden states through
    unchanged (nothing is computed), so the model's own loop goes on to build the next layer's arguments."""

    def __init__(self, layer: nn.Module, index: int, last: bool, record: list):
        super().__init__()
        self.layer, self.index, self.last, self.record = layer, index, last, record

    def forward(self, *args, **kwargs):
        call = (args, kwargs)
        # Only layer 0's hidden states are real; later layers' are placeholders (their inputs are computed).
        self.record.append(call if self.index == 0 else with_hidden(call, None))
        if self.last:
            raise _Captured
        return hidden_of(call)

    def __getattr__(self, name):
        # Some decoder loops read attributes of the layer (e.g. its attention type): answer for the layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


def move(obj, device, dtype=None, memo: dict | None = None):
    """Tensors (also inside tuples, lists and dicts) to `device` (floating ones also to `dtype`, if given);
    anything else unchanged. `memo`: {id: moved tensor} shared across calls, so a tensor met again (the same
    mask or rotary table in every layer's arguments) is moved once and stays one tensor."""
    if isinstance(obj, torch.Tensor):
        if memo is not None and id(obj) in memo:
            return memo[id(obj)][1]
        moved = obj.to(device=device, dtype=dtype if dtype is not None and obj.is_floating_point() else None)
        if memo is not None:
            memo[id(obj)] = (obj, moved)  # the source is kept alive so that its id cannot be reused
        return moved
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device, dtype, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device, dtype, memo) for k, v in obj.items()}
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


class LayerCalls:
    """The arguments the model itself passes each decoder layer, per calibration batch.

    Layers need not get the same arguments: models mixing sliding-window and full attention (Gemma 2/3, Qwen2/3
    with sliding layers, gpt-oss) pass each layer the mask of its own type. So the capture records every layer's
    call, and the runner gives layer i its own arguments with the hidden states the previous layer produced."""

    def __init__(self, per_layer: list[list[tuple]]):
        self.per_layer = per_layer

    def first(self) -> list[tuple]:
        """Layer 0's calls, with the real hidden states."""
        return self.per_layer[0]

    def onto(self, index: int, outputs: list[tuple]) -> list[tuple]:
        """Layer `index`'s calls carrying the hidden states of `outputs` (calls of layer index-1 with its
        outputs as hidden states); past the last layer, `outputs` as they are."""
        if index >= len(self.per_layer):
            return outputs
        return [with_hidden(call, hidden_of(out)) for call, out in zip(self.per_layer[index], outputs)]


@torch.no_grad()
def capture_layer_calls(model, layers: nn.ModuleList, batches: torch.Tensor, *, device, offload,
                        batch_size: int) -> LayerCalls:
    """Run the model's own forward for each calibration batch with every decoder layer replaced by a catcher
    (no layer computes); return the arguments each layer received."""
    records: list[list] = [[] for _ in layers]
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(layer, i, i == len(originals) - 1, records[i])
    try:
        for start in range(0, batches.shape[0], batch_size):
            chunk = batches[start : start + batch_size].to(device)
            try:
                model(input_ids=chunk, use_cache=False)
            except _Captured:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if any(len(r) != len(records[0]) for r in records):
        raise RuntimeError("the model's forward did not call every decoder layer once per batch; "
                           "this architecture's layer loop is not supported")
    memo: dict = {}
    return LayerCalls([[move(call, offload, memo=memo) for call in r] for r in records])


def capture_layer_inputs(model, layers: nn.ModuleList, batches: torch.Tensor, *, device, offload, batch_size: int):
    """Layer 0's calls only: [(args, kwargs)] per batch (see capture_layer_calls for every layer's)."""
    return capture_layer_calls(model, layers, batches, device=device, offload=offload, batch_size=batch_size).first()


def run_layer(layer, calls, device, offload) -> list:
    """Run `layer` on each recorded call; return the calls for the next layer (same kwargs, new hidden states)."""
    outs = []
    with exact_paths(layer):
        for args, kwargs in calls:
            out = move(layer_output(layer(*move(args, device), **move(kwargs, device))), offload)
            outs.append(with_hidden((args, kwargs), out))
    return outs


@contextmanager
def exact_paths(layer: nn.Module):
    """Inside the block the compressed modules of `layer` take their exact reference paths (dequantise, densify
    S), not the packed kernels or inference copies: what later layers are calibrated on must not depend on the
    machine's kernels, and compression builds no inference copy. Each module's choice is restored on exit."""
    switched = [m for m in layer.modules() if getattr(m, "use_kernel", False)]
    for module in switched:
        module.use_kernel = False
    try:
        yield
    finally:
        for module in switched:
            module.use_kernel = True


class LayerSource:
    """Where decoder layers wait between uses, and how one comes to the compute device and goes back: every walk
    over the layers (calibration, the Fisher pass, the planning pass) moves them through one of these.

    In memory the layers wait on `homes` (one device, or one per layer). With `layer_io` (compressor/pipeline/streaming.py)
    they wait on disk: a pass that writes (the compression pass) gets each with `load` and hands it to `done`, which
    writes its output shard; a pass that only reads (`writes=False`) uses `read` and `release`."""

    def __init__(self, layers: nn.ModuleList, device, homes, layer_io=None, writes: bool = True):
        self.layers, self.device, self.io, self.writes = layers, device, layer_io, writes
        self.homes = list(homes) if isinstance(homes, (list, tuple)) else [homes] * len(layers)

    def enter(self, index: int) -> nn.Module:
        layer = self.layers[index]
        if self.io is not None:
            (self.io.load if self.writes else self.io.read)(index, layer)
        return layer.to(self.device)

    def leave(self, index: int) -> None:
        layer = self.layers[index]
        layer.to(self.homes[index])
        if self.io is not None:
            (self.io.done if self.writes else self.io.release)(index, layer)

    def send_home(self) -> None:
        """In memory: every layer to its home (on disk they already are)."""
        if self.io is None:
            for layer, home in zip(self.layers, self.homes):
                layer.to(home)


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
    read_only: bool = False,
    granularity: str = "layer",
    skip_first: int = 0,
    refine: Callable | None = None,
    refine_target: str = "compressed",
    start: int = 0,
    start_hidden: tuple[list, list | None] | None = None,
    on_layer_done: Callable[[int, nn.Module, list, list | None], None] | None = None,
) -> None:
    """`layer_io` (see compressor/pipeline/streaming.py): an object with `load(index, layer)`, called before a layer is
    used, and `done(index, layer)`, called once the runner no longer needs it — for weights that live on disk
    until needed (the decoder layers are then on the meta device until loaded). `read_only`: a pass that writes
    nothing (`read`/`release` instead, see LayerSource).

    `granularity="group"`: the targets of a layer are compressed group by group (the linears sharing an input,
    in the order the layer calls them), each group's statistics collected with the earlier groups already
    compressed; `on_layer` is then called once per group with a collector over that group only.
    `skip_first`: positions per window left out of the statistics (attention sinks).
    `refine(index, layer, calls, targets, device, offload) -> outputs`: called once a layer's targets are all
    compressed, with the layer's calibration inputs and the outputs it should reproduce — the dense layer's on
    the same inputs (`refine_target="compressed"`) or the dense model's own (`"dense"`: a second, dense stream);
    it returns the compressed layer's outputs for `calls`, the next layer's inputs.
    `start`, `start_hidden` = (hidden states, dense hidden states or None) per batch: resume at layer `start`
    with the activations an earlier run had there (layers before it are neither loaded nor run).
    `on_layer_done(index, layer, hidden, dense_hidden)`: called once layer `index` is finished (and handed to
    `layer_io.done`), with the activations layer index+1 will get — what a journal keeps to resume from."""
    path, layers = find_decoder_layers(model)
    was_training = model.training
    model.eval()
    # Everything but the decoder layers (embeddings, rotary tables, final norm) goes to the device now.
    move_all_but_layers(model, device)
    source = LayerSource(layers, device, offload, layer_io, writes=not read_only)
    source.send_home()

    # Under torchrun each process calibrates and propagates its share of the windows (compressor/pipeline/distributed.py).
    distributed.set_chunk(batch_size)
    arguments = capture_layer_calls(model, layers, distributed.shard(batches), device=device, offload=offload,
                                    batch_size=batch_size)
    calls = arguments.first()
    # The dense model's own activations, kept beside the compressed ones only when something asks for them.
    dense_wanted = "cross" in needs or (refine is not None and refine_target == "dense")
    dense_calls = list(calls) if dense_wanted and propagate == "compressed" else None
    if start:
        hidden, dense_hidden = start_hidden
        if (dense_hidden is None) != (dense_calls is None) or len(hidden) != len(calls):
            raise ValueError("the activations to resume from do not fit this run's streams")
        carried = [((h,), {}) for h in hidden]
        calls = arguments.onto(start, carried)
        if dense_calls is not None:
            dense_calls = arguments.onto(start, [((h,), {}) for h in dense_hidden])
    for index, layer in enumerate(layers):
        if index < start:
            if progress is not None:
                progress(index)
            continue
        source.enter(index)
        targets = layer_targets[index]
        # Group-sequential "cross" needs the dense layer's inputs of later groups after earlier ones are swapped.
        dense_copy = _dense_twin(layer, targets) if granularity == "group" and targets and dense_calls is not None \
            and "cross" in needs else None
        collector = StatsCollector(targets, needs, skip_first=skip_first)
        try:
            outs, dense_outs = _calibrate(layer, calls, dense_calls, collector, targets, device, offload)
        finally:
            collector.remove()
        distributed.all_reduce_stats(collector.stats)  # sums over every process's windows
        if targets:
            groups = _groups_in_call_order(collector, targets) if granularity == "group" else [list(targets)]
            for g, names in enumerate(groups):
                if g > 0:  # the earlier groups are compressed now: calibrate this one on what they produce
                    collector = StatsCollector({n: targets[n] for n in names}, needs, skip_first=skip_first)
                    try:
                        twin = None if dense_copy is None else (dense_copy[0], {n: dense_copy[1][n] for n in names})
                        _calibrate(layer, calls, dense_calls if twin else None, collector, targets, device, offload,
                                   dense_twin=twin)
                    finally:
                        collector.remove()
                    distributed.all_reduce_stats(collector.stats)
                on_layer(index, collector.restricted(names) if len(groups) > 1 else collector)
                del collector  # its Grams and kept inputs are dead weight from here on
                collector = None
        del dense_copy
        refined = None
        if refine is not None and targets:
            wanted = dense_outs if refine_target == "dense" and dense_calls is not None else outs
            with exact_paths(layer):
                outputs = refine(index, layer, calls, [hidden_of(c) for c in wanted], device, offload)
            refined = [with_hidden(call, y) for call, y in zip(calls, outputs)]
        if propagate == "compressed" and targets:
            outs = refined if refined is not None else run_layer(layer, calls, device, offload)
        calls = arguments.onto(index + 1, outs)
        if dense_calls is not None:
            dense_calls = arguments.onto(index + 1, dense_outs)
        source.leave(index)
        if on_layer_done is not None:
            on_layer_done(index, layer, [hidden_of(c) for c in calls],
                          None if dense_calls is None else [hidden_of(c) for c in dense_calls])
        if progress is not None:
            progress(index)
    # The embeddings and head follow the layers back: one place for the whole model.
    move_all_but_layers(model, offload)
    model.train(was_training)


def _calibrate(layer, calls, dense_calls, collector: StatsCollector, targets, device, offload, dense_twin=None):
    """Run every calibration batch through `layer` with `collector`'s hooks on; return (outputs, dense outputs).

    With `dense_calls`, each batch first runs on the dense stream — through `layer` itself while it is still
    dense (hooks paused; that also yields the dense stream's next inputs), or through `dense_twin` (a dense copy
    and its targets by name) once parts of `layer` are compressed — recording each target's dense input, which
    the collector pairs with the compressed input ("cross")."""
    outs, dense_outs = [], []
    for b, call in enumerate(calls):
        reference = None
        if dense_calls is not None:
            twin, twin_targets = dense_twin if dense_twin is not None else (layer, targets)
            collector.paused = True
            with _recorded_inputs(twin_targets) as reference:
                dense_outs.extend(run_layer(twin, [dense_calls[b]], device, offload))
            collector.paused = False
            if "cross" not in collector.needs:
                reference = None
        collector.start_batch(reference)
        outs.extend(run_layer(layer, [call], device, offload))
        del reference
    return outs, dense_outs


def _groups_in_call_order(collector: StatsCollector, targets: dict) -> list[list[str]]:
    """The targets grouped by shared input, in the order the layer first called them (the module graph, not
    names); targets never called form a last group, so that the caller reports them."""
    groups = [[n for n in targets if collector.owner.get(n) == owner] for owner in collector.stats]
    uncalled = [n for n in targets if n not in collector.owner]
    return groups + ([uncalled] if uncalled else [])


def _dense_twin(layer: nn.Module, targets: dict) -> tuple[nn.Module, dict]:
    """A dense copy of `layer` and its targets by the same full names (one more layer of memory)."""
    local = {id(m): n for n, m in layer.named_modules()}
    twin = copy.deepcopy(layer)
    return twin, {name: twin.get_submodule(local[id(module)]) for name, module in targets.items()}


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
    with layers_detached(model):  # parts released to the meta device (compressor/pipeline/streaming.py) stay there
        model._apply(lambda t: t if t.is_meta else t.to(device))
