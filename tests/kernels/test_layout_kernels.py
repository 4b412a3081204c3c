"""The Triton kernels on every code layout (issue 12 §3): outlier groups (``paper-3.5``,
``paper-2.5``, ``outliers-32-4-2``), K and V of different layouts, GQA, a residual window and
lengths that are not a multiple of the kernel block.

References: :class:`turboquant.layout_quantizer.TurboQuantLayout` (the torch quantizer the store
uses) for codes, norms and reconstructions; the materialising float32 attention
(``decode_attention_codespace_reference``, itself checked against ``TurboQuantLayout.dequantize``
+ softmax) for decode. Tolerances as in ``test_decode_attention.py``: float16 tensor-core products
with float32 accumulation give ~1e-3 relative error on O(1) outputs; codes may differ only within
1e-5 of a codebook boundary (float32 rounding of the rotation), norms by one float16 ulp.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from turboquant.layout import build_layout, select_outliers
from turboquant.layout_quantizer import PackedLayout, TurboQuantLayout

# (d, key layout, value layout, H_q, H_kv, length, residual R, batch): interpreter-sized cases
CASES = [
    (64, "paper-3.5", "paper-2.5", 4, 2, 45, 5, 1),
    (128, "outliers-32-4-2", "paper-3.5", 4, 1, 70, 3, 2),
    (128, "paper-2.5", "halves-3.5", 2, 2, 33, 0, 1),
    (256, "paper-3.5", "outliers-32-4-2", 2, 1, 21, 4, 1),
]
QUANT = [
    (64, "paper-3.5"),
    (64, "paper-2.5"),
    (128, "paper-3.5"),
    (128, "outliers-32-4-2"),
    (256, "paper-2.5"),
]
GPU_CASES = [
    (256, "paper-3.5", "paper-3.5", 24, 4, 4097, 128, 1),
    (256, "paper-2.5", "paper-2.5", 24, 4, 1000, 37, 3),
    (128, "paper-3.5", "halves-2.5", 32, 8, 3333, 0, 2),
    (64, "outliers-32-4-2", "paper-2.5", 12, 4, 2049, 64, 2),
    (256, "halves-3.5", "paper-3.5", 6, 1, 515, 1, 2),
]


def _ids(grid):
    return [f"d{c[0]}-{c[1]}-{c[2]}-{c[3]}x{c[4]}-L{c[5]}-R{c[6]}-B{c[7]}" for c in grid]


def _data(shape, seed, planted=3):
    """Gaussian vectors with one planted outlier channel (10x) so the outlier groups are not empty
    of signal."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    x[..., planted] *= 10
    return x


def _quantize(dev, layout, x):
    """Codes and norms of ``x`` [B, H, T, d] by the kernel, plus the torch quantizer and outliers."""
    from turboquant.kernels import KernelTables, quantize_pack

    q = TurboQuantLayout(layout)
    t = KernelTables.from_layout(layout, dev)
    out = select_outliers(x, layout.n_out).to(dev) if layout.is_grouped else None
    codes, norms = quantize_pack(x.to(dev), t, outliers=out)
    return q, t, out, codes, norms


def _torch_packed(q, x, out):
    return q.pack(q.quantize(x, None if out is None else out.cpu().long().unsqueeze(-2)))


def _case(dev, d, kl, vl, hq, hkv, n, r, b, dtype=torch.float32):
    kl, vl = build_layout(kl, d, seed=5), build_layout(vl, d, seed=6)
    cap = n + 11
    k, v = _data((b, hkv, cap, d), n + d), _data((b, hkv, cap, d), n + d + 1, planted=d - 2)
    *_, kt, ko, kc, kn = _quantize(dev, kl, k)
    *_, vt, vo, vc, vn = _quantize(dev, vl, v)
    gen = torch.Generator().manual_seed(7 * n + d)
    q = (torch.randn(b, hq, 1, d, generator=gen) * 2).to(device=dev, dtype=dtype)
    rk = torch.randn(b, hkv, r, d, generator=gen).to(device=dev, dtype=dtype) if r else None
    rv = torch.randn(b, hkv, r, d, generator=gen).to(device=dev, dtype=dtype) if r else None
    return {
        "query": q,
        "k_codes": kc,
        "k_norms": kn,
        "v_codes": vc,
        "v_norms": vn,
        "k_tables": kt,
        "v_tables": vt,
        "residual_k": rk,
        "residual_v": rv,
        "k_outliers": ko,
        "v_outliers": vo,
    }


def _reference(c, length):
    from turboquant.kernels import decode_attention_codespace_reference
    from turboquant.kernels.codespace import as_codespace

    return decode_attention_codespace_reference(
        c["query"],
        c["k_codes"],
        c["k_norms"],
        c["v_codes"],
        c["v_norms"],
        length,
        as_codespace(c["k_tables"]),
        as_codespace(c["v_tables"]),
        c["query"].shape[-1] ** -0.5,
        c["residual_k"],
        c["residual_v"],
        c["k_outliers"],
        c["v_outliers"],
    )


