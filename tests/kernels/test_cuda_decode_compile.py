"""The CUDA decode kernel's generated source compiles for sm_90 with NVRTC, for every layout the
kernel takes (CI has no GPU: without this a source the layout object generates wrongly would only
fail on a GPU machine). NVRTC is a library (``nvidia-cuda-nvrtc-cu12``, in the test extras); it
compiles to SASS through its built-in ptxas, whose report gives registers and spills. Each layout
compiles with a host length and with int32 / int64 device lengths (``LEN_KIND``).

Also checked: the halves-3.5 / halves-2.5 variants compile without local-memory spills at the
shipped launch shapes (ptxas of NVRTC 12.9; a spill is L1 traffic in the decode loop). Measured
here, not asserted: K4/V3 spills 4 bytes, paper-3.5 up to 80 (the mixed round's word registers).
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import pytest

from turboquant.kernels import cuda_decode
from turboquant.kernels._common import KernelTables
from turboquant.kernels.codespace import CodeSpaceTables
from turboquant.layout import build_layout

pytestmark = pytest.mark.synthetic

PAIRS = [("halves-3.5", "halves-3.5"), ("halves-2.5", "halves-2.5"), ("int-4", "int-3"), ("paper-3.5", "paper-3.5"),
         ("paper-2.5", "paper-2.5"), ("paper-3.5", "halves-2.5"), ("outliers-64-4-2", "outliers-128-3-2")]


@pytest.fixture(scope="module")
def nvrtc():
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    libs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("lib/libnvrtc.so.*")) if spec else []
    if not libs:
        pytest.skip("NVRTC (pip install nvidia-cuda-nvrtc-cu12, in the test extras) is not installed")
    return ctypes.CDLL(str(libs[0]))


def _compile(lib, src: str) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"tq_decode.cu", 0, None, None) == 0
    opts = [b"-arch=sm_90", b"-std=c++17", b"--ptxas-options=-v"]
    res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return res, log.value.decode(errors="replace")


def _tables(kl: str, vl: str):
    k, v = build_layout(kl, 256, seed=1), build_layout(vl, 256, seed=2)
    if not k.is_grouped and not v.is_grouped:
        return KernelTables.from_layout(k), KernelTables.from_layout(v)
    return CodeSpaceTables.from_layout(k), CodeSpaceTables.from_layout(v)


@pytest.mark.parametrize("few", [False, True], ids=["4-warp", "16-warp"])
@pytest.mark.parametrize("kl,vl", PAIRS, ids=[f"{k}/{v}" for k, v in PAIRS])
def test_generated_cuda_source_compiles_for_sm90(nvrtc, kl, vl, few):
    kt, vt = _tables(kl, vl)
    cfg = cuda_decode.DEFAULT_CONFIG
    shape = cfg.launch_shape(few)
    for G, lkind in ((1, 2), (6, 0), (6, 1), (8, 0)):  # lkind: host length, int32 / int64 device lengths
        src = cuda_decode.kernel_source(G, kt, vt, 2, cfg.stages, shape["min_blocks"], cfg.chains,
                                        cfg.qf_smem, shape["warps"], lkind)
        assert f"#define LEN_KIND {lkind}" in src
        res, log = _compile(nvrtc, src)
        assert res == 0, f"{kl}/{vl} G={G} LEN_KIND={lkind}: NVRTC error {res}\n{log[-3000:]}"
        regs = re.search(r"Used (\d+) registers", log)
        assert regs and int(regs.group(1)) <= 65536 // (32 * shape["warps"] * shape["min_blocks"]), log
        if isinstance(kt, KernelTables) and kl == vl and G == 6:
            spill = re.search(r"(\d+) bytes spill stores", log)
            assert spill and int(spill.group(1)) == 0, f"{kl}/{vl}: the halves kernel spills\n{log}"


@pytest.mark.parametrize("text", ["4:3:0:4:0:0", "2:1:2:1:1:8"])
def test_swept_cuda_configs_compile_for_sm90(nvrtc, text):
    """Launch configurations other than the default (the benchmarks' sweep syntax) generate the
    defines they name and compile, within their register cap."""
    cfg = cuda_decode.CudaConfig.parse(text)
    kt, vt = _tables("halves-3.5", "halves-3.5")
    shape = cfg.launch_shape(False)
    src = cuda_decode.kernel_source(6, kt, vt, 2, cfg.stages, shape["min_blocks"], cfg.chains, cfg.qf_smem,
                                    shape["warps"], 1)
    for name, value in (("STAGES", cfg.stages), ("CHAINS", cfg.chains), ("QF_SMEM", cfg.qf_smem),
                        ("WARPS", shape["warps"]), ("MIN_BLOCKS", shape["min_blocks"])):
        assert f"#define {name} {value}" in src
    res, log = _compile(nvrtc, src)
    assert res == 0, f"{text}: NVRTC error {res}\n{log[-3000:]}"
    regs = re.search(r"Used (\d+) registers", log)
    assert regs and int(regs.group(1)) <= 65536 // (32 * shape["warps"] * shape["min_blocks"]), log
