"""Named KV-cache recipes and baselines, one table, so that one loop covers all of them.

Every entry builds a fresh transformers ``Cache`` for a model (usable as ``past_key_values`` in
``generate`` / ``forward``); measured bits a coordinate come from the bytes it holds
(:func:`turboquant.baselines.kv_bits`). TurboQuant recipes (DESIGN.md, "Recipes"):

* ``halves-3.5`` / ``halves-2.5``: ``key_bits = value_bits = b + 0.5``, the first d/2 *rotated*
  coordinates at ``b + 1`` bits (data-oblivious split, not the paper's)
* ``K4/V3``: keys 4 bits, values 3 bits (3.5 on average)
* ``paper-3.5`` / ``paper-2.5``: the paper's outlier split in raw channel space (d/4 channels at
  ``b + 1`` bits, the rest at ``b``), enabled when ``TurboQuantCacheConfig`` has ``key_layout``

Baselines (DESIGN.md, "Baselines"): ``fp8-e4m3``, ``rot-int-3.5`` / ``rot-int-2.5`` (rotation + plain
int at TurboQuant's bytes), ``quanto-int4`` / ``quanto-int2`` and ``hqq-int4`` / ``hqq-int2``
(transformers' ``QuantizedCache``, quanto / HQQ backend, its defaults: group 64, residual 128).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FULL = "full"
RESIDUAL_LENGTH = 16  # TurboQuantCache's default window, used by our baselines too


@dataclass(frozen=True)
class Recipe:
    """A named cache: ``family`` is ``full`` / ``turboquant`` / ``baseline``; ``nominal_bits`` the
    intended bits a coordinate (measured bits are reported beside it)."""

    name: str
    family: str
    nominal_bits: float
    description: str
    build: Callable[[Any], Any]
    requirement: Callable[[Any], str | None] = lambda config: None
    key_layout: str | None = None  # TurboQuant recipes: the key / value code layouts (turboquant.layout names)
    value_layout: str | None = None
    in_grid: bool = True  # run on the quality grids (C09/C10); False: the C08 / recipes_cpu rows only

    def unavailable(self, config: Any) -> str | None:
        """Why this recipe cannot run for ``config`` (None when it can)."""
        return self.requirement(config)


def _turboquant(**kw: Any) -> Callable[[Any], Any]:
    def build(config: Any) -> Any:
        from turboquant.cache import TurboQuantCache

        return TurboQuantCache(config, **kw)

    return build


def _tq(name: str, key_layout: str, value_layout: str, nominal_bits: float, description: str,
        in_grid: bool = True) -> Recipe:
    """A TurboQuant recipe: ``TurboQuantCache(config, key_layout=..., value_layout=...)``."""
    return Recipe(name, "turboquant", nominal_bits, description,
                  _turboquant(key_layout=key_layout, value_layout=value_layout),
                  key_layout=key_layout, value_layout=value_layout, in_grid=in_grid)


def _dense_only(config: Any) -> str | None:
    text = config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention"}:
        return f"needs a model with only full-attention layers; this one has {sorted(kinds)}"
    return None


def _needs_quanto(config: Any) -> str | None:
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        return "transformers' QuantizedCache quanto backend needs `pip install optimum-quanto`"
    return _dense_only(config)


def _needs_hqq(config: Any) -> str | None:
    from transformers.utils import is_hqq_available

    if not is_hqq_available():
        return ("transformers' QuantizedCache HQQ backend needs `pip install hqq` (0.2.8: build its wheel with "
                "DISABLE_CUDA=1 for the pure-torch backend)")
    return _dense_only(config)


def _full(config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _codec_cache(kind: str, bits: float | None = None) -> Callable[[Any], Any]:
    def build(config: Any) -> Any:
        from turboquant.baselines import CodecCache, Fp8Codec, RotatedIntCodec

        if kind == "fp8":
            def make(d: int, layer: int, kv: str) -> Any:
                return Fp8Codec(d)
        else:
            def make(d: int, layer: int, kv: str) -> Any:
                return RotatedIntCodec(d, bits, seed=2 * layer + (kv == "v"))
        return CodecCache(config, make, residual_length=RESIDUAL_LENGTH, name=kind)

    return build


def _quantized(backend: str, nbits: int) -> Callable[[Any], Any]:
    def build(config: Any) -> Any:
        from transformers import QuantizedCache

        return QuantizedCache(backend=backend, config=config, nbits=nbits)

    return build


def _table() -> dict[str, Recipe]:
    rows = [
        Recipe(FULL, "full", 16.0, "DynamicCache, full precision", _full),
        _tq("paper-3.5", "paper-3.5", "paper-3.5", 3.5, "paper outlier split: d/4 channels at 4 bits + rest at 3"),
        _tq("paper-2.5", "paper-2.5", "paper-2.5", 2.5, "paper outlier split: d/4 channels at 3 bits + rest at 2"),
        _tq("halves-3.5", "halves-3.5", "halves-3.5", 3.5, "TurboQuant-mse, rotated halves at 4 + 3 bits"),
        _tq("halves-2.5", "halves-2.5", "halves-2.5", 2.5, "TurboQuant-mse, rotated halves at 3 + 2 bits"),
        _tq("K4/V3", "int-4", "int-3", 3.5, "TurboQuant-mse, keys 4 bits, values 3 bits"),
        _tq("paper-3.5-keys", "paper-3.5", "halves-3.5", 3.5, "keys-only: paper keys, halves values at the same width",
            in_grid=False),
        _tq("paper-2.5-keys", "paper-2.5", "halves-2.5", 2.5, "keys-only: paper keys, halves values at the same width",
            in_grid=False),
        _tq("K4/V2", "int-4", "int-2", 3.0, "TurboQuant-mse, keys 4 bits, values 2 bits", in_grid=False),
        Recipe("fp8-e4m3", "baseline", 8.0, "fp8 e4m3 K/V, one float16 scale a token and head", _codec_cache("fp8"),
               _dense_only),
        Recipe("rot-int-3.5", "baseline", 3.5, "signed Hadamard + per-vector absmax int, halves at 4 + 3 bits",
               _codec_cache("int", 3.5), _dense_only),
        Recipe("rot-int-2.5", "baseline", 2.5, "signed Hadamard + per-vector absmax int, halves at 3 + 2 bits",
               _codec_cache("int", 2.5), _dense_only),
        Recipe("quanto-int4", "baseline", 4.0, "transformers QuantizedCache, quanto int4 (group 64, residual 128)",
               _quantized("quanto", 4), _needs_quanto),
        Recipe("quanto-int2", "baseline", 2.0, "transformers QuantizedCache, quanto int2 (group 64, residual 128)",
               _quantized("quanto", 2), _needs_quanto),
        Recipe("hqq-int4", "baseline", 4.0, "transformers QuantizedCache, HQQ int4 (group 64, residual 128)",
               _quantized("hqq", 4), _needs_hqq),
        Recipe("hqq-int2", "baseline", 2.0, "transformers QuantizedCache, HQQ int2 (group 64, residual 128)",
               _quantized("hqq", 2), _needs_hqq),
    ]
    return {r.name: r for r in rows}


RECIPES: dict[str, Recipe] = _table()
#: The recipes and baselines the quality grids run beside full precision (C09, C10; every
#: ``in_grid`` row of :data:`RECIPES` as defined here, not the ones the layout options add).
GRID_NAMES: tuple[str, ...] = tuple(n for n, r in RECIPES.items() if r.in_grid and n != FULL)
# The recipe a claim's verdict is taken on, in order of preference (the paper's when it runs).
VERDICT_PREFERENCE: dict[str, tuple[str, ...]] = {"3.5": ("paper-3.5", "halves-3.5"), "2.5": ("paper-2.5", "halves-2.5")}


def get_recipe(name: str) -> Recipe:
    """The recipe or baseline called ``name``; unknown names raise listing the valid ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe/baseline {name!r}; valid: {list(RECIPES)}") from None


