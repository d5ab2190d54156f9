"""Rotary position embeddings and the RoPE scaling family, as transforms of a frozen spec.

A `RopeSpec` is everything the model needs to know about positions: the inverse frequencies of
each rotated pair, an optional data-dependent rule for them (dynamic NTK), and the multiplier on
attention logits (YaRN's constant m², entropy-aware ABF's max(1, log_c i)) with the layers it
skips. Every method of the family is a pure function `spec -> spec`, so context-extension recipes
compose them without touching the model. Specs are hashable (tuples and scalars only) and can be
static jit arguments.

The rotation uses the "rotate half" pairing of HF Llama (dimension j is paired with j + K/2), so HF
checkpoints load without permuting q/k weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

LOGIT_SCALE_KINDS = ("none", "constant", "log_window")


@dataclasses.dataclass(frozen=True)
class LogitScale:
    """Multiplier on q·k/sqrt(K), applied to the query after rotation.

    kind "constant": multiply by `value` (YaRN: m_y²). kind "log_window": multiply query position
    i (1-based) by max(1, ln i / ln window) (entropy-aware ABF).
    """

    kind: Literal["none", "constant", "log_window"] = "none"
    value: float = 1.0
    window: int = 0

    def __post_init__(self):
        if self.kind not in LOGIT_SCALE_KINDS:
            raise ValueError(f"unknown logit scale kind {self.kind!r}; known: {LOGIT_SCALE_KINDS}")
        if self.kind == "log_window" and self.window < 2:
            raise ValueError(f"log_window logit scale needs window >= 2, got {self.window}")


@dataclasses.dataclass(frozen=True)
class DynamicNTK:
    """HF "dynamic" scaling: the base grows with the longest position seen in the current call.

    base' = base · (factor · n / window − (factor − 1))^(d / (d − 2)) with n = max position + 1,
    used only when n > window.
    """

    base: float
    factor: float
    window: int


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Frozen description of rotary embeddings and attention-logit scaling.

    head_dim: rotated width K (all of it is rotated). inv_freq: K/2 inverse frequencies θ_j.
    dynamic: optional data-dependent frequency rule (overrides inv_freq when positions pass its
    window). logit_scale / unscaled_layers: the query multiplier and the layers that skip it.
    provenance: the HF config entries this spec was read from or stands for, used by `to_hf`.
    """

    head_dim: int
    inv_freq: tuple[float, ...]
    logit_scale: LogitScale = LogitScale()
    unscaled_layers: tuple[int, ...] = ()
    dynamic: DynamicNTK | None = None
    provenance: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.head_dim % 2:
            raise ValueError(f"RoPE head_dim must be even, got {self.head_dim}")
        if len(self.inv_freq) != self.head_dim // 2:
            raise ValueError(
                f"inv_freq has {len(self.inv_freq)} entries, head_dim {self.head_dim} needs {self.head_dim // 2}")

    @property
    def base(self) -> float:
        """The RoPE base b the frequencies were derived from (θ_0 = 1 always, so read it off θ_1)."""
        return dict(self.provenance).get("rope_theta", _base_of(self.inv_freq, self.head_dim))


def _base_of(inv_freq, head_dim) -> float:
    return float(inv_freq[1] ** (-head_dim / 2.0)) if len(inv_freq) > 1 else 10_000.0


def _default_inv_freq(head_dim: int, base: float) -> np.ndarray:
    # float32 arithmetic, as HF computes it, so imported checkpoints see the same frequencies.
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(base) ** exponents)).astype(np.float32)


def _freeze(inv_freq) -> tuple[float, ...]:
    return tuple(float(x) for x in np.asarray(inv_freq, np.float32))


def _hf_entries(rope_type: str, base: float, **params) -> tuple[tuple[str, Any], ...]:
    entries = {"rope_type": rope_type, "rope_theta": float(base), **params}
    return tuple(sorted(entries.items()))


def default(head_dim: int, base: float = 10_000.0) -> RopeSpec:
    """Plain RoPE with θ_j = base^(−2j/K)."""
    return RopeSpec(head_dim, _freeze(_default_inv_freq(head_dim, base)),
                    provenance=_hf_entries("default", base))


def linear(spec: RopeSpec, factor: float) -> RopeSpec:
    """Position interpolation (PI): every θ_j divided by `factor` ≡ positions divided by it."""
    _check_factor(factor)
    inv = np.asarray(_default_inv_freq(spec.head_dim, spec.base)) / np.float32(factor)
    return dataclasses.replace(spec, inv_freq=_freeze(inv), dynamic=None,
                               provenance=_hf_entries("linear", spec.base, factor=float(factor)))


