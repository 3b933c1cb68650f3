"""PNG plots of a report.json: rank and relative errors per module, parameters per decoder layer, perplexity.

    from compressor.report.plots import write_plots
    write_plots(json.load(open("out/report.json")), Path("out/plots"))  # -> [out/plots/rank.png, ...]

Headless: figures are `matplotlib.figure.Figure` objects drawn by the Agg canvas, never pyplot, so there is no
global figure state and no display is needed. Many modules stay readable because the x-axis is the decoder layer
and each module kind (q_proj, up_proj, ...) is one line, instead of one tick label per module.
"""

from __future__ import annotations

import re
from pathlib import Path

# file name -> alt text used by report.md; the order is the order of the report.
PLOTS = {
    "rank.png": "Rank per module",
    "error.png": "Relative weight and output error per module",
    "params.png": "Parameters and bytes per decoder layer, before and after",
    "perplexity.png": "Perplexity before and after",
}
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(name: str) -> int | None:
    """Decoder layer index from a module name (`model.layers.3.mlp.up_proj` -> 3); None outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def kind_of(name: str) -> str:
    """Module kind within a layer: the name with the layer prefix removed (`self_attn.q_proj`, `mlp.up_proj`)."""
    match = _LAYER.search(name)
    return name[match.end():] if match else name


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _by_kind(modules, value) -> dict[str, tuple[list[int], list[float]]]:
    """{kind: (layers, values)} for modules inside decoder layers whose `value(m)` is not None."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for m in modules:
        layer, v = layer_of(m["name"]), value(m)
        if layer is None or v is None:
            continue
        xs, ys = series.setdefault(kind_of(m["name"]), ([], []))
        xs.append(layer)
        ys.append(v)
    return series


def _outside(modules, value) -> list[tuple[str, float]]:
    return [(m["name"], value(m)) for m in modules if layer_of(m["name"]) is None and value(m) is not None]


