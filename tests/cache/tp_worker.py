"""Worker of tests/cache/test_tensor_parallel.py, run under ``torchrun --nproc-per-node N``.

Loads a saved tiny model with transformers' tensor parallel plan (``tp_plan="auto"``; gloo on CPU,
NCCL on GPUs), runs a TurboQuantCache prefill + teacher-forced decode and greedy generation, and
writes (rank 0) the logits, the tokens and the KV heads each rank held to a JSON file.
Usage: ``tp_worker.py MODEL_DIR OUT_JSON``; without torchrun it runs single-process (the reference).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

from turboquant.cache import TurboQuantCache, TurboQuantLayer, turboquant_attention

BITS = (16, 3.5)
PROMPT, STEPS, NEW = 40, 8, 16


def run(model_dir: str) -> dict:
    distributed = "RANK" in os.environ
    kw = {"tp_plan": "auto"} if distributed else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw)
    device = next(model.parameters()).device
    ids = torch.randint(3, 128, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(0)).to(device)
    out: dict = {"tp_size": model.tp_size or 1}
    for bits in BITS:
        cache = TurboQuantCache(model.config, key_bits=bits, value_bits=bits, tp_size=model.tp_size)
        with torch.no_grad(), turboquant_attention(model):
            logits = [model(input_ids=ids[:, :PROMPT], past_key_values=cache).logits[:, -1]]
            for t in range(PROMPT, PROMPT + STEPS):
                logits.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
            heads = [l.key_store.codes.shape[1] for l in cache.layers if isinstance(l, TurboQuantLayer)]
            gen = model.generate(input_ids=ids[:, :PROMPT], max_new_tokens=NEW, do_sample=False,
                                 past_key_values=TurboQuantCache(model.config, key_bits=bits, value_bits=bits,
                                                                 tp_size=model.tp_size))
        out[str(bits)] = {"logits": torch.stack(logits, 1).float().cpu().tolist(),
                          "tokens": gen[:, PROMPT:].cpu().tolist(), "kv_heads_held": heads}
    return out


if __name__ == "__main__":
    result = run(sys.argv[1])
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(result, f)
