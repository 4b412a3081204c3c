"""Split-K decode attention over packed TurboQuant-mse codes in CUDA C++ (tensor cores, register LUT).

The Triton kernel (:mod:`turboquant.kernels.decode_attention`) spends most of its time turning
codes into float16 centroids: one L1 gather a code pair and a shared-memory round trip to reach
the tensor-core operand layout. This kernel decodes codes *directly in the registers that feed*
``mma.sync.m16n8k16``, so neither happens:

* keys are the A operand (16 tokens x 16 positions), the G <= 8 query heads of a KV group the B
  operand (``n = 8``): ``s[t, h] = (Σ_j q_rot[h, j] c[idx_tj]) · ||k_t||``;
* each thread owns whole 32-bit plane words (32 coordinates of one token), so its codes never leave
  it: SWAR gathers bit ``j`` of codes ``4k + I`` into nibble ``k`` (2 integer ops a plane per 8
  codes), and ``prmt`` looks up the low and the high byte of four float16 centroids at once from
  an 8-entry table held in two registers; 4-bit codes use the codebook's symmetry
  ``c[r] = -c[15 - r]`` (3-bit magnitude index + sign, checked at table build);
* the positions the MMA sees are a fixed permutation of the rotated coordinates; the query is
  loaded in the same permutation, so ``q·k`` is unchanged;
* probabilities go C layout -> B operand with ``movmatrix`` (no shared memory), and values reuse
  the key decoder plus four ``movmatrix`` transposes a 16 x 16 tile to become the A operand of
  ``acc^T[pos, h] += V^T[pos, t] · P^T[t, h]`` (rotated value domain);
* packed rows stream global -> shared with ``cp.async`` (``STAGES``-deep pipeline a warp);
* online softmax in log2 units a warp, warps merged through shared memory, one float32 partial
  ``(m, l, acc)`` a CTA, written in the position order of the Triton combine kernel, which merges
  the splits, adds the residual window (Triton partial programs) and un-rotates once a head.

Every layout runs from its words (:class:`TensorWords`, read from the layout object): code space is
cut into 32-coordinate words of ``(bits, plane-0 byte, plane stride, norm slot)``; thread ``r`` of a
*round* (128 coordinates, 8 k-tiles) decodes word ``4·round + r`` at the round's widest bits (a
narrower word reads its missing planes as zero and a table built for it). A round whose words share
a group (halves: both rounds; ``paper-3.5``: the 192-channel rest) sums first and scales by that
group's norm; a round mixing groups (``paper-3.5`` round 0: outliers 64 @ 4 + rest @ 3) scales each
decoded centroid by its group's norm (``||x_g|| c_g[idx]``, float16) before the MMA:

    s[t, h] = Σ_rounds n_round(t) Σ_j q̃[h, j] c[idx_tj],   acc[j, h] = Σ_t p[t, h] n_g(j)(t) c[idx_tj].

``KernelTables`` (halves): the kernel applies ``s ∘`` and the FWHT to the raw query and the halves
combine un-rotates; ``CodeSpaceTables`` (outlier and other grouped layouts): the query arrives
rotated per group in code space and the partials land in the word decoder's position order
(:mod:`turboquant.kernels.segmented` rotates, combines and un-rotates).

Compiled at first use with NVRTC (``torch.cuda._compile_kernel``; no nvcc needed). Supports
head_dim 256 (the Qwen3.6 full-attention shape), words of 1-4 bits with at most two norm slots
(every halves / int / paper preset and outlier splits on 32-channel boundaries), G <= 8 query heads
a KV head; :func:`unsupported` says why a call does not qualify, and ``backend="auto"`` falls back
to the Triton kernels then.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from turboquant.kernels._common import KernelTables, position_coords

CUDA_HEAD_DIMS = (256,)
TILE = 16

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;


__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
  u32 d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s)); return d;
}
// x >> K as the high word of x * 2^(32-K): runs on the FMA pipe (IMAD.HI) instead of the integer
// ALU pipe, which the LUT decode keeps busy (ncu: ALU the most utilised pipe). K in 1..31.
template <int K> __device__ __forceinline__ u32 shr(u32 x) {
  u32 d; asm("mul.hi.u32 %0, %1, %2;" : "=r"(d) : "r"(x), "n"(1u << (32 - K))); return d;
}
template <> __device__ __forceinline__ u32 shr<0>(u32 x) { return x; }
__device__ __forceinline__ u32 movt(u32 a) {
  u32 d; asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a)); return d;
}
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
  u32 d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
__device__ __forceinline__ float h2f(u16 h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ float ex2(float x) {
  float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}
__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int nbytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(nbytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }

__device__ __forceinline__ float load_q(const void* q, long i) {
#if Q_KIND == 0
  return ((const float*)q)[i];
#elif Q_KIND == 1
  return h2f(((const u16*)q)[i]);
#else
  return __uint_as_float(((u32)((const u16*)q)[i]) << 16);
#endif
}

// Rotated coordinate held at MMA k-position `pos` (0..15) of k-tile `t` (0..15); see module doc.
// Thread r (= lane % 4) owns plane word r (coordinates 32r..32r+31) of both segments; the
// decoder's half2 number h holds coordinates (h>>2) + 8(h&3) + {0, 4}; tile t uses h = 2(t%8)
// (k-positions 2r, 2r+1) and 2(t%8)+1 (k-positions 2r+8, 2r+9).
__device__ __forceinline__ int coord_of(int t, int pos) {
  int seg = t >> 3, tl = t & 7, hi = pos >> 3, rr = (pos & 7) >> 1, e = pos & 1;
  int h = 2 * tl + hi;
  return seg * D2 + 32 * rr + (h >> 2) + 8 * (h & 3) + 4 * e;
}

// 32 codes of one token (one word a plane) -> 16 half2 centroids. tab = {lo0, lo1, hi0, hi1}:
// low / high bytes of the float16 centroids of entries 0..7 (BITS <= 3) or of c[8..15] (BITS == 4).
template <int BITS>
__device__ __forceinline__ void decode32(const u32* P, const u32* tab, u32* H) {
#pragma unroll
  for (int I = 0; I < 4; ++I) {
    u32 x = (I == 0 ? P[0] : (I == 1 ? shr<1>(P[0]) : (I == 2 ? shr<2>(P[0]) : shr<3>(P[0])))) & 0x11111111u;
#pragma unroll
    for (int j = 1; j < (BITS < 4 ? BITS : 3); ++j) {
      const int k = I - j;  // right shift by k > 0, else left shift by -k
      u32 w = k <= 0 ? (P[j] << (-k)) : (k == 1 ? shr<1>(P[j]) : shr<2>(P[j]));
      x |= w & (0x11111111u << j);
    }
    u32 sel = x, y = 0;
    if (BITS == 4) {
      y = (I == 0 ? P[3] : (I == 1 ? shr<1>(P[3]) : (I == 2 ? shr<2>(P[3]) : shr<3>(P[3])))) & 0x11111111u;
      sel = x ^ (0x77777777u - 7u * y);              // h ? r : 7 - r  (index into c[8..15])
    }
    const u32 s16 = shr<16>(sel);
    u32 l0 = prmt(tab[0], tab[1], sel), h0 = prmt(tab[2], tab[3], sel);
    u32 l1 = prmt(tab[0], tab[1], s16), h1 = prmt(tab[2], tab[3], s16);
    if (BITS == 4) {  // flip the float16 sign where h == 0 (c[r] = -c[15 - r]; narrower words: h = 0):
      // y's nibble k is h, so it selects byte h of 0x0080: 0x80 (h = 0) or 0 -- the sign mask in one prmt
      h0 ^= prmt(0x80u, 0u, y);
      h1 ^= prmt(0x80u, 0u, shr<16>(y));
    }
    H[4 * I + 0] = prmt(l0, h0, 0x5140);
    H[4 * I + 1] = prmt(l0, h0, 0x7362);
    H[4 * I + 2] = prmt(l1, h1, 0x5140);
    H[4 * I + 3] = prmt(l1, h1, 0x7362);
  }
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
  u32 d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}

// planes 0..BITS-1 of this thread's word (plane j at row + base + j * stride); planes at or past
// `nb` (a narrower word in a wider round) read as zero
template <int BITS>
__device__ __forceinline__ void load_planes(const u8* row, int base, int stride, int nb, u32* P) {
#pragma unroll
  for (int j = 0; j < BITS; ++j) P[j] = j < nb ? *(const u32*)(row + base + j * stride) : 0u;
}

// One round (128 code-space coordinates, thread r: word 4 * round + r) of tokens g (H0) and g + 8
// (H1): 16 half2 centroids each. MIXED (the round's words belong to different groups): scaled by
// the half2 norms n0 / n1 of the thread's group, so the MMA sums true coordinates.
template <int BITS, int MIXED>
__device__ __forceinline__ void decode_round(const u8* row0, const u8* row1, int base, int stride, int nb,
                                             const u32* tab, u32 n0, u32 n1, u32* H0, u32* H1) {
  u32 P0[4], P1[4];
  load_planes<BITS>(row0, base, stride, nb, P0);
  load_planes<BITS>(row1, base, stride, nb, P1);
  decode32<BITS>(P0, tab, H0);
  decode32<BITS>(P1, tab, H1);
  if (MIXED) {
#pragma unroll
    for (int i = 0; i < 16; ++i) { H0[i] = hmul2(H0[i], n0); H1[i] = hmul2(H1[i], n1); }
  }
}

#if K_NN == 2
#define KNORM(t) (*(const u32*)(knb + 2 * (t)))
#else
#define KNORM(t) ((u32)knb[t])
#endif
#if V_NN == 2
#define VNORM(t) (*(const u32*)(vnb + 2 * (t)))
#else
#define VNORM(t) ((u32)vnb[t])
#endif
#define LO(x) h2f((u16)((x) & 0xFFFFu))
#define HI(x) h2f((u16)((x) >> 16))

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
tq_decode_partial(const void* __restrict__ q, const float* __restrict__ ksign,
                  const u8* __restrict__ kc, const u16* __restrict__ kn,
                  const u8* __restrict__ vc, const u16* __restrict__ vn,
                  const u32* __restrict__ tabs, const int* __restrict__ dst,
                  float* __restrict__ m_part, float* __restrict__ l_part, float* __restrict__ acc_part,
                  int length, int chunk, int S, int Hkv, double qk_scale_d,
                  int sq_b, int sq_h, int skc_b, int skc_h, int skn_b, int skn_h,
                  int svc_b, int svc_h, int svn_b, int svn_h, const void* __restrict__ lenp, int len_sb) {
  extern __shared__ __align__(16) u8 smem[];
  float* qs = (float*)smem;                                     // [G][D] rotated, scaled queries
  u8* stage = smem + G * D * 4 + QF_SMEM * 4096;               // [WARPS][STAGES][TILE * (NBK + NBV)]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, r = lane & 3;
  const int s_idx = blockIdx.x, bh = blockIdx.y, b = bh / Hkv, h = bh % Hkv;
  // LEN_KIND 1 / 2: this sequence's valid length from device memory (int32 / int64, batch stride
  // len_sb), clamped to the host bound `length`; the grid is sized by the bound, so CTAs past the
  // valid length write an empty partial (m = -inf, l = 0, acc = 0) without reading a row
#if LEN_KIND == 1
  length = min(length, ((const int*)lenp)[(long long)b * len_sb]);
#elif LEN_KIND == 2
  length = (int)min((long long)length, ((const long long*)lenp)[(long long)b * len_sb]);
#endif
  const int start = s_idx * chunk;
  const int end = min(start + chunk, length);

#if Q_ROT
  // ---- query given in code space (Π_g q_g per group, scaling · log2 e folded in), float32 -------
  for (int i = tid; i < G * D; i += WARPS * 32) {
    int gi = i / D, c = i % D;
    qs[i] = ((const float*)q)[(long)b * sq_b + (long)(h * G + gi) * sq_h + c];
  }
  __syncthreads();
  const float qmul = 1.f;
#else
  // ---- query: s ∘ q, FWHT, scale (Π q · scaling · log2 e) -------------------------------------
  const float qk_scale = (float)qk_scale_d;
  for (int i = tid; i < G * D; i += WARPS * 32) {
    int gi = i / D, c = i % D;
    qs[i] = load_q(q, (long)b * sq_b + (long)(h * G + gi) * sq_h + c) * ksign[c];
  }
  __syncthreads();
#pragma unroll
  for (int lg = 0; lg < LOG2_D; ++lg) {  // D = 2^LOG2_D; butterflies (a, a + L), L = 2^lg, a's lg-bit clear
    const int L = 1 << lg;
    for (int u = tid; u < G * D2; u += WARPS * 32) {
      const int gi = u / D2, v = u % D2;
      const int a = ((v >> lg) << (lg + 1)) | (v & (L - 1));
      float x = qs[gi * D + a], y = qs[gi * D + a + L];
      qs[gi * D + a] = x + y;
      qs[gi * D + a + L] = x - y;
    }
    __syncthreads();
  }
  const float qmul = qk_scale * rsqrtf((float)D);
#endif
#if QF_SMEM
  // query B fragments, the same for every warp: u32 [16 k-tiles][2][32 lanes] after the queries
  u32* qfs = (u32*)(smem + G * D * 4);
  if (warp == 0) {
#pragma unroll
    for (int t = 0; t < 16; ++t) {
      u32 f0 = 0u, f1 = 0u;
      if (g < G) {
        const float* qg = qs + g * D;
        f0 = pack_h2(qg[coord_of(t, 2 * r)] * qmul, qg[coord_of(t, 2 * r + 1)] * qmul);
        f1 = pack_h2(qg[coord_of(t, 2 * r + 8)] * qmul, qg[coord_of(t, 2 * r + 9)] * qmul);
      }
      qfs[(2 * t) * 32 + lane] = f0;
      qfs[(2 * t + 1) * 32 + lane] = f1;
    }
  }
  __syncthreads();
#define QF(t, i) qfs[(2 * (t) + (i)) * 32 + lane]
#else
  u32 qf[16][2];
#pragma unroll
  for (int t = 0; t < 16; ++t) {
    if (g < G) {
      const float* qg = qs + g * D;
      qf[t][0] = pack_h2(qg[coord_of(t, 2 * r)] * qmul, qg[coord_of(t, 2 * r + 1)] * qmul);
      qf[t][1] = pack_h2(qg[coord_of(t, 2 * r + 8)] * qmul, qg[coord_of(t, 2 * r + 9)] * qmul);
    } else {
      qf[t][0] = 0u; qf[t][1] = 0u;
    }
  }
#define QF(t, i) qf[t][i]
#endif
  // byte tables of this thread's word in each round: [K|V][round][thread r][lo0, lo1, hi0, hi1]
  u32 ktab[2][4], vtab[2][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ktab[0][i] = tabs[r * 4 + i]; ktab[1][i] = tabs[16 + r * 4 + i];
    vtab[0][i] = tabs[32 + r * 4 + i]; vtab[1][i] = tabs[48 + r * 4 + i];
  }
  // this thread's word in each round: plane-0 byte, plane stride, bits; prmt selector of its
  // group's norm as half2 (mixed rounds only: norm slot 0 -> low half of the pair, 1 -> high)
  const int kb0 = K_BASE0(r), ks0 = K_STRIDE0(r), kq0 = K_NB0(r), kb1 = K_BASE1(r), ks1 = K_STRIDE1(r),
            kq1 = K_NB1(r);
  const int vb0 = V_BASE0(r), vs0 = V_STRIDE0(r), vq0 = V_NB0(r), vb1 = V_BASE1(r), vs1 = V_STRIDE1(r),
            vq1 = V_NB1(r);
  const u32 kh0 = K_SLOT0(r) ? 0x3232u : 0x1010u, kh1 = K_SLOT1(r) ? 0x3232u : 0x1010u;
  const u32 vh0 = V_SLOT0(r) ? 0x3232u : 0x1010u, vh1 = V_SLOT1(r) ? 0x3232u : 0x1010u;

  // ---- stream this warp's 16-token tiles ------------------------------------------------------
  const u8* kbase = kc + (long long)b * skc_b + (long long)h * skc_h;
  const u8* vbase = vc + (long long)b * svc_b + (long long)h * svc_h;
  const u16* knb = kn + (long long)b * skn_b + (long long)h * skn_h;
  const u16* vnb = vn + (long long)b * svn_b + (long long)h * svn_h;
  const int ntiles = (end - start + TILE - 1) / TILE;
  const int nmy = ntiles > warp ? (ntiles - warp + WARPS - 1) / WARPS : 0;
  u8* wstage = stage + warp * (STAGES * TILE * (NBK + NBV));
  u32 wstage_s;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(wstage_s) : "l"(wstage));

  auto issue = [&](int k) {
    if (k < nmy) {
      const int n0 = start + (warp + k * WARPS) * TILE;
      const long long rows = end - n0;                          // real rows in this tile
      const u8* ksrc = kbase + (long long)n0 * NBK;
      const u8* vsrc = vbase + (long long)n0 * NBV;
      const u32 kd = wstage_s + (k % STAGES) * (TILE * (NBK + NBV));
      const u32 vd = kd + TILE * NBK;
      if (rows >= TILE) {  // full tile: no bounds (TILE * NB / 16 = NB chunks of 16 bytes)
#pragma unroll
        for (int c = lane; c < NBK; c += 32) cp_async16(kd + 16 * c, ksrc + 16 * c, 16);
#pragma unroll
        for (int c = lane; c < NBV; c += 32) cp_async16(vd + 16 * c, vsrc + 16 * c, 16);
      } else {  // last tile: rows past `end` are zero-filled, never read from global memory
        for (int c = lane; c < NBK; c += 32) {
          long long rem = rows * NBK - 16LL * c;
          int nb = rem >= 16 ? 16 : (rem > 0 ? (int)rem : 0);
          cp_async16(kd + 16 * c, nb ? (const void*)(ksrc + 16 * c) : (const void*)kbase, nb);
        }
        for (int c = lane; c < NBV; c += 32) {
          long long rem = rows * NBV - 16LL * c;
          int nb = rem >= 16 ? 16 : (rem > 0 ? (int)rem : 0);
          cp_async16(vd + 16 * c, nb ? (const void*)(vsrc + 16 * c) : (const void*)vbase, nb);
        }
      }
    }
    cp_commit();
  };

  float m0 = -TQ_INF, m1 = -TQ_INF, l0 = 0.f, l1 = 0.f;
  float acc[16][4];
#pragma unroll
  for (int t = 0; t < 16; ++t) { acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f; }

  // norms of tokens g / g+8 of tile k (K then V; a pair slot0 | slot1 << 16 for two groups),
  // loaded one tile ahead (global latency off the critical path)
  auto load_norms = [&](int k, u32* nrm) {
    nrm[0] = nrm[1] = nrm[2] = nrm[3] = 0u;
    if (k < nmy) {
      const int n0 = start + (warp + k * WARPS) * TILE, t0 = n0 + g, t1 = n0 + g + 8;
      if (t0 < end) { nrm[0] = KNORM(t0); nrm[2] = VNORM(t0); }
      if (t1 < end) { nrm[1] = KNORM(t1); nrm[3] = VNORM(t1); }
    }
  };
  u32 cur[4];
  load_norms(0, cur);
#pragma unroll
  for (int k = 0; k < STAGES - 1; ++k) issue(k);
#pragma unroll 1
  for (int k = 0; k < nmy; ++k) {
    issue(k + STAGES - 1);
    u32 nxt[4];
    load_norms(k + 1, nxt);
    cp_wait<STAGES - 1>();
    __syncwarp();
    const int n0 = start + (warp + k * WARPS) * TILE;
    const u8* kt = wstage + (k % STAGES) * (TILE * (NBK + NBV));
    const u8* vt = kt + TILE * NBK;
    const u8* krow0 = kt + g * NBK;
    const u8* krow1 = kt + (g + 8) * NBK;

    // scores: s[0..1] token g heads 2r, 2r+1; s[2..3] token g+8. Accumulators by norm class (a
    // round's K_C: 0 / 1 = one group's norm slot, applied after the sum; 2 = mixed, applied in the
    // decode), CHAINS independent chains each (k-tile % CHAINS) so consecutive MMAs need not wait.
    float s[4];
    {
      float sc[3][KCH][4];
#pragma unroll
      for (int c = 0; c < 3; ++c)
#pragma unroll
        for (int i = 0; i < KCH; ++i) { sc[c][i][0] = sc[c][i][1] = sc[c][i][2] = sc[c][i][3] = 0.f; }
      u32 H0[16], H1[16];
      decode_round<K_B0, K_C0 == 2>(krow0, krow1, kb0, ks0, kq0, ktab[0], prmt(cur[0], 0u, kh0),
                                    prmt(cur[1], 0u, kh0), H0, H1);
#pragma unroll
      for (int tl = 0; tl < 8; ++tl)
        mma16816(sc[K_C0][tl % KCH], H0[2 * tl], H1[2 * tl], H0[2 * tl + 1], H1[2 * tl + 1], QF(tl, 0), QF(tl, 1));
      decode_round<K_B1, K_C1 == 2>(krow0, krow1, kb1, ks1, kq1, ktab[1], prmt(cur[0], 0u, kh1),
                                    prmt(cur[1], 0u, kh1), H0, H1);
#pragma unroll
      for (int tl = 0; tl < 8; ++tl)
        mma16816(sc[K_C1][tl % KCH], H0[2 * tl], H1[2 * tl], H0[2 * tl + 1], H1[2 * tl + 1], QF(8 + tl, 0),
                 QF(8 + tl, 1));
      float sum[3][4];
#pragma unroll
      for (int c = 0; c < 3; ++c)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          sum[c][i] = sc[c][0][i];
#pragma unroll
          for (int j = 1; j < KCH; ++j) sum[c][i] += sc[c][j][i];
        }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const u32 nk = cur[i >> 1];
        s[i] = K_SCORE(LO(nk), HI(nk), sum[0][i], sum[1][i], sum[2][i]);
      }
    }
    const int t0 = n0 + g, t1 = n0 + g + 8;
    s[0] = t0 < end ? s[0] : -TQ_INF;
    s[1] = t0 < end ? s[1] : -TQ_INF;
    s[2] = t1 < end ? s[2] : -TQ_INF;
    s[3] = t1 < end ? s[3] : -TQ_INF;
    float x0 = fmaxf(s[0], s[2]), x1 = fmaxf(s[1], s[3]);
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, o));
      x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, o));
    }
    const float mn0 = fmaxf(m0, x0), mn1 = fmaxf(m1, x1);
    const float a0 = ex2(m0 - mn0), a1 = ex2(m1 - mn1);
    m0 = mn0; m1 = mn1;
    const float p0 = ex2(s[0] - mn0), p1 = ex2(s[1] - mn1), p2 = ex2(s[2] - mn0), p3 = ex2(s[3] - mn1);
    l0 = l0 * a0 + p0 + p2;
    l1 = l1 * a1 + p1 + p3;
    if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
      for (int t = 0; t < 16; ++t) { acc[t][0] *= a0; acc[t][1] *= a1; acc[t][2] *= a0; acc[t][3] *= a1; }
    }
    // B operands P^T of the value MMAs of a round of norm class c: tokens 2r, 2r+1 (PB(c, 0)) /
    // 2r+8, 2r+9 (PB(c, 1)) of head g; class 0 / 1 scaled by that slot's value norm, 2 (mixed) not
#define PBN(c, x) ((c) == 2 ? 1.f : (c) == 1 ? HI(x) : LO(x))
#define PB(c, i) movt(pack_h2((i) ? p2 * PBN(c, cur[3]) : p0 * PBN(c, cur[2]), (i) ? p3 * PBN(c, cur[3]) : p1 * PBN(c, cur[2])))
    u32 pa0 = PB(V_C0, 0), pa1 = PB(V_C0, 1);
    {
      const u8* vrow0 = vt + g * NBV;
      const u8* vrow1 = vt + (g + 8) * NBV;
      u32 H0[16], H1[16];
      decode_round<V_B0, V_C0 == 2>(vrow0, vrow1, vb0, vs0, vq0, vtab[0], prmt(cur[2], 0u, vh0),
                                    prmt(cur[3], 0u, vh0), H0, H1);
#pragma unroll
      for (int tl = 0; tl < 8; ++tl)
        mma16816(acc[tl], movt(H0[2 * tl]), movt(H0[2 * tl + 1]), movt(H1[2 * tl]), movt(H1[2 * tl + 1]), pa0, pa1);
#if V_C1 != V_C0
      pa0 = PB(V_C1, 0); pa1 = PB(V_C1, 1);
#endif
      decode_round<V_B1, V_C1 == 2>(vrow0, vrow1, vb1, vs1, vq1, vtab[1], prmt(cur[2], 0u, vh1),
                                    prmt(cur[3], 0u, vh1), H0, H1);
#pragma unroll
      for (int tl = 0; tl < 8; ++tl)
        mma16816(acc[8 + tl], movt(H0[2 * tl]), movt(H0[2 * tl + 1]), movt(H1[2 * tl]), movt(H1[2 * tl + 1]), pa0,
                 pa1);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) cur[i] = nxt[i];
    __syncwarp();
  }
  cp_wait<0>();
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o);
  }

  // ---- merge the warps in shared memory, write one partial a CTA ------------------------------
  __syncthreads();
  float* wm = (float*)stage;                  // [WARPS][8]
  float* wl = wm + WARPS * 8;                 // [WARPS][8]
  float* wacc = wl + WARPS * 8;               // [WARPS][8][D] (rotated coordinate order)
  if (g == 0) {
    wm[warp * 8 + 2 * r] = m0; wm[warp * 8 + 2 * r + 1] = m1;
    wl[warp * 8 + 2 * r] = l0; wl[warp * 8 + 2 * r + 1] = l1;
  }
  __syncthreads();
  float M0 = -TQ_INF, M1 = -TQ_INF;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) { M0 = fmaxf(M0, wm[w * 8 + 2 * r]); M1 = fmaxf(M1, wm[w * 8 + 2 * r + 1]); }
  const float f0 = m0 == -TQ_INF ? 0.f : ex2(m0 - M0), f1 = m1 == -TQ_INF ? 0.f : ex2(m1 - M1);
  float* mine = wacc + warp * 8 * D;
#pragma unroll
  for (int t = 0; t < 16; ++t) {
    const int c0 = coord_of(t, g), c1 = coord_of(t, g + 8);   // rows g / g+8 of the V^T tile
    mine[(2 * r) * D + c0] = acc[t][0] * f0;
    mine[(2 * r + 1) * D + c0] = acc[t][1] * f1;
    mine[(2 * r) * D + c1] = acc[t][2] * f0;
    mine[(2 * r + 1) * D + c1] = acc[t][3] * f1;
  }
  __syncthreads();
  const long long part0 = ((long long)bh * S + s_idx) * G;
  for (int i = tid; i < G * D; i += WARPS * 32) {
    const int hi = i / D, c = i % D;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += wacc[(w * 8 + hi) * D + c];
    acc_part[(part0 + hi) * D + dst[c]] = v;
  }
  if (tid < G) {
    float M = -TQ_INF, L = 0.f;
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, wm[w * 8 + tid]);
    for (int w = 0; w < WARPS; ++w) {
      const float mw = wm[w * 8 + tid];
      if (mw != -TQ_INF) L += wl[w * 8 + tid] * ex2(mw - M);
    }
    m_part[part0 + tid] = M;
    l_part[part0 + tid] = L;
  }
}
"""