def _line_plot(ax, modules, value, ylabel: str, title: str, log: bool = False) -> bool:
    series = _by_kind(modules, value)
    if not series and not _outside(modules, value):
        return False
    markers = "osD^v<>ph*"
    for i, (kind, (xs, ys)) in enumerate(sorted(series.items())):
        ax.plot(xs, ys, marker=markers[i % len(markers)], markersize=4, linewidth=1.2, label=kind)
    for name, v in _outside(modules, value):  # lm_head and friends: a horizontal reference line
        ax.axhline(v, linestyle="--", linewidth=1, color="grey", label=name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    layers = sorted({x for xs, _ in series.values() for x in xs})
    if layers and len(layers) <= 16:
        ax.set_xticks(layers)
    else:  # deep models: integer ticks at a readable spacing instead of one label per layer
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.grid(True, alpha=0.3)
    # Outside the axes, right: never on top of the data however many kinds there are.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return True


def _rank(m):
    spec = m.get("spec") or {}
    return spec.get("rank") if m.get("compressed") and spec.get("rank") else None


def rank_title(modules) -> str:
    ranks = {_rank(m) for m in modules} - {None}
    if len(ranks) == 1:  # a fixed-rank recipe: the flat line is the message, say it (params.png shows the cost)
        return f"Rank per module: {ranks.pop()} for every compressed module (fixed by the recipe)"
    return "Rank per module (compressed modules)"


def plot_rank(report: dict, path: Path) -> bool:
    fig = _figure(9, 4.2)
    if not _line_plot(fig.add_subplot(), report["modules"], _rank, "rank", rank_title(report["modules"])):
        return False
    fig.savefig(path)
    return True


def plot_errors(report: dict, path: Path) -> bool:
    fig = _figure(9, 7)
    top, bottom = fig.subplots(2, 1, sharex=True)
    weight = lambda m: m.get("rel_weight_error") if m.get("compressed") else None  # noqa: E731
    output = lambda m: m.get("rel_output_error") if m.get("compressed") else None  # noqa: E731
    drew = _line_plot(top, report["modules"], weight, "‖W − Ŵ‖ / ‖W‖", "Relative weight error")
    drew_out = _line_plot(bottom, report["modules"], output, "‖(W − Ŵ)X‖ / ‖WX‖",
                          "Relative output error on calibration inputs")
    if not drew_out:
        bottom.set_axis_off()
        bottom.text(0.5, 0.5, "no output errors in this report", ha="center", va="center")
    if not (drew or drew_out):
        return False
    fig.savefig(path)
    return True


def _per_layer(modules, before: str, after: str) -> dict[str, list[int]]:
    """{decoder layer (or module name outside the layers): [sum of `before`, sum of `after`]} over the modules."""
    layers: dict[str, list[int]] = {}
    for m in modules:
        if m.get(before) is None or m.get(after) is None:
            continue
        layer = layer_of(m["name"])
        key = str(layer) if layer is not None else m["name"].rsplit(".", 1)[-1]
        sums = layers.setdefault(key, [0, 0])
        sums[0] += m[before]
        sums[1] += m[after]
    return layers


def _before_after_bars(ax, layers: dict[str, list[int]], scale: float, ylabel: str, title: str) -> None:
    keys = sorted(layers, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    xs = range(len(keys))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [layers[k][0] / scale for k in keys], width, label="before")
    ax.bar([x + width / 2 for x in xs], [layers[k][1] / scale for k in keys], width, label="after")
    step = max(1, len(keys) // 32)  # at most ~32 tick labels, whatever the depth
    ax.set_xticks(list(xs)[::step], keys[::step], rotation=0 if len(keys) <= 32 else 90)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    # The taller of before and after sets the scale: "after" grows past "before" when a method adds parameters
    # (EoRA's residual on top of a quantized base), and must not be cut off.
    ax.set_ylim(0, max(max(v) for v in layers.values()) / scale * 1.05)
    # Outside the axes, right: never on top of a bar.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _ratio(after, before) -> str:
    return f"{after / before:.3f}" if before else "—"


def plot_params(report: dict, path: Path) -> bool:
    fig = params_figure(report)
    if fig is None:
        return False
    fig.savefig(path)
    return True


def params_figure(report: dict):
    """Parameters and bytes of the targets per decoder layer, before and after (None without modules). Both: a
    4-bit base plus a rank-64 residual has more parameters than the dense layer and a third of its bytes."""
    params = _per_layer(report["modules"], "params_before", "params_after")
    nbytes = _per_layer(report["modules"], "bytes_before", "bytes_after")
    if not params:
        return None
    fig = _figure(max(6, min(16, 0.35 * len(params) + 3)), 7 if nbytes else 4.2)
    axes = fig.subplots(2, 1, sharex=True) if nbytes else [fig.add_subplot()]
    t = report["totals"]
    _before_after_bars(axes[0], params, 1e6, "parameters (millions)",
                       f"Target parameters per layer: {t['target_params_before']:,} → {t['target_params_after']:,} "
                       f"({_ratio(t['target_params_after'], t['target_params_before'])})")
    if nbytes:
        b0 = t.get("target_bytes_before", sum(v[0] for v in nbytes.values()))
        b1 = t.get("target_bytes_after", sum(v[1] for v in nbytes.values()))
        _before_after_bars(axes[1], nbytes, 2**20, "bytes (MiB)",
                           f"Target bytes per layer: {b0:,} → {b1:,} ({_ratio(b1, b0)})")
    axes[-1].set_xlabel("decoder layer")
    return fig


def plot_perplexity(report: dict, path: Path) -> bool:
    ppl = report.get("perplexity") or {}
    bars = [(label, ppl.get(key)) for label, key in (("before", "before"), ("after", "after"))
            if ppl.get(key) is not None]
    if not bars:
        return False
    fig = _figure(4.5, 4)
    ax = fig.add_subplot()
    drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars], color=["tab:blue", "tab:orange"][: len(bars)],
                   width=0.5)
    ax.bar_label(drawn, fmt="%.3f")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"Perplexity: {report.get('recipe')}", fontsize=10)
    ax.set_ylim(0, max(v for _, v in bars) * 1.15)
    ax.text(0.5, -0.16, f"{ppl.get('data')}, seqlen {ppl.get('seqlen')}, {ppl.get('windows')} windows",
            transform=ax.transAxes, ha="center", fontsize=7, wrap=True)
    fig.savefig(path)
    return True


_WRITERS = {"rank.png": plot_rank, "error.png": plot_errors, "params.png": plot_params,
            "perplexity.png": plot_perplexity}


def write_plots(report: dict, folder: Path) -> list[Path]:
    """Write every plot the report has data for into `folder` (created); returns the written PNGs in report
    order. A plot without data (no perplexity, no ranks for a pure RTN recipe) is not written, and a stale copy
    of it from an earlier run is removed so report.md never embeds an image of another run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, writer in _WRITERS.items():
        path = folder / name
        if writer(report, path):
            written.append(path)
        elif path.exists():
            path.unlink()
    return written


def render_report(out) -> list[Path]:
    """`lrc report OUT`: rewrite OUT/plots/*.png and OUT/report.md from OUT/report.json; returns the PNGs.
    report.md is replaced atomically (written next to it, then renamed)."""
    import json
    import os

    from compressor.errors import UserError
    from compressor.report.summary import render_markdown

    out = Path(out)
    source = out / "report.json"
    if not source.is_file():
        raise UserError(f"no report.json in {out}" if out.is_dir() else f"not a directory: {out}")
    try:
        report = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {source}: {e}") from None
    if not isinstance(report, dict) or not {"totals", "modules", "model", "recipe"} <= set(report):
        raise UserError(f"{source} is not an lrc report (needs totals, modules, model, recipe)")
    try:
        written = write_plots(report, out / "plots")
        markdown = render_markdown(report, [p.relative_to(out).as_posix() for p in written])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source} is not a complete lrc report: {type(e).__name__}: {e}") from None
    tmp = out / ".report.md.tmp"
    tmp.write_text(markdown, encoding="utf-8")
    os.replace(tmp, out / "report.md")
    return written
