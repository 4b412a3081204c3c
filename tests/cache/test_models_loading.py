"""The real loading code (`turboquant.models.load_model`) on a local directory of a tiny model."""

from __future__ import annotations

import pytest
import torch

from turboquant.models import ModelNotAvailable, load_model, parse_dtype, tiny_model

pytestmark = pytest.mark.synthetic


def _save_tiny(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(124)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    tiny_model("llama", seed=0).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("dtype,attn", [("bfloat16", "eager")])
def test_load_local_directory(tmp_path, dtype, attn):
    folder = _save_tiny(tmp_path)
    lm = load_model(str(folder), torch_dtype=dtype, attn_implementation=attn, local_files_only=True)
    assert lm.model.dtype == parse_dtype(dtype), f"loaded dtype {lm.model.dtype}, asked {dtype}"
    assert lm.model.config._attn_implementation == attn
    ids = lm.tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert out.shape == (1, ids.shape[1] + 4), f"generated shape {tuple(out.shape)}"


def test_missing_models_raise_with_instructions(tmp_path):
    with pytest.raises(ModelNotAvailable, match="--model_id"):
        load_model("nobody-owns-this/not-a-model-xyz", local_files_only=True)
    with pytest.raises(ModelNotAvailable, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="torch_dtype"):
        parse_dtype("float8")
    with pytest.raises(ValueError, match="attn_implementation"):
        load_model(None, attn_implementation="flash")
