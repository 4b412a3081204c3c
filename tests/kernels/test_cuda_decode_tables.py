"""The CUDA decode kernel's host-side contract, checked on CPU (CI has no GPU; the kernel itself is
checked against the torch reference by the ``gpu`` tests in ``test_decode_attention.py`` and
``test_layout_kernels.py``).

* ``tensor_words`` reads every 32-coordinate word of a row where the layout packs it: pulling each
  code out of the plane words it names (plane-0 byte, stride, bits) and scaling by its norm slot
  gives the layout's own unpacked code-space vectors, for halves, integer and outlier layouts;
* the per-thread byte tables ``round_tables`` builds, read the way the kernel's ``prmt`` decoder
  reads them (8-entry low/high byte tables; a 4-bit round decodes 3-bit magnitude + sign flip, and
  narrower words in it read top bit 0), give back exactly the float16 centroid of every code;
* a codebook that is not symmetric in float16 is refused (the kernel would decode it wrongly);
* ``_dst_index`` inverts the Triton combine kernel's position order (``coord_perm``), so the
  CUDA partials land where the combine reads them.
"""

from __future__ import annotations

import pytest
import torch

from turboquant.kernels import cuda_decode
from turboquant.kernels._common import KernelTables, coord_perm
from turboquant.kernels.codespace import CodeSpaceTables, unpack_codespace_reference
from turboquant.layout import build_layout
from turboquant.quantizer import TurboQuantMSE

pytestmark = pytest.mark.synthetic

LAYOUTS = ["halves-3.5", "halves-2.5", "halves-1.5", "int-4", "int-3", "int-2", "paper-3.5", "paper-2.5",
           "outliers-64-4-2", "outliers-128-3-2"]


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte k of the result = byte (sel nibble k & 7) of {b, a},
    replicated sign bit when the nibble's bit 3 is set."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        n = (sel >> (4 * k)) & 0xF
        byte = src[n & 7]
        if n & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def _decode_code(code: int, round_bits: int, tab: list[int]) -> float:
    """One code through ``decode32<round_bits>``'s table logic, as a float (a narrower word's
    missing planes are zero, so its code's high bits are 0)."""
    if round_bits == 4:
        y, x = code >> 3, code & 7
        sel = x ^ (7 - 7 * y)  # h ? r : 7 - r
        lo = _prmt(tab[0], tab[1], sel) & 0xFF
        hi = _prmt(tab[2], tab[3], sel) & 0xFF
        hi ^= _prmt(0x80, 0, y) & 0xFF  # the sign mask: byte h of 0x0080 (flip where h == 0)
    else:
        lo = _prmt(tab[0], tab[1], code) & 0xFF
        hi = _prmt(tab[2], tab[3], code) & 0xFF
    return torch.tensor([lo | (hi << 8)], dtype=torch.int32).to(torch.int16).view(torch.float16).item()


def _tables(spec: str, seed: int = 0):
    lay = build_layout(spec, 256, seed=seed)
    return CodeSpaceTables.from_layout(lay) if lay.is_grouped else KernelTables.from_layout(lay)


