"""The norm registry: every norm kind by name, with a uniform apply / init contract.

``get(name)`` returns a ``NormSpec``; ``names()`` lists the canonical names. The contract, shared by
the Flax wrappers, the models and the training loop:

  params = spec.init_params(key, x, **options)        # dict of arrays ({} when none)
  state = spec.init_state(x, **options)                # dict of arrays ({} unless stateful)
  y, state = spec.apply(x, params, state, train=..., **options, **call_options)

``x`` is an example input (for weight transforms: the weight itself); initializers use its shape
and dtype (and, for sigma_reparam, its values). Each kind's construction options are a small frozen
record (``spec.options_type``, a dataclass: field names, types and defaults in one place);
``call_options`` (e.g. ``out_scale``, ``mask``) vary per call and may be traced. An unknown name or
option is a ``ConfigError`` (a ValueError) naming the value and the valid choices. This package is
pure XLA math: the fused kernels (``pallas_kernels``) build on it, never the reverse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from normjax.norms._util import CASTINGS, Array, Axis
from normjax.norms.power import BACKWARDS
from normjax.norms.prepbn import LN_KINDS
from normjax.norms.weight import WS_VARIANTS
from normjax.treeutil import path_names
from normjax.validation import ConfigError, check_choice, closest

Params = dict[str, Array]
State = dict[str, Array]
ApplyFn = Callable[..., tuple[Array, State]]  # (x, params, state, options, train, **call) -> (y, state)


@dataclasses.dataclass(frozen=True)
class Options:
  """Base of every kind's option record; subclasses declare the fields with their defaults."""

  @classmethod
  def create(cls, kind: str, **overrides: Any) -> Options:
    """The defaults with ``overrides``; an unknown key is a ConfigError listing the valid options."""
    valid = sorted(f.name for f in dataclasses.fields(cls))
    for key in overrides:
      if key not in valid:
        close = closest(key, valid)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise ConfigError(f"norm {kind!r} has no option {key!r}; valid options: {valid}{hint}")
    return cls(**overrides)

  def at_site(self, site: str) -> Options:
    """The options of this kind's norm at ``site`` of a model (one of ``SITES``): the same
    everywhere unless a kind's recipe differs by site (DyT's LLM alpha_0)."""
    del site
    return self


# where a model places an activation norm: a block's attention or MLP sublayer, after the
# embedding, before the head
SITES = ("attn", "mlp", "embed", "final")


@dataclasses.dataclass(frozen=True)
class TokenOptions(Options):
  """layer_norm, rms_norm, crms_norm: a per-token norm over ``axis`` with an optional affine."""
  axis: Axis = -1
  eps: float = 1e-6
  use_scale: bool = True
  use_bias: bool = False
  scale_offset: float = 0.0  # Gemma's (1 + w): the gain initializes to 0
  casting: str = "f32"  # normjax.norms._util.CASTINGS; "hf" returns x's dtype promoted with param_dtype
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_choice(self.casting, "casting", CASTINGS)


@dataclasses.dataclass(frozen=True)
class LayerNormOptions(TokenOptions):
  use_bias: bool = True


@dataclasses.dataclass(frozen=True)
class L2Options(Options):
  axis: Axis = -1
  eps: float = 1e-6
  use_scale: bool = False
  param_dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class DyTOptions(Options):
  """DyT's alpha_0 per site (arXiv:2503.10622): ``alpha_init`` everywhere (the vision recipe's 0.5;
  in the LLM recipe, the MLP's and the embedding norm's), unless ``alpha_attn`` / ``alpha_final``
  set the attention sublayer's / the final norm's (the LLM recipe: ``norms.dyt_llm_options``)."""
  alpha_init: float = 0.5
  alpha_attn: float | None = None
  alpha_final: float | None = None
  use_scale: bool = True
  use_bias: bool = True  # the LLaMA recipe drops the bias
  param_dtype: Any = jnp.float32

  def at_site(self, site: str) -> DyTOptions:
    alpha = {"attn": self.alpha_attn, "final": self.alpha_final}.get(site)
    return self if alpha is None else dataclasses.replace(self, alpha_init=alpha)


@dataclasses.dataclass(frozen=True)
class FixedOptions(Options):
  axis: Axis = -1
  center: bool = True
  std_init: float = 1.0
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
  pass


