"""Shared fixtures: the embedded SmolLM2-135M-Instruct, converted once per test session."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mixq  # noqa: F401  (loads OpenBLAS before mlx.core)
import pytest

from mixq.config import ModelConfig
from mixq.prepare import prepare_model


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLX dir of the embedded SmolLM2-135M-Instruct GGUF, float32 (read-only for tests)."""
    cfg = ModelConfig(kind="embedded", id="smollm2-135m-instruct")
    return prepare_model(cfg, tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    """``(model, tokenizer)`` from stock ``mlx_lm.load`` of :func:`smollm2_dir` (don't mutate)."""
    import mlx_lm

    return mlx_lm.load(str(smollm2_dir))


def tiny_llama(vocab_size: int = 49152, layers: int = 2, seed: int = 0):
    """A random-weight Llama (hidden 64) from mlx-lm's own model class, float32."""
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=layers, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        vocab_size=vocab_size, tie_word_embeddings=True, max_position_embeddings=2048,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def tiny_qwen35_hybrid(seed: int = 0, head_dim: int = 16):
    """A random-weight Qwen3.5-style hybrid: Gated DeltaNet (linear attention) layers with a
    full-attention layer every 2nd block, from mlx-lm's qwen3_5 classes (``head_dim``: of the
    full-attention layers)."""
    import mlx.core as mx
    from mlx_lm.models import qwen3_5

    mx.random.seed(seed)
    text = dict(
        model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, vocab_size=256,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, full_attention_interval=2, tie_word_embeddings=False,
    )
    model = qwen3_5.Model(qwen3_5.ModelArgs(model_type="qwen3_5", text_config=text))
    mx.eval(model.parameters())
    return model


def tiny_moe(seed: int = 0):
    """A random-weight mixture-of-experts model (mlx-lm's qwen3_moe, SwitchLinear experts)."""
    import mlx.core as mx
    from mlx_lm.models import qwen3_moe

    mx.random.seed(seed)
    args = qwen3_moe.ModelArgs(
        model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        vocab_size=256, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=64, rope_theta=10000.0,
        tie_word_embeddings=False, max_position_embeddings=2048, norm_topk_prob=True,
    )
    model = qwen3_moe.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLX model dir: a 2-block random Llama with SmolLM2's real tokenizer and chat
    template (fast stand-in for pipeline tests)."""
    import shutil

    out = save_tiny_llama(tiny_llama(), tmp_path_factory.mktemp("tiny") / "tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(smollm2_dir / name, out / name)
    return out


# Real `dvc` runs in temporary git copies of this project (test_pipeline_dvc, test_remote).
REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> str:
    """Run a command in ``cwd`` (this venv's tools first on PATH); fail on a non-zero exit;
    return stdout + stderr."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MIXQ_CACHE": str(cwd / ".mixq-cache")}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def executed(log: str) -> set[str]:
    """Stages a `dvc repro` log says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", log))


def restored(log: str) -> set[str]:
    """Stages a `dvc repro` log says it restored from the run cache."""
    return set(re.findall(r"Stage '([^']+)' is cached - skipping run", log))


def copy_project(root: Path) -> Path:
    """A fresh git + DVC repo at ``root`` holding this project's working-tree files that git
    does not ignore (no tests, benchmarks or dvc.lock), committed once."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (name.startswith(("tests/", "benchmarks/")) or name == "dvc.lock"
                or not (REPO / name).is_file()):
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    run(["git", "init", "-q"], root)
    git_commit(root, "init")
    return root


def git_commit(root: Path, message: str) -> None:
    """``git add -A`` and commit everything in ``root`` under a throwaway identity."""
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], root)


def compose(project: Path, tiny_llama_dir: Path, *overrides: str) -> None:
    """`mixq compose` the tiny-Llama pipeline (64-token windows, 1 sample per domain)."""
    run([sys.executable, "-m", "mixq", "compose", "model=path", f"model.id={tiny_llama_dir}",
         "calibration.seq_len=64", "calibration.samples_per_domain=1", *overrides], project)


def save_tiny_llama(model, out: Path, architecture: str = "LlamaForCausalLM") -> Path:
    """Save a tiny mlx-lm model as an MLX model dir (weights and config.json, no tokenizer)."""
    import json

    from mlx_lm.utils import save_model

    save_model(out, model)
    config = {**model.args.__dict__, "architectures": [architecture]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def tiny_gemma3(vocab_size: int = 49152, seed: int = 0):
    """A random-weight Gemma-3-shaped model (mlx-lm's gemma3_text): 6 blocks, every 3rd global,
    the others sliding-window (64 tokens: RotatingKVCache), head_dim 256, tied embeddings."""
    import mlx.core as mx
    from mlx_lm.models import gemma3_text

    mx.random.seed(seed)
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
        num_attention_heads=2, num_key_value_heads=1, head_dim=256, vocab_size=vocab_size,
        sliding_window=64, sliding_window_pattern=3, query_pre_attn_scalar=256,
        max_position_embeddings=2048,
    )
    model = gemma3_text.Model(args)
    model.tie_word_embeddings = True  # as Gemma 3 (mlx-lm ties when lm_head is not saved)
    model.pop("lm_head")
    mx.eval(model.parameters())
    return model


def tiny_qwen3(vocab_size: int = 49152, seed: int = 0):
    """A random-weight Qwen3-shaped model (mlx-lm's qwen3): 4 blocks, q/k norms, head_dim 128
    (as Qwen3 and Llama 3), tied embeddings."""
    import mlx.core as mx
    from mlx_lm.models import qwen3

    mx.random.seed(seed)
    args = qwen3.ModelArgs(
        model_type="qwen3", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-6,
        vocab_size=vocab_size, max_position_embeddings=2048, rope_theta=1e6,
        tie_word_embeddings=True,
    )
    model = qwen3.Model(args)
    mx.eval(model.parameters())
    return model


def with_tokenizer(model_dir: Path, tokenizer_dir: Path, chat_template: bool = True) -> Path:
    """Copy ``tokenizer_dir``'s tokenizer files into ``model_dir``; ``chat_template=False``
    drops the template (a base model's tokenizer)."""
    import json

    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / name, model_dir / name)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    if not chat_template:
        config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir
