"""KV accounting from HF configs: dense, hybrid (linear attention) and sliding-window layers."""

import pytest

from turboquant.accounting import GIB, KVLayout, compression_ratio, memory_table

pytestmark = pytest.mark.synthetic


def test_dense_llama_config_caches_every_layer(repo_root):
    layout = KVLayout.from_config(repo_root / "data/configs/smollm2-135m.json")
    assert (layout.n_full, layout.n_linear, layout.num_kv_heads, layout.head_dim) == (30, 0, 3, 64)
    # 2 (K, V) x 30 layers x 3 heads x 64 dims x 2 bytes = 23040 bytes a token in bf16
    assert layout.kv_bytes(1, bits=16) == 23040
    assert layout.kv_bytes(8192, bits=16) / layout.kv_bytes(8192, bits=3.5) == pytest.approx(16 / 3.5)


def test_hybrid_config_counts_only_full_attention_layers_and_shows_linear_state(repo_root):
    layout = KVLayout.from_config(repo_root / "data/configs/qwen3.6-27b.json")
    assert layout.layer_types[:4] == ("linear_attention",) * 3 + ("full_attention",)
    assert layout.kv_bytes(32768) / GIB == 2.0
    # fixed state: 48 layers x (48 x 128 x 128 fp32 recurrent + 10240 x 4 conv in bf16)
    assert layout.linear_state_bytes() == 48 * (48 * 128 * 128 * 4 + 10240 * 4 * 2)
    assert layout.linear_state_bytes() == layout.linear_state_bytes(batch=1)  # does not grow with tokens


def test_multimodal_config_uses_its_text_config():
    cfg = {"model_type": "qwen3_5", "text_config": {"num_hidden_layers": 4, "full_attention_interval": 2,
                                                     "num_attention_heads": 8, "num_key_value_heads": 2,
                                                     "hidden_size": 512, "head_dim": 64}}
    layout = KVLayout.from_config(cfg)
    assert layout.layer_types == ("linear_attention", "full_attention") * 2


def test_sliding_window_layers_stop_growing_at_the_window():
    cfg = {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"], "num_attention_heads": 4,
           "num_key_value_heads": 1, "hidden_size": 256, "sliding_window": 100}
    layout = KVLayout.from_config(cfg)
    per_token = 2 * 1 * 64 * 2
    assert layout.kv_bytes(1000) == per_token * (1000 + 100)


def test_memory_table_ratio_grows_with_context(repo_root):
    layout = KVLayout.from_config(repo_root / "data/configs/qwen3.6-27b.json")
    rows = memory_table(layout, [4096, 32768, 262144], 3.5, weights_gib=50.1)
    ratios = [r.total_ratio for r in rows]
    assert ratios == sorted(ratios) and all(r.kv_ratio == pytest.approx(16 / 3.5) for r in rows)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.json"):
        KVLayout.from_config(tmp_path / "nope.json")


def test_layer_types_must_match_the_layer_count():
    with pytest.raises(ValueError, match="layer_types"):
        KVLayout.from_config({"num_hidden_layers": 3, "layer_types": ["full_attention"], "num_attention_heads": 2,
                              "hidden_size": 64})


@pytest.mark.parametrize("bad", [0, -1, 65])
def test_compression_ratio_rejects_impossible_bit_widths(bad):
    with pytest.raises(ValueError, match="bits_per_coordinate"):
        compression_ratio(128, 16, bad)