@dataclasses.dataclass(frozen=True)
class GroupOptions(Options):
  """group_norm and evonorm_s0: statistics per sample over (spatial, channels in a group)."""
  num_groups: int = 32
  eps: float = 1e-5
  batch_axes: tuple[int, ...] = (0,)  # axes that index samples (models use (0, 1): per token)
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class BatchOptions(Options):
  axis: Axis = -1
  momentum: float = 0.9
  eps: float = 1e-5
  axis_name: str | None = None  # a mapped axis to sum the statistics over (shard_map/pmap)
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class BatchChannelOptions(Options):
  num_groups: int = 32
  momentum: float = 0.9
  eps: float = 1e-5
  param_dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class PowerOptions(Options):
  alpha_fwd: float = 0.9
  alpha_bwd: float = 0.9
  eps: float = 1e-5
  warmup_steps: int = 0
  group_scaling: int = 0
  backward: str = "paper"  # "paper" (Algorithm 2) or "code" (the public implementation)
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_choice(self.backward, "backward", BACKWARDS)


@dataclasses.dataclass(frozen=True)
class PRepBNOptions(Options):
  """PRepBN (arXiv:2405.11582): LayerNorm for ``warmup_steps``, then blended into RepBN over
  ``decay_steps`` (the paper's DeiT/Swin runs: 60000). The init is the vision code's (eta 1, BN
  gain 1); its LLaMA run starts both at 0 (``eta_init=0, bn_scale_init=0``)."""
  ln: str = "layer_norm"  # the norm annealed away: layer_norm (vision) or rms_norm (the LLaMA run)
  warmup_steps: int = 0
  decay_steps: int = 60_000
  eta_init: float = 1.0
  bn_scale_init: float = 1.0
  momentum: float = 0.9
  eps: float = 1e-5  # the BatchNorm's
  ln_eps: float = 1e-6  # the LayerNorm's (the DeiT code's)
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_choice(self.ln, "ln", LN_KINDS)
    for name in ("warmup_steps", "decay_steps"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < (0 if name == "warmup_steps" else 1):
        raise ConfigError(f"prepbn option {name}={value!r} must be an integer >= "
                          f"{0 if name == 'warmup_steps' else 1}")


@dataclasses.dataclass(frozen=True)
class UnifiedOptions(Options):
  """Unified Normalization (arXiv:2208.01313) with the paper's defaults: windows of 4 steps for the
  forward (``window``) and backward (``grad_window``) statistics, 4000 warmup steps; the outlier
  filter is the authors' choice for vision (on) and language (off, the default)."""
  window: int = 4
  grad_window: int = 4
  warmup_steps: int = 4000
  outlier_filtration: bool = False
  hold_steps: int = 1000  # the gradient compensation's r is 1 this long (the authors' code)
  ratio_clip: float = 5.0  # then r is clipped to [1/ratio_clip, ratio_clip] (the authors' code)
  momentum: float = 0.9
  eps: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name, low in (("window", 1), ("grad_window", 1), ("warmup_steps", 0), ("hold_steps", 0)):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"unified_norm option {name}={value!r} must be an integer >= {low}")
    if not self.ratio_clip >= 1.0:
      raise ConfigError(f"unified_norm option ratio_clip={self.ratio_clip!r} must be >= 1")


@dataclasses.dataclass(frozen=True)
class EvoB0Options(Options):
  momentum: float = 0.9
  eps: float = 1e-5
  param_dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class WSOptions(Options):
  eps: float = 1e-5
  variant: str = "paper"  # "paper" (eq. 5-6) or "code" (the authors' Conv2d)

  def __post_init__(self):
    check_choice(self.variant, "variant", WS_VARIANTS)