_KERNELS: dict = {}


@dataclass(frozen=True)
class CudaConfig:
    """One launch configuration of the CUDA decode kernel (each a compiled variant): ``stages``
    cp.async stages a warp, ``chains`` independent MMA accumulator chains, ``qf_smem`` query
    fragments in shared memory (1) or registers (0), ``warps`` a CTA, ``min_blocks`` resident CTAs
    an SM (``__launch_bounds__``: caps registers), ``programs_per_sm`` CTAs an SM the split count
    aims at. ``None`` = by load, measured on the H100: few KV heads in flight (B·H_kv < 16) -> one
    16-warp CTA an SM (fewer, longer splits: a cheaper combine); else 4-warp CTAs, 4 an SM
    (128 registers a thread). Pass one as ``decode_attention(..., cuda_config=...)``; benchmarks
    sweep them (:meth:`parse`)."""

    stages: int = 2
    chains: int = 2
    qf_smem: int = 1
    warps: int | None = None
    min_blocks: int | None = None
    programs_per_sm: int | None = None

    def __post_init__(self):
        for name, allowed in (("stages", (1, 2, 3, 4)), ("chains", (1, 2, 4)), ("qf_smem", (0, 1)),
                              ("warps", (None, 4, 8, 16))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"CudaConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("min_blocks", "programs_per_sm"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 32):
                raise ValueError(f"CudaConfig.{name} must be None or an int in [1, 32], got {v!r}")

    def launch_shape(self, few: bool) -> dict:
        """Warps a CTA, resident CTAs an SM (register cap) and CTAs an SM the split count aims at."""
        return {
            "warps": self.warps or (16 if few else 4),
            "min_blocks": self.min_blocks or (1 if few else 4),
            "programs_per_sm": self.programs_per_sm or (1 if few else 4),
        }

    @classmethod
    def parse(cls, text: str) -> CudaConfig:
        """``programs_per_sm:stages:min_blocks:chains:qf_smem:warps`` (0 = by load for the
        first, third and last), the benchmarks' ``--configs`` syntax."""
        parts = text.split(":")
        if len(parts) != 6 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"CUDA config {text!r}: expected programs_per_sm:stages:min_blocks:chains:qf_smem:warps "
                             "(six non-negative ints, 0 = by load for programs_per_sm, min_blocks, warps)")
        pps, st, mb, ch, qs, wp = (int(p) for p in parts)
        return cls(stages=st, chains=ch, qf_smem=qs, warps=wp or None, min_blocks=mb or None,
                   programs_per_sm=pps or None)


