"""report.json / report.md: what was done to every target, what it cost, and what it changed. Honest numbers:
parameters actually kept, bytes of the weights, clamps, skipped targets with the reason.

Two ratios per target and in total: `param_ratio` (parameters kept — what papers compare; a quantised weight counts
as one) and `size_ratio` (stored bytes of everything the checkpoint holds for the target — factors, codes, scales,
zero points, sparse values and positions — over the same linear stored dense in the checkpoint's dtype). The
bytes come from the tensors written (compressor.nn.modules.stored_bytes; each tensor once, a tied head being its
embedding), so they sum to the safetensors' tensor data, which `lrc compress` checks before publishing its output."""

from __future__ import annotations

import platform
import resource
import sys

import torch

import compressor


def state_bytes(model: torch.nn.Module, float_dtype: torch.dtype | None = None) -> int:
    """Bytes of the persistent weights as they are (or would be) saved, each tensor once: a tied `lm_head` is the
    embedding's tensor, listed twice by `state_dict()` but stored once (save_pretrained and the --low-memory writer
    drop it). Floating tensors counted in `float_dtype` when given (the checkpoint dtype), except the fp16 `*scales`
    of the packed formats, which keep their dtype (as compressor.nn.modules.stored_bytes counts one module)."""
    element = None if float_dtype is None else torch.empty((), dtype=float_dtype).element_size()
    state = model.state_dict(keep_vars=True)
    # A tie is a name (moving a layer to the meta device and back gives the head a Parameter of its own) or one
    # Parameter under two names; transformers declares which names are tied.
    tied = {k for k, source in (getattr(model, "all_tied_weights_keys", None) or {}).items() if source in state}
    seen, total = set(), 0
    for name, t in state.items():
        if name in tied or id(t) in seen:
            continue
        seen.add(id(t))
        size = t.element_size()
        if element is not None and t.is_floating_point() and not name.endswith("scales"):
            size = element
        total += t.numel() * size
    return total


def count_parameters(model: torch.nn.Module) -> int:
    """Logical parameters: every quantized weight counts as one (at its bit width), plus its scales and zero
    points; packed int32 words are not parameters. Low-rank factors, biases and residual paths count in full."""
    from compressor.nn.modules import QuantLinear, QuantLowRankLinear

    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.in_features * module.out_features + 2 * module.scales.numel()
        elif isinstance(module, QuantLowRankLinear):
            total += module.rank * (module.in_features + module.out_features)
            total += 2 * (module.A_scales.numel() + module.B_scales.numel())
    return total