def ntk(spec: RopeSpec, factor: float) -> RopeSpec:
    """Static NTK-aware scaling: base b' = b · s^(K/(K−2)); highest frequency unchanged."""
    _check_factor(factor)
    d = spec.head_dim
    new_base = spec.base * factor ** (d / (d - 2))
    return dataclasses.replace(default(d, new_base), logit_scale=spec.logit_scale,
                               unscaled_layers=spec.unscaled_layers)


def dynamic_ntk(spec: RopeSpec, factor: float, window: int) -> RopeSpec:
    """Dynamic NTK (HF "dynamic"): plain RoPE up to `window`, NTK-aware base growth beyond it."""
    _check_factor(factor)
    base = spec.base
    return dataclasses.replace(
        spec, inv_freq=_freeze(_default_inv_freq(spec.head_dim, base)),
        dynamic=DynamicNTK(base=float(base), factor=float(factor), window=int(window)),
        provenance=_hf_entries("dynamic", base, factor=float(factor)) + (("max_position_embeddings", int(window)),))


def yarn(spec: RopeSpec, factor: float, original_max_position: int, beta_fast: float = 32.0,
         beta_slow: float = 1.0) -> RopeSpec:
    """YaRN: NTK-by-parts frequencies (high-frequency pairs kept, low-frequency ones interpolated
    by `factor`, a linear ramp between) and logits multiplied by m_y² with m_y = 0.1 ln s + 1."""
    _check_factor(factor)
    d, base = spec.head_dim, spec.base

    def correction_dim(rotations):
        return d * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # γ_j: 1 keeps the original (high-frequency) θ_j
    inv = _default_inv_freq(d, base)
    inv_freq = (inv / np.float32(factor)) * (1 - keep) + inv * keep
    m_y = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return dataclasses.replace(
        spec, inv_freq=_freeze(inv_freq), dynamic=None,
        logit_scale=LogitScale("constant", value=m_y * m_y), unscaled_layers=(),
        provenance=_hf_entries("yarn", base, factor=float(factor), beta_fast=float(beta_fast),
                               beta_slow=float(beta_slow),
                               original_max_position_embeddings=int(original_max_position)))


def llama3(spec: RopeSpec, factor: float = 8.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
           original_max_position: int = 8192) -> RopeSpec:
    """Llama-3.1 frequency-dependent interpolation: long wavelengths divided by `factor`, short
    ones kept, a smooth blend between."""
    _check_factor(factor)
    inv = _default_inv_freq(spec.head_dim, spec.base)
    wavelen = 2 * np.float32(math.pi) / inv
    low_wl = original_max_position / low_freq_factor
    high_wl = original_max_position / high_freq_factor
    scaled = np.where(wavelen > low_wl, inv / np.float32(factor), inv)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    inv_freq = np.where(medium, blended, scaled)
    return dataclasses.replace(
        spec, inv_freq=_freeze(inv_freq), dynamic=None,
        provenance=_hf_entries("llama3", spec.base, factor=float(factor), low_freq_factor=float(low_freq_factor),
                               high_freq_factor=float(high_freq_factor),
                               original_max_position_embeddings=int(original_max_position)))


def abf(spec: RopeSpec, base: float = 500_000.0) -> RopeSpec:
    """Adjusted base frequency: plain RoPE frequencies recomputed with a larger base."""
    return dataclasses.replace(default(spec.head_dim, base), logit_scale=spec.logit_scale,
                               unscaled_layers=spec.unscaled_layers)


def entropy_aware_abf(spec: RopeSpec, base: float = 500_000.0, pretrained_window: int = 4096,
                      unscaled_layers=(0, 1)) -> RopeSpec:
    """ABF plus query scaling t(i) = max(1, ln i / ln c) (i 1-based, c the pretrained window) on
    every layer except `unscaled_layers` (pass () for the released all-layers variant)."""
    return dataclasses.replace(default(spec.head_dim, base),
                               logit_scale=LogitScale("log_window", window=int(pretrained_window)),
                               unscaled_layers=tuple(sorted(int(l) for l in unscaled_layers)))


def _check_factor(factor):
    if not factor > 0:
        raise ValueError(f"RoPE scaling factor must be > 0, got {factor}")


def inv_freq_for(positions_BT, spec: RopeSpec):
    """The K/2 inverse frequencies in force for this call (data-dependent only for dynamic NTK)."""
    inv = jnp.asarray(spec.inv_freq, jnp.float32)
    if spec.dynamic is None:
        return inv
    dyn, d = spec.dynamic, spec.head_dim
    n = jnp.maximum(jnp.max(positions_BT) + 1, dyn.window).astype(jnp.float32)
    new_base = dyn.base * (dyn.factor * n / dyn.window - (dyn.factor - 1)) ** (d / (d - 2))
    return 1.0 / new_base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)


