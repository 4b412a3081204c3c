"""Attention over TurboQuant-compressed keys and values, scored in the rotated domain.

For a query ``q`` and a key stored as ``(idx, ||k||)`` (TurboQuant-mse, ``k̃ = ||k|| Π^T c[idx]``)

    <q, k̃> = ||k|| <Π q, c[idx]>

so the query is rotated once (``Π q``) and every key costs a centroid gather and a dot product: no
inverse FWHT per key. Values are accumulated in their rotated domain and un-rotated once:

    Σ_j p_j ṽ_j = Π_v^T ( Σ_j p_j ||v_j|| c[idx_j] ).

TurboQuant-prod adds the QJL term ``√(π/2)/d · ||r|| <S q, z>`` (``z = sign(S r)``) to the score,
and ``√(π/2)/d · S^T Σ_j p_j ||r_j|| z_j`` to the output.

The pure-torch path below is the reference and the CPU path. On CUDA,
:func:`compressed_attention` hands the layer to ``turboquant.kernels.compressed_attention_cuda``
when that function exists and accepts the call (returns a tensor, not ``None``).

The cache hands its layer to the attention function through a thread-local record (see
:func:`handoff` / :func:`take_handoff`): ``TurboQuantLayer.update`` records ``(layer, layer_idx,
key tensor it returned)``; ``turboquant_attention_forward`` uses the compressed path only when the
module's ``layer_idx`` and the identity of the ``key`` tensor it receives both match the record.
Anything else (prefill, exact layers, other caches) runs transformers' ``sdpa`` unchanged.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from turboquant.store_protocol import CodeStore, CompressedLayer

ATTENTION_NAME = "turboquant"
# Keys are scored this many tokens at a time: the transient centroid block is [B, H, CHUNK, D].
SCORE_CHUNK_TOKENS = 4096

# ------------------------------------------------------------------------------------------------
# fast unpacking of bit planes (layout of turboquant.packing) into centroid-table indices
# ------------------------------------------------------------------------------------------------
if sys.byteorder != "little":  # pragma: no cover - every supported CPU/GPU is little-endian
    raise ImportError("turboquant.attention assumes a little-endian byte order")


def _plane_lut(bits: int) -> torch.Tensor:
    """int32 ``[bits, 256]``: entry ``[j, p]`` puts bit ``i`` of byte ``p`` at bit ``4 i + j``.

    OR-ing the entries of the ``bits`` plane bytes of one 8-code group gives the 8 codes as the 8
    nibbles of one int32 (code ``i`` in bits ``4i .. 4i+3``): one gather per plane byte.
    """
    p = torch.arange(256, dtype=torch.int64)
    i = torch.arange(8, dtype=torch.int64)
    bit = (p[:, None] >> i[None, :]) & 1  # [256, 8]
    words = torch.stack([((bit << j) << (4 * i)).sum(-1) for j in range(bits)])
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _quad_table(centroids: tuple[float, ...]) -> torch.Tensor:
    """float32 ``[65536, 4]``: the centroids of the 4 codes packed as nibbles in a 16-bit value."""
    c = torch.zeros(16, dtype=torch.float32)
    c[: len(centroids)] = torch.tensor(centroids, dtype=torch.float32)
    v = torch.arange(65536)
    return torch.stack([c[(v >> (4 * k)) & 15] for k in range(4)], dim=-1).contiguous()


_TABLES: dict = {}


@dataclass
class CentroidTable:
    """Turns packed codes of one quantizer into centroid values ``c[idx]`` with three gathers.

    1. ``plane_lut`` (int32, one 256-entry table per (segment, plane); ``byte_offsets`` selects
       it for every code byte): each plane byte -> its bits spread into nibbles; OR over planes
       gives 8 codes a word;
    2. a word viewed as two int16 = 4 codes each;
    3. ``quads[s]`` ``[65536, 4]``: 4 codes -> 4 centroids of segment ``s`` (one row gather).

    ``segments``: per segment ``(byte_start, planes, bytes_per_plane, coords)``. Tables depend
    only on the codebooks, so layers of equal width share them (:meth:`shared`).
    """

    d: int
    code_nbytes: int
    plane_lut: torch.Tensor
    byte_offsets: torch.Tensor
    segments: tuple[tuple[int, int, int, int], ...]
    quads: tuple[torch.Tensor, ...]
    c_seg: torch.Tensor  # int32 [nseg * 4]: (byte_start, planes, bytes_per_plane, first_coord)
    c_spread: torch.Tensor  # int32 [4 * 256]: the plane tables of a 4-bit code (CPU kernel)
    c_pairs: torch.Tensor  # float32 [nseg, 256, 2]: centroids of a byte of two nibble codes

    @classmethod
    def from_segments(cls, d: int, segments: list, device: torch.device) -> CentroidTable:
        luts, plan, quads, plane_sizes, c_seg, pairs = [], [], [], [], [], []
        start = 0
        v = torch.arange(256)
        for a, b, nb, cb in segments:
            if nb > 4:
                raise ValueError(f"CentroidTable supports codes of at most 4 bits, got {nb}")
            n = b - a
            per_plane = n // 8
            lut = _plane_lut(nb)
            for j in range(nb):
                luts.append(lut[j])
                plane_sizes.append(per_plane)
            plan.append((start, nb, per_plane, n))
            c_seg += [start, nb, per_plane, a]
            quads.append(_quad_table(cb.centroids).to(device))
            c = torch.zeros(16)
            c[: 2**nb] = torch.tensor(cb.centroids, dtype=torch.float32)
            pairs.append(torch.stack([c[v & 15], c[v >> 4]], dim=-1))
            start += nb * per_plane
        offsets = torch.cat([torch.full((n,), k * 256, dtype=torch.int32) for k, n in enumerate(plane_sizes)])
        return cls(
            d, start, torch.cat(luts).to(device), offsets.to(device), tuple(plan), tuple(quads),
            torch.tensor(c_seg, dtype=torch.int32), _plane_lut(4).reshape(-1).contiguous(),
            torch.stack(pairs).contiguous(),
        )

    @classmethod
    def shared(cls, d: int, segments: list, device: torch.device) -> CentroidTable:
        """One table per (d, codebooks, device): layers with equal bit widths share it."""
        key = (d, tuple((a, b, nb, cb.centroids) for a, b, nb, cb in segments), str(device))
        if key not in _TABLES:
            _TABLES[key] = cls.from_segments(d, segments, device)
        return _TABLES[key]

    def tensors(self) -> list[torch.Tensor]:
        return [self.plane_lut, self.byte_offsets, *self.quads, self.c_seg, self.c_spread, self.c_pairs]

    def gather(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes ``[..., code_nbytes]`` -> ``c[idx]`` float32 ``[..., d]`` (unit-norm, rotated domain)."""
        lead = codes.shape[:-1]
        flat = (codes.to(torch.int32) + self.byte_offsets).reshape(-1)
        words = torch.index_select(self.plane_lut, 0, flat).view(*lead, self.code_nbytes)
        outs = []
        for (start, nb, per_plane, n), quad in zip(self.segments, self.quads):
            acc = words[..., start : start + per_plane]
            for j in range(1, nb):
                acc = acc | words[..., start + j * per_plane : start + (j + 1) * per_plane]
            idx = acc.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
            outs.append(torch.index_select(quad, 0, idx.reshape(-1)).view(*lead, n))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


