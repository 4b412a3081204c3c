"""The quality benchmark's code path (the GPU tier's full grid) at tiny sizes on CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("bits_measured", "needle_acc", "needle_diff_ci95", "qa_f1", "qa_diff_ci95", "kl", "top1")


def _bench():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.synthetic
def test_quality_bench_rejects_unknown_recipe_names() -> None:
    with pytest.raises(KeyError, match=r"unknown recipe/baseline 'int3'; valid: \['full'"):
        _bench().main(["--recipes", "halves-3.5,int3"], lm=SimpleNamespace(model=None, tokenizer=None))


@pytest.mark.model
def test_quality_bench_writes_every_key_for_every_recipe(lc_lm: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "quality_cpu.json"
    res = _bench().main(["--recipes", "halves-3.5,fp8-e4m3,paper-3.5", "--n-needles", "1", "--lengths", "1024",
                         "--depths", "0.5", "--n-qa", "5", "--qa-lengths", "1024", "--kl-prompts", "1",
                         "--kl-tokens", "2", "--out", str(out)], lm=lc_lm)
    saved = json.loads(out.read_text())
    assert saved["n_needles"] == 1 and saved["n_qa"] == 5 and saved["meta"]["date"] and saved["meta"]["device"]
    ran = set(saved["recipes"]) - {"full"}
    assert ran | set(saved["skipped"]) == {"halves-3.5", "fp8-e4m3", "paper-3.5"}
    for name in ran:
        missing = [k for k in KEYS if saved["recipes"][name].get(k) is None]
        assert not missing, f"{name}: missing {missing}"
        assert saved["recipes"][name]["needle_verdict"] == "WARN", "1 needle can never settle a verdict"
    assert saved["recipes"]["fp8-e4m3"]["bits_measured"] == pytest.approx(8.25)
    assert (tmp_path / "quality_cpu_needle_heatmap.png").stat().st_size > 0
    assert (tmp_path / "quality_cpu_vs_bits.png").stat().st_size > 0
    assert res["recipes"].keys() == saved["recipes"].keys()
