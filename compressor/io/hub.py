"""Upload an lrc output directory to the Hugging Face Hub, with a generated model card.

    from compressor.io.hub import upload
    upload("out/", "me/qwen2.5-0.5b-svd-llm-20", token=..., private=True)

What is sent: every file of the output directory (weights, config.json, tokenizer, recipe.yaml, report.json,
report.md, plots/) plus a generated README.md (model card), in ONE commit built from explicit
`CommitOperationAdd`s: the card goes up from memory, so the output directory on disk is never modified, and the
weights and the card that describes them land together or not at all. The token only travels in the
Authorization header; it is never printed, also not inside error messages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compressor.errors import UserError
from compressor.nn.hf_integration import install_line
from compressor.io.checkpoint import read_quantization_config
from compressor.report.summary import data_lines, encoding_lines

CARD_NAME = "README.md"
REQUIRED = ("config.json", "report.json", "recipe.yaml")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class UploadPlan:
    out: Path
    repo_id: str
    files: list[tuple[str, int]]  # (path in repo, size in bytes), the card excluded
    card: str
    report: dict = field(repr=False)

    def describe(self) -> str:
        """What --dry-run prints: the files with their sizes, then the generated card."""
        width = max(len(p) for p, _ in self.files + [(CARD_NAME, 0)])
        lines = [f"would upload {len(self.files) + 1} files to {self.repo_id}:"]
        lines += [f"  {p:<{width}}  {size:>12,} B" for p, size in self.files]
        lines.append(f"  {CARD_NAME:<{width}}  {len(self.card.encode()):>12,} B  (generated model card)")
        lines += ["", f"--- {CARD_NAME} (generated) ---", self.card.rstrip("\n")]
        return "\n".join(lines)


def check_output(out) -> tuple[dict, dict]:
    """(quantization_config, report) of a complete lrc output directory; UserError naming what is missing."""
    out = Path(out)
    qc = read_quantization_config(out)  # not a dir / no config.json / not lrc: its own one-line errors
    missing = [name for name in REQUIRED if not (out / name).is_file()]
    if not any(out.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise UserError(f"incomplete lrc output {out}: missing {', '.join(missing)}")
    try:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {out / 'report.json'}: {e}") from None
    if not isinstance(report, dict) or not isinstance(report.get("totals"), dict):
        raise UserError(f"{out / 'report.json'} is not an lrc report (no totals)")
    return qc, report


def collect_files(out: Path) -> list[tuple[str, int]]:
    """Files to upload: everything under `out` except hidden entries and an existing README.md (replaced)."""
    files = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or rel.as_posix() == CARD_NAME:
            continue
        files.append((rel.as_posix(), path.stat().st_size))
    return files


def plan_upload(out, repo_id: str) -> UploadPlan:
    out = Path(out)
    if not _HUB_ID.match(repo_id):
        raise UserError(f"repository id must look like NAMESPACE/NAME, got {repo_id!r}")
    qc, report = check_output(out)
    return UploadPlan(out, repo_id, collect_files(out), build_model_card(report, qc, repo_id), report)


def upload(out, repo_id: str, *, token: str | None = None, private: bool = False, revision: str | None = None,
           endpoint: str | None = None, dry_run: bool = False) -> tuple[UploadPlan, str | None]:
    """Create the repo (exist_ok) and commit the output directory plus its model card. Returns the plan and the
    commit URL (None on a dry run)."""
    plan = plan_upload(out, repo_id)
    if dry_run:
        return plan, None
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(plan.out / p)) for p, _ in plan.files]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=plan.card.encode("utf-8")))
    try:
        # Without --private, None: the hub default (public, or private where the organisation says so).
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id, operations=operations, revision=revision,
            commit_message=f"lrc: {plan.report.get('recipe')} compression of {plan.report.get('model')}",
        )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise UserError(_redact(f"upload to {repo_id} failed (HTTP {status}): {_first_line(e)}", token)) from None
    except (OSError, ValueError) as e:  # connection refused, DNS, invalid card metadata
        raise UserError(_redact(f"upload to {repo_id} failed: {type(e).__name__}: {_first_line(e)}", token)) from None
    except Exception as e:  # httpx transport errors etc.: still one line, still no token
        if type(e).__module__.split(".")[0] not in ("httpx", "httpcore", "requests", "urllib3"):
            raise
        raise UserError(_redact(f"upload to {repo_id} failed: {type(e).__name__}: {_first_line(e)}", token)) from None
    return plan, str(info.commit_url)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _redact(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message


# ---------------------------------------------------------------- model card


def _base_model_id(source: str) -> str | None:
    """The base model's hub id, when the report's model source is one (not a local path)."""
    if not source or Path(source).exists() or not _HUB_ID.match(source):
        return None
    return source


def _card_metadata(text: str) -> dict:
    if not text.startswith("---"):
        return {}
    try:
        head = text.split("---", 2)[1]
        data = yaml.safe_load(head)
    except (IndexError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def base_license(source: str) -> str | None:
    """License of the base model when it is known without the network: its local README's metadata, or the
    README in the local hub cache. None otherwise (the card then has no license field rather than a guess)."""
    readme = None
    if source and Path(source, CARD_NAME).is_file():
        readme = Path(source, CARD_NAME)
    elif _base_model_id(source):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, CARD_NAME)
            readme = Path(cached) if isinstance(cached, str) else None
        except Exception:  # a malformed cache is not worth failing an upload for
            readme = None
    if readme is None:
        return None
    try:
        value = _card_metadata(readme.read_text(encoding="utf-8")).get("license")
    except (OSError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) and value else None


def _module_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _module_summary(modules: list[dict]) -> list[str]:
    """One table row per module kind (q_proj, up_proj, ...): a 7-row summary instead of 7 × layers rows."""
    groups: dict[str, list[dict]] = {}
    for m in modules:
        groups.setdefault(_module_kind(m["name"]), []).append(m)
    rows = ["| module | count | compressed | result | params before → after | rel. weight err (mean) "
            "| rel. output err (mean) |", "|---|---:|---:|---|---:|---:|---:|"]
    for kind, ms in groups.items():
        done = [m for m in ms if m["compressed"]]
        specs = sorted({", ".join(f"{k}={v}" for k, v in (m.get("spec") or {}).items() if k != "kind") for m in done})
        result = "; ".join(specs) if len(specs) <= 3 else f"{specs[0]} … {specs[-1]} ({len(specs)} variants)"
        if len(done) < len(ms):
            result = (result + "; " if result else "") + f"{len(ms) - len(done)} kept dense"
        werr = [m["rel_weight_error"] for m in done if m.get("rel_weight_error") is not None]
        oerr = [m["rel_output_error"] for m in done if m.get("rel_output_error") is not None]
        mean = lambda v: f"{sum(v) / len(v):.4f}" if v else "—"  # noqa: E731
        rows.append(f"| {kind} | {len(ms)} | {len(done)} | {result or '—'} | "
                    f"{sum(m['params_before'] for m in ms):,} → {sum(m['params_after'] for m in ms):,} | "
                    f"{mean(werr)} | {mean(oerr)} |")
    return rows


def build_model_card(report: dict, qc: dict, repo_id: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    source = report.get("model") or ""
    base = _base_model_id(source)
    method, recipe = report.get("method") or qc.get("method"), report.get("recipe") or qc.get("recipe")
    tags = [t for t in dict.fromkeys(["lrc", "compression", method, recipe]) if t]
    ppl = report.get("perplexity") or {}
    evals = []
    for when in ("before", "after"):
        if ppl.get(when) is not None:
            evals.append(EvalResult(
                task_type="text-generation", dataset_type="text", dataset_name=ppl.get("data") or "text",
                metric_type="perplexity", metric_value=round(float(ppl[when]), 4),
                metric_name=f"perplexity ({when} compression)",
                metric_config=f"seqlen={ppl.get('seqlen')}, windows={ppl.get('windows')}",
            ))
    data = ModelCardData(
        base_model=base, library_name="transformers", tags=tags, license=base_license(source),
        model_name=repo_id if evals else None, eval_results=evals or None, pipeline_tag="text-generation",
    )
    t = report["totals"]
    ratio = lambda a, b: f"{a / b:.3f}" if b else "—"  # noqa: E731
    lines = [
        "---", data.to_yaml().rstrip("\n"), "---", "",
        f"# {repo_id}", "",
        f"`{source}` compressed after training with lrc {report.get('lrc_version', '')}"
        f" using the `{recipe}` recipe (method `{method}`, options `{report.get('options')}`, layer inputs "
        f"{report.get('sequential_inputs')}). {t['compressed']} of {t['targets']} target linears were replaced by "
        f"compressed modules; {t['skipped']} were kept dense.",
        "",
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
        f"| parameters | {t['model_params_before']:,} | {t['model_params_after']:,} | "
        f"{ratio(t['model_params_after'], t['model_params_before'])} |",
        f"| weight bytes | {t['weight_bytes_before']:,} | {t['weight_bytes_after']:,} | "
        f"{ratio(t['weight_bytes_after'], t['weight_bytes_before'])} |",
    ]
    if t.get("target_bytes_before"):  # what size_ratio / --target-size budget: the targeted linears only
        lines.append(f"| bytes of the targeted linears (size_ratio) | {t['target_bytes_before']:,} | "
                     f"{t['target_bytes_after']:,} | {ratio(t['target_bytes_after'], t['target_bytes_before'])} |")
    if ppl.get("before") is not None or ppl.get("after") is not None:
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        r = ratio(ppl["after"], ppl["before"]) if ppl.get("before") and ppl.get("after") else "—"
        lines.append(f"| perplexity | {fmt(ppl.get('before'))} | {fmt(ppl.get('after'))} | {r} |")
    lines += data_lines(report)
    encodings = encoding_lines(report.get("modules") or [])
    if encodings:  # which encodings the targets got (a byte budget mixes them)
        lines += ["", *encodings[:-1]]
    lines += [
        "", "## How to load", "",
        "The compressed linears are lrc modules. Install lrc (the PyPI package named `lrc` is a different "
        "project):", "",
        "```",
        install_line(),
        "```", "",
        "then import `compressor` before loading: it registers lrc with transformers, and the usual call works "
        "(no `trust_remote_code`). Without it transformers refuses this checkpoint (its `model_type` says to "
        "`import compressor`) rather than building a model with random weights.", "",
        "```python",
        "import compressor  # registers the lrc quantization method with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```", "",
        "A plain dense checkpoint (loads without lrc, but is no smaller) can be made from a local copy with "
        "`lrc export LOCAL_COPY --dense -o dense/`.", "",
        "## Per-module summary", "",
        *_module_summary(report.get("modules") or []), "",
        "Every module, with its rank, errors and timings, is in `report.md` / `report.json`; the exact recipe is "
        "`recipe.yaml`.",
    ]
    return "\n".join(lines) + "\n"
