"""TurboQuant (Zandieh et al., arXiv 2504.19874): online vector quantization for KV caches.

Public API (grouped):

* rotations: :class:`HadamardRotation`, :class:`DenseRotation`, :func:`make_rotation`
* codebooks: :class:`Codebook`, :func:`lloyd_max_codebook`
* quantizers: :class:`TurboQuantMSE`, :class:`TurboQuantProd`, :class:`ScalarQuantizer`
* packing: :func:`pack_bits`, :func:`unpack_bits`, :func:`packed_nbytes`
"""

from turboquant.codebook import Codebook, lloyd_max_codebook
from turboquant.packing import pack_bits, packed_nbytes, unpack_bits
from turboquant.quantizer import (
    SUPPORTED_BITS,
    MSEQuantized,
    PackedMSE,
    PackedProd,
    ProdQuantized,
    ScalarQuantizer,
    TurboQuantMSE,
    TurboQuantProd,
    parse_bits,
)
from turboquant.rotation import DenseRotation, HadamardRotation, fwht, make_rotation

__all__ = [
    # rotations
    "fwht",
    "HadamardRotation",
    "DenseRotation",
    "make_rotation",
    # codebooks
    "Codebook",
    "lloyd_max_codebook",
    # quantizers
    "SUPPORTED_BITS",
    "parse_bits",
    "TurboQuantMSE",
    "TurboQuantProd",
    "ScalarQuantizer",
    "MSEQuantized",
    "ProdQuantized",
    "PackedMSE",
    "PackedProd",
    # packing
    "pack_bits",
    "unpack_bits",
    "packed_nbytes",
]
