"""`lrc upload` against a local test double of the Hub API (no network): what is sent, to where, with which card.

The double is a `http.server` on 127.0.0.1 (random free port, one thread, shut down after the module) that
implements just the endpoints huggingface_hub calls for `create_repo` + `create_branch` + `create_commit`:
POST /api/repos/create, /api/validate-yaml, /api/models/{repo}/preupload/{rev}, /api/models/{repo}/branch/{rev},
/api/models/{repo}/commit/{rev} (NDJSON). Preupload answers "regular" for every file, so file contents travel
base64 inside the commit payload and the test can compare them byte for byte. Every request is recorded.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compressor.cli import app

TOKEN = "hf_lrcTestSecret0123456789"
PPL = {"before": 12.5, "after": 13.25, "data": "bundled test.txt", "seqlen": 32, "windows": 2, "tokens_scored": 62}


# ---------------------------------------------------------------- an lrc output directory, built in-process


def make_lrc_output(path: Path, build_tiny, *, model_source="HuggingFaceTB/SmolLM2-135M") -> Path:
    """A real lrc output (tiny fp32 Llama, svd-llm-20) with a report whose perplexity block is filled in."""
    import torch

    from compressor.api import compress
    from compressor.recipe import load_recipe
    from compressor.report.summary import build_report, count_parameters, render_markdown, state_bytes

    model = build_tiny("llama")
    before, bytes_before = count_parameters(model), state_bytes(model)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    result = compress(model, load_recipe("svd-llm-20"), batches=ids)
    report = build_report(result, model_source=model_source, params_before=before,
                          params_after=count_parameters(model), bytes_before=bytes_before,
                          bytes_after=state_bytes(model))
    report["perplexity"] = dict(PPL)
    result.save(path, report=report, report_md=render_markdown(report))
    return path


@pytest.fixture(scope="module")
def lrc_out(tmp_path_factory, tiny_model) -> Path:
    return make_lrc_output(tmp_path_factory.mktemp("hub") / "out", tiny_model)


# ---------------------------------------------------------------- the Hub test double


class HubDouble:
    def __init__(self):
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def _handle(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload = double.route(method, self.path.split("?")[0], body)
                headers = {k.lower(): v for k, v in self.headers.items()}
                double.requests.append({"method": method, "path": self.path, "headers": headers, "body": body,
                                        "status": status})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def route(self, method, path, body):
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            url = f"{self.endpoint}/{repo_id}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            self.repos[repo_id] = {"create": req, "branches": {"main"}}
            return 200, {"url": url, "name": repo_id, "id": "x" * 24}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            ok = content.startswith("---\n") and isinstance(yaml.safe_load(content.split("---")[1]), dict)
            return (200, {"errors": [], "warnings": []}) if ok else (400, {"errors": [{"message": "bad yaml"}]})
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"]:
            repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}
            if action == "branch":
                if rev in repo["branches"]:
                    return 409, {"error": "Reference already exists"}
                repo["branches"].add(rev)
                return 200, {}
            if rev not in repo["branches"]:
                return 404, {"error": f"Invalid rev id: {rev}"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]}
            if action == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                         for item in lines if item["key"] == "file"}
                header = next(item["value"] for item in lines if item["key"] == "header")
                self.commits.append({"repo": repo_id, "revision": rev, "header": header, "files": files,
                                     "other": [item for item in lines if item["key"] not in ("file", "header")]})
                oid = f"{len(self.commits):040x}"
                return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None}
        return 404, {"error": f"test double: no route for {method} {path}"}


@pytest.fixture()
def hub(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the double is local; offline mode would block it
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    double = HubDouble()
    thread = threading.Thread(target=double.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield double
    finally:
        double.server.shutdown()
        double.server.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


def run(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)


def card_metadata(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---")[1])


# ---------------------------------------------------------------- uploads


def test_upload_sends_every_file_and_a_card(hub, lrc_out):
    result = run("upload", lrc_out, "me/tiny-svd", "--private", "--token", TOKEN, "--endpoint", hub.endpoint)
    assert result.exit_code == 0, result.output
    assert "me/tiny-svd" in result.stdout
    assert TOKEN not in result.stdout + result.stderr

    assert hub.repos["me/tiny-svd"]["create"]["visibility"] == "private"
    assert hub.repos["me/tiny-svd"]["create"]["name"] == "tiny-svd"
    for request in hub.requests:  # the token travels only as the Authorization header
        assert request["headers"].get("authorization") == f"Bearer {TOKEN}", request["path"]
        assert TOKEN.encode() not in request["body"]

    (commit,) = hub.commits
    assert commit["repo"] == "me/tiny-svd" and commit["revision"] == "main" and commit["other"] == []
    on_disk = {p.relative_to(lrc_out).as_posix(): p.read_bytes() for p in lrc_out.rglob("*") if p.is_file()}
    assert "README.md" not in on_disk  # the card is never written into the output directory
    assert {k: v for k, v in commit["files"].items() if k != "README.md"} == on_disk
    assert {"config.json", "model.safetensors", "report.json", "recipe.yaml", "report.md"} <= set(on_disk)

    card = commit["files"]["README.md"].decode()
    meta = card_metadata(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["lrc", "compression", "svd-llm", "svd-llm-20"]
    assert "license" not in meta  # unknown offline: omitted, not guessed
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [(m["type"], m["value"]) for m in metrics] == [("perplexity", 12.5), ("perplexity", 13.25)]
    report = json.loads(on_disk["report.json"])
    t = report["totals"]
    assert f"{t['model_params_before']:,} | {t['model_params_after']:,}" in card
    assert f"(size_ratio) | {t['target_bytes_before']:,} | {t['target_bytes_after']:,} | {t['size_ratio']:.3f} |" in card
    assert "import compressor" in card and 'AutoModelForCausalLM.from_pretrained("me/tiny-svd")' in card
    # an install line for this project, not PyPI's unrelated `lrc`; and what happens without lrc
    assert "pip install lrc" not in card and 'pip install "lrc @ git+' in card and "refuses" in card
    assert "| q_proj | 2 | 2 | rank=" in card  # per-module summary grouped by kind


def test_upload_revision_env_token_existing_repo(hub, lrc_out):
    env = {"HF_TOKEN": TOKEN}
    assert run("upload", lrc_out, "org/model", "--endpoint", hub.endpoint, env=env).exit_code == 0
    result = run("upload", lrc_out, "org/model", "--revision", "v2", "--endpoint", hub.endpoint, env=env)
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.stdout + result.stderr
    assert "visibility" not in hub.repos["org/model"]["create"]  # the hub default unless --private
    assert [c["revision"] for c in hub.commits] == ["main", "v2"]
    assert "v2" in hub.repos["org/model"]["branches"]
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)


def test_upload_errors_are_one_line_without_the_token(hub, lrc_out):
    # A server-side failure (every route 404s under a wrong endpoint prefix) must not leak the token either.
    from compressor.io import hub as lrc_hub
    from compressor.errors import UserError

    with pytest.raises(UserError) as exc:
        lrc_hub.upload(lrc_out, "me/x", token=TOKEN, endpoint=hub.endpoint + "/nowhere")
    assert TOKEN not in str(exc.value)
    result = run("upload", lrc_out, "me/x", "--token", TOKEN, "--endpoint", hub.endpoint + "/nowhere")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: upload to me/x failed (HTTP 404)")
    assert TOKEN not in result.stdout + result.stderr


def test_dry_run_lists_files_and_card_and_sends_nothing(hub, lrc_out):
    result = run("upload", lrc_out, "me/tiny-svd", "--dry-run", "--token", TOKEN, "--endpoint", hub.endpoint)
    assert result.exit_code == 0, result.output
    assert hub.requests == []
    listed = {}
    lines = result.stdout.splitlines()
    assert lines[0] == "would upload 7 files to me/tiny-svd:"  # 6 on disk + the card
    for line in lines[1:]:
        if not line.startswith("  "):
            break
        name, size = line.split()[:2]
        listed[name] = int(size.replace(",", ""))
    expected = {p.relative_to(lrc_out).as_posix(): p.stat().st_size for p in lrc_out.rglob("*") if p.is_file()}
    card = result.stdout.split("--- README.md (generated) ---\n", 1)[1]
    assert listed == {**expected, "README.md": len(card.encode())}
    assert card_metadata(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert TOKEN not in result.stdout + result.stderr


def test_card_license_from_local_base_model(tmp_path, lrc_out):
    from compressor.io.hub import build_model_card, check_output

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    qc, report = check_output(lrc_out)
    report = {**report, "model": str(base), "perplexity": None}
    meta = card_metadata(build_model_card(report, qc, "me/x"))
    assert meta["license"] == "apache-2.0"
    assert "base_model" not in meta and "model-index" not in meta  # a local path is no hub id; no ppl measured


# ---------------------------------------------------------------- refusals


def test_refuses_incomplete_outputs(tmp_path, lrc_out):
    import shutil

    cases = {}
    for missing in ("report.json", "recipe.yaml", "model.safetensors"):
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(lrc_out, broken)
        (broken / missing).unlink()
        cases[broken] = "incomplete lrc output"
    dense = tmp_path / "dense"
    shutil.copytree(lrc_out, dense)
    config = json.loads((dense / "config.json").read_text())
    del config["quantization_config"]
    (dense / "config.json").write_text(json.dumps(config))
    cases[dense] = "not an lrc checkpoint"
    cases[tmp_path / "absent"] = "not a directory"
    for out, message in cases.items():
        result = run("upload", out, "me/x", "--token", TOKEN, "--dry-run")
        assert result.exit_code == 2, (out, result.output)
        assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr
        assert TOKEN not in result.stderr
    assert "recipe.yaml" in run("upload", tmp_path / "no-recipe.yaml", "me/x", "--dry-run").stderr
    bad_id = run("upload", lrc_out, "not a repo id", "--dry-run")
    assert bad_id.exit_code == 2 and "NAMESPACE/NAME" in bad_id.stderr
