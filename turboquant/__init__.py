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
    # quantizers
    "SUPPORTED_BITS",
    # codebooks
    "Codebook",
    "DenseRotation",
    "HadamardRotation",
    "MSEQuantized",
    "PackedMSE",
    "PackedProd",
    "ProdQuantized",
    "ScalarQuantizer",
    "TurboQuantMSE",
    "TurboQuantProd",
    # rotations
    "fwht",
    "lloyd_max_codebook",
    "make_rotation",
    # packing
    "pack_bits",
    "packed_nbytes",
    "parse_bits",
    "unpack_bits",
]