def peak_memory() -> dict:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_peak_rss_bytes": rss_kib * (1 if sys.platform == "darwin" else 1024)}
    if torch.cuda.is_available():
        out["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def build_report(result, *, model_source: str, params_before: int, params_after: int, bytes_before: int,
                 bytes_after: int, ppl_before=None, ppl_after=None, timings=None, device="cpu") -> dict:
    modules = [m.to_dict() for m in result.modules]
    done = [m for m in result.modules if m.compressed]
    totals = {
        "targets": len(result.modules),
        "compressed": len(done),
        "skipped": len(result.modules) - len(done),
        "target_params_before": sum(m.params_before for m in result.modules),
        "target_params_after": sum(m.params_after for m in result.modules),
        "model_params_before": params_before,
        "model_params_after": params_after,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": bytes_after,
        "target_bytes_before": sum(m.bytes_before or 0 for m in result.modules),
        "target_bytes_after": sum(m.bytes_after or 0 for m in result.modules),
        "clamped_eigenvalues": sum(m.clamped_eigenvalues for m in done),
    }
    totals["param_ratio"] = totals["target_params_after"] / max(totals["target_params_before"], 1)
    totals["size_ratio"] = totals["target_bytes_after"] / max(totals["target_bytes_before"], 1)
    ppl = None
    if ppl_before is not None or ppl_after is not None:
        ref = ppl_after or ppl_before
        ppl = {
            "before": None if ppl_before is None else ppl_before.ppl,
            "after": None if ppl_after is None else ppl_after.ppl,
            "data": getattr(ref, "data", None),
            "seqlen": ref.seqlen,
            "windows": ref.windows,
            "tokens_scored": ref.tokens,
        }
    return {
        "lrc_version": compressor.__version__,
        "model": model_source,
        "recipe": result.recipe.name,
        "method": result.recipe.method,
        "options": result.recipe.method_options().model_dump(),
        "allocation": result.recipe.allocation,
        "allocation_weight": (result.recipe.allocation_options.weight_for(result.recipe.method)  # unset: the default
                              if result.recipe.allocation == "global" else None),
        "sequential_inputs": result.recipe.sequential.inputs,
        "sequential_granularity": result.recipe.sequential.granularity,
        "refinement": [r.to_dict() for r in getattr(result, "refinement", [])],
        "calibration": result.calibration,
        "device": str(device),
        "environment": {"python": platform.python_version(), "torch": torch.__version__},
        "totals": totals,
        "perplexity": ppl,
        "timings_seconds": {k: round(v, 3) for k, v in (timings or result.timings).items()},
        "peak_memory": peak_memory(),
        "modules": modules,
    }


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def data_lines(report: dict) -> list[str]:
    """The paragraphs saying which text was scored and which calibrated (report.md and the model card)."""
    lines = []
    ppl = report.get("perplexity") or {}
    if ppl.get("before") is not None or ppl.get("after") is not None:
        lines += ["", f"Perplexity: {ppl.get('data')}, seqlen {ppl.get('seqlen')}, {ppl.get('windows')} windows, "
                      f"{ppl.get('tokens_scored') or 0:,} scored tokens."]
    cal = report.get("calibration") or {}
    if cal:
        lines += ["", f"Calibration: {cal.get('source')}, {cal.get('nsamples')} × {cal.get('seqlen')} tokens, "
                      f"seed {cal.get('seed')}."]
    return lines


def _allocation_words(report: dict) -> str:
    allocation = report.get("allocation")
    if allocation in (None, "uniform"):
        return ""
    weight = report.get("allocation_weight")
    return f", allocation: {allocation}" + (f" (errors weighted {weight})" if weight else "")


def describe_spec(spec: dict | None) -> str:
    """A module's encoding in words: 'dense', 'low rank', '4-bit (g128) + rank-r residual', '8-bit factors'…"""
    if not spec:
        return "dense"
    kind = spec.get("kind")
    if kind == "quant":
        words = f"{spec['bits']}-bit (g{spec['group_size']})"
        return words + (" + low-rank residual" if spec.get("rank") else "")
    if kind == "lowrank_quant":
        return f"low rank, {spec['bits']}-bit factors"
    return {"lowrank": "low rank"}.get(kind, str(kind).replace("_", " "))


def encoding_lines(modules: list[dict]) -> list[str]:
    """Which encodings the targets got, with their bytes and mean predicted vs measured output error."""
    groups: dict[str, list[dict]] = {}
    for m in modules:
        groups.setdefault(describe_spec(m["spec"] if m["compressed"] else None), []).append(m)
    if len(groups) < 2 and not any(m.get("predicted_rel_output_error") is not None for m in modules):
        return []
    lines = ["| encoding | targets | bytes after | mean rel. output err (measured) | (predicted) |",
             "|---|---:|---:|---:|---:|"]
    mean = lambda xs: "—" if not xs else f"{sum(xs) / len(xs):.4f}"  # noqa: E731
    for name, ms in sorted(groups.items(), key=lambda kv: -sum(m.get("bytes_after") or 0 for m in kv[1])):
        measured = [m["rel_output_error"] for m in ms if m["rel_output_error"] is not None]
        predicted = [m["predicted_rel_output_error"] for m in ms if m.get("predicted_rel_output_error") is not None]
        lines.append(f"| {name} | {len(ms)} | {_fmt_bytes(sum(m.get('bytes_after') or 0 for m in ms))} | "
                     f"{mean(measured)} | {mean(predicted)} |")
    return lines + [""]