# ------------------------------------------------------------------------------------------------
# CPU kernel (C, compiled once per machine with the system compiler; torch fallback without one)
# ------------------------------------------------------------------------------------------------
_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
/* One vector of bit-plane codes -> centroid floats. T: uint32 [4][256] spreads bit i of a plane
   byte to bit 4i+j (plane j): OR over planes = 8 codes as nibbles. pairs: float [nseg][256][2]:
   a byte of two nibble codes -> their two centroids (one 8-byte load). seg: per segment
   (byte_start, planes, bytes_per_plane, first_coord). */
static inline void decode_vec(const uint8_t* row, int nseg, const int* seg, const uint32_t* T,
                              const float* pairs, float* buf) {
    for (int s = 0; s < nseg; s++) {
        int start = seg[4*s], nb = seg[4*s+1], pp = seg[4*s+2], coord0 = seg[4*s+3];
        const uint64_t* pr = (const uint64_t*)(pairs + 512*s);
        const uint8_t* r = row + start;
        for (int m = 0; m < pp; m++) {
            uint32_t w = T[r[m]];
            for (int j = 1; j < nb; j++) w |= T[256*j + r[j*pp + m]];
            uint64_t* o = (uint64_t*)(buf + coord0 + 8*m);
            o[0] = pr[w & 0xFF]; o[1] = pr[(w >> 8) & 0xFF]; o[2] = pr[(w >> 16) & 0xFF]; o[3] = pr[w >> 24];
        }
    }
}
/* scores[h, g, n] = norm[h, n] * <q[h, g], c[idx[h, n]]>  (q already rotated) */
void tq_scores(const uint8_t* codes, long head_stride, int nbytes, const float* norms, int BH, int N,
               int D, int G, const float* q, float* out, int nseg, const int* seg, const uint32_t* T,
               const float* pairs) {
    float buf[512];
    for (int h = 0; h < BH; h++) {
        const float* qh = q + (long)h*G*D;
        for (int n = 0; n < N; n++) {
            decode_vec(codes + h*head_stride + (long)n*nbytes, nseg, seg, T, pairs, buf);
            float nr = norms[(long)h*N + n];
            for (int g = 0; g < G; g++) {
                const float* qg = qh + g*D;
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int d = 0; d < D; d += 8)
                    for (int k = 0; k < 8; k++) acc[k] += qg[d+k]*buf[d+k];
                float a = 0; for (int k = 0; k < 8; k++) a += acc[k];
                out[((long)h*G + g)*N + n] = a*nr;
            }
        }
    }
}
/* out[h, g, :] = sum_n p[h, g, n] * norm[h, n] * c[idx[h, n]]  (rotated domain) */
void tq_values(const uint8_t* codes, long head_stride, int nbytes, const float* norms, int BH, int N,
               int D, int G, const float* p, float* out, int nseg, const int* seg, const uint32_t* T,
               const float* pairs) {
    float buf[512];
    for (int h = 0; h < BH; h++) {
        float* oh = out + (long)h*G*D;
        memset(oh, 0, sizeof(float)*G*D);
        for (int n = 0; n < N; n++) {
            decode_vec(codes + h*head_stride + (long)n*nbytes, nseg, seg, T, pairs, buf);
            float nr = norms[(long)h*N + n];
            for (int g = 0; g < G; g++) {
                float w = p[((long)h*G + g)*N + n]*nr;
                if (w == 0.0f) continue;
                float* og = oh + g*D;
                for (int d = 0; d < D; d++) og[d] += w*buf[d];
            }
        }
    }
}
"""
_C_LIB: list = []  # [ctypes.CDLL | None] once tried
C_MAX_HEAD_DIM = 512


def _cpu_kernel_lib():
    """The compiled CPU kernel, or ``None`` (no compiler, or ``TURBOQUANT_CPU_KERNEL=0``).

    Built with ``$CC`` (default ``cc``) ``-O3 -march=native`` into
    ``$TURBOQUANT_CACHE_DIR`` (default ``~/.cache/turboquant``), keyed by a hash of the source,
    the compiler and the CPU flags, so a machine compiles it once (~0.3 s).
    """
    if _C_LIB:
        return _C_LIB[0]
    lib = None
    if os.environ.get("TURBOQUANT_CPU_KERNEL", "1") != "0":
        try:
            lib = _build_cpu_kernel()
        except (OSError, subprocess.SubprocessError, AttributeError) as err:  # no compiler / failed build: torch
            warnings.warn(f"turboquant: CPU attention kernel unavailable ({err}); using the torch path", stacklevel=2)
    _C_LIB.append(lib)
    return lib


def _build_cpu_kernel():
    import ctypes
    import hashlib
    import platform
    import tempfile
    from pathlib import Path

    cc = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    try:
        cpu = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        cpu = platform.processor()
    key = hashlib.sha256("|".join([_C_SOURCE, cc, *flags, cpu, platform.machine()]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("TURBOQUANT_CACHE_DIR", Path.home() / ".cache" / "turboquant"))
    folder.mkdir(parents=True, exist_ok=True)
    so = folder / f"tq_cpu_{key}.so"
    if not so.exists():
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "tq_cpu.c"
            src.write_text(_C_SOURCE)
            out = Path(tmp) / so.name
            subprocess.run([cc, *flags, "-o", str(out), str(src)], check=True, capture_output=True, timeout=120)
            os.replace(out, so)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(str(so))
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    for fn in (lib.tq_scores, lib.tq_values):
        fn.argtypes = [vp, i64, i32, vp, i32, i32, i32, i32, vp, vp, i32, vp, vp, vp]
        fn.restype = None
    return lib


def cpu_backend() -> str:
    """``"c"`` when the compiled CPU kernel is in use, else ``"torch"``."""
    return "c" if _cpu_kernel_lib() is not None else "torch"


def _c_call(fn, table: CentroidTable, codes: torch.Tensor, norms: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    """Run ``tq_scores`` / ``tq_values`` on codes [B, H, n, nbytes] (a slice of a contiguous buffer)."""
    b, h, n, nbytes = codes.shape
    if codes.stride(3) != 1 or codes.stride(2) != nbytes or codes.stride(0) != h * codes.stride(1):
        codes = codes.contiguous()
    g, d = x.shape[-2], table.d
    fn(codes.data_ptr(), codes.stride(1), nbytes, norms.data_ptr(), b * h, n, d, g, x.data_ptr(), out.data_ptr(),
       len(table.segments), table.c_seg.data_ptr(), table.c_spread.data_ptr(), table.c_pairs.data_ptr())


def _use_c_groups(x: torch.Tensor, codec) -> bool:
    """Outlier layouts: the C kernel runs each channel group as a layout of its own."""
    return x.device.type == "cpu" and _cpu_kernel_lib() is not None


def _use_c(x: torch.Tensor, codec) -> bool:
    """The C kernel scores one-group layouts (one norm a vector) here; outlier layouts per group."""
    table = codec.table
    return (x.device.type == "cpu" and not codec.grouped and table.d <= C_MAX_HEAD_DIM
            and _cpu_kernel_lib() is not None)


def qjl_signs(qjl: torch.Tensor, d: int) -> torch.Tensor:
    """1-bit plane uint8 ``[..., d/8]`` -> float32 ``±1`` ``[..., d]``."""
    lut = _sign_lut(qjl.device)
    return lut[qjl.long()].flatten(-2)[..., :d]


_SIGN_LUTS: dict = {}


def _sign_lut(device: torch.device) -> torch.Tensor:
    if device not in _SIGN_LUTS:
        p = torch.arange(256)
        _SIGN_LUTS[device] = (((p[:, None] >> torch.arange(8)) & 1).float() * 2 - 1).to(device)
    return _SIGN_LUTS[device]


# ------------------------------------------------------------------------------------------------
# the reference / CPU attention
# ------------------------------------------------------------------------------------------------
def _store_scores(q: torch.Tensor, qr: torch.Tensor | None, store: CodeStore, start: int, stop: int) -> torch.Tensor:
    """Scores ``<q, k̃_j>`` for stored keys ``j in [start, stop)``: q [B, H, M, D] (``qr = Π q``) -> [B, H, M, n]."""
    codec = store.codec
    s = None
    if store.codes is not None:
        codes = store.codes[:, :, start:stop]
        norms = store.norms[:, :, start:stop].float()
        if _use_c(qr, codec):
            s = torch.empty((*qr.shape[:-1], stop - start), dtype=torch.float32)
            _c_call(_cpu_kernel_lib().tq_scores, codec.table, codes, norms, qr, s)
        elif codec.grouped and _use_c_groups(qr, codec):  # the C kernel one group at a time
            s = 0
            for a, b, g, b0, b1, table in codec.group_tables:
                part = torch.empty((*qr.shape[:-1], stop - start), dtype=torch.float32)
                _c_call(_cpu_kernel_lib().tq_scores, table, codes[..., b0:b1], norms[..., g].contiguous(),
                        qr[..., a:b].contiguous(), part)
                s = s + part
        elif codec.grouped:  # Σ_g ||k_g|| <(Π q)_g, c_g[idx_g]>, one partial score a group
            cents = codec.table.gather(codes)  # [B, H, n, D] code space
            s = sum(torch.matmul(qr[..., a:b], cents[..., a:b].transpose(-1, -2)) * norms[..., g].unsqueeze(-2)
                    for a, b, g in codec.group_slices())
        else:
            cents = codec.table.gather(codes)  # [B, H, n, D]
            s = torch.matmul(qr, cents.transpose(-1, -2)) * norms.unsqueeze(-2)
    if store.qjl is not None:
        z = qjl_signs(store.qjl[:, :, start:stop], codec.d)  # [B, H, n, D]
        qs = torch.matmul(q, codec.S.T)  # S q
        sq = torch.matmul(qs, z.transpose(-1, -2)) * (codec.qjl_scale * store.rnorms[:, :, start:stop].float()).unsqueeze(-2)
        s = sq if s is None else s + sq
    return s


def _store_values(p: torch.Tensor, store: CodeStore, start: int, stop: int) -> torch.Tensor:
    """``Σ_j p_j ṽ_j`` over stored values ``j in [start, stop)``: ``p`` [B, H, M, n] -> [B, H, M, D]."""
    codec = store.codec
    out = None
    if store.codes is not None:
        codes = store.codes[:, :, start:stop]
        norms = store.norms[:, :, start:stop].float()
        if _use_c(p, codec):
            acc = torch.empty((*p.shape[:-1], codec.d), dtype=torch.float32)
            _c_call(_cpu_kernel_lib().tq_values, codec.table, codes, norms, p.contiguous(), acc)
        elif codec.grouped and _use_c_groups(p, codec):
            parts, pc = [], p.contiguous()
            for a, b, g, b0, b1, table in codec.group_tables:
                part = torch.empty((*p.shape[:-1], b - a), dtype=torch.float32)
                _c_call(_cpu_kernel_lib().tq_values, table, codes[..., b0:b1], norms[..., g].contiguous(), pc, part)
                parts.append(part)
            acc = torch.cat(parts, dim=-1)
        elif codec.grouped:  # per group Σ_j p_j ||v_j,g|| c_g[idx_j,g], un-rotated per group below
            cents = codec.table.gather(codes)
            acc = torch.cat([torch.matmul(p * norms[..., g].unsqueeze(-2), cents[..., a:b])
                             for a, b, g in codec.group_slices()], dim=-1)
        else:
            acc = torch.matmul(p * norms.unsqueeze(-2), codec.table.gather(codes))
        out = codec.unrotate(acc, store.outliers)
    if store.qjl is not None:
        z = qjl_signs(store.qjl[:, :, start:stop], codec.d)
        w = p * (codec.qjl_scale * store.rnorms[:, :, start:stop].float()).unsqueeze(-2)
        o = torch.matmul(torch.matmul(w, z), codec.S)  # S^T Σ w_j z_j (row vectors)
        out = o if out is None else out + o
    return out


def _expand_mask(mask: torch.Tensor | None, n_rep: int, kv_len: int, tq: int) -> torch.Tensor | None:
    """Mask [B|1, 1, Tq, kv] (bool: True = attend, or additive float) -> additive [B|1, 1, n_rep*Tq, kv]."""
    if mask is None:
        return None
    mask = mask[..., :kv_len]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    else:
        mask = mask.float()
    b, h = mask.shape[0], mask.shape[1]
    if h != 1:
        raise ValueError(f"per-head attention masks are not supported by the compressed path (got {h} heads)")
    if n_rep > 1:
        mask = mask.expand(b, n_rep, tq, kv_len).reshape(b, 1, n_rep * tq, kv_len)
    return mask


def compressed_attention_reference(
    query: torch.Tensor,
    layer: CompressedLayer,
    scaling: float,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention of ``query`` [B, H_q, T_q, D] over a layer's codes + residual window.

    Keys/values ``[0, L_c)`` come from the packed stores, ``[L_c, L_c + R)`` from the residual
    window (the newest tokens, including the ones just appended). Returns ``[B, T_q, H_q, D]`` in
    the query dtype. ``attention_mask`` as transformers builds it for sdpa (bool, True = attend,
    or additive float), or ``None`` (causal: query ``t`` sees keys ``<= L - T_q + t``).
    """
    with torch.profiler.record_function("turboquant::attention"):
        return _compressed_attention(query, layer, scaling, attention_mask)


