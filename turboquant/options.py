"""The suite's options, in the seed review's spelling: one list for pytest (``--model-id``) and the CLI
(``--model_id``). Booleans are switches on the CLI and ``true/false`` values for pytest."""

from __future__ import annotations

# (name, default, help)
SUITE_OPTIONS: list[tuple[str, object, str]] = [
    ("model_id", None, "Hugging Face model id or local directory (default: the embedded SmolLM2-135M-Instruct GGUF)"),
    ("local_files_only", True, "never download; load from the local HF cache or a directory"),
    ("torch_dtype", "float32", "model dtype: float32 | bfloat16 | float16"),
    ("attn_implementation", "sdpa", "attention backend for full-precision runs: sdpa | eager"),
    ("needle_context_tokens", None, "needle-in-a-haystack context lengths, comma list (default: CPU grid 1k,2k,4k)"),
    ("needle_required_bits", "3.5", "bit width whose needle accuracy must match full precision (C09)"),
    ("needle_trials", None, "needle trials per (length, depth) cell"),
    ("needle_positions", None, "needle depths in [0, 1], comma list"),
    ("longbench_local_dir", None, "directory of LongBench-E jsonl files (default: the shipped fixture in data/)"),
    ("longbench_required_bits", "3.5", "bit width whose LongBench score must match full precision (C10)"),
    ("longbench_max_examples", None, "examples per LongBench task"),
    ("longbench_max_prompt_tokens", None, "truncate LongBench prompts (head + tail) to this many tokens"),
    ("throughput_new_tokens", "128", "new tokens per decode-throughput repeat (C11)"),
    ("throughput_warmup", "1", "decode-throughput warmup runs"),
    ("throughput_repeats", "3", "decode-throughput measured repeats"),
    ("ann_use_qwen_embeddings", False, "ANN data = mean-pooled hidden states of the selected model (C12/C13)"),
    ("ann_required_scalar_bits", "2,3,4", "bits at which TurboQuant must beat scalar no-rotation recall (C12)"),
    ("ann_pq_index_speedup_threshold", "10", "minimum PQ / TurboQuant index build-time ratio (C13)"),
]