@pytest.mark.parametrize("spec", LAYOUTS)
def test_cuda_tables_decode_every_code_to_its_float16_centroid(spec):
    t = _tables(spec)
    tw = cuda_decode.tensor_words(t)
    assert not isinstance(tw, str), tw
    tabs = cuda_decode.round_tables(tw)
    assert tabs is not None
    for w, ((nb, _, _, _), book) in enumerate(zip(tw.words, tw.books)):
        cent = torch.tensor(book).to(torch.float16)
        got = torch.tensor([_decode_code(c, tw.round_bits(w // 4), tabs[w]) for c in range(2**nb)],
                           dtype=torch.float16)
        assert torch.equal(got, cent), f"word {w} ({nb} bits in a {tw.round_bits(w // 4)}-bit round)"


@pytest.mark.parametrize("spec", LAYOUTS)
def test_cuda_words_read_each_code_where_the_layout_packs_it(spec):
    """Random bytes are valid codes of any layout: the words' reading of them (and the norm slot
    of each word) must equal the layout's own unpacking, coordinate by coordinate."""
    t = _tables(spec, seed=3)
    cs = t if isinstance(t, CodeSpaceTables) else CodeSpaceTables.from_layout(t.layout)
    tw = cuda_decode.tensor_words(t)
    gen = torch.Generator().manual_seed(11)
    n = 5
    codes = torch.randint(0, 256, (n, tw.nbytes), generator=gen, dtype=torch.uint8)
    norms = torch.rand(n, tw.num_norms, generator=gen).to(torch.float16) + 0.5
    want = unpack_codespace_reference(codes, norms if cs.grouped else norms[:, 0], cs)
    got = torch.zeros(n, 256)
    for w, ((nb, base, stride, slot), book) in enumerate(zip(tw.words, tw.books)):
        idx = torch.zeros(n, 32, dtype=torch.long)
        for j in range(nb):
            word = codes[:, base + j * stride: base + j * stride + 4].long()
            u32 = word[:, 0] | word[:, 1] << 8 | word[:, 2] << 16 | word[:, 3] << 24
            idx |= ((u32[:, None] >> torch.arange(32)) & 1) << j
        got[:, 32 * w: 32 * w + 32] = torch.tensor(book)[idx] * norms[:, slot, None].float()
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)


def test_paper_layouts_decode_a_mixed_first_round_and_a_uniform_second():
    """paper-3.5 at d=256: outliers 64 @ 4 bits (words 0, 1) + rest 192 @ 3 (words 2-7): round 0
    mixes both groups (4-bit decode, norms in the decode), round 1 is the rest (3 bits, slot 1)."""
    tw = cuda_decode.tensor_words(_tables("paper-3.5"))
    assert [w[0] for w in tw.words] == [4, 4, 3, 3, 3, 3, 3, 3]
    assert [w[3] for w in tw.words] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert (tw.round_bits(0), tw.round_class(0), tw.round_bits(1), tw.round_class(1)) == (4, 2, 3, 1)
    halves = cuda_decode.tensor_words(_tables("halves-3.5"))
    assert (halves.round_bits(0), halves.round_class(0), halves.round_bits(1), halves.round_class(1)) == (4, 0, 3, 0)


def test_cuda_words_refuse_what_the_kernel_cannot_read():
    assert "head_dim 128" in cuda_decode.tensor_words(CodeSpaceTables.from_layout(build_layout("paper-3.5", 128)))
    # 48 outliers at d=256: the rest group's segment starts at code coordinate 48, inside word 1
    why = cuda_decode.tensor_words(CodeSpaceTables.from_layout(build_layout("outliers-48-4-3", 256)))
    assert "segment boundary inside" in why


def test_cuda_tables_refuse_an_asymmetric_4bit_codebook():
    c = torch.linspace(-0.2, 0.25, 16)  # not symmetric about 0
    kt = KernelTables.build(256, 4.0, torch.ones(256), c)
    assert cuda_decode._tables_of(kt) is None


def test_cuda_partials_land_in_the_combine_kernels_position_order():
    d = 256
    dst = cuda_decode._dst_index(d, torch.device("cpu")).long()
    assert sorted(dst.tolist()) == list(range(d))
    # the combine holds rotated coordinate nat[k] at position k (per half, coord_perm inside)
    half = coord_perm(d // 2)
    nat = torch.cat([half, half + d // 2])
    assert torch.equal(nat[dst], torch.arange(d))


def test_cuda_backend_is_not_picked_without_a_gpu():
    kt = KernelTables.from_quantizer(TurboQuantMSE(256, 3.5, seed=0))
    codes = torch.zeros(1, 2, 8, kt.code_nbytes, dtype=torch.uint8)
    norms = torch.zeros(1, 2, 8, dtype=torch.float16)
    assert not cuda_decode.supports(256, 6, kt, kt, codes, codes, norms, norms)


@pytest.mark.parametrize("bad", ["cpu", "Triton", ""])
def test_both_decode_paths_name_the_allowed_backends(bad):
    """``backend`` is checked in one place (``cuda_decode.check_backend``) for the halves and the
    outlier (segmented) path alike: the error names the parameter and the allowed values."""
    from turboquant.kernels import segmented

    for name in cuda_decode.BACKENDS:
        cuda_decode.check_backend(name)
    msg = "`backend` must be one of 'auto', 'triton', 'cuda', got " + repr(bad)
    with pytest.raises(ValueError, match=msg):
        cuda_decode.check_backend(bad)
    with pytest.raises(ValueError, match=msg):  # before it reads any other argument
        segmented._cuda_launch(None, None, None, None, None, None, None, None, False, bad)


@pytest.mark.parametrize("kl,vl", [("paper-3.5", "paper-3.5"), ("paper-2.5", "halves-2.5"), ("halves-3.5", "halves-3.5")])
def test_kernel_source_carries_each_layouts_words(kl, vl):
    """The variant's source is generated from the words: per-round bits and classes, K and V row
    bytes of their own, and the query path (FWHT in the kernel for halves tables, none for code space)."""
    kt, vt = _tables(kl), _tables(vl)
    if isinstance(kt, KernelTables) != isinstance(vt, KernelTables):
        kt = kt if isinstance(kt, CodeSpaceTables) else CodeSpaceTables.from_layout(kt.layout)
        vt = vt if isinstance(vt, CodeSpaceTables) else CodeSpaceTables.from_layout(vt.layout)
    src = cuda_decode.kernel_source(6, kt, vt, 0, 2, 4, 2, 1, 4)
    kw, vw = cuda_decode.tensor_words(kt), cuda_decode.tensor_words(vt)
    assert f"#define NBK {kw.nbytes}\n" in src and f"#define NBV {vw.nbytes}\n" in src
    assert f"#define K_B0 {kw.round_bits(0)}\n" in src and f"#define V_C1 {vw.round_class(1)}\n" in src
    assert f"#define Q_ROT {int(isinstance(kt, CodeSpaceTables))}\n" in src


def test_kernel_entry_points_make_the_inputs_device_current(monkeypatch):
    """decode_attention / quantize_pack / dequantize switch to their input's GPU when another one
    is current (accelerate's device_map), and leave CPU inputs and the current device alone. The
    switch is watched by faking two devices (CI has none)."""
    from turboquant.kernels._common import on_input_device

    entered = []

    class FakeDevice:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    fn = on_input_device(lambda x, y=1: (x.device, y))

    class OnGpu1:
        device = torch.device("cuda", 1)

    class OnGpu0:
        device = torch.device("cuda", 0)

    assert fn(OnGpu1(), y=2) == (torch.device("cuda", 1), 2) and entered == [torch.device("cuda", 1)]
    fn(x=OnGpu1())  # the input by keyword switches too
    assert entered == [torch.device("cuda", 1)] * 2
    fn(OnGpu0())
    fn(torch.zeros(1))
    assert entered == [torch.device("cuda", 1)] * 2, "no switch for the current device or CPU tensors"
    from turboquant.kernels import decode_attention, dequantize, quantize_pack

    for f in (decode_attention, dequantize, quantize_pack):
        assert getattr(f, "__wrapped__", None) is not None, f"{f.__name__} does not switch devices"


def test_halves_path_runs_k_and_v_of_different_widths_in_cuda():
    """K4/V3 through KernelTables: the kernel reads K and V rows of their own widths (NBK, NBV), so
    the halves path qualifies for it as the code-space path does (GPU: test_decode_attention's
    CUDA_CASES K4/V3 and 3.5/2.5 rows); K and V tables of different kinds still name the reason."""
    kt = KernelTables.from_layout(build_layout("int-4", 256, seed=0))
    vt = KernelTables.from_layout(build_layout("int-3", 256, seed=1))

    class FakeCuda:  # only what unsupported() reads of the stores, on a "cuda" device
        def __init__(self, t):
            self.t, self.device, self.shape = t, torch.device("cuda", 0), t.shape

        def stride(self, *a):
            return self.t.stride(*a)

        def dim(self):
            return self.t.dim()

        def data_ptr(self):
            return 0

        element_size = staticmethod(lambda: 1)

    kc = FakeCuda(torch.zeros(1, 2, 256, kt.code_nbytes, dtype=torch.uint8))
    vc = FakeCuda(torch.zeros(1, 2, 256, vt.code_nbytes, dtype=torch.uint8))
    n = FakeCuda(torch.zeros(1, 2, 256, dtype=torch.float16))
    why = cuda_decode.unsupported(256, 6, kt, vt, kc, vc, n, n)
    if why and "NVRTC" in why:  # this torch has no NVRTC hook: the layout rules come later
        pytest.skip("torch.cuda._compile_kernel is missing in this torch build")
    assert why is None, why
    from turboquant.kernels.codespace import CodeSpaceTables

    cs = CodeSpaceTables.from_layout(build_layout("int-3", 256, seed=1))
    assert "different kinds" in cuda_decode.unsupported(256, 6, kt, cs, kc, vc, n, n)


def test_device_length_kind_follows_the_length_dtype():
    """The kernel variant that reads device lengths is chosen by their dtype (``LEN_KIND`` 1 / 2:
    int32 / int64 loads); a host length takes LEN_KIND 0 (no load); other dtypes are refused by
    name. (test_cuda_decode_compile.py compiles each kind.)"""
    assert cuda_decode.len_kind(None) == 0
    assert cuda_decode.len_kind(torch.tensor([3], dtype=torch.int32)) == 1
    assert cuda_decode.len_kind(torch.tensor(3, dtype=torch.int64)) == 2
    with pytest.raises(ValueError, match="device `length` must be int32 or int64, got torch.float32"):
        cuda_decode.len_kind(torch.tensor([3.0]))
    kt = KernelTables.from_layout(build_layout("halves-3.5", 256, seed=0))
    for lk in (0, 1, 2):
        assert f"#define LEN_KIND {lk}\n" in cuda_decode.kernel_source(6, kt, kt, 2, 2, 4, 2, 1, 4, lk)
