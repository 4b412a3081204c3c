"""KV-cache baselines a user would pick instead of TurboQuant, through transformers' Cache API.

* ``fp8-e4m3``: fp8 e4m3 with a per-token float16 scale (:class:`~.codecs.Fp8Codec`)
* ``rot-int-<b>``: signed Hadamard + per-vector absmax round-to-nearest int at ``b`` bits, the same
  bytes as TurboQuant at ``b`` bits (:class:`~.codecs.RotatedIntCodec`)
* ``quanto-int<b>`` / ``hqq-int<b>``: transformers' own ``QuantizedCache`` (quanto / HQQ backend,
  its defaults: group 64, residual 128), where ``optimum-quanto`` / ``hqq`` is installed and the
  model is dense

:func:`turboquant.baselines.bits.kv_bits` measures bits a coordinate from the bytes any of them
(or a ``TurboQuantCache``) holds.
"""

from turboquant.baselines.bits import kv_bits
from turboquant.baselines.codecs import Fp8Codec, RotatedIntCodec
from turboquant.baselines.layers import CodecCache, CodecLayer

__all__ = ["CodecCache", "CodecLayer", "Fp8Codec", "RotatedIntCodec", "kv_bits"]