def _kernel(c, length, **kw):
    from turboquant.kernels import decode_attention

    return decode_attention(
        c["query"],
        c["k_codes"],
        c["k_norms"],
        c["v_codes"],
        c["v_norms"],
        length,
        c["k_tables"],
        c["v_tables"],
        c["query"].shape[-1] ** -0.5,
        c["residual_k"],
        c["residual_v"],
        k_outliers=c["k_outliers"],
        v_outliers=c["v_outliers"],
        **kw,
    )


def _assert_attention_close(out, ref, atol=2e-3, rtol=1e-2, rel=2e-3):
    assert out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    _assert_frobenius_close(out, ref, rel)


def _assert_frobenius_close(out, ref, rel=2e-3):
    err = float(torch.linalg.norm(out.float() - ref.float()) / torch.linalg.norm(ref.float()))
    assert err < rel, f"relative Frobenius error {err:.2e} >= {rel:.0e}"


# ------------------------------------------------------------------------------------------------
# tables from the layout object
# ------------------------------------------------------------------------------------------------
@pytest.mark.synthetic
@pytest.mark.parametrize(
    "spec", ["halves-3.5", "halves-2.5", "halves-1.5", "int-4", "int-3", "int-2"]
)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_halves_tables_from_layout_equal_the_bits_derivation(spec, d):
    """``KernelTables.from_layout`` reads segments, offsets and codebooks from the layout and lands
    on exactly the tables the old ``bits``-based ``build`` gave (so halves codes stay byte-identical)."""
    from turboquant.kernels import KernelTables

    layout = build_layout(spec, d, seed=3)
    t = KernelTables.from_layout(layout)
    segs = layout.segments
    books = [s.codebook for s in segs]
    old = KernelTables.build(
        d,
        layout.code_bits,
        layout.groups[0].rotation.signs,
        books[0].centroids,
        books[-1].centroids if len(segs) > 1 else None,
        boundaries=(books[0].boundaries, books[-1].boundaries if len(segs) > 1 else None),
    )
    assert t.seg == old.seg and t.code_nbytes == old.code_nbytes == layout.code_nbytes
    for f in ("signs", "boundaries", "centroids", "lut32", "rot"):
        assert torch.equal(getattr(t, f), getattr(old, f)), f
    assert t.layout is layout


@pytest.mark.synthetic
@pytest.mark.parametrize("spec", ["paper-3.5", "paper-2.5", "outliers-32-4-2"])
def test_outlier_layout_tables_follow_the_layout(spec):
    """Code-space tables: per byte column the segment's plane offset/stride/bits, per coordinate
    its codebook and its group's norm slot, one rotation a group."""
    from turboquant.kernels import CodeSpaceTables, KernelTables

    layout = build_layout(spec, 128, seed=1)
    t = KernelTables.from_layout(layout)
    assert (
        isinstance(t, CodeSpaceTables) and t.code_nbytes == layout.code_nbytes and t.num_norms == 2
    )
    ncol = 128 // 8
    off, stride, bits = t.meta[:ncol], t.meta[ncol : 2 * ncol], t.meta[2 * ncol : 3 * ncol]
    slot = t.meta[3 * ncol + 128 :]
    for s in layout.segments:
        k = s.start // 8
        assert (
            int(off[k]) == s.byte_start
            and int(stride[k]) == s.plane_nbytes
            and int(bits[k]) == s.bits
        )
    g0 = layout.groups[0]
    assert slot[: g0.size].eq(0).all() and slot[g0.size :].eq(1).all()
    assert [(a, n) for a, n, _ in t.rotations] == [(g.start, g.size) for g in layout.groups]


# ------------------------------------------------------------------------------------------------
# quantize_pack / dequantize
# ------------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("d,spec", QUANT, ids=[f"d{d}-{s}" for d, s in QUANT])
def test_quantize_pack_equals_the_layout_quantizer(kdev, d, spec):
    """Kernel codes = ``TurboQuantLayout.pack(quantize(x))`` except within 1e-5 of a boundary;
    group norms within one float16 ulp; zero vectors stay zero."""
    layout = build_layout(spec, d, seed=2)
    x = _data((2, 3, 7, d), d) * 3
    x[:, :, 0] = 0
    q, t, out, codes, norms = _quantize(kdev, layout, x)
    ref = _torch_packed(q, x, out)
    assert codes.shape == ref.codes.shape and norms.shape == ref.norms.shape == (2, 3, 7, 2)
    torch.testing.assert_close(norms.cpu().float(), ref.norms.float(), rtol=1e-3, atol=0)
    got_idx = q.unpack(PackedLayout(codes.cpu(), norms.cpu(), ref.outliers)).idx
    ref_idx = q.unpack(ref).idx
    diff = got_idx != ref_idx
    if diff.any():  # only coordinates sitting on a codebook boundary may differ
        y = q.rotate(x, ref.outliers.long().unsqueeze(-2))
        yn = y / t.spread(
            t.group_norms(q.to_code_order(x, ref.outliers.long().unsqueeze(-2))).clamp_min(1e-30)
        )
        bnd = torch.cat([s.codebook.boundaries.flatten() for s in layout.segments])
        dist = (yn.unsqueeze(-1) - bnd).abs().amin(-1)
        assert float(dist[diff].max()) < 1e-5, (
            f"{int(diff.sum())} codes differ away from boundaries"
        )
    assert diff.float().mean() < 1e-3
    xd = q.dequantize(q.unpack(PackedLayout(codes.cpu(), norms.cpu(), ref.outliers)))
    assert float(xd[:, :, 0].abs().max()) == 0.0