def render_markdown(report: dict, plots=()) -> str:
    """report.md. `plots`: PNG paths relative to the report's folder (e.g. `plots/rank.png`, from
    compressor.report.plots.write_plots); each is embedded as an image, in the given order; none: no images."""
    t = report["totals"]
    lines = [
        f"# lrc report — {report['model']} with `{report['recipe']}`",
        "",
        f"Method `{report['method']}`, options `{report['options']}`, layer inputs: {report['sequential_inputs']}"
        + _allocation_words(report) + ".",
        "",
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
        f"| parameters (whole model) | {t['model_params_before']:,} | {t['model_params_after']:,} | "
        f"{t['model_params_after'] / max(t['model_params_before'], 1):.3f} |",
        f"| parameters (targets): param_ratio | {t['target_params_before']:,} | {t['target_params_after']:,} | "
        f"{t['target_params_after'] / max(t['target_params_before'], 1):.3f} |",
        f"| weight bytes | {_fmt_bytes(t['weight_bytes_before'])} | {_fmt_bytes(t['weight_bytes_after'])} | "
        f"{t['weight_bytes_after'] / max(t['weight_bytes_before'], 1):.3f} |",
    ]
    if t.get("target_bytes_before"):
        lines.insert(-1, f"| bytes (targets): size_ratio | {_fmt_bytes(t['target_bytes_before'])} | "
                         f"{_fmt_bytes(t['target_bytes_after'])} | {t['size_ratio']:.3f} |")
    ppl = report.get("perplexity")
    if ppl:
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| perplexity | {fmt(ppl['before'])} | {fmt(ppl['after'])} | "
                     f"{(ppl['after'] / ppl['before']) if ppl['before'] and ppl['after'] else float('nan'):.3f} |")
    lines += data_lines(report)
    lines += [
        "",
        f"Targets: {t['targets']} ({t['compressed']} compressed, {t['skipped']} kept dense). "
        f"Gram regularisation: {t['clamped_eigenvalues']} (clamped eigenvalues with eigh whitening, damping escalations "
        "with cholesky).",
        "",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_seconds"].items()),
        "",
    ]
    lines += encoding_lines(report["modules"])
    refinement = report.get("refinement") or []
    if refinement:
        lines += ["Block refinement (relative output error² of each decoder layer on the calibration windows):", "",
                  "| layer | before | after | steps | refined params | s |", "|---:|---:|---:|---:|---:|---:|"]
        for r in refinement:
            after = f"{r['loss_after']:.5f}" + (" (reverted)" if r.get("reverted") else "")
            lines.append(f"| {r['layer']} | {r['loss_before']:.5f} | {after} | {r['steps']} | {r['parameters']:,} | "
                         f"{r['seconds']:.1f} |")
        lines.append("")
    if plots:
        from compressor.report.plots import PLOTS

        for plot in plots:
            plot = str(plot).replace("\\", "/")
            lines += [f"![{PLOTS.get(plot.rsplit('/', 1)[-1], plot)}]({plot})", ""]
    lines += [
        "| module | shape | result | params before → after | param ratio | size ratio | rel. weight err | "
        "rel. output err | clamps | s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in report["modules"]:
        spec = m["spec"] or {}
        result = ", ".join(f"{k}={v}" for k, v in spec.items()) if m["compressed"] else f"dense: {m['note']}"
        out_err = "—" if m["rel_output_error"] is None else f"{m['rel_output_error']:.4f}"
        if m.get("predicted_rel_output_error") is not None:  # rank allocation's prediction, next to the measure
            out_err += f" (pred. {m['predicted_rel_output_error']:.4f})"
        param_ratio = m["params_after"] / max(m["params_before"], 1)
        size_ratio = "—" if m.get("size_ratio") is None else f"{m['size_ratio']:.3f}"
        lines.append(
            f"| {m['name']} | {m['shape'][0]}×{m['shape'][1]} | {result} | {m['params_before']:,} → "
            f"{m['params_after']:,} | {param_ratio:.3f} | {size_ratio} | {m['rel_weight_error']:.4f} | {out_err} | "
            f"{m['clamped_eigenvalues']} | {m['seconds']:.3f} |"
        )
    return "\n".join(lines) + "\n"
