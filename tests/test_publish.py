"""publish: the repo folder, the model card's provenance and the upload against a local stand-in
for the Hub endpoints huggingface_hub calls (whoami, create, validate-yaml, preupload, LFS
batch + PUT, commit)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file
from test_budget import smollm2_table
from test_calibration import calibrate, small_tokenizer

import mixq
from mixq.allocate import allocate
from mixq.budget import candidate_dict
from mixq.card import compose_overrides, recipe_section, render_card
from mixq.cli import compose_params
from mixq.config import (
    CalibrationConfig, Candidate, Config, KVConfig, ModelConfig, ProtectRule, PublishConfig,
    QuantConfig, as_dict, load_params,
)
from mixq.io import read_json, write_json
from mixq.kv import KVLayer, kv_config, kv_plan, kv_table
from mixq.prepare import embedded_gguf, sha256_file
from mixq.publish import CARD_SECTIONS, build_folder, params_hash

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_standInToken0123456789abcdef"
REPO_ID = "mixq-test/SmolLM2-135M-Instruct-mixq"
# A stand-in for outputs/eval/metrics.json until the eval stage lands (not measured numbers).
EVAL_METRICS = {
    "baseline": "uniform-affine-b4-g64",
    "samples_per_task": 8,
    "quants": {
        "mixq": {
            "size_bytes": 84140230, "kl_mean": 0.0412, "kl_p95": 0.1573, "ppl": 19.84,
            "top1": 0.7921, "tasks": {"arithmetic": 0.5, "format": 0.75, "code": 0.375},
            "capability": 0.5,
            "delta_vs_uniform4": {"kl_mean": -0.0377, "ppl": -1.27, "top1": 0.0312,
                                  "size_bytes": 8349828},
        },
        "uniform-affine-b4-g64": {
            "size_bytes": 75790402, "kl_mean": 0.0789, "kl_p95": 0.2875, "ppl": 21.11,
            "top1": 0.7609, "tasks": {"arithmetic": 0.375, "format": 0.75, "code": 0.375},
            "capability": 0.425,
        },
    },
}
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")


def config(**publish) -> Config:
    return Config(model=ModelConfig(id="smollm2-135m-instruct"),
                  publish=PublishConfig(repo_id=REPO_ID, **publish))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project dir with the publish stage's inputs: a checkpoint dir with the real plan and
    sensitivity table formats (weights are stand-in bytes), read-only as in DVC's cache; the
    source record of the embedded model; a real calibration manifest; stand-in eval metrics."""
    root = tmp_path_factory.mktemp("project")
    table = {**smollm2_table(), "tokens": 3072, "method": "fisher", "reference": "float",
             "dtype": "bfloat16"}
    plan = allocate(table, QuantConfig([Candidate(4, 64), Candidate(8, 64)]), 16)  # the table's
    quant = root / "outputs/refined"
    (quant / "mixq").mkdir(parents=True)
    save_file({"w": np.arange(50_000, dtype=np.uint32)}, str(quant / "model.safetensors"))
    write_json(quant / "config.json", {"model_type": "llama", "quantization": plan["layers"]})
    write_json(quant / "tokenizer_config.json", {"chat_template": "{{ messages }}"})
    write_json(quant / "tokenizer.json", {"model": {"type": "BPE", "vocab": {"a": 0}}})
    write_json(quant / "mixq/plan.json", plan)
    write_json(quant / "mixq/sensitivity.json", table)
    for f in quant.rglob("*"):
        if f.is_file():
            f.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    gguf = embedded_gguf("smollm2-135m-instruct")
    write_json(root / "outputs/model/mixq_source.json", {
        "kind": "embedded", "id": "smollm2-135m-instruct", "revision": None,
        "dtype": "float32", "file": gguf.name, "sha256": sha256_file(gguf),
        "gguf": {"name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "license": "apache-2.0"},
    })
    calibrate(small_tokenizer(), CalibrationConfig(), root / "outputs/calibration")
    write_json(root / "outputs/eval/metrics.json", EVAL_METRICS)
    layers = [KVLayer(i, heads=3, key_dim=64, value_dim=64) for i in range(30)]
    kv_candidates = [candidate_dict(Candidate(b, 64)) for b in (2, 4, 8)]
    rows = {(str(layer.index), c["name"]): {"mean": 0.1 / c["bits"] ** 2 * (1 + layer.index),
                                            "p95": None, "max": None}
            for layer in layers for c in kv_candidates}  # stand-in KLs, real formats
    kv = kv_table(layers, rows, kv_candidates, {}, "bfloat16", 512, {})
    write_json(root / "outputs/kv/kv_config.json",
               kv_config(kv, kv_plan(kv, KVConfig()), Path("outputs/refined")))
    return root


def build(inputs: Path, out: Path, cfg: Config, source: Path | None = None) -> Path:
    build_folder(out, cfg, inputs / "outputs/refined",
                 source or inputs / "outputs/model/mixq_source.json",
                 inputs / "outputs/calibration/manifest.json",
                 inputs / "outputs/eval/metrics.json", inputs / "outputs/kv/kv_config.json")
    return out


@pytest.fixture(scope="module")
def folder(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(inputs, tmp_path_factory.mktemp("publish") / "repo", config())


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_folder_is_a_byte_copy_plus_sidecar_and_card(inputs: Path, folder: Path):
    quant = inputs / "outputs/refined"
    for src in (f for f in quant.rglob("*") if f.is_file()):
        dst = folder / src.relative_to(quant)
        assert dst.read_bytes() == src.read_bytes()
        assert os.stat(dst).st_ino != os.stat(src).st_ino and os.stat(dst).st_nlink == 1
        assert os.access(dst, os.W_OK)  # DVC's read-only cache modes are not carried over
    for name in ("source.json", "params.json", "calibration.json", "eval.json"):
        assert (folder / "mixq" / name).is_file()
    assert read_json(folder / "mixq/eval.json") == EVAL_METRICS
    assert (folder / "README.md").read_text() == render_card(folder)


def test_card_metadata_and_sections(folder: Path):
    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "mlx" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"  # from the embedded GGUF's metadata
    assert {"mlx", "mixq", "mixed-precision", "quantized", "4-bit", "8-bit"} <= set(meta["tags"])
    for heading in ("## Quantization", "## Calibration mix", "## Benchmarks",
                    "## Size on disk", "## KV cache", "## How it was made", "## Use with mlx-lm"):
        assert heading in card
    run = read_json(folder / "mixq/params.json")
    assert run["params_hash"] == params_hash(config()) and run["params_hash"] in card
    assert f'load("{REPO_ID}")' in card and f"--model {REPO_ID}" in card
    for key in ("kl_mean", "tasks.arithmetic", "delta_vs_uniform4.top1", "capability"):
        assert f"| `{key}` |" in card
    assert "| `delta_vs_uniform4.top1` | +0.0312 | – |" in card


def source_numbers(folder: Path) -> list[float]:
    """Every number in the sidecar JSON files, the folder's byte sizes, and those in MB."""

    def walk(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                yield from walk(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from walk(v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            yield obj

    values = [v for f in (folder / "mixq").glob("*.json") for v in walk(read_json(f))]
    files = [f for f in folder.rglob("*") if f.is_file() and f.name != "README.md"]
    values += [sum(f.stat().st_size for f in files),
               sum(f.stat().st_size for f in files if f.suffix == ".safetensors")]
    return values + [v / 1e6 for v in values]


def unsourced(card: str, folder: Path) -> list[str]:
    """The numbers in ``card`` that no source number rounds to (at the digits shown)."""
    card = card.replace(read_json(folder / "mixq/params.json")["params_hash"], "")
    values = source_numbers(folder)

    def found(token: str) -> bool:
        mantissa, _, exponent = token.lower().lstrip("+-").partition("e")
        tolerance = 0.5 * 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))
        return any(abs(v - float(token)) <= tolerance * (1 + 1e-9) for v in values)

    return [token for token in NUMBER.findall(card) if not found(token)]


def test_every_number_in_the_card_comes_from_the_files(folder: Path):
    card = (folder / "README.md").read_text()
    assert len(NUMBER.findall(card)) > 100
    assert unsourced(card, folder) == []
    tampered = card.replace("## Size on disk", "## Size on disk\n\nAbout 123.457 MB.")
    assert unsourced(tampered, folder) == ["123.457"]


def test_card_shows_whatever_eval_keys_exist(folder: Path, tmp_path: Path):
    repo = shutil.copytree(folder, tmp_path / "repo")
    metrics = {"mixed": {"ppl": 12.5, "new_score": 0.123}, "uniform-4": {"ppl": 13.25}}
    write_json(repo / "mixq/eval.json", metrics)
    card = render_card(repo)
    assert "| metric | `mixed` | `uniform-4` |" in card
    assert "| `ppl` | 12.5 | 13.25 |" in card and "| `new_score` | 0.123 | – |" in card
    assert unsourced(card, repo) == []


def test_unknown_source_has_no_license_and_no_invented_base(inputs: Path, tmp_path: Path):
    source = tmp_path / "source.json"
    write_json(source, {"kind": "path", "id": "/models/mine", "revision": None,
                        "dtype": "float32", "path": "/models/mine"})
    card = (build(inputs, tmp_path / "repo", config(), source) / "README.md").read_text()
    meta = front_matter(card)
    assert "license" not in meta and "base_model" not in meta
    assert "License: **unknown**" in card


@pytest.mark.parametrize("source,repo,base,license", [
    ({"kind": "embedded", "id": "smollm2-135m-instruct", "gguf": {"license": "apache-2.0"}},
     "mixq/SmolLM2-135M-Instruct-mixq", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    ({"kind": "embedded", "id": "gemma3-270m", "gguf": {"license": "gemma"}},
     "mixq/gemma-3-270m-mixq", "google/gemma-3-270m", "gemma"),
    ({"kind": "path", "id": "/models/tiny-gemma3", "path": "/models/tiny-gemma3"},
     "mixq/tiny-gemma3-mixq", None, None),
], ids=["smollm2", "gemma3", "local-dir"])
def test_identity_comes_from_the_model_and_the_card_has_no_local_paths(
    inputs: Path, tmp_path: Path, source: dict, repo: str, base: str | None, license: str | None
):
    record = tmp_path / "source.json"
    write_json(record, {"revision": None, "dtype": "float32", **source})
    cfg = Config(model=ModelConfig(kind=source["kind"], id=source["id"]))
    assert cfg.publish.repo_id is None
    out = tmp_path / "repo"
    assert build_folder(out, cfg, inputs / "outputs/refined", record,
                        inputs / "outputs/calibration/manifest.json",
                        inputs / "outputs/eval/metrics.json") == repo
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert (meta.get("base_model"), meta.get("license")) == (base, license)
    assert f"\n# {repo.split('/')[1]}\n" in card and f'load("{repo}")' in card
    assert "/models" not in card
    if source["kind"] == "path":
        assert "id `path/to/tiny-gemma3`" in card and "model.id=path/to/tiny-gemma3" in card
        assert "Local paths are shown as `path/to/<name>`" in card


def compose_command(card: str) -> list[str]:
    command = card.split("mixq compose \\\n")[1].split("\ndvc repro")[0]
    return shlex.split(command.replace("\\\n", " "))


@pytest.mark.parametrize("cfg", [
    config(),
    Config(
        model=ModelConfig(kind="hub", id="Org/Model-1.5B", revision="0123"),
        calibration=CalibrationConfig(source="files", domains=["prose", "code"],
                                      files={"prose": "my data/p's.jsonl", "code": "c.txt"}),
        quant=QuantConfig(target_bpw=4.75, protect=[ProtectRule("*.embed_tokens", 8, 32)]),
    ),
])
def test_compose_command_in_the_card_reproduces_the_params(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    params = {name: as_dict(getattr(cfg, name)) for name in CARD_SECTIONS}
    card = recipe_section({"mixq_version": "0", "params_hash": "0", "hashed_sections": [],
                           "params": params})
    monkeypatch.chdir(REPO)
    compose_params(compose_command(card), REPO / "conf", tmp_path / "params.yaml")
    composed = as_dict(load_params(tmp_path / "params.yaml"))
    assert {name: composed[name] for name in CARD_SECTIONS} == params
    assert compose_command(card) == compose_overrides(params)


def test_params_hash_covers_only_what_determines_the_weights():
    base = params_hash(config())
    assert params_hash(config()) == base and re.fullmatch(r"[0-9a-f]{12}", base)
    assert params_hash(Config(model=ModelConfig(id="smollm2-135m-instruct"),
                              quant=QuantConfig(target_bpw=4.75))) != base
    unrelated = config(push=True, private=False)
    unrelated.eval.samples_per_task = 99
    unrelated.kv.target_bits = 2.0
    unrelated.measure.shards, unrelated.measure.shard_ids = 3, [0, 1, 2]  # same table
    assert params_hash(unrelated) == base


# --- the upload, against a stand-in Hub --------------------------------------------------


class StandInHub(ThreadingHTTPServer):
    """The Hub endpoints an upload uses, on 127.0.0.1; records every request. ``mode``:
    ``ok``, ``read`` (a read-only token), ``public`` (the repo exists and is public),
    ``bad-card`` (the card's metadata is rejected), ``new-fails`` (no repo until created, then
    the commit fails with a 500)."""

    def __init__(self, mode: str = "ok"):
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode, self.requests, self.uploads = mode, [], {}
        self.created = mode != "new-fails"
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, *args) -> None:
        pass

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        data = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            data += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return data

    def reply(self, status: int, obj: dict | None = None) -> None:
        data = json.dumps(obj or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_one(self) -> None:
        body = self.body()
        hub = self.server
        hub.requests.append({"method": self.command, "path": self.path, "body": body,
                             "headers": {k.lower(): v for k, v in self.headers.items()}})
        path, auth = self.path.split("?")[0], self.headers.get("Authorization")
        repo_api = f"/api/models/{REPO_ID}"
        if path == "/api/whoami-v2":
            role = "read" if hub.mode == "read" else "write"
            if auth != f"Bearer {TOKEN}":
                return self.reply(401, {"error": "Invalid credentials in Authorization header"})
            return self.reply(200, {"type": "user", "name": "tester",
                                    "auth": {"accessToken": {"role": role}}})
        if path == "/api/repos/create":
            hub.created = True
            return self.reply(200, {"url": f"{hub.url}/{REPO_ID}"})
        if path == repo_api:
            if not hub.created:
                return self.reply(404, {"error": "Repository not found"})
            return self.reply(200, {"id": REPO_ID, "private": hub.mode != "public",
                                    "sha": "0" * 40})
        if path == "/api/validate-yaml":
            if hub.mode == "bad-card":
                return self.reply(400, {"error": '"license" must be one of [apache-2.0, ...]'})
            return self.reply(200, {"errors": [], "warnings": []})
        if path == f"{repo_api}/preupload/main":
            files = json.loads(body)["files"]
            return self.reply(200, {"files": [
                {"path": f["path"], "shouldIgnore": False,
                 "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular"}
                for f in files]})
        if path == f"/{REPO_ID}.git/info/lfs/objects/batch":
            return self.reply(200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}}
                for o in json.loads(body)["objects"]]})
        if path.startswith("/lfs-upload/"):
            hub.uploads[path.rsplit("/", 1)[1]] = body
            return self.reply(200)
        if path == f"{repo_api}/commit/main":
            if hub.mode == "new-fails":
                return self.reply(500, {"error": "Internal Error"})
            return self.reply(200, {"commitUrl": f"{hub.url}/{REPO_ID}/commit/{'1' * 40}",
                                    "commitOid": "1" * 40})
        return self.reply(404, {"error": f"stand-in has no {self.command} {path}"})

    do_GET = do_POST = do_PUT = handle_one


@contextlib.contextmanager
def stand_in_hub(mode: str) -> Iterator[StandInHub]:
    server = StandInHub(mode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub(request: pytest.FixtureRequest):
    with stand_in_hub(getattr(request, "param", "ok")) as server:
        yield server


def run_stage(inputs: Path, tmp_path: Path, endpoint: str, token: str | None,
              **publish) -> subprocess.CompletedProcess:
    """``python stages/publish.py`` in a copy of ``inputs`` with ``publish`` params; the Hub
    endpoint set through HF_ENDPOINT (Xet off, so the upload uses the LFS protocol)."""
    project = shutil.copytree(inputs, tmp_path / "project")
    (project / "params.yaml").write_text(yaml.safe_dump(as_dict(config(**publish))))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, str(REPO / "stages/publish.py")], cwd=project,
                          env=env, capture_output=True, text=True, timeout=120)