DEFAULT_CONFIG = CudaConfig()


def launch_shape(few: bool, config: CudaConfig | None = None) -> dict:
    """:meth:`CudaConfig.launch_shape` of ``config`` (default :data:`DEFAULT_CONFIG`)."""
    return (config or DEFAULT_CONFIG).launch_shape(few)


_DST_INDEX: dict = {}
WORD = 32  # code-space coordinates a 32-bit plane word (one thread's share of a round)
ROUND = 128  # code-space coordinates a round: 4 threads x one word (the MMA k-tiles 8t .. 8t+7)
NUM_CLASSES = 3  # norm classes of a round: 0 / 1 = one group's norm slot, 2 = mixed groups


@dataclass(frozen=True)
class TensorWords:
    """How the kernel reads the code rows of one tensor (K or V), read from its tables' layout.

    ``words[w] = (bits, plane-0 byte, plane stride, norm slot)`` of code-space coordinates
    ``[32w, 32w + 32)`` (one 32-bit word a bit plane: packing puts code ``32w + i`` of the segment in
    bit ``i``); ``books[w]`` its codebook's centroids (ascending). Thread ``r`` of a warp decodes word
    ``4·round + r`` of every token row; a round decodes at its widest word's bits (narrower words
    read their missing planes as zero) and, where its words belong to different groups, scales
    the centroids by each word's group norm in the decode (``class 2``); else the group's norm
    scales the round's sum afterwards (``class`` = the norm slot)."""

    words: tuple[tuple[int, int, int, int], ...]
    books: tuple[tuple[float, ...], ...]
    num_norms: int
    nbytes: int

    def round_words(self, i: int) -> tuple[tuple[int, int, int, int], ...]:
        return self.words[4 * i : 4 * i + 4]

    def round_bits(self, i: int) -> int:
        return max(w[0] for w in self.round_words(i))

    def round_class(self, i: int) -> int:
        slots = {w[3] for w in self.round_words(i)}
        return slots.pop() if len(slots) == 1 else 2

    @property
    def classes(self) -> set[int]:
        return {self.round_class(i) for i in range(len(self.words) // 4)}


def tensor_words(tables) -> TensorWords | str:
    """The :class:`TensorWords` of ``KernelTables`` (halves: kernel segments A/B = rounds 0/1) or of
    ``CodeSpaceTables`` (any layout whose segments are whole words), or why the kernel cannot
    read them. Cached on the tables object."""
    cache = tables.__dict__.setdefault("_cuda_decode", {})
    if "words" not in cache:
        cache["words"] = _words_of(tables)
    return cache["words"]


def _words_of(tables) -> TensorWords | str:
    if isinstance(tables, KernelTables):
        if tables.d != 2 * ROUND:
            return f"head_dim {tables.d}"
        words, books = [], []
        for s, (nb, base, stride) in enumerate(tables.seg):
            cent = tuple(float(c) for c in tables.centroids[s, : 2**nb].detach().cpu())
            for r in range(4):
                words.append((nb, base + 4 * r, stride, 0))
                books.append(cent)
        return TensorWords(tuple(words), tuple(books), 1, tables.code_nbytes)
    layout = getattr(tables, "layout", None)
    if layout is None:
        return "tables without a layout"
    if layout.d != 2 * ROUND:
        return f"head_dim {layout.d}"
    if layout.num_norms > 2:
        return f"{layout.num_norms} channel groups (the kernel takes at most 2 norm slots)"
    words, books = [], []
    for w in range(layout.d // WORD):
        lo, hi = WORD * w, WORD * (w + 1)
        hit = [(g, s) for g in layout.groups for s in g.segments if s.start <= lo and hi <= s.stop]
        if not hit:
            return f"a segment boundary inside code-space coordinates [{lo}, {hi}) (segments must be whole 32-coordinate words)"
        g, s = hit[0]
        if not 1 <= s.bits <= 4:
            return f"a {s.bits}-bit segment (the kernel decodes 1-4 bits)"
        words.append((s.bits, s.byte_start + (lo - s.start) // 8, s.plane_nbytes, g.norm_slot))
        books.append(tuple(float(c) for c in s.codebook.centroids))
    return TensorWords(tuple(words), tuple(books), layout.num_norms, layout.code_nbytes)


def round_tables(tw: TensorWords) -> list[list[int]] | None:
    """uint32 ``[round · 4 + r][lo0, lo1, hi0, hi1]``: low / high bytes of the 8 float16 entries the
    ``prmt`` decoder of thread ``r``'s word looks up, or None when a 4-bit codebook is not symmetric
    in float16. A 3-bit (or narrower) round: the word's centroids ``c[0..]`` (zero padded). A 4-bit
    round: a 4-bit word's ``c[8..15]`` (``c[r] = -c[15 - r]``: 3-bit magnitude index + sign flip
    where the top bit is 0); a narrower word there reads top bit 0 (its plane 3 is zero), so its
    entry ``7 - x`` holds ``-c[x]`` and the sign flip gives ``c[x]`` back."""
    out = []
    for w, ((nb, _, _, _), book) in enumerate(zip(tw.words, tw.books)):
        rb = tw.round_bits(w // 4)
        c = torch.tensor(book, dtype=torch.float32).to(torch.float16)
        ent = torch.zeros(8, dtype=torch.float16)
        if rb == 4 and nb == 4:
            if not torch.equal(c[:8], -c.flip(0)[:8]):
                return None
            ent = c[8:].clone()
        elif rb == 4:
            for x in range(2**nb):
                ent[7 - x] = -c[x]
        else:
            ent[: c.numel()] = c
        bits = ent.view(torch.int16).to(torch.int32) & 0xFFFF
        lo, hi = (bits & 0xFF).tolist(), (bits >> 8).tolist()
        word = lambda v: v[0] | v[1] << 8 | v[2] << 16 | v[3] << 24
        out.append([word(lo[:4]), word(lo[4:]), word(hi[:4]), word(hi[4:])])
    return out


def _tables_of(t):
    """:func:`round_tables` of ``t``'s words (None: unsupported words or an asymmetric 4-bit
    codebook), cached on the tables object beside the words."""
    cache = t.__dict__.setdefault("_cuda_decode", {})
    if "round_tables" not in cache:
        tw = tensor_words(t)
        cache["round_tables"] = None if isinstance(tw, str) else round_tables(tw)
    return cache["round_tables"]


def unsupported(d: int, G: int, k_tables, v_tables, k_codes: torch.Tensor, v_codes: torch.Tensor,
                k_norms: torch.Tensor, v_norms: torch.Tensor) -> str | None:
    """Why the CUDA kernel does not handle this call (None: it does; else the Triton kernel runs).
    It takes head_dim 256, G <= 8, and K/V layouts whose segments are whole 32-coordinate words of
    1-4 bits with at most two channel groups (every halves and paper preset at d=256) and float16-
    symmetric 4-bit codebooks; both tables of one kind (``KernelTables``: the halves path, the
    kernel rotates the query; ``CodeSpaceTables``: the query comes rotated per group); code rows
    contiguous with 16-byte aligned tiles; norms contiguous along tokens; a CUDA device with NVRTC."""
    if d not in CUDA_HEAD_DIMS or not 1 <= G <= 8 or k_codes.device.type != "cuda":
        return f"head_dim {d} / G={G} / device {k_codes.device} (needs head_dim {CUDA_HEAD_DIMS}, G <= 8, CUDA)"
    if not hasattr(torch.cuda, "_compile_kernel") or COMPILE_FAILURES:
        return "NVRTC unavailable or a compile failure earlier in this process"
    if isinstance(k_tables, KernelTables) != isinstance(v_tables, KernelTables):
        return "K and V tables of different kinds (halves KernelTables with code-space tables)"
    for name, t, codes, norms in (("K", k_tables, k_codes, k_norms), ("V", v_tables, v_codes, v_norms)):
        tw = tensor_words(t)
        if isinstance(tw, str):
            return f"{name} layout: {tw}"
        if _tables_of(t) is None:
            return f"{name} layout: a 4-bit codebook that is not symmetric in float16"
        if codes.shape[-1] != tw.nbytes or codes.shape[-1] % 4:
            return f"{name} code rows of {codes.shape[-1]} bytes (layout: {tw.nbytes}, the kernel reads 4-byte words)"
        if codes.stride(-1) != 1 or codes.stride(2) != codes.shape[-1] or codes.data_ptr() % 16 \
                or any((s * codes.element_size()) % 16 for s in codes.stride()[:2]):
            return "code rows not contiguous and 16-byte aligned"
        nn = tw.num_norms
        lead = norms.dim() - (1 if nn == 2 else 0)
        if lead != 3 or (nn == 2 and (norms.shape[-1] != 2 or norms.stride(-1) != 1)) or norms.stride(2) != nn \
                or (nn == 2 and (norms.data_ptr() % 4 or any(s % 2 for s in norms.stride()[:2]))):
            return f"{name} norms not [B, H, T{', 2' if nn == 2 else ''}] contiguous along tokens"
    if any(st >= 2**31 for t in (k_codes, v_codes, k_norms, v_norms) for st in t.stride()):
        return "strides of 2^31 or more (the kernel takes 32-bit strides; Triton handles larger)"
    return None


_T = TypeVar("_T")

BACKENDS = ("auto", "triton", "cuda")  # decode_attention's and the segmented path's `backend` values


def check_backend(backend: str) -> None:
    """Raise the named error for a ``backend`` outside :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def choose(backend: str, why: str | None, build: Callable[[], _T], stacklevel: int = 3) -> _T | None:
    """What a call that may run the CUDA kernel runs (both decode paths ask here): ``build()``
    (which compiles the variant at first use) where ``why`` (:func:`unsupported`) is None and no
    variant failed to compile earlier in this process; else None (the Triton kernel runs it).
    ``backend="cuda"`` raises a named error instead of returning None; ``"auto"`` warns once, at the
    compile failure itself. A compile failure earlier in the process is answered first
    (:func:`unsupported` then names it as its reason too)."""
    if COMPILE_FAILURES:
        if backend == "cuda":
            raise RuntimeError("backend='cuda': the CUDA decode kernel failed to compile earlier in this process "
                               f"({next(iter(COMPILE_FAILURES.values()))}); use backend='triton' or 'auto'")
        return None
    if why is not None:
        if backend == "cuda":
            raise ValueError(
                f"backend='cuda': the CUDA decode kernel cannot run this call ({why}); it needs head_dim in "
                f"{CUDA_HEAD_DIMS}, H_q/H_kv <= 8, layouts of whole 32-coordinate words, 16-byte aligned "
                "contiguous code rows and a CUDA device: use backend='triton' or 'auto'")
        return None
    try:
        return build()
    except RuntimeError as err:  # NVRTC failed: recorded in COMPILE_FAILURES
        if backend == "cuda":
            raise
        warnings.warn(f"{err}; decode_attention(backend='auto') uses the Triton kernel instead", RuntimeWarning,
                      stacklevel=stacklevel + 1)
        return None


def supports(d: int, G: int, k_tables, v_tables, k_codes: torch.Tensor, v_codes: torch.Tensor,
             k_norms: torch.Tensor, v_norms: torch.Tensor) -> bool:
    """Whether the CUDA kernel handles this call (:func:`unsupported` is None)."""
    return unsupported(d, G, k_tables, v_tables, k_codes, v_codes, k_norms, v_norms) is None


def _per_thread(vals: list[int]) -> str:
    """A C expression of ``r`` (0..3) taking ``vals[r]`` (a constant or ``a + s·r`` where it can)."""
    if len(set(vals)) == 1:
        return str(vals[0])
    step = vals[1] - vals[0]
    if all(vals[i] == vals[0] + step * i for i in range(4)):
        return f"({vals[0]} + {step} * (r))"
    return f"((r) == 0 ? {vals[0]} : (r) == 1 ? {vals[1]} : (r) == 2 ? {vals[2]} : {vals[3]})"


def word_defines(prefix: str, tw: TensorWords) -> list[str]:
    """The ``#define`` lines of one tensor's :class:`TensorWords` (``prefix`` K or V): per round
    ``i`` the decode bits ``{p}_B{i}``, norm class ``{p}_C{i}`` and this thread's word
    ``{p}_BASE{i}(r)``, ``{p}_STRIDE{i}(r)``, ``{p}_NB{i}(r)``, ``{p}_SLOT{i}(r)``; ``{p}_NN``."""
    lines = [f"#define {prefix}_NN {tw.num_norms}"]
    for i in range(2):
        ws = tw.round_words(i)
        lines += [f"#define {prefix}_B{i} {tw.round_bits(i)}", f"#define {prefix}_C{i} {tw.round_class(i)}"]
        for j, name in enumerate(("NB", "BASE", "STRIDE", "SLOT")):
            col = [w[(0, 1, 2, 3)[j]] for w in ws]
            lines.append(f"#define {prefix}_{name}{i}(r) {_per_thread(col)}")
    return lines


def _score_expr(classes: set[int]) -> str:
    """``K_SCORE(n0, n1, a0, a1, a2)``: a token's score from its per-class sums and key norms."""
    terms = [t for c, t in ((0, "(a0) * (n0)"), (1, "(a1) * (n1)"), (2, "(a2)")) if c in classes]
    return "#define K_SCORE(n0, n1, a0, a1, a2) (" + " + ".join(terms) + ")"


def kernel_source(G: int, k_tables, v_tables, q_kind: int, stages: int, min_blocks: int, chains: int,
                  qf_smem: int, warps: int, lkind: int = 0) -> str:
    """The CUDA source of one kernel variant: compile-time ``#define``s (the layouts' words from
    :func:`tensor_words`) + :data:`_SOURCE`. ``KernelTables`` (halves): the kernel applies
    ``s ∘`` and the FWHT to the raw query; ``CodeSpaceTables``: the query arrives rotated.
    ``lkind``: 0 the host int length only, 1 / 2 also an int32 / int64 device length a sequence
    (:data:`LEN_KINDS`)."""
    kw, vw = tensor_words(k_tables), tensor_words(v_tables)
    for name, tw in (("K", kw), ("V", vw)):
        if isinstance(tw, str):
            raise ValueError(f"the CUDA kernel cannot read the {name} layout: {tw}")  # noqa: TRY004
    d = 2 * ROUND
    q_rot = int(not isinstance(k_tables, KernelTables))
    defs = {"G": G, "NBK": kw.nbytes, "NBV": vw.nbytes, "STAGES": stages, "MIN_BLOCKS": min_blocks,
            "CHAINS": chains, "QF_SMEM": qf_smem, "WARPS": warps, "TILE": TILE, "Q_KIND": q_kind, "Q_ROT": q_rot,
            "D": d, "LOG2_D": d.bit_length() - 1, "D2": ROUND, "KCH": max(1, chains // len(kw.classes)),
            "LEN_KIND": lkind}
    lines = [f"#define {k} {v}" for k, v in defs.items()] + word_defines("K", kw) + word_defines("V", vw)
    lines += [_score_expr(kw.classes), "#define TQ_INF __int_as_float(0x7f800000)"]
    return "\n".join(lines) + "\n" + _SOURCE


def _smem_bytes(G: int, nbk: int, nbv: int, stages: int, qf_smem: int, warps: int) -> int:
    return G * 256 * 4 + 4096 * qf_smem + max(warps * stages * TILE * (nbk + nbv), (warps * 8 * 2 + warps * 8 * 256) * 4)


def _kernel(G: int, k_tables, v_tables, q_kind: int, stages: int, min_blocks: int, chains: int, qf_smem: int,
            warps: int, lkind: int = 0):
    kw, vw = tensor_words(k_tables), tensor_words(v_tables)
    q_rot = not isinstance(k_tables, KernelTables)
    # compiled modules belong to the current device's context: the device is part of the variant
    dev = torch.cuda.current_device() if torch.cuda.is_available() else -1
    key = (dev, G, kw, vw, q_kind, q_rot, stages, min_blocks, chains, qf_smem, warps, lkind)
    if key not in _KERNELS:
        src = kernel_source(G, k_tables, v_tables, q_kind, stages, min_blocks, chains, qf_smem, warps, lkind)
        kern = torch.cuda._compile_kernel(src, "tq_decode_partial", nvcc_options=["-std=c++17"])
        smem = _smem_bytes(G, kw.nbytes, vw.nbytes, stages, qf_smem, warps)
        if smem >= 48 * 1024:
            kern.set_shared_memory_config(smem)
        _KERNELS[key] = (kern, smem)
    return _KERNELS[key]


def _dst_index(d: int, device: torch.device) -> torch.Tensor:
    """int32 [d]: where the Triton combine kernel expects rotated coordinate j (it holds coordinate
    ``nat[k]`` at position k: :func:`position_coords`)."""
    key = (d, str(device))
    if key not in _DST_INDEX:
        _DST_INDEX[key] = torch.argsort(position_coords(d)).to(device=device, dtype=torch.int32)
    return _DST_INDEX[key]


def _codespace_dst(v_tables, device: torch.device) -> torch.Tensor:
    """int32 [d]: where the code-space combine expects code-space coordinate j (the word-decoder
    kernel's position order, :attr:`SegmentTables.inverse`)."""
    from turboquant.kernels.segmented import SegmentTables

    cache = v_tables.__dict__.setdefault("_cuda_decode", {})
    key = ("dst", str(device))
    if key not in cache:
        seg = SegmentTables.of(v_tables)
        if seg is None:
            raise ValueError(f"layout {v_tables.layout.name!r} has no word-decoder position order")
        cache[key] = seg.inverse.to(device=device, dtype=torch.int32)
    return cache[key]


def _tables_tensor(k_tables, v_tables, device: torch.device) -> torch.Tensor:
    """int32 [64] on ``device``: the K round tables (:func:`round_tables`, 8 x 4 words) then the V
    ones (cached on ``k_tables``)."""
    cache = k_tables.__dict__.setdefault("_cuda_decode", {})
    key = ("tabs", id(v_tables), str(device))
    if key not in cache:
        vals = [w for e in _tables_of(k_tables) for w in e] + [w for e in _tables_of(v_tables) for w in e]
        t = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in vals], dtype=torch.int32)
        cache[key] = (v_tables, t.to(device))  # holds v_tables so its id() stays unique
    return cache[key][1]


# NVRTC compile errors seen in this process (kernel variant -> message). After one, ``supports``
# answers False, so backend="auto" stays on the Triton kernel instead of failing every call.
COMPILE_FAILURES: dict = {}


LEN_KINDS = {torch.int32: 1, torch.int64: 2}  # device-length dtype -> the kernel's LEN_KIND


def len_kind(length: torch.Tensor | None) -> int:
    """The kernel's ``LEN_KIND`` for a call's device lengths (None: a host int length only)."""
    if length is None:
        return 0
    if length.dtype not in LEN_KINDS:
        raise ValueError(f"device `length` must be int32 or int64, got {length.dtype}")
    return LEN_KINDS[length.dtype]


def variant(query_dtype: torch.dtype, G: int, k_tables, v_tables, few: bool, lkind: int = 0,
            config: CudaConfig | None = None):
    """The compiled kernel (and its shared-memory bytes) for one call shape, compiling it at first
    use. Raises ``RuntimeError`` (and records it in :data:`COMPILE_FAILURES`) where NVRTC fails.
    ``query_dtype`` is that of the raw query (halves path); code-space tables take float32.
    ``lkind``: :func:`len_kind` of the call's device lengths; ``config``: the launch configuration
    (default :data:`DEFAULT_CONFIG`)."""
    q_kind = 0 if not isinstance(k_tables, KernelTables) else \
        {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[query_dtype]
    cfg = config or DEFAULT_CONFIG
    shape = cfg.launch_shape(few)
    args = (G, k_tables, v_tables, q_kind, cfg.stages, shape["min_blocks"], cfg.chains, cfg.qf_smem,
            shape["warps"], int(lkind))
    try:
        return _kernel(*args)
    except Exception as err:  # NVRTC missing or failing on this CUDA install
        key = (G, tensor_words(k_tables), tensor_words(v_tables), q_kind)
        COMPILE_FAILURES[key] = f"{type(err).__name__}: {err}"
        raise RuntimeError(f"the CUDA decode kernel did not compile with NVRTC ({type(err).__name__}: {err})") from err


_LIBCUDA: list = []


def _cu_launch_kernel():
    """libcuda's ``cuLaunchKernel`` through ctypes (torch's generic launcher reopens libcuda and
    converts every argument on each call: ~0.5 ms a call, measured)."""
    import ctypes

    if not _LIBCUDA:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
        fn.restype = ctypes.c_int
        # (f, gridDim xyz, blockDim xyz, sharedMemBytes, hStream, kernelParams, extra): 64-bit handles
        # as c_void_p (a bare Python int would pass as a 32-bit int)
        fn.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        _LIBCUDA.append(fn)
    return _LIBCUDA[0]


class PartialLaunch:
    """The ``cuLaunchKernel`` argument block of one call structure, built once (the variant, the
    code/norm/table addresses, strides, ``qk_scale``); a call rewrites only the slots that change
    from step to step (query and split-buffer addresses, ``length``, ``chunk``, ``S``) and launches.
    Kernel parameter order: q, ksign, kc, kn, vc, vn, tabs, dst, m, l, acc, length, chunk, S, Hkv,
    qk_scale (double), the 10 int strides, then the device lengths' address and batch stride (see
    the source's ``tq_decode_partial``). It fills the compressed splits ``[0, S_C)`` of the partial
    buffers (grid ``(S_C, B·H_kv)``); the call must pass :func:`supports`. ``query``: the raw
    ``[B, H_q, 1, d]`` query for ``KernelTables``; for code-space tables the rotated, scaled float32
    ``[B, H_q, (1,) d]`` (qk_scale unused). ``lkind`` (:func:`len_kind`): the variant reads a device
    length a sequence (address and stride given a call), clamped to the call's int ``length``."""

    def __init__(self, query, k_codes, k_norms, v_codes, v_norms, k_tables, v_tables, qk_scale: float, few: bool,
                 lkind: int = 0, config: CudaConfig | None = None):
        import ctypes

        B, Hq, d = query.shape[0], query.shape[1], query.shape[-1]
        Hkv = k_codes.shape[1]
        shape = launch_shape(few, config)
        halves = isinstance(k_tables, KernelTables)
        self.lkind = lkind
        self.kern, self.smem = variant(query.dtype, Hq // Hkv, k_tables, v_tables, few, lkind, config)
        tabs = _tables_tensor(k_tables, v_tables, query.device)
        dst = _dst_index(d, query.device) if halves else _codespace_dst(v_tables, query.device)
        ksign = k_tables.signs if halves else tabs  # code-space queries arrive rotated: never read
        self._keep = (tabs, dst)  # addresses below stay valid while the plan lives
        self.grid_y, self.block = B * Hkv, shape["warps"] * 32
        c_void, c_int = ctypes.c_void_p, ctypes.c_int
        self.q, self.m, self.l, self.acc = c_void(0), c_void(0), c_void(0), c_void(0)
        self.length, self.chunk, self.S = c_int(0), c_int(0), c_int(0)
        self.lenp, self.len_sb = c_void(0), c_int(0)
        fixed = [c_void(t.data_ptr()) for t in (ksign, k_codes, k_norms, v_codes, v_norms, *self._keep)]
        strides = [c_int(int(x)) for x in (query.stride(0), query.stride(1), k_codes.stride(0), k_codes.stride(1),
                                           k_norms.stride(0), k_norms.stride(1), v_codes.stride(0), v_codes.stride(1),
                                           v_norms.stride(0), v_norms.stride(1))]
        self._vals = [self.q, *fixed, self.m, self.l, self.acc, self.length, self.chunk, self.S, c_int(Hkv),
                      ctypes.c_double(float(qk_scale)), *strides, self.lenp, self.len_sb]
        self.argv = (ctypes.c_void_p * len(self._vals))(*[ctypes.addressof(v) for v in self._vals])
        self.fn = _cu_launch_kernel()
        self.func = self.kern.func

    def __call__(self, q_ptr: int, m_ptr: int, l_ptr: int, acc_ptr: int, length: int, chunk: int, S_C: int, S: int,
                 stream: int, len_ptr: int = 0, len_sb: int = 0) -> None:
        if self.lkind and not len_ptr:
            raise ValueError("this PartialLaunch reads device lengths: pass `len_ptr`")
        self.q.value, self.m.value, self.l.value, self.acc.value = q_ptr, m_ptr, l_ptr, acc_ptr
        self.length.value, self.chunk.value, self.S.value = length, chunk, S
        self.lenp.value, self.len_sb.value = len_ptr or None, len_sb
        err = self.fn(self.func, S_C, self.grid_y, 1, self.block, 1, 1, self.smem, stream, self.argv, None)
        if err:
            raise RuntimeError(f"cuLaunchKernel(tq_decode_partial) failed with CUDA error {err}")


def kernel_info() -> list[dict]:
    """Registers and local (spill) bytes a thread of every compiled variant (cuFuncGetAttribute)."""
    import ctypes

    lib = torch.cuda._utils._get_gpu_runtime_library()
    out = []
    for key, (kern, smem) in _KERNELS.items():
        vals = {}
        for name, attr in (("regs", 4), ("local_bytes", 3), ("max_threads", 0)):
            v = ctypes.c_int()
            lib.cuFuncGetAttribute(ctypes.byref(v), attr, kern.func)
            vals[name] = v.value
        kw, vw = key[2], key[3]
        out.append({"device": key[0], "G": key[1], "k_words": [w[:2] for w in kw.words], "v_words": [w[:2] for w in vw.words],
                    "k_classes": sorted(kw.classes), "v_classes": sorted(vw.classes), "q_rotated": key[5],
                    "stages": key[6], "min_blocks": key[7], "chains": key[8], "qf_smem": key[9], "warps": key[10],
                    "len_kind": key[11], "smem": smem, **vals})
    return out


__all__ = ["BACKENDS", "COMPILE_FAILURES", "CUDA_HEAD_DIMS", "LEN_KINDS", "PartialLaunch", "TensorWords", "check_backend",
           "kernel_info", "kernel_source", "launch_shape", "len_kind", "round_tables", "supports", "tensor_words",
           "unsupported", "variant"]
