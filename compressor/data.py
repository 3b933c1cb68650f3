"""Text sources for calibration and evaluation, and the token windows cut from them.

`load_texts` turns a user's `--calib` / `--eval` value into a list of documents plus a one-line description
for the report. A source is, in order of precedence:
  * None: the bundled split (`calibration/{train,valid,test}.txt`);
  * an existing local path: a `.txt` file (documents separated by a blank line), a `.jsonl` file (field
    "text" of each line), a `.parquet` file (column "text"), or a folder of such files (sorted by name);
  * otherwise a Hugging Face hub dataset, written `name`, `name:config` or `name:config:split`, or one of
    the aliases in `HUB_ALIASES` ("wikitext2", "c4", "ptb") that pin the papers' exact files and splits.

Rows of jsonl / parquet / hub datasets are kept verbatim, empty rows included: the papers' wikitext-2
numbers come from `"\\n\\n".join(test["text"])` with the empty rows in it, and we must reproduce that text
byte for byte. A `.txt` file has no rows, so there the blank-line separators are the documents' boundaries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .resources import calibration_file

SUFFIXES = (".txt", ".jsonl", ".parquet")
DOC_SEPARATOR = "\n\n"  # between documents, both when reading .txt files and when joining for tokenization


@dataclass(frozen=True)
class HubRequest:
    """One `datasets.load_dataset` call, as data so aliases and user-written names share one code path."""

    path: str
    config: str | None
    split: str
    data_files: dict[str, str] | None = None  # only the requested split's files: others would be downloaded too
    column: str = "text"
    max_documents: int | None = None  # first N rows; a full C4 shard is far more text than any protocol uses


# split_default ("train" calibration, "valid", "test" evaluation) -> what the papers load for that role.
HUB_ALIASES: dict[str, dict[str, HubRequest]] = {
    "wikitext2": {
        role: HubRequest("wikitext", "wikitext-2-raw-v1", split)
        for role, split in (("train", "train"), ("valid", "validation"), ("test", "test"))
    },
    # GPTQ: calibration windows from the first train shard, evaluation on the first validation shard.
    # SVD-LLM scores the first 2000 validation documents; the train cap only bounds tokenization time.
    "c4": {
        "train": HubRequest(
            "allenai/c4", None, "train",
            data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, max_documents=20000,
        ),
        "valid": HubRequest(
            "allenai/c4", None, "validation",
            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, max_documents=2000,
        ),
        "test": HubRequest(
            "allenai/c4", None, "validation",
            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, max_documents=2000,
        ),
    },
    "ptb": {
        role: HubRequest("ptb-text-only/ptb_text_only", "penn_treebank", split, column="sentence")
        for role, split in (("train", "train"), ("valid", "validation"), ("test", "test"))
    },
}

_HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}


def load_texts(source: str | None, *, split_default: str) -> tuple[list[str], str]:
    """Documents of `source` and a description of exactly which text they are (for the report).

    `split_default` is "train" for calibration and "test" for evaluation: it picks the bundled file when
    `source` is None, the hub split when the name does not give one, and the wording of error messages.
    """
    role = "calibration" if split_default == "train" else "evaluation"
    if source is None:
        path = calibration_file(split_default)
        docs = _read_txt(path, role)
        return docs, f"bundled {path.name} ({len(docs)} documents)"

    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, role)
    if path.exists():
        docs = _read_file(path, role)
        return docs, f"local file {path.resolve()} ({len(docs)} documents)"
    if _looks_like_path(source):
        raise UserError(f"{role} file not found: {source}")
    return _load_hub(source, split_default, role)


def _looks_like_path(source: str) -> bool:
    # Hub names contain "/" too ("allenai/c4"), so only an explicit path prefix or a file suffix means "local".
    return source.startswith(("/", "./", "../", "~")) or Path(source).suffix.lower() in (*SUFFIXES, ".json")


def _read_file(path: Path, role: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path, role)
    if suffix == ".jsonl":
        return _read_jsonl(path, role)
    if suffix == ".parquet":
        return _read_parquet(path, role)
    raise UserError(f"unsupported {role} file type {suffix or '(none)'!r} for {path}: use .txt, .jsonl or .parquet")


def _read_folder(folder: Path, role: str) -> tuple[list[str], str]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(f"no .txt, .jsonl or .parquet files in {role} folder {folder}")
    docs = [doc for p in files for doc in _read_file(p, role)]
    return docs, f"local folder {folder.resolve()} ({len(files)} files, {len(docs)} documents)"


def _read_text(path: Path, role: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{role} file {path} is not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise UserError(f"could not read {role} file {path}: {e.strerror or e}") from e


def _require_text(docs: list[str], path: Path, role: str) -> list[str]:
    if not any(doc.strip() for doc in docs):
        raise UserError(f"{role} file {path} contains no text")
    return docs


def _read_txt(path: Path, role: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"{role} file not found: {path}")
    text = _read_text(path, role).replace("\r\n", "\n")
    # Runs of 3+ newlines leave empty or newline-led chunks: they are separator debris, not documents.
    docs = [chunk.strip("\n") for chunk in text.split(DOC_SEPARATOR)]
    return _require_text([doc for doc in docs if doc.strip()], path, role)


def _read_jsonl(path: Path, role: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path, role).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or "text" not in row:
            raise UserError(f'{path} line {lineno}: no "text" field')
        if not isinstance(row["text"], str):
            raise UserError(f'{path} line {lineno}: "text" is {type(row["text"]).__name__}, not a string')
        docs.append(row["text"])
    return _require_text(docs, path, role)


def _read_parquet(path: Path, role: str) -> list[str]:
    import pyarrow.parquet as pq  # installed with `datasets`; imported late to keep CLI start-up fast

    try:
        columns = pq.read_schema(path).names
        if "text" not in columns:
            raise UserError(f'{role} file {path} has no "text" column (columns: {", ".join(columns)})')
        values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except UserError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for corrupt or non-parquet files
        raise UserError(f"could not read {role} file {path} as parquet: {_short(e)}") from e
    return _require_text(["" if v is None else str(v) for v in values], path, role)


def _load_hub(source: str, split_default: str, role: str) -> tuple[list[str], str]:
    request = _hub_request(source, split_default)
    import datasets  # slow import (~1 s): only paid when a hub dataset is asked for

    try:
        ds = datasets.load_dataset(
            request.path, request.config, split=request.split, data_files=request.data_files
        )
    except Exception as e:  # no network, unknown name/config/split, gated repo: datasets raises a zoo of types
        raise UserError(f"could not load dataset {source!r} from the hub: {_short(e)}") from e
    if request.column not in ds.column_names:
        raise UserError(
            f"dataset {source!r} has no {request.column!r} column (columns: {', '.join(ds.column_names)})"
        )
    if request.max_documents is not None and len(ds) > request.max_documents:
        ds = ds.select(range(request.max_documents))
    docs = ["" if v is None else str(v) for v in ds[request.column]]
    if not any(doc.strip() for doc in docs):
        raise UserError(f"dataset {source!r} (split {request.split}) contains no text")
    return docs, _describe(request, len(docs))


def _hub_request(source: str, split_default: str) -> HubRequest:
    if source in HUB_ALIASES:
        roles = HUB_ALIASES[source]
        if split_default not in roles:
            raise UserError(f"dataset alias {source!r} has no {split_default!r} split")
        return roles[split_default]
    parts = source.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UserError(f"bad dataset name {source!r}: expected NAME, NAME:CONFIG or NAME:CONFIG:SPLIT")
    name, config, split = (parts + [None, None])[:3]
    return HubRequest(name, config or None, split or _HUB_SPLIT.get(split_default, split_default))


def _describe(request: HubRequest, ndocs: int) -> str:
    what = f"hub dataset {request.path}"
    if request.config:
        what += f" ({request.config})"
    what += f", split {request.split}"
    if request.data_files:
        what += f", files {', '.join(request.data_files.values())}"
    what += f", column {request.column!r}"
    first = f"first {ndocs}" if request.max_documents is not None and ndocs == request.max_documents else str(ndocs)
    return f"{what} ({first} documents)"


def _short(e: Exception) -> str:
    # Library messages can span many lines (tracebacks, hints); the CLI prints one line.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    msg = lines[0] if lines else type(e).__name__
    return msg if len(msg) <= 240 else msg[:237] + "..."


def _token_ids(tokenizer, documents: list[str]) -> torch.Tensor:
    # verbose=False: the whole corpus is one "sequence" far past model_max_length, which is intended here.
    ids = tokenizer(DOC_SEPARATOR.join(documents), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batch(tokenizer, documents: list[str], *, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random starts (GPTQ / SVD-LLM), shape (nsamples, seqlen).

    Deterministic given `seed` (its own generator: the global torch RNG is neither read nor advanced).
    Windows may overlap when the text is short; a start is drawn uniformly in [0, ntokens - seqlen - 1] as
    in GPTQ, so the text needs at least seqlen + 1 tokens.
    """
    if nsamples < 1 or seqlen < 1:
        raise UserError(f"calibration needs nsamples >= 1 and seqlen >= 1 (got {nsamples} and {seqlen})")
    ids = _token_ids(tokenizer, documents)
    if ids.numel() < seqlen + 1:
        raise UserError(
            f"calibration text has {ids.numel()} tokens; at least {seqlen + 1} are needed for windows of "
            f"{seqlen} tokens (use a longer text or a smaller seqlen)"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, documents: list[str], seqlen: int) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens over the joined text, tail dropped: (nwindows, seqlen)."""
    if seqlen < 2:
        raise UserError(f"evaluation seqlen must be at least 2 (got {seqlen})")
    ids = _token_ids(tokenizer, documents)
    nwindows = ids.numel() // seqlen
    if nwindows == 0:
        raise UserError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen} (use a longer text "
            f"or a smaller seqlen)"
        )
    return ids[: nwindows * seqlen].view(nwindows, seqlen).clone()
