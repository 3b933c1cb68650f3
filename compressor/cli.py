"""`lrc` command line: a thin click layer over compressor.api.

User errors print one line (`error: ...`) on stderr and exit with code 2; nothing half-written stays on disk.
"""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from compressor.errors import UserError

out = Console()
err = Console(stderr=True)


class _App(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            hint = getattr(exc, "lrc_hint", None)  # a journaled run says what it kept (compressor/pipeline/journal.py)
            click.echo(f"interrupted; {hint}" if hint else "interrupted; nothing was written", err=True)
            sys.exit(130)


@click.group(cls=_App, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lrc")
def app():
    """lrc: compress LLMs after training with low-rank decompositions, and report honestly what it cost."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lrc draws its own progress; transformers' bars would interleave


def _device_options(f):
    f = click.option("--device", default="cpu", show_default=True, help="compute device (cpu, cuda, cuda:1)")(f)
    f = click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="compute dtype; auto = float32 on CPU, the checkpoint's dtype on GPU")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="allow the model's own code from the hub")(f)
    return f


@app.command()
@click.argument("model")
@click.option("--recipe", "-r", default=None,
              help="built-in recipe name (lrc recipes list) or a YAML path; with --target-size alone: auto")
@click.option("--target-size", default=None, metavar="X",
              help="the whole checkpoint's weights in at most a size (4.5GB, 800MiB) or a fraction of the dense "
                   "checkpoint's (0.35); the targets' own share is --set size_ratio=")
@click.option("--output", "-o", required=True, type=click.Path(), help="output directory (must not exist)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a recipe field: bare method option (param_ratio=0.7) or dotted path")
@click.option("--calib", default=None, help="calibration text: .txt/.jsonl/.parquet file or folder, or hub dataset")
@click.option("--nsamples", type=int, default=None, help="calibration windows (recipe default otherwise)")
@click.option("--seqlen", type=int, default=None, help="calibration window length in tokens")
@click.option("--seed", type=int, default=None, help="calibration sampling seed")
@click.option("--dense-inputs", is_flag=True,
              help="calibrate each layer on the uncompressed model's activations instead of the compressed ones")
@click.option("--eval", "evaluate_ppl", is_flag=True, help="measure perplexity before and after")
@click.option("--eval-data", default=None, help="evaluation text (default: the bundled test split); implies --eval")
@click.option("--eval-seqlen", type=int, default=None, help="evaluation window (default 2048, capped at the model's context)")
@click.option("--eval-max-windows", type=int, default=None, help="evaluate on the first N windows only")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option("--resume", is_flag=True,
              help="finish the run an interruption (crash, kill, Ctrl-C) left beside OUTPUT, from its last finished "
                   "decoder layer; the result is identical to an uninterrupted run's")
@click.option("--no-plots", is_flag=True, help="do not draw the report's PNG plots (saves a few seconds)")
@click.option("--low-memory", is_flag=True,
              help="stream weights from the checkpoint's safetensors one decoder layer at a time and write output "
                   "shards as layers finish: for models larger than RAM")
@click.option("--collective-timeout", type=float, default=600.0, show_default=True, metavar="SECONDS",
              help="under torchrun: how long a process waits for the others before the run ends on every process")
@_device_options
def compress(model, recipe, target_size, output, overrides, calib, nsamples, seqlen, seed, dense_inputs, evaluate_ppl,
             eval_data, eval_seqlen, eval_max_windows, overwrite, resume, no_plots, low_memory, collective_timeout,
             device, dtype, trust_remote_code):
    """Compress MODEL (local directory or hub id) with a recipe into OUTPUT.

    Several processes (`torchrun --nproc-per-node N -m compressor compress ...`) share the calibration windows
    and the decompositions; rank 0 writes the output (docs/large-models.md)."""
    from compressor.pipeline import distributed

    with distributed.session(timeout=collective_timeout, device=device):
        _compress(model, recipe, target_size, output, overrides, calib, nsamples, seqlen, seed, dense_inputs,
                  evaluate_ppl, eval_data, eval_seqlen, eval_max_windows, overwrite, resume, no_plots, low_memory,
                  device, dtype, trust_remote_code, writer=distributed.is_writer())


def _compress(model, recipe, target_size, output, overrides, calib, nsamples, seqlen, seed, dense_inputs, evaluate_ppl,
              eval_data, eval_seqlen, eval_max_windows, overwrite, resume, no_plots, low_memory, device, dtype,
              trust_remote_code, writer):
    from compressor.api import compress_checkpoint

    evaluate_ppl = evaluate_ppl or eval_data is not None  # asking for evaluation data means evaluating
    extra = [f"calibration.{k}={v}" for k, v in (("nsamples", nsamples), ("seqlen", seqlen), ("seed", seed))
             if v is not None]
    if dense_inputs:
        extra.append("sequential.inputs=dense")
    report = compress_checkpoint(
        model, recipe, output, overrides=tuple(overrides) + tuple(extra), target_size=target_size, calib=calib,
        evaluate_ppl=evaluate_ppl, eval_data=eval_data, eval_seqlen=eval_seqlen, eval_max_windows=eval_max_windows,
        device=device, dtype=dtype, overwrite=overwrite, trust_remote_code=trust_remote_code, with_plots=not no_plots,
        low_memory=low_memory, resume=resume, show_progress=writer,
    )
    if not writer:  # another process of a torchrun: rank 0 writes and reports
        return
    out.print(_summary_table(report))
    out.print(f"wrote {output}/ (report.md, report.json, recipe.yaml, weights)")


def _summary_table(report: dict) -> Table:
    t = report["totals"]
    table = Table(title=f"{report['model']} · {report['recipe']}")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("parameters", f"{t['model_params_before']:,}", f"{t['model_params_after']:,}",
                  f"{t['model_params_after'] / t['model_params_before']:.3f}")
    table.add_row("weight bytes", f"{t['weight_bytes_before']:,}", f"{t['weight_bytes_after']:,}",
                  f"{t['weight_bytes_after'] / t['weight_bytes_before']:.3f}")
    if t.get("target_bytes_before"):  # the targeted linears only: what size_ratio / --target-size budget
        table.add_row("target bytes", f"{t['target_bytes_before']:,}", f"{t['target_bytes_after']:,}",
                      f"{t['size_ratio']:.3f}")
    ppl = report.get("perplexity")
    if ppl and ppl["before"] and ppl["after"]:
        table.add_row("perplexity", f"{ppl['before']:.3f}", f"{ppl['after']:.3f}", f"{ppl['after'] / ppl['before']:.3f}")
    table.caption = (f"{t['compressed']} of {t['targets']} targets compressed, {t['skipped']} kept dense; "
                     f"{t['clamped_eigenvalues']} clamped eigenvalues; "
                     f"{report['timings_seconds'].get('compress_total', 0):.1f}s compressing")
    return table


@app.command("eval")
@click.argument("model")
@click.option("--data", default=None, help="text: file/folder or hub dataset (wikitext2, c4); default bundled test split")
@click.option("--seqlen", type=int, default=None, help="window length (default 2048, capped at the model's context)")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--max-windows", type=int, default=None, help="score only the first N windows")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@_device_options
def eval_(model, data, seqlen, batch_size, max_windows, as_json, device, dtype, trust_remote_code):
    """Perplexity of MODEL (a checkpoint, an lrc output directory or a hub id), papers' protocol."""
    from compressor.pipeline.workflow import evaluate_checkpoint

    result = evaluate_checkpoint(model, data=data, seqlen=seqlen, device=device, dtype=dtype, batch_size=batch_size,
                                 max_windows=max_windows, trust_remote_code=trust_remote_code)
    payload = {"model": model, "ppl": result.ppl, "nll": result.nll, "seqlen": result.seqlen,
               "windows": result.windows, "tokens_scored": result.tokens, "data": getattr(result, "data", None)}
    if as_json:
        click.echo(json.dumps(payload))
    else:
        out.print(f"perplexity {result.ppl:.4f}  ({payload['data']}; seqlen {result.seqlen}, "
                  f"{result.windows} windows, {result.tokens:,} scored tokens)")


@app.group()
def recipes():
    """Built-in recipes."""


@recipes.command("list")
def recipes_list():
    """List the built-in recipes."""
    from compressor.recipe import builtin_names, load_recipe

    table = Table()
    for col in ("name", "method", "options", "description"):
        table.add_column(col)
    for name in builtin_names():
        r = load_recipe(name)
        table.add_row(name, r.method, ", ".join(f"{k}={v}" for k, v in r.options.items()), r.description)
    out.print(table)


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a recipe (built-in name or path) as YAML, with defaults filled in."""
    from compressor.recipe import load_recipe

    click.echo(load_recipe(name).with_defaults().to_yaml(), nl=False)


@app.command()
@click.option("--output", "-o", default=None, type=click.Path(), help="keep the compressed models here")
@click.option("--device", default="cpu", show_default=True, help="compute device (cpu, cuda, cuda:1)")
def demo(output, device):
    """Compress the shipped demo model with svd-20, svd-llm-20, rtn-4bit and eora-4bit; print a table."""
    from compressor.demo import run_demo

    run_demo(output=output, device=device, console=out)


@app.command()
@click.argument("out", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="create the repository as private (ignored if it exists)")
@click.option("--revision", default=None, help="branch to commit to (created when missing); default main")
@click.option("--token", default=None, envvar="HF_TOKEN", show_envvar=True,
              help="hub token (default: $HF_TOKEN, else the saved login); never printed")
@click.option("--endpoint", default=None, help="hub endpoint URL (default: huggingface.co or $HF_ENDPOINT)")
@click.option("--dry-run", is_flag=True, help="print the files and the generated model card; upload nothing")
def upload(out, repo_id, private, revision, token, endpoint, dry_run):
    """Upload the lrc output directory OUT to the hub repository REPO_ID, with a generated model card."""
    from compressor.io.hub import upload as hub_upload

    plan, url = hub_upload(out, repo_id, token=token or None, private=private, revision=revision,
                           endpoint=endpoint, dry_run=dry_run)
    if dry_run:
        click.echo(plan.describe())
    else:
        click.echo(f"uploaded {len(plan.files) + 1} files to {repo_id}: {url}")


@app.command()
@click.argument("out", type=click.Path())
def report(out):
    """Re-render OUT/report.md and OUT/plots/*.png from OUT/report.json."""
    from compressor.report.plots import render_report

    written = render_report(out)
    click.echo(f"wrote {out}/report.md and {len(written)} plots in {out}/plots/")


@app.command()
@click.argument("out", type=click.Path())
@click.option("--dense", is_flag=True, help="export a plain dense checkpoint")
@click.option("--serving", is_flag=True,
              help="what a serving engine reads: quantized modules (one scheme) packed in a compressed-tensors base "
                   "in OUTPUT/base, EoRA residuals as a PEFT LoRA adapter in OUTPUT/adapter, "
                   "low-rank modules made dense (needs pip install 'lrc[export]')")
@click.option("--quantized-adapter", is_flag=True,
              help="--serving for outputs whose every module is quantized (rtn, gptq, eora)")
@click.option("--output", "-o", required=True, type=click.Path(), help="destination directory (must not exist)")
@click.option("--overwrite", is_flag=True, help="replace an existing destination checkpoint")
def export(out, dense, serving, quantized_adapter, output, overwrite):
    """Export the lrc checkpoint OUT in a standard format that loads without lrc."""
    if dense + serving + quantized_adapter != 1:
        raise UserError("pass --dense (a plain dense checkpoint), --serving (a compressed-tensors base plus a PEFT "
                        "LoRA adapter) or --quantized-adapter (--serving for all-quantized outputs), exactly one")
    from compressor.io.preflight import check_output, export_bytes

    # Before loading anything: writable, allowed (--overwrite), room for it. The adapter export has its own rules
    # for an existing destination (a previous export may be replaced) and checks them itself, also first.
    check_output(output, overwrite=overwrite, expected_bytes=export_bytes(out, dense=dense), destination_rules=dense,
                 source=out)
    if dense:
        from compressor.io.export import export_dense

        path, count = export_dense(out, output, overwrite=overwrite)
        click.echo(f"wrote {path}/ ({count} compressed modules made dense; loads without lrc)")
        return
    from compressor.io.export_serving import export_serving

    done = export_serving(out, output, overwrite=overwrite, quantized_only=quantized_adapter)
    base = f"wrote {done.base}/ ({done.quantized} quantized modules, compressed-tensors pack-quantized {done.scheme})"
    if done.densified:
        was, now = done.densified_bytes
        click.echo(f"{done.densified} low-rank modules made dense (no serving format holds the factors): their "
                   f"weights grow from {was:,} to {now:,} bytes")
    if done.adapter is None:
        click.echo(f"{base}; no EoRA residual in {out}, so no adapter: the base is the whole model")
    else:
        click.echo(f"{base} and {done.adapter}/ (PEFT LoRA, {done.residuals} EoRA residuals); loads without lrc")


def main():
    app(prog_name="lrc")


if __name__ == "__main__":
    main()