def verdict_recipe(bits: str, config: Any) -> tuple[str, str | None]:
    """``(name, note)``: the recipe a claim at ``bits`` ("3.5" / "2.5") is judged on, and a note
    when the paper's recipe is not available."""
    if bits not in VERDICT_PREFERENCE:
        raise ValueError(f"verdict bits must be one of {list(VERDICT_PREFERENCE)}, got {bits!r}")
    first, *rest = VERDICT_PREFERENCE[bits]
    reason = get_recipe(first).unavailable(config)
    if reason is None:
        return first, None
    return rest[0], f"verdict on {rest[0]} instead of {first}: {reason}"


def available(names: list[str] | tuple[str, ...], config: Any) -> tuple[list[str], dict[str, str]]:
    """Split ``names`` into those that run for ``config`` and ``{name: reason}`` for the others."""
    runs, skipped = [], {}
    for n in names:
        reason = get_recipe(n).unavailable(config)
        if reason is None:
            runs.append(n)
        else:
            skipped[n] = reason
    return runs, skipped


def recipe_cache_factory(model: Any) -> Callable[[str], Any]:
    """``name -> fresh cache`` for :mod:`turboquant.eval.runner` (settings are recipe names)."""

    def factory(name: str) -> Any:
        recipe = get_recipe(name)
        reason = recipe.unavailable(model.config)
        if reason is not None:
            raise ValueError(f"recipe {name!r} cannot run on this model: {reason}")
        return recipe.build(model.config)

    return factory


def layout_recipe(key_layout: str, value_layout: str) -> str:
    """Register (once) and name the TurboQuant recipe of a key and a value code layout
    (``turboquant.layout`` names, e.g. from ``--kv_layout`` / ``--key_layout`` /
    ``--value_layout``): ``paper-3.5`` when both are that preset, else ``K<key>/V<value>``."""
    from turboquant.layout import layout_name

    k, v = layout_name(key_layout), layout_name(value_layout)
    name = k if k == v else f"K{k}/V{v}"
    if name not in RECIPES:
        from turboquant.layout import build_layout

        bits = (build_layout(k, 128, rotation="dense").bits_per_coordinate
                + build_layout(v, 128, rotation="dense").bits_per_coordinate) / 2
        RECIPES[name] = _tq(name, k, v, bits, f"TurboQuant-mse, keys {k}, values {v} (user layouts)", in_grid=False)
    return name


def layout_options(opts: Any, default: str) -> tuple[str, str] | None:
    """``(key_layout, value_layout)`` of the ``--kv_layout`` / ``--key_layout`` / ``--value_layout``
    options (each side falling back to ``--kv_layout``, then to ``default``), or None when none is
    given."""
    kv = getattr(opts, "kv_layout", None)
    key, value = getattr(opts, "key_layout", None) or kv, getattr(opts, "value_layout", None) or kv
    if key is None and value is None:
        return None
    return key or default, value or default


def claim_recipe(opts: Any, bits: str, config: Any) -> tuple[str, str | None]:
    """The recipe a C09/C10 verdict is taken on: the layout options' (:func:`layout_options`,
    default side ``paper-<bits>``) when given, else :func:`verdict_recipe`."""
    layouts = layout_options(opts, f"paper-{bits}")
    if layouts is None:
        return verdict_recipe(bits, config)
    name = layout_recipe(*layouts)
    return name, f"verdict on the recipe of the layout options: {RECIPES[name].description}"