def test_upload_is_one_private_commit_of_the_folder(inputs: Path, tmp_path: Path, hub):
    result = run_stage(inputs, tmp_path, hub.url, TOKEN, push=True)
    assert result.returncode == 0, result.stderr
    requests = hub.requests
    routes = [(r["method"], r["path"].split("?")[0]) for r in requests]
    assert routes[0] == ("GET", "/api/whoami-v2")
    assert routes.index(("POST", "/api/validate-yaml")) < routes.index(("POST", "/api/repos/create"))
    assert routes.index(("POST", "/api/repos/create")) < routes.index(
        ("POST", f"/api/models/{REPO_ID}/preupload/main"))
    commits = [r for r in requests if r["path"].startswith(f"/api/models/{REPO_ID}/commit/")]
    assert len(commits) == 1 and requests[-1] is commits[0]

    create = next(r for r in requests if r["path"] == "/api/repos/create")
    assert json.loads(create["body"]) == {"name": REPO_ID.split("/")[1],
                                          "organization": REPO_ID.split("/")[0],
                                          "visibility": "private"}

    folder = tmp_path / "project/outputs/publish"
    local = {f.relative_to(folder).as_posix(): f.read_bytes()
             for f in folder.rglob("*") if f.is_file()}
    lines = [json.loads(line) for line in commits[0]["body"].decode().splitlines()]
    header = lines[0]["value"]["summary"]
    run = read_json(folder / "mixq/params.json")
    assert mixq.__version__ in header and run["params_hash"] in header
    regular = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
               for x in lines if x["key"] == "file"}
    lfs = {x["value"]["path"]: x["value"]["oid"] for x in lines if x["key"] == "lfsFile"}
    assert set(regular) | set(lfs) == set(local) and not set(regular) & set(lfs)
    assert {"README.md", "model.safetensors", "config.json", "mixq/plan.json"} <= set(local)
    assert all(regular[p] == local[p] for p in regular)
    assert lfs == {"model.safetensors": hashlib.sha256(local["model.safetensors"]).hexdigest()}
    assert hub.uploads == {lfs["model.safetensors"]: local["model.safetensors"]}
    validated = [json.loads(r["body"])["content"] for r in requests
                 if r["path"] == "/api/validate-yaml"]
    assert validated and all(v == local["README.md"].decode() for v in validated)

    for r in requests:  # the token travels in the Authorization header of API calls only
        assert TOKEN not in r["path"] and TOKEN.encode() not in r["body"]
        assert all(TOKEN not in v for k, v in r["headers"].items() if k != "authorization")
        expected = {None} if r["path"].startswith("/lfs-upload/") else {f"Bearer {TOKEN}"}
        if r["path"] == "/api/validate-yaml":  # mixq's own check before creating: no token
            expected |= {None}
        assert r["headers"].get("authorization") in expected, r["path"]
    assert TOKEN not in result.stdout + result.stderr
    assert not [f for f in (tmp_path / "project").rglob("*")
                if f.is_file() and TOKEN.encode() in f.read_bytes()]