@pytest.mark.integration
@pytest.mark.parametrize("d,spec", QUANT[:4], ids=[f"d{d}-{s}" for d, s in QUANT[:4]])
def test_dequantize_equals_the_layout_quantizer(kdev, d, spec):
    """Kernel ``dequantize`` (code space in the kernel, per-group un-rotation + scatter outside)
    = ``TurboQuantLayout.dequantize``, into a caller's buffer too; the torch reference agrees."""
    from turboquant.kernels import dequantize, dequantize_codespace_reference

    layout = build_layout(spec, d, seed=4)
    x = _data((2, 2, 13, d), d + 1)
    q, t, out, codes, norms = _quantize(kdev, layout, x)
    ref = q.dequantize(q.unpack(PackedLayout(codes.cpu(), norms.cpu(), out.cpu().unsqueeze(-2))))
    got = dequantize(codes, norms, 11, t, torch.float32, outliers=out)
    tol = 1e-5 * float(ref.abs().max())
    torch.testing.assert_close(got.cpu(), ref[:, :, :11], atol=tol, rtol=0)
    torch.testing.assert_close(
        dequantize_codespace_reference(codes, norms, t, out).cpu(), ref, atol=tol, rtol=0
    )
    buf = torch.full((2, 2, 20, d), 7.0, device=kdev)
    dequantize(codes, norms, 13, t, outliers=out, out=buf)
    torch.testing.assert_close(buf[:, :, :13].cpu(), ref, atol=tol, rtol=0)
    assert bool((buf[:, :, 13:] == 7.0).all())


# ------------------------------------------------------------------------------------------------
# decode_attention
# ------------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_decode_attention_matches_reference_for_outlier_layouts(kdev, case):
    c = _case(kdev, *case)
    _assert_attention_close(_kernel(c, case[5]), _reference(c, case[5]))