def apply(x_BTHK, positions_BT, spec: RopeSpec):
    """Rotate queries or keys by their absolute 0-based positions (float32 math, input dtype out)."""
    inv_K2 = inv_freq_for(positions_BT, spec)
    angles_BTK2 = positions_BT.astype(jnp.float32)[..., None] * inv_K2
    angles_BTK = jnp.concatenate([angles_BTK2, angles_BTK2], axis=-1)[:, :, None, :]
    x = x_BTHK.astype(jnp.float32)
    half = spec.head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * jnp.cos(angles_BTK) + rotated * jnp.sin(angles_BTK)).astype(x_BTHK.dtype)


def query_scale(positions_BT, spec: RopeSpec, layer):
    """Per-position multiplier for the rotated query in `layer` (an int or a traced index)."""
    scale = spec.logit_scale
    if scale.kind == "none":
        return jnp.ones(positions_BT.shape, jnp.float32)
    if scale.kind == "constant":
        t_BT = jnp.full(positions_BT.shape, scale.value, jnp.float32)
    else:
        i_BT = positions_BT.astype(jnp.float32) + 1.0
        t_BT = jnp.maximum(1.0, jnp.log(i_BT) / math.log(scale.window))
    if not spec.unscaled_layers:
        return t_BT
    skipped = jnp.any(jnp.asarray(layer) == jnp.asarray(spec.unscaled_layers))
    return jnp.where(skipped, 1.0, t_BT)


# ----------------------------------------------------------------------------- HF interop

_LOGIT_SCALE_KEY = "jaxllm_logit_scale"


def from_hf(cfg: dict, head_dim: int | None = None) -> RopeSpec:
    """Read the RoPE fields of an HF config dict: `rope_theta` + `rope_scaling` (legacy, with
    "type" or "rope_type") or transformers-5 `rope_parameters`; plus jaxllm's logit-scale entry."""
    if head_dim is None:
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = float(params.get("rope_theta", cfg.get("rope_theta", 10_000.0)))
    plain = default(head_dim, base)
    if rope_type == "default":
        spec = plain
    elif rope_type == "linear":
        spec = linear(plain, params["factor"])
    elif rope_type == "dynamic":
        spec = dynamic_ntk(plain, params["factor"], cfg["max_position_embeddings"])
    elif rope_type == "yarn":
        original = params.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        spec = yarn(plain, params["factor"], original, params.get("beta_fast") or 32.0,
                    params.get("beta_slow") or 1.0)
        if params.get("attention_factor") is not None:
            raise ValueError("yarn with an explicit attention_factor is not supported")
    elif rope_type == "llama3":
        spec = llama3(plain, params["factor"], params["low_freq_factor"], params["high_freq_factor"],
                      params["original_max_position_embeddings"])
    else:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, linear, dynamic, yarn, llama3")
    if _LOGIT_SCALE_KEY in cfg:
        extra = cfg[_LOGIT_SCALE_KEY]
        spec = dataclasses.replace(spec, logit_scale=LogitScale(extra["kind"], extra.get("value", 1.0),
                                                                extra.get("window", 0)),
                                   unscaled_layers=tuple(extra.get("unscaled_layers", ())))
    original_form = _original_form(cfg)
    return dataclasses.replace(spec, provenance=spec.provenance + (("hf_form", original_form),))


def _original_form(cfg: dict):
    """Remember the exact HF rope entries so `to_hf(from_hf(x)) == x`."""
    keys = ("rope_theta", "rope_scaling", "rope_parameters")
    return repr({k: cfg[k] for k in keys if k in cfg})


def to_hf(spec: RopeSpec) -> dict:
    """HF config entries for this spec (transformers-5 `rope_parameters` form unless the spec was
    read from another form). A logit scale HF cannot express (entropy-aware ABF) is written under
    `jaxllm_logit_scale`; HF ignores it, jaxllm's `from_hf` restores it."""
    entries = dict(spec.provenance)
    if "hf_form" in entries:
        import ast
        out = ast.literal_eval(entries["hf_form"])
    else:
        params = {k: v for k, v in entries.items() if k not in ("max_position_embeddings",)}
        if not params:
            params = dict(_hf_entries("default", spec.base))
        out = {"rope_parameters": params}
    expressible = spec.logit_scale.kind == "none" or entries.get("rope_type") == "yarn"
    if not expressible:
        out[_LOGIT_SCALE_KEY] = {"kind": spec.logit_scale.kind, "value": spec.logit_scale.value,
                                 "window": spec.logit_scale.window,
                                 "unscaled_layers": list(spec.unscaled_layers)}
    return out