@dataclasses.dataclass(frozen=True)
class SigmaOptions(Options):
  gamma_init: str = "sigma"
  num_iters: int = 1
  eps: float = 1e-12
  param_dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """One registered norm kind. Use ``apply``/``init_params``/``init_state``, not the raw adapters."""
  name: str
  fn: Callable[..., Any]  # the pure transform this kind wraps (its docstring has the math)
  summary: str
  options_type: type[Options]
  apply_fn: ApplyFn
  init_params_fn: Callable[[jax.Array, Any, Any], Params]
  init_state_fn: Callable[[Any, Any], State] | None = None
  call_options: tuple[str, ...] = ()
  acts_on: str = "activations"  # or "weights": the input is a kernel in Flax [..., out] layout
  mixes_positions: bool = False  # statistics across positions of a sequence (leaks the future)
  # state the BACKWARD pass advances: its cotangent is the increment (``update_backward_state``)
  backward_state: tuple[str, ...] = ()

  @property
  def stateful(self) -> bool:
    """True when the kind carries state between calls (running statistics, power-iteration u)."""
    return self.init_state_fn is not None

  @property
  def defaults(self) -> Mapping[str, Any]:
    """The option names with their default values."""
    return dataclasses.asdict(self.options_type())

  def options(self, **overrides: Any) -> Options:
    """The kind's option record with ``overrides``; an unknown option is a ConfigError."""
    return self.options_type.create(self.name, **overrides)

  def _resolve(self, options: Options | None, kwargs: Mapping[str, Any]
               ) -> tuple[Options, dict[str, Any]]:
    call = {k: v for k, v in kwargs.items() if k in self.call_options}
    overrides = {k: v for k, v in kwargs.items() if k not in self.call_options}
    if options is None:
      return self.options(**overrides), call
    if overrides:
      return self.options(**{**dataclasses.asdict(options), **overrides}), call
    return options, call

  def init_params(self, key: jax.Array, x: Any, options: Options | None = None, **kwargs: Any
                  ) -> Params:
    return self.init_params_fn(key, x, self._resolve(options, kwargs)[0])

  def init_state(self, x: Any, options: Options | None = None, **kwargs: Any) -> State:
    if self.init_state_fn is None:
      return {}
    return self.init_state_fn(x, self._resolve(options, kwargs)[0])

  def apply(self, x: Array, params: Params, state: State | None = None, *, train: bool = False,
            options: Options | None = None, **kwargs: Any) -> tuple[Array, State]:
    """Runs the norm. ``kwargs``: construction options (overriding ``options``) and/or call
    options. Returns (y, new_state)."""
    resolved, call = self._resolve(options, kwargs)
    if self.stateful and not state:
      raise ValueError(f"norm {self.name!r} is stateful: pass the state from spec.init_state(x)")
    return self.apply_fn(x, params, state or {}, resolved, train, **call)


def update_backward_state(state: Any, state_grads: Any) -> Any:
  """Adds the backward-pass increments to a (nested) norm-state tree: PowerNorm's ``nu``, UN's
  ``ema_gz`` and ``buffer_gz`` (every kind's ``backward_state``). ``state_grads`` is the loss's
  gradient with respect to ``state`` (same structure); other leaves are returned unchanged, so a
  whole model's norm state can be passed at once."""
  keys = {key for spec in _REGISTRY.values() for key in spec.backward_state}

  def update(path, value, grad):
    names = path_names(path)
    return value + grad.astype(value.dtype) if names and names[-1] in keys else value
  return jax.tree_util.tree_map_with_path(update, state, state_grads)


def logical_axes(value: Array) -> tuple[str | None, ...]:
  """Logical axis names of a norm parameter or state: per-feature vectors are ``("norm",)``."""
  return ("norm",) if value.ndim == 1 else (None,) * value.ndim


_REGISTRY: dict[str, NormSpec] = {}
_ALIASES = {
    "ln": "layer_norm", "layernorm": "layer_norm", "rms": "rms_norm", "rmsnorm": "rms_norm",
    "crms": "crms_norm", "crmsnorm": "crms_norm", "l2": "l2_norm", "gn": "group_norm",
    "bn": "batch_norm", "bcn": "batch_channel_norm", "pn": "power_norm", "powernorm": "power_norm",
    "un": "unified_norm",
    "ws": "weight_standardize", "sigma": "sigma_reparam", "fixed": "fixed_norm", "none": "identity",
}


def register(spec: NormSpec) -> NormSpec:
  if spec.name in _REGISTRY or spec.name in _ALIASES:
    raise ValueError(f"norm {spec.name!r} is already registered")
  _REGISTRY[spec.name] = spec
  return spec


def names() -> list[str]:
  """Canonical names of every registered norm kind, sorted."""
  return sorted(_REGISTRY)


def aliases() -> dict[str, str]:
  """Short names accepted by ``get`` (for configs: ``norm=rms``) and what they stand for."""
  return dict(_ALIASES)


def get(name: str) -> NormSpec:
  """The spec for ``name`` (canonical or alias); ConfigError with the closest match otherwise."""
  key = _ALIASES.get(name, name) if isinstance(name, str) else name
  if key not in _REGISTRY:
    choices = names() + sorted(_ALIASES)
    close = closest(name, choices)
    hint = f" Did you mean {close!r}?" if close else ""
    raise ConfigError(f"unknown norm {name!r}.{hint} Valid norms: {names()} "
                      f"(aliases: {sorted(_ALIASES)})")
  return _REGISTRY[key]