@pytest.mark.integration
def test_codespace_reference_equals_layout_dequantize_attention():
    """The decode reference is the plain attention over ``TurboQuantLayout.dequantize`` (an
    independent reconstruction) + the residual window, in float64."""
    d, hq, hkv, n, r = 64, 4, 2, 30, 3
    c = _case(torch.device("cpu"), d, "paper-3.5", "paper-2.5", hq, hkv, n, r, 1)
    ks, vs = [], []
    for kind, codes, norms, out in (
        ("k", c["k_codes"], c["k_norms"], c["k_outliers"]),
        ("v", c["v_codes"], c["v_norms"], c["v_outliers"]),
    ):
        q = TurboQuantLayout(c[f"{kind}_tables"].layout)
        x = q.dequantize(
            q.unpack(PackedLayout(codes[:, :, :n], norms[:, :, :n], out.unsqueeze(-2)))
        )
        (ks if kind == "k" else vs).append(torch.cat([x, c[f"residual_{kind}"]], 2).double())
    k, v = ks[0].repeat_interleave(hq // hkv, 1), vs[0].repeat_interleave(hq // hkv, 1)
    p = torch.softmax((c["query"].double() @ k.transpose(-1, -2)) * d**-0.5, -1)
    torch.testing.assert_close(
        _reference(c, n).double(), (p @ v).transpose(1, 2), atol=1e-5, rtol=1e-5
    )


@pytest.mark.integration
def test_grouped_store_through_the_hook_matches_the_cache_reference(kdev):
    """A real ``PackedStore`` of an outlier layout (norms [B, H, cap, 2], per-head outliers), keys
    and values of different layouts, through ``fused_decode`` = ``compressed_attention_reference``."""
    from types import SimpleNamespace

    from turboquant.attention import compressed_attention_reference
    from turboquant.cache import PackedStore, TensorCodec
    from turboquant.kernels.hook import fused_decode

    B, hq, hkv, d, n, r = 2, 4, 2, 64, 41, 6
    stores = []
    for seed, spec in ((11, "paper-3.5"), (12, "outliers-16-3-2")):
        codec = TensorCodec(d, 3.5, "mse", "hadamard", seed, 0, "beta", kdev, layout=spec)
        st = PackedStore(codec, chunk_tokens=16, backend="torch")
        st.append(_data((B, hkv, 30, d), seed).to(kdev))
        st.append(_data((B, hkv, n - 30, d), seed + 1).to(kdev))
        stores.append(st)
    assert stores[0].norms.shape[-1] == 2 and stores[0].outliers.shape == (hkv, d // 4)
    gen = torch.Generator().manual_seed(3)
    rk, rv = (torch.randn(B, hkv, r, d, generator=gen).to(kdev) for _ in range(2))
    layer = SimpleNamespace(
        key_store=stores[0],
        value_store=stores[1],
        num_heads=hkv,
        residual_keys=lambda: rk,
        residual_values=lambda: rv,
    )
    q = torch.randn(B, hq, 1, d, generator=gen).to(kdev)
    out = fused_decode(q, layer, d**-0.5, None)
    assert out is not None, "the hook sent an outlier layout to the torch reference"
    _assert_attention_close(out, compressed_attention_reference(q, layer, d**-0.5, None))


# ------------------------------------------------------------------------------------------------
# device-side length (issue 14 §2) and the workspace
# ------------------------------------------------------------------------------------------------
def _halves_case(dev, d=64, hq=4, hkv=2, n=45, r=5, b=2):
    from turboquant.kernels import KernelTables, quantize_pack

    kl, vl = build_layout("halves-3.5", d, seed=5), build_layout("halves-2.5", d, seed=6)
    kt, vt = KernelTables.from_layout(kl, dev), KernelTables.from_layout(vl, dev)
    cap = n + 19
    k, v = _data((b, hkv, cap, d), 1), _data((b, hkv, cap, d), 2)
    kc, kn = quantize_pack(k.to(dev), kt)
    vc, vn = quantize_pack(v.to(dev), vt)
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(b, hq, 1, d, generator=gen).to(dev)
    rk, rv = (torch.randn(b, hkv, r, d, generator=gen).to(dev) for _ in range(2))
    return {
        "query": q,
        "k_codes": kc,
        "k_norms": kn,
        "v_codes": vc,
        "v_norms": vn,
        "k_tables": kt,
        "v_tables": vt,
        "residual_k": rk,
        "residual_v": rv,
        "k_outliers": None,
        "v_outliers": None,
    }


def _per_sequence(c, lengths, rlens=None):
    """Int-length kernel calls one sequence at a time (the value device lengths must reproduce)."""
    outs = []
    for i, n in enumerate(lengths):
        ci = {
            k: (
                v[i : i + 1]
                if isinstance(v, torch.Tensor) and k not in ("k_outliers", "v_outliers")
                else v
            )
            for k, v in c.items()
        }
        if rlens is not None:
            ci["residual_k"], ci["residual_v"] = (
                ci["residual_k"][:, :, : rlens[i]],
                ci["residual_v"][:, :, : rlens[i]],
            )
        outs.append(_kernel(ci, n))
    return torch.cat(outs)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["halves", "outliers"])
def test_device_length_equals_int_length(kdev, kind):
    """``length`` as an int32 [B] / int64 [] device tensor with a fixed ``max_length`` grid (and a
    device ``residual_length``) gives the int-length results, per sequence."""
    c = (
        _halves_case(kdev)
        if kind == "halves"
        else _case(kdev, 64, "paper-3.5", "paper-2.5", 4, 2, 45, 5, 2)
    )
    cap = c["k_codes"].shape[2]
    lengths = [45, 17]
    want = _per_sequence(c, lengths)
    got = _kernel(c, torch.tensor(lengths, dtype=torch.int32, device=kdev), max_length=cap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    one = _kernel(c, torch.tensor(30, dtype=torch.int64, device=kdev), max_length=cap)
    torch.testing.assert_close(one, _kernel(c, 30), atol=1e-5, rtol=1e-5)
    rl = [5, 2]
    got_r = _kernel(
        c,
        torch.tensor(lengths, dtype=torch.int32, device=kdev),
        max_length=cap,
        residual_length=torch.tensor(rl, dtype=torch.int32, device=kdev),
    )
    torch.testing.assert_close(got_r, _per_sequence(c, lengths, rl), atol=1e-5, rtol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["halves", "outliers"])
def test_workspace_calls_allocate_nothing_new(kdev, kind):
    """Repeated calls with one ``DecodeWorkspace`` reuse its buffers (same addresses) and agree."""
    from turboquant.kernels import DecodeWorkspace

    c = (
        _halves_case(kdev)
        if kind == "halves"
        else _case(kdev, 64, "paper-2.5", "paper-3.5", 4, 2, 33, 2, 1)
    )
    ws = DecodeWorkspace()
    ln = torch.tensor(20, dtype=torch.int32, device=kdev)
    first = _kernel(c, ln, max_length=c["k_codes"].shape[2], workspace=ws).clone()
    ptrs = {k: t.data_ptr() for k, t in ws.buffers.items()}
    ln.fill_(33)  # what a static cache does between graph replays: the length moves on the device
    second = _kernel(c, ln, max_length=c["k_codes"].shape[2], workspace=ws)
    assert {k: t.data_ptr() for k, t in ws.buffers.items()} == ptrs
    torch.testing.assert_close(first, _kernel(c, 20), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, _kernel(c, 33), atol=1e-5, rtol=1e-5)


@pytest.mark.synthetic
def test_device_length_bad_input_is_named():
    """A CPU length tensor past ``max_length`` (or negative), a tensor without ``max_length``, a
    float tensor, a wrong shape and ``max_length`` past the capacity are refused by name (a CUDA
    tensor cannot be read without a host sync: the kernels clamp it to ``max_length``)."""
    from turboquant.kernels.workspace import resolve_length

    dev = torch.device("cpu")
    with pytest.raises(ValueError, match=r"`length` tensor holds 70, outside \[0, max_length=64\]"):
        resolve_length(torch.tensor([70, 3], dtype=torch.int32), 64, 2, 80, dev)
    with pytest.raises(ValueError, match="outside"):
        resolve_length(torch.tensor(-1), 64, 2, 80, dev)
    with pytest.raises(ValueError, match="needs `max_length`"):
        resolve_length(torch.tensor(3), None, 2, 80, dev)
    with pytest.raises(TypeError, match="int32 or int64"):
        resolve_length(torch.tensor(3.0), 64, 2, 80, dev)
    with pytest.raises(ValueError, match=r"shape \[\], \[1\] or \[B\]=\[2\]"):
        resolve_length(torch.tensor([1, 2, 3]), 64, 2, 80, dev)
    with pytest.raises(ValueError, match="`max_length`=90 must be in"):
        resolve_length(torch.tensor(3), 90, 2, 80, dev)
    with pytest.raises(ValueError, match=r"`length`=81 must be in \[0, 80\]"):
        resolve_length(81, None, 2, 80, dev)


@pytest.mark.integration
def test_cuda_backend_names_what_it_cannot_run(kdev):
    """backend="cuda" takes device lengths (the kernel reads them) but not head_dim 64, nor the
    byte-column layouts; each refusal names the reason."""
    c = _halves_case(kdev)
    with pytest.raises(ValueError, match="needs head_dim in"):
        _kernel(c, torch.tensor(4, dtype=torch.int32, device=kdev), max_length=30, backend="cuda")
    g = _case(kdev, 64, "paper-3.5", "paper-2.5", 4, 2, 20, 0, 1)
    with pytest.raises(ValueError, match="byte-column Triton kernel"):
        _kernel(g, 20, backend="cuda")
    if kdev.type == "cpu":  # word-decoder layouts: the CUDA kernel needs a GPU (and says so)
        w = _case(kdev, 256, "paper-3.5", "paper-2.5", 4, 2, 20, 0, 1)
        with pytest.raises(ValueError, match="backend='cuda': the CUDA decode kernel cannot run this call"):
            _kernel(w, 20, backend="cuda")


# ------------------------------------------------------------------------------------------------
# what the kernels cannot run
# ------------------------------------------------------------------------------------------------
@pytest.mark.synthetic
def test_layout_unsupported_names_the_reason():
    from turboquant.kernels import KernelTables, layout_unsupported

    paper = build_layout("paper-3.5", 128)
    assert layout_unsupported(paper) is None
    assert (
        layout_unsupported(build_layout("halves-3.5", 64, rotation="dense")) is None
    )  # code-space kernels
    odd = dataclasses.replace(
        paper, groups=(dataclasses.replace(paper.groups[0], size=24), paper.groups[1])
    )
    assert "multiple of 16" in layout_unsupported(odd)
    assert "head_dim 96" in layout_unsupported(build_layout("halves-3.5", 96, rotation="dense"))
    assert "mode 'prod'" in layout_unsupported(paper, mode="prod")
    assert "mode 'prod'" in layout_unsupported(build_layout("halves-3.5", 128), mode="prod")
    if not torch.cuda.is_available():
        assert "device cuda" in layout_unsupported(paper, "cuda")
    with pytest.raises(ValueError, match="multiple of 16"):
        KernelTables.from_layout(odd)


# ------------------------------------------------------------------------------------------------
# GPU tier: the same checks compiled, at realistic sizes and bfloat16
# ------------------------------------------------------------------------------------------------
GPU_TOL = {  # kernel vs the float32 reference, by query / window dtype
    torch.float32: {"atol": 2e-3, "rtol": 1e-2, "rel": 2e-3},
    torch.bfloat16: {"atol": 1e-2, "rtol": 2e-2, "rel": 1e-2},
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_ids(GPU_CASES))
def test_decode_attention_outlier_layouts_gpu(cuda, case):
    for dtype in (torch.float32, torch.bfloat16):
        c = _case(cuda, *case, dtype=dtype)
        tol = GPU_TOL[dtype]
        _assert_attention_close(_kernel(c, case[5]), _reference(c, case[5]), **tol)


CUDA_CASES = [  # (d, key layout, value layout, H_q, H_kv, length, residual, batch): head_dim 256 only
    (256, "paper-3.5", "paper-3.5", 24, 4, 4097, 128, 1),
    (256, "paper-2.5", "paper-2.5", 24, 4, 1001, 37, 3),
    (256, "paper-3.5", "halves-2.5", 32, 4, 3333, 0, 2),
    (256, "halves-3.5", "paper-3.5", 4, 4, 515, 1, 2),
    (256, "outliers-64-4-2", "outliers-128-3-2", 12, 4, 2049, 64, 2),
    (256, "int-4", "paper-2.5", 8, 8, 77, 5, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_CASES, ids=_ids(CUDA_CASES))
def test_cuda_kernel_runs_outlier_layouts_like_the_reference(cuda, case):
    """backend="cuda" on outlier (and mixed halves/outlier) layouts at head_dim 256: the CUDA kernel
    runs the compressed splits (``LAST_KERNEL``) and matches the float32 reference and the Triton
    word decoder; odd lengths, GQA 1, 3, 6 and 8 (the others: the next test), K and V rows of
    different widths, float32 and bfloat16."""
    from turboquant.kernels.codespace import LAST_KERNEL

    for dtype in (torch.float32, torch.bfloat16):
        c = _case(cuda, *case, dtype=dtype)
        tol = GPU_TOL[dtype]
        got = _kernel(c, case[5], backend="cuda")
        assert LAST_KERNEL["decode"] == "segmented+cuda"
        _assert_attention_close(got, _reference(c, case[5]), **tol)
        _assert_attention_close(got, _kernel(c, case[5], backend="triton"), **tol)
        assert LAST_KERNEL["decode"] == "segmented"


@pytest.mark.gpu
@pytest.mark.parametrize("g", [2, 4, 5, 7])
def test_cuda_kernel_runs_outlier_layouts_at_the_other_gqa_ratios(cuda, g):
    """The group sizes G = H_q / H_kv the cases above leave out (they run 1, 3, 6 and 8): paper-3.5
    through the CUDA kernel against the float32 reference, a partial last tile."""
    from turboquant.kernels.codespace import LAST_KERNEL

    c = _case(cuda, 256, "paper-3.5", "paper-3.5", 2 * g, 2, 301, 7, 2, dtype=torch.float32)
    got = _kernel(c, 301, backend="cuda")
    assert LAST_KERNEL["decode"] == "segmented+cuda"
    _assert_attention_close(got, _reference(c, 301), **GPU_TOL[torch.float32])


@pytest.mark.gpu
def test_cuda_kernel_refuses_rows_whose_tiles_are_not_16_byte_aligned(cuda):
    """paper-2.5 rows are 72 bytes: a capacity of 1011 tokens puts heads at 8-byte offsets, which
    the kernel's 16-byte cp.async cannot read. backend="cuda" says so; "auto" runs Triton."""
    from turboquant.kernels.codespace import LAST_KERNEL

    c = _case(cuda, 256, "paper-2.5", "paper-2.5", 24, 4, 1000, 37, 3)
    with pytest.raises(ValueError, match="16-byte aligned"):
        _kernel(c, 1000, backend="cuda")
    _assert_attention_close(_kernel(c, 1000), _reference(c, 1000))
    assert LAST_KERNEL["decode"] == "segmented"


@pytest.mark.gpu
@pytest.mark.parametrize("d,spec", QUANT, ids=[f"d{d}-{s}" for d, s in QUANT])
def test_quantize_dequantize_outlier_layouts_gpu(cuda, d, spec):
    test_quantize_pack_equals_the_layout_quantizer(cuda, d, spec)
    if d <= 128:
        test_dequantize_equals_the_layout_quantizer(cuda, d, spec)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["halves", "outliers"])
def test_device_length_decode_replays_in_a_cuda_graph(cuda, kind):
    """One decode_attention call captured in a CUDA graph with a device length and a workspace;
    replayed after the length moved on the device it equals the eager int-length call on the same
    grid (``max_length`` = capacity: same splits, same reduction order) within 1e-5, and the
    float32 reference at the kernel tolerance. (An int-length call without ``max_length`` sizes
    its own split grid: another flash-decoding reduction order, float16 ``p`` rounded against
    other per-split maxima, ~2e-4 apart on this case; both are within the reference tolerance.)"""
    from turboquant.kernels import DecodeWorkspace

    c = (
        _halves_case(cuda, d=256, hq=24, hkv=4, n=3000, r=64, b=2)
        if kind == "halves"
        else _case(cuda, 256, "paper-3.5", "paper-2.5", 24, 4, 3000, 64, 2)
    )
    cap = c["k_codes"].shape[2]
    ws, ln = DecodeWorkspace(), torch.tensor([1000], dtype=torch.int32, device=cuda)
    _kernel(c, ln, max_length=cap, workspace=ws)  # compile + allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _kernel(c, ln, max_length=cap, workspace=ws)
    for n in (1000, 2999, 17):
        ln.fill_(n)
        graph.replay()
        torch.testing.assert_close(out, _kernel(c, n, max_length=cap), atol=1e-5, rtol=1e-5)
        _assert_attention_close(out, _reference(c, n))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["halves", "outliers"])
def test_cuda_kernel_reads_device_lengths_like_int_lengths(cuda, kind):
    """backend="cuda" with a device length a sequence (int32 and int64, the grid sized by
    ``max_length``): each sequence's row equals the int-length call at that sequence's length on the
    same grid (1e-6), and the float32 reference (relative Frobenius error); captured in a CUDA
    graph, replays follow the lengths as they move on the device (CTAs past a length write empty
    partials and read no row). The reference check is the Frobenius one only: on these cases the
    kernels' float16 operands put one to four elements in ~10k past the elementwise 2e-3 (H200,
    2026-12-01: CUDA paper layouts up to 3.6e-3 at relative errors 0.9-1.2e-3, the Triton word
    decoder 3.2e-3 at 0.5-0.7e-3, halves both backends 4.6e-3 at 1.2e-3); the elementwise checks
    stay in the tests above on their own cases."""
    from turboquant.kernels import DecodeWorkspace
    from turboquant.kernels.codespace import LAST_KERNEL
    from turboquant.kernels.decode_attention import LAST_LAUNCH

    c = (
        _halves_case(cuda, d=256, hq=24, hkv=4, n=3000, r=64, b=2)
        if kind == "halves"
        else _case(cuda, 256, "paper-3.5", "paper-2.5", 24, 4, 3001, 64, 2)  # 72-byte V rows: even capacity
    )
    cap = c["k_codes"].shape[2]

    def ran_cuda():
        return LAST_LAUNCH["cuda"] if kind == "halves" else LAST_KERNEL["decode"] == "segmented+cuda"

    def check(out, lens):
        for b, n in enumerate(lens):
            want = _kernel(c, n, max_length=cap, backend="cuda")
            assert ran_cuda()
            torch.testing.assert_close(out[b], want[b], atol=1e-6, rtol=0,
                                       msg=lambda m, b=b, n=n: f"sequence {b} at length {n} of {lens}: {m}")
            try:
                _assert_frobenius_close(out[b : b + 1], _reference(_row(c, b), n), GPU_TOL[torch.float32]["rel"])
            except AssertionError as err:
                raise AssertionError(f"sequence {b} at length {n} of {lens} against the reference: {err}") from err

    for dtype in (torch.int32, torch.int64):
        lens = [1000, 2999]
        out = _kernel(c, torch.tensor(lens, dtype=dtype, device=cuda), max_length=cap, backend="cuda")
        assert ran_cuda()
        check(out, lens)
    ws, ln = DecodeWorkspace(), torch.tensor([5, 5], dtype=torch.int32, device=cuda)
    _kernel(c, ln, max_length=cap, workspace=ws, backend="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _kernel(c, ln, max_length=cap, workspace=ws, backend="cuda")
    for lens in ([17, 3000], [2048, 1], [0, 1500]):
        ln.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        check(out.clone(), lens)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["halves", "outliers"])
def test_cuda_kernel_with_device_window_lengths(cuda, kind):
    """The static cache's call: device lengths for the codes *and* the residual window
    (``residual_length``), the CUDA kernel for the codes and the Triton residual splits reading the
    window's length on the device. Each sequence equals the int-length call at its own lengths on
    the same grid, and the float32 reference (relative Frobenius error)."""
    from turboquant.kernels.codespace import LAST_KERNEL
    from turboquant.kernels.decode_attention import LAST_LAUNCH

    c = (
        _halves_case(cuda, d=256, hq=24, hkv=4, n=3000, r=64, b=2)
        if kind == "halves"
        else _case(cuda, 256, "paper-3.5", "paper-2.5", 24, 4, 3001, 64, 2)
    )
    cap = c["k_codes"].shape[2]
    lens, rlens = [2500, 700], [64, 9]
    out = _kernel(c, torch.tensor(lens, dtype=torch.int32, device=cuda), max_length=cap,
                  residual_length=torch.tensor(rlens, dtype=torch.int32, device=cuda), backend="cuda")
    assert LAST_LAUNCH["cuda"] if kind == "halves" else LAST_KERNEL["decode"] == "segmented+cuda"
    for b, (n, r) in enumerate(zip(lens, rlens)):
        want = _kernel(c, n, max_length=cap, residual_length=r, backend="cuda")
        torch.testing.assert_close(out[b], want[b], atol=1e-6, rtol=0)
        row = _row(c, b)
        row["residual_k"], row["residual_v"] = row["residual_k"][:, :, :r], row["residual_v"][:, :, :r]
        _assert_frobenius_close(out[b : b + 1], _reference(row, n), GPU_TOL[torch.float32]["rel"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bound_call_on_outlier_layouts_replays_its_graph_like_decode_attention(cuda, backend):
    """The paper recipe through :class:`DecodeAttentionCall` (the static cache's eager call): from
    the second call the bound call replays its own CUDA graph (query map, CUDA or Triton partials,
    residual splits, combine, output map); every step, lengths moved on the device in place, equals
    ``decode_attention`` with the same arguments bitwise."""
    from turboquant.kernels import DecodeAttentionCall, DecodeWorkspace
    from turboquant.kernels.codespace import LAST_KERNEL

    c = _case(cuda, 256, "paper-3.5", "paper-2.5", 24, 4, 3001, 64, 2)
    cap = c["k_codes"].shape[2]
    length = torch.tensor([2500, 700], dtype=torch.int32, device=cuda)
    rlen = torch.tensor([64, 9], dtype=torch.int32, device=cuda)
    call = DecodeAttentionCall(c["k_codes"], c["k_norms"], c["v_codes"], c["v_norms"], length, c["k_tables"],
                               c["v_tables"], c["query"].shape[-1] ** -0.5, c["residual_k"], c["residual_v"],
                               k_outliers=c["k_outliers"], v_outliers=c["v_outliers"], max_length=cap,
                               residual_length=rlen, backend=backend)
    gen = torch.Generator(device=cuda).manual_seed(9)
    for step, (lens, rl) in enumerate((([2500, 700], [64, 9]), ([1, 3001], [3, 64]), ([0, 1500], [1, 0]),
                                       ([3001, 2], [64, 64]))):
        length.copy_(torch.tensor(lens, dtype=torch.int32))
        rlen.copy_(torch.tensor(rl, dtype=torch.int32))
        q = torch.randn(c["query"].shape, device=cuda, generator=gen).to(c["query"].dtype)
        got = call(q).clone()
        assert (call._graph is not None) == (step > 0)
        want = _kernel({**c, "query": q}, length, max_length=cap, residual_length=rlen, backend=backend,
                       workspace=DecodeWorkspace())
        if backend == "cuda":
            assert LAST_KERNEL["decode"] == "segmented+cuda"
        assert torch.equal(got, want), f"step {step} (lengths {lens}, window {rl})"


def _row(c, b):
    """Sequence ``b`` of a case: the batched tensors sliced to ``[b : b + 1]`` (outliers are per head)."""
    return {k: v[b : b + 1] if isinstance(v, torch.Tensor) and not k.endswith("outliers") else v for k, v in c.items()}


@pytest.mark.gpu
def test_cuda_segmented_decode_in_a_cuda_graph_equals_eager(cuda):
    """The outlier layouts' CUDA path captured in a CUDA graph: the residual window's splits run on
    a forked stream beside the query map and the CUDA kernel (joined before the combine). Replayed
    after the query and the window were rewritten in place, the graph gives the eager call's bits
    (same kernels, same split grid), and the float32 reference within the relative Frobenius error
    (elementwise: see the device-length test above)."""
    from turboquant.kernels import DecodeWorkspace
    from turboquant.kernels.codespace import LAST_KERNEL

    c = _case(cuda, 256, "paper-3.5", "paper-3.5", 24, 4, 8191, 128, 2)
    n, ws = 8191, DecodeWorkspace()
    _kernel(c, n, workspace=ws, backend="cuda")  # compile + allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _kernel(c, n, workspace=ws, backend="cuda")
    assert LAST_KERNEL["decode"] == "segmented+cuda"
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # new inputs drawn as _case draws them (query x 2, window x 1)
        for name, scale in (("query", 2.0), ("residual_k", 1.0), ("residual_v", 1.0)):
            c[name].copy_(torch.randn(c[name].shape, generator=gen) * scale)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, _kernel(c, n, backend="cuda"))
        _assert_frobenius_close(out, _reference(c, n), GPU_TOL[torch.float32]["rel"])


@pytest.mark.integration
@pytest.mark.parametrize("spec", ["halves-3.5", "paper-2.5"])
def test_quantize_pack_at_device_positions_equals_slice_writes(kdev, spec):
    """``quantize_pack(..., positions=<device tensor [B]>)`` writes ``x`` at each sequence's own
    offset of the whole buffers (the static cache's append, no host sync), byte-equal to writing
    the slices; rows before and after stay untouched; a CPU offset past the capacity is refused."""
    from turboquant.kernels import KernelTables, quantize_pack

    layout = build_layout(spec, 64, seed=8)
    t = KernelTables.from_layout(layout, kdev)
    B, H, T, cap = 2, 2, 5, 16
    x = _data((B, H, T, 64), 4).to(kdev)
    out = select_outliers(x, layout.n_out).to(kdev) if layout.is_grouped else None
    ntrail = (layout.num_norms,) if layout.is_grouped else ()
    codes = torch.zeros(B, H, cap, layout.code_nbytes, dtype=torch.uint8, device=kdev)
    norms = torch.zeros(B, H, cap, *ntrail, dtype=torch.float16, device=kdev)
    pos = torch.tensor([3, 10], dtype=torch.int32, device=kdev)
    quantize_pack(x, t, out_codes=codes, out_norms=norms, outliers=out, positions=pos)
    for b, p in enumerate((3, 10)):
        want_c, want_n = quantize_pack(x[b : b + 1], t, outliers=out)
        assert torch.equal(codes[b : b + 1, :, p : p + T], want_c)
        assert torch.equal(norms[b : b + 1, :, p : p + T], want_n)
        assert int(codes[b, :, :p].count_nonzero()) == 0 and int(codes[b, :, p + T :].count_nonzero()) == 0
    if kdev.type == "cpu":
        with pytest.raises(ValueError, match=r"`positions` \+ T=5 must stay in \[0, capacity=16\]"):
            quantize_pack(x, t, out_codes=codes, out_norms=norms, outliers=out,
                          positions=torch.tensor([3, 12], dtype=torch.int32))


@pytest.mark.synthetic
def test_codespace_rotation_round_trips_and_follows_changed_outliers():
    """``rotate``/``unrotate`` invert each other (GQA ``repeat`` too); the cached channel
    permutation follows an in-place change of the outlier indices (no stale cache)."""
    from turboquant.kernels import CodeSpaceTables

    t = CodeSpaceTables.from_layout(build_layout("paper-3.5", 64, seed=2))
    out = torch.stack([torch.arange(16), torch.arange(16) + 16])
    x = torch.randn(1, 4, 3, 64, generator=torch.Generator().manual_seed(0))
    y = t.rotate(x, out, repeat=2)
    torch.testing.assert_close(t.unrotate(y, out, repeat=2), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, t.rotate(x, out.repeat_interleave(2, 0)), atol=0, rtol=0)
    out[0, 0] = 40
    assert not torch.equal(t.rotate(x, out, repeat=2), y)
    torch.testing.assert_close(t.rotate(x, out, repeat=2), t.rotate(x, out.clone().repeat_interleave(2, 0)))