def _compressed_attention(
    query: torch.Tensor,
    layer: CompressedLayer,
    scaling: float,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    b, hq, tq, d = query.shape
    ks, vs = layer.key_store, layer.value_store
    hkv = layer.num_heads
    n_rep = hq // hkv
    q = query.float().reshape(b, hkv, n_rep * tq, d)  # query heads grouped by their KV head
    lc = ks.length
    rk, rv = layer.residual_keys(), layer.residual_values()
    r = 0 if rk is None else rk.shape[-2]
    kv_len = lc + r
    chunks = [(s, min(s + SCORE_CHUNK_TOKENS, lc)) for s in range(0, lc, SCORE_CHUNK_TOKENS)]
    qr = ks.codec.rotate(q, ks.outliers).contiguous() if ks.codes is not None else None
    scores = [_store_scores(q, qr, ks, s, e) for s, e in chunks]
    if r:
        scores.append(torch.matmul(q, rk.float().transpose(-1, -2)))
    logits = (torch.cat(scores, dim=-1) if len(scores) > 1 else scores[0]) * scaling
    mask = _expand_mask(attention_mask, n_rep, kv_len, tq)
    if mask is None and tq > 1:
        pos_q = torch.arange(tq, device=q.device).repeat(n_rep) + (kv_len - tq)
        causal = torch.arange(kv_len, device=q.device)[None, :] <= pos_q[:, None]
        mask = torch.zeros(causal.shape, device=q.device).masked_fill_(~causal, float("-inf"))
    if mask is not None:
        logits = logits + mask
    probs = torch.softmax(logits, dim=-1)
    if mask is not None:
        probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows (left padding) -> zeros, like sdpa
    out = None
    for s, e in chunks:
        o = _store_values(probs[..., s:e], vs, s, e)
        out = o if out is None else out + o
    if r:
        o = torch.matmul(probs[..., lc:], rv.float())
        out = o if out is None else out + o
    out = out.reshape(b, hkv, n_rep, tq, d).reshape(b, hq, tq, d)
    return out.transpose(1, 2).to(query.dtype).contiguous()


def compressed_attention(
    query: torch.Tensor,
    layer: CompressedLayer,
    scaling: float,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Dispatch: fused Triton kernel on CUDA when available, else the torch reference."""
    if query.is_cuda:
        try:
            from turboquant.kernels import compressed_attention_cuda  # type: ignore[attr-defined]
        except (ImportError, AttributeError):
            compressed_attention_cuda = None
        if compressed_attention_cuda is not None:
            out = compressed_attention_cuda(query, layer, scaling, attention_mask)
            if out is not None:
                return out
    return compressed_attention_reference(query, layer, scaling, attention_mask)


# ------------------------------------------------------------------------------------------------
# cache -> attention hand-off and the transformers attention function
# ------------------------------------------------------------------------------------------------
HANDOFF_EAGER_REASON = (
    "TurboQuantCache hands its compressed layer to the 'turboquant' attention outside the traced "
    "graph: torch.compile runs `update` and the attention eagerly (a graph break each); "
    "fullgraph=True cannot do that, compile with fullgraph=False"
)


def run_eagerly(fn: Any) -> Any:
    """Keep ``fn`` out of torch.compile graphs (a graph break around it, the call runs in Python).

    The cache -> attention hand-off is a Python-side record: traced, it would be baked into the
    graph and lost at replay (the attention would read only the window placeholders)."""
    try:
        return torch.compiler.disable(fn, reason=HANDOFF_EAGER_REASON)
    except TypeError:  # torch without the `reason` keyword
        return torch.compiler.disable(fn)


class _Handoff(threading.local):
    record: tuple[Any, int, torch.Tensor] | None = None


_HANDOFF = _Handoff()


def handoff(layer: CompressedLayer | None, layer_idx: int = -1, key: torch.Tensor | None = None) -> None:
    """Called by the cache's ``update``: the next attention call for ``layer_idx`` whose ``key``
    argument *is* ``key`` reads ``layer``'s compressed storage. ``handoff(None)`` drops a record
    that no attention call took (e.g. a forward that raised in between), so it cannot be taken
    by a later call."""
    _HANDOFF.record = None if layer is None else (layer, layer_idx, key)


def take_handoff(module: torch.nn.Module, key: torch.Tensor) -> CompressedLayer | None:
    """Return the layer recorded for this attention call, or ``None`` (plain attention).

    Raises if the cache prepared a compressed call for this layer but the model changed the key
    tensor on the way (the compressed path would then silently ignore the change).
    """
    rec = _HANDOFF.record
    if rec is None:
        return None
    layer, layer_idx, rec_key = rec
    if getattr(module, "layer_idx", None) != layer_idx:
        return None
    _HANDOFF.record = None
    if rec_key is not key:
        raise RuntimeError(
            f"TurboQuantCache: layer {layer_idx} transformed the cached keys between `cache.update` and the "
            "attention call; the 'turboquant' attention cannot honour that. Use attn_implementation='sdpa' "
            "(exact dequantized fallback) for this model."
        )
    return layer


@run_eagerly
def turboquant_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function ``"turboquant"``: compressed decode, else ``sdpa``."""
    layer = take_handoff(module, key)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError("the 'turboquant' attention supports plain full attention only (no softcap / sliding window)")
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    attend = getattr(layer, "attend", None)
    if attend is not None:  # a layer that scores its own storage (turboquant.static_cache)
        return attend(query, scaling, attention_mask), None
    return compressed_attention(query, layer, scaling, attention_mask), None


HANDOFF_ATTENTIONS: set[str] = {ATTENTION_NAME}


def register_attention(name: str = ATTENTION_NAME, fn: Any = None) -> None:
    """Register an attention function that reads the cache's hand-off (default: ``"turboquant"`` =
    :func:`turboquant_attention_forward`) with transformers' attention and mask interfaces
    (sdpa masks); ``TurboQuantCache`` hands its layers to every name registered here. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn or turboquant_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    HANDOFF_ATTENTIONS.add(name)


__all__ = [
    "ATTENTION_NAME",
    "HANDOFF_ATTENTIONS",
    "CentroidTable",
    "compressed_attention",
    "compressed_attention_reference",
    "handoff",
    "qjl_signs",
    "register_attention",
    "run_eagerly",
    "take_handoff",
    "turboquant_attention_forward",
]