def test_no_token_fails_clearly_without_any_request(inputs: Path, tmp_path: Path, hub):
    result = run_stage(inputs, tmp_path, hub.url, None, push=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("publish: publish.push is true")
    assert "HF_TOKEN is not set" in result.stderr and "Traceback" not in result.stderr
    assert hub.requests == []
    assert (tmp_path / "project/outputs/publish/README.md").is_file()  # the dry-run part ran


def test_unreachable_hub_fails_clearly(inputs: Path, tmp_path: Path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = run_stage(inputs, tmp_path, url, TOKEN, push=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"publish: cannot reach the Hugging Face Hub at {url}" in result.stderr
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.parametrize("hub, token, message", [
    ("ok", "hf_wrong", "refused HF_TOKEN (HTTP 401)"),
    ("read", TOKEN, "HF_TOKEN is a read-only token"),
    ("public", TOKEN, f"{REPO_ID} exists and is public but publish.private is true"),
], indirect=["hub"])
def test_refused_uploads_commit_nothing(inputs: Path, tmp_path: Path, hub, token, message):
    result = run_stage(inputs, tmp_path, hub.url, token, push=True)
    assert result.returncode != 0 and message in result.stderr
    assert not [r for r in hub.requests if "/preupload/" in r["path"] or "/commit/" in r["path"]]
    if hub.mode != "public":
        assert [r["path"] for r in hub.requests] == ["/api/whoami-v2"]


def test_a_card_the_hub_rejects_creates_no_repo(inputs: Path, tmp_path: Path):
    with stand_in_hub("bad-card") as hub:
        result = run_stage(inputs, tmp_path, hub.url, TOKEN, push=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "the Hub rejects" in result.stderr and "no repo created" in result.stderr
    assert not [r for r in hub.requests if r["path"] == "/api/repos/create"]


def test_a_failed_upload_says_what_exists_on_the_hub(inputs: Path, tmp_path: Path):
    with stand_in_hub("new-fails") as hub:
        result = run_stage(inputs, tmp_path, hub.url, TOKEN, push=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{REPO_ID} was created by this run and holds no files of it" in result.stderr


def test_dry_run_makes_no_request(inputs: Path, tmp_path: Path, hub):
    result = run_stage(inputs, tmp_path, hub.url, TOKEN)
    assert result.returncode == 0 and "nothing was uploaded" in result.stderr
    assert hub.requests == []
