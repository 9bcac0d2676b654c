"""The calibration library: building, validation, writing and reading (the builtin corpus:
test_corpus.py)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mixq.artifacts import CalibrationSet, read_calibration
from mixq.calibration import build_calibration, content_hash, write_calibration
from mixq.config import DOMAINS, CalibrationConfig
from mixq.corpus import builtin_documents
from mixq.documents import CalibrationError, load_documents

CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
# A template that renders tools and tool calls itself (as Hermes/Qwen-style templates do).
TOOL_CHATML = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
)
MAX_CONTEXT = 2048


def small_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a little builtin text, with a ChatML template."""
    sample = [d["text"] for domain in ("prose", "code") for d in builtin_documents(domain, 0, 10)]
    sample += [json.dumps(d) for domain in DOMAINS[3:] for d in builtin_documents(domain, 0, 5)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(sample, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        chat_template=chat_template,
        model_max_length=MAX_CONTEXT,
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return small_tokenizer()


def calibrate(tokenizer, cfg: CalibrationConfig, out_dir: Path) -> CalibrationSet:
    """What the calibrate stage does."""
    cal = build_calibration(tokenizer, cfg, MAX_CONTEXT)
    write_calibration(cal, out_dir, "test-tokenizer", cfg)
    return cal


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def numbered_documents(count: int) -> list[dict]:
    words = (
        "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    )
    return [
        {"text": f"Document {i}: " + " ".join(words[(i + j) % len(words)] for j in range(30))}
        for i in range(count)
    ]


# --- building ---------------------------------------------------------------------------------


def test_build_packs_every_domain_into_windows(tokenizer):
    cfg = CalibrationConfig(samples_per_domain=2, heldout_per_domain=1, seq_len=128)
    cal = build_calibration(tokenizer, cfg, MAX_CONTEXT)
    assert cal.domains == DOMAINS
    assert cal.tokens.shape == (12, 128) and cal.tokens.dtype == np.int32
    assert cal.heldout_tokens.shape == (6, 128) and cal.heldout_tokens.dtype == np.int32
    assert cal.domain_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert (
        cal.heldout_domain_ids.tolist() == [0, 1, 2, 3, 4, 5] and cal.domain_ids.dtype == np.int32
    )
    assert (cal.tokens == tokenizer.eos_token_id).any()
    for domain in DOMAINS[3:]:
        window = tokenizer.decode(cal.tokens[DOMAINS.index(domain) * 2].tolist())
        assert "<|im_start|>" in window
    assert "<tool_call>" in tokenizer.decode(
        cal.tokens[cal.domain_ids == DOMAINS.index("tool_call")].ravel().tolist()
    )


def test_heldout_windows_share_no_document_with_calibration(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "prose.jsonl", numbered_documents(80))
    cfg = CalibrationConfig(
        source="files",
        domains=["prose"],
        files={"prose": str(path)},
        samples_per_domain=4,
        refine_per_domain=5,
        heldout_per_domain=3,
        seq_len=64,
    )
    cal = build_calibration(tokenizer, cfg, MAX_CONTEXT)
    found = {
        split: set(re.findall(r"Document (\d+):",
                              tokenizer.decode(cal.split(split)[0].ravel().tolist())))
        for split in ("calibration", "refine", "heldout")
    }
    assert all(found.values())
    assert not found["calibration"] & found["heldout"]
    assert not found["refine"] & (found["heldout"] | found["calibration"])
    assert cal.documents["prose"]["calibration"] >= len(found["calibration"])


def test_heldout_other_comes_from_other_sources_whatever_the_calibration(tokenizer):
    """The other-source split is package docs and library code (not the stdlib nor generated
    chats), identical for any calibration seed, domains or source, and shares no text with the
    calibration windows."""
    small = CalibrationConfig(samples_per_domain=1, refine_per_domain=0, heldout_per_domain=0,
                              seq_len=128)
    a = build_calibration(tokenizer, small, MAX_CONTEXT)
    b = build_calibration(tokenizer, replace(small, seed=3, domains=["code"]), MAX_CONTEXT)
    assert a.heldout_other_tokens.shape == (8, 128)
    assert np.array_equal(a.heldout_other_tokens, b.heldout_other_tokens)
    assert a.other_sources == ["docs", "library_code"]
    assert a.heldout_other_source_ids.tolist() == [0] * 4 + [1] * 4
    texts = [tokenizer.decode(w.tolist()) for w in a.heldout_other_tokens]
    assert any("mlx_lm" in t or "mlx-lm" in t for t in texts[:4])  # the packages' docs
    assert "def " in "".join(texts[4:]) and all("(" in t for t in texts[4:])  # their code
    calibration = tokenizer.decode(a.tokens.ravel().tolist())
    assert not any(t[20:80] in calibration for t in texts)


def test_same_seed_same_tokens_other_seed_other_tokens(tokenizer, tmp_path):
    cfg = CalibrationConfig(samples_per_domain=1, heldout_per_domain=1, seq_len=96)
    first = calibrate(tokenizer, cfg, tmp_path / "a")
    calibrate(tokenizer, cfg, tmp_path / "b")
    other = calibrate(tokenizer, replace(cfg, seed=1), tmp_path / "c")
    for name in ("calibration.safetensors", "heldout.safetensors", "manifest.json", "preview.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ac"]
    for index in range(len(DOMAINS)):
        assert not np.array_equal(
            first.tokens[first.domain_ids == index], other.tokens[other.domain_ids == index]
        )
    assert (
        manifests[0]["splits"]["calibration"]["sha256"]
        != manifests[1]["splits"]["calibration"]["sha256"]
    )


def test_template_with_tool_support_renders_tools_itself(tmp_path):
    tools_tokenizer = small_tokenizer(TOOL_CHATML)
    cfg = CalibrationConfig(
        domains=["tool_call"], samples_per_domain=2, heldout_per_domain=0, seq_len=256
    )
    cal = build_calibration(tools_tokenizer, cfg, MAX_CONTEXT)
    text = tools_tokenizer.decode(cal.tokens.ravel().tolist())
    assert "Tools:\n{" in text and '<tool_call>{"name": ' in text
    assert "You can call these functions" not in text
    assert cal.heldout_tokens.shape == (0, 256)


def test_files_source_reads_jsonl_and_txt(tokenizer, tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text("\n\n\n".join(d["text"] for d in builtin_documents("prose", 0, 20)) + "\n\n")
    chats = write_jsonl(tmp_path / "chats.jsonl", builtin_documents("reasoning", 0, 40))
    cfg = CalibrationConfig(
        source="files",
        domains=["prose", "reasoning"],
        files={"prose": str(prose), "reasoning": str(chats)},
        seq_len=128,
    )
    documents = load_documents(cfg, "reasoning", 40)
    assert len(documents) == 40 and documents != builtin_documents("reasoning", 0, 40)
    assert load_documents(cfg, "reasoning", 7) == documents[:7]
    assert load_documents(replace(cfg, seed=5), "reasoning", 7) != documents[:7]
    paragraphs = load_documents(cfg, "prose", 1000)
    assert all(set(d) == {"text"} and d["text"].strip() == d["text"] for d in paragraphs)
    cal = calibrate(tokenizer, cfg, tmp_path / "out")
    assert cal.tokens.shape == (4, 128)


def hf_cache(root: Path, repo: str, files: dict[str, str]) -> None:
    """A Hugging Face hub cache holding ``files`` of dataset ``repo`` at its main revision."""
    commit = "0" * 40
    folder = root / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name, text in files.items():
        (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / commit / name).write_text(text)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hf_source_parses_the_downloaded_file(tokenizer, offline_hub):
    hf_cache(
        offline_hub,
        "mixq/calib",
        {"code.jsonl": "".join(json.dumps(d) + "\n" for d in numbered_documents(30))},
    )
    cfg = CalibrationConfig(
        source="hf",
        domains=["code"],
        hf_repo="mixq/calib",
        hf_files={"code": "code.jsonl"},
        seq_len=64,
    )
    assert len(load_documents(cfg, "code", 100)) == 30
    assert build_calibration(tokenizer, cfg, MAX_CONTEXT).tokens.shape == (2, 64)


def test_hf_source_unreachable_is_one_clear_error(tokenizer, offline_hub, tmp_path):
    cfg = CalibrationConfig(
        source="hf", domains=["code"], hf_repo="mixq/calib", hf_files={"code": "code.jsonl"}
    )
    with pytest.raises(
        CalibrationError,
        match=r"calibration\.hf_files\.code: cannot download code\.jsonl "
        r"from dataset mixq/calib@main",
    ):
        calibrate(tokenizer, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- validation -------------------------------------------------------------------------------


def files_config(tmp_path: Path, name: str, content: bytes) -> CalibrationConfig:
    (tmp_path / name).write_bytes(content)
    return CalibrationConfig(source="files", domains=["code"], files={"code": str(tmp_path / name)})


INVALID = {
    "empty file": (
        lambda t: files_config(t, "code.jsonl", b""),
        r"calibration\.files\.code \(.*code\.jsonl\): file is empty",
    ),
    "blank file": (
        lambda t: files_config(t, "code.txt", b"\n \n\n"),
        r"code\.txt\): file is empty",
    ),
    "not utf-8": (
        lambda t: files_config(t, "code.txt", "café\n".encode("latin-1")),
        r"code\.txt\): not UTF-8 text \(byte 0xe9 at offset 3\)",
    ),
    "no usable samples": (
        lambda t: files_config(t, "code.jsonl", b'{"text": "  "}\n{"body": "x"}\n[1]\n'),
        r"code\.jsonl\): no usable samples",
    ),
    "bad json": (
        lambda t: files_config(t, "code.jsonl", b'{"text": "a"}\n{"text": \n'),
        r"code\.jsonl\): line 2 is not valid JSON",
    ),
    "unsupported type": (
        lambda t: files_config(t, "code.csv", b"text\nhello\n"),
        r"code\.csv\): unsupported file type '\.csv'",
    ),
    "missing file": (
        lambda t: CalibrationConfig(
            source="files", domains=["code"], files={"code": str(t / "nope.jsonl")}
        ),
        r"nope\.jsonl\): cannot read the file \(No such file",
    ),
    "no file configured": (
        lambda t: CalibrationConfig(source="files", domains=["prose"], files={"code": "x.txt"}),
        r"calibration\.files\.prose: no file configured",
    ),
    "no hf file configured": (
        lambda t: CalibrationConfig(source="hf", domains=["agent"], hf_repo="a/b"),
        r"calibration\.hf_files\.agent: no file configured",
    ),
    "no hf repo": (
        lambda t: CalibrationConfig(source="hf", domains=["code"], hf_files={"code": "c.jsonl"}),
        r"calibration\.hf_repo: not set",
    ),
    "duplicate domain": (
        lambda t: CalibrationConfig(domains=["code", "code"]),
        r"'code' is listed twice",
    ),
    "seq_len over context": (
        lambda t: CalibrationConfig(seq_len=MAX_CONTEXT + 1),
        r"calibration\.seq_len=2049 must be between 1 and the model's context length 2048",
    ),
    "no samples": (
        lambda t: CalibrationConfig(samples_per_domain=0),
        r"calibration\.samples_per_domain must be >= 1, got 0",
    ),
    "negative heldout": (
        lambda t: CalibrationConfig(heldout_per_domain=-1),
        r"calibration\.heldout_per_domain must be >= 0",
    ),
    "not enough text": (
        lambda t: files_config(t, "code.txt", b"def f():\n    return 1\n\nx = 2\n"),
        r"calibration\.code: not enough text: 2 documents give "
        r"\d+/512 calibration tokens, \d+/6656 refine tokens, \d+/256 heldout tokens",
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_settings_or_data_fail_clearly_without_output(tokenizer, tmp_path, case):
    make_config, message = INVALID[case]
    out = tmp_path / "calibration"
    with pytest.raises(CalibrationError, match=message):
        calibrate(tokenizer, make_config(tmp_path), out)
    assert not out.exists() and not (tmp_path / "calibration.tmp").exists()


def test_skips_unusable_records_with_a_warning(tmp_path, caplog):
    records = [
        {"text": "kept"},
        {"text": ""},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    cfg = CalibrationConfig(
        source="files",
        domains=["agent"],
        files={"agent": str(write_jsonl(tmp_path / "a.jsonl", records))},
    )
    assert len(load_documents(cfg, "agent", 10)) == 2
    assert "skipped 2 of 4 records" in caplog.text


# --- writing and reading ----------------------------------------------------------------------


def test_write_and_read_calibration(tokenizer, tmp_path):
    cfg = CalibrationConfig(samples_per_domain=2, refine_per_domain=3, heldout_per_domain=1,
                            seq_len=64)
    out = tmp_path / "calibration"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    cal = calibrate(tokenizer, cfg, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "calibration.safetensors",
        "heldout.safetensors",
        "heldout_other.safetensors",
        "manifest.json",
        "preview.md",
        "refine.safetensors",
    ]
    assert not (tmp_path / "calibration.tmp").exists()

    tensors = {}
    for split in ("calibration", "refine", "heldout", "heldout_other"):
        tensors |= load_file(out / f"{split}.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in tensors.items()} == {
        "tokens": (np.int32, (12, 64)),
        "domain_ids": (np.int32, (12,)),
        "refine_tokens": (np.int32, (18, 64)),
        "refine_domain_ids": (np.int32, (18,)),
        "heldout_tokens": (np.int32, (6, 64)),
        "heldout_domain_ids": (np.int32, (6,)),
        "heldout_other_tokens": (np.int32, (8, 64)),
        "heldout_other_source_ids": (np.int32, (8,)),
    }
    info = json.loads((out / "manifest.json").read_text())
    assert info["splits"]["calibration"] == {
        "file": "calibration.safetensors",
        "sequences": 12,
        "tokens": 768,
        "sha256": content_hash(cal.tokens, cal.domain_ids),
    }
    assert info["per_domain"]["code"]["heldout"]["sequences"] == 1
    assert info["per_domain"]["code"]["calibration"]["sha256"] == content_hash(cal.tokens[4:6])
    assert info["per_domain"]["agent"]["calibration"]["documents"] >= 1
    assert info["tokenizer"]["name"] == "test-tokenizer" and info["tokenizer"]["vocab_size"] == len(
        tokenizer.get_vocab()
    )
    assert len(info["tokenizer"]["chat_template_sha256"]) == 64
    assert info["config"]["seq_len"] == 64 and info["config"]["source"] == "builtin"

    preview = (out / "preview.md").read_text()
    assert re.search(r"\| constraints \| 2 / \d+ \| 3 / \d+ \| 1 / \d+ \|", preview)
    assert "## tool_call" in preview and "library_code 4 windows" in preview
    assert cal.excerpts["reasoning"] in preview and cal.excerpts["reasoning"].startswith(
        "<|im_start|>"
    )

    again = read_calibration(out)
    assert again.domains == DOMAINS and again.seq_len == 64
    for field in tensors:
        assert np.array_equal(getattr(again, field), getattr(cal, field))
    assert (again.documents, again.tokenizer, again.excerpts) == (
        cal.documents,
        cal.tokenizer,
        cal.excerpts,
    )


def test_failed_write_keeps_the_previous_output(tokenizer, tmp_path):
    cfg = CalibrationConfig(domains=["prose"], seq_len=32)
    out = tmp_path / "calibration"
    calibrate(tokenizer, cfg, out)
    before = (out / "manifest.json").read_text()
    broken = replace(build_calibration(tokenizer, replace(cfg, seed=1), MAX_CONTEXT), documents={})
    with pytest.raises(KeyError):
        write_calibration(broken, out, "test-tokenizer", cfg)
    assert (out / "manifest.json").read_text() == before
    assert not (tmp_path / "calibration.tmp").exists()


# --- the real model tokenizer -----------------------------------------------------------------


def test_smollm2_end_to_end(smollm2_dir, tmp_path):
    smollm2 = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = CalibrationConfig(samples_per_domain=2, heldout_per_domain=1, seq_len=256)
    cal = calibrate(smollm2, cfg, tmp_path / "a")
    assert cal.tokens.shape == (12, 256) and cal.heldout_tokens.shape == (6, 256)
    assert cal.tokens.max() < len(smollm2.get_vocab())
    for domain in DOMAINS[3:]:
        rows = cal.tokens[cal.domain_ids == DOMAINS.index(domain)]
        assert "<|im_start|>" in smollm2.decode(rows.ravel().tolist())

    same = calibrate(
        load_tokenizer(smollm2_dir), cfg, tmp_path / "b"
    )  # as the calibrate stage does
    assert np.array_equal(same.tokens, cal.tokens) and np.array_equal(
        same.heldout_tokens, cal.heldout_tokens
    )
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert a["splits"] == b["splits"] and a["per_domain"] == b["per_domain"]
    other = build_calibration(smollm2, replace(cfg, seed=7), MAX_CONTEXT)
    for index in range(len(DOMAINS)):
        assert not np.array_equal(
            cal.tokens[cal.domain_ids == index], other.tokens[other.domain_ids == index]
        )

    code = DOMAINS.index("code")
    calibration_text = smollm2.decode(cal.tokens[cal.domain_ids == code].ravel().tolist())
    heldout_text = smollm2.decode(
        cal.heldout_tokens[cal.heldout_domain_ids == code].ravel().tolist()
    )
    starts = [d["text"][:80] for d in builtin_documents("code", cfg.seed, 40)]
    assert any(s in calibration_text for s in starts) and any(s in heldout_text for s in starts)
    assert not [s for s in starts if s in calibration_text and s in heldout_text]
