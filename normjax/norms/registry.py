"""The norm registry: every norm kind by name, with a uniform apply / init contract.

``get(name)`` returns a ``NormSpec``; ``names()`` lists the canonical names. The contract, shared by
the Flax wrappers, the models and the training loop:

  params = spec.init_params(key, x, **options)        # dict of arrays ({} when none)
  state = spec.init_state(x, **options)                # dict of arrays ({} unless stateful)
  y, state = spec.apply(x, params, state, train=..., **options, **call_options)

``x`` is an example input (for weight transforms: the weight itself); initializers use its shape
and dtype (and, for sigma_reparam, its values). ``options`` are construction-time settings with the
defaults in ``spec.defaults``; ``call_options`` (e.g. ``out_scale``, ``mask``) vary per call and may
be traced. An unknown name or option is a ValueError naming the value and the valid choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels
from normjax.norms import batch, power, standard, weight
from normjax.norms._util import Array, canonical_axes, closest, param_shape

Params = dict[str, Array]
State = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """One registered norm kind. Use ``apply``/``init_params``/``init_state``, not the raw adapters."""
  name: str
  fn: Callable[..., Any]  # the pure transform this kind wraps (its docstring has the math)
  summary: str
  defaults: Mapping[str, Any]
  call_options: tuple[str, ...]
  _apply: Callable[..., tuple[Array, State]]
  _init_params: Callable[..., Params]
  _init_state: Callable[..., State] | None = None
  acts_on: str = "activations"  # or "weights": the input is a kernel in Flax [..., out] layout

  @property
  def stateful(self) -> bool:
    """True when the kind carries state between calls (running statistics, power-iteration u)."""
    return self._init_state is not None

  def options(self, **overrides: Any) -> dict[str, Any]:
    """The defaults merged with ``overrides``; an unknown option is a ValueError listing the valid ones."""
    for key in overrides:
      if key not in self.defaults:
        raise ValueError(f"norm {self.name!r} has no option {key!r}; valid options: "
                         f"{sorted(self.defaults)}")
    return {**self.defaults, **overrides}

  def _split(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    call = {k: v for k, v in kwargs.items() if k in self.call_options}
    return self.options(**{k: v for k, v in kwargs.items() if k not in self.call_options}), call

  def init_params(self, key: jax.Array, x: Any, **options: Any) -> Params:
    return self._init_params(key, x, self.options(**options))

  def init_state(self, x: Any, **options: Any) -> State:
    return {} if self._init_state is None else self._init_state(x, self.options(**options))

  def apply(self, x: Array, params: Params, state: State | None = None, *, train: bool = False,
            **kwargs: Any) -> tuple[Array, State]:
    """Runs the norm. ``kwargs``: construction options and/or call options. Returns (y, new_state)."""
    options, call = self._split(kwargs)
    if self.stateful and not state:
      raise ValueError(f"norm {self.name!r} is stateful: pass the state from spec.init_state(x)")
    return self._apply(x, params, state or {}, options, train, **call)


def logical_axes(value: Array) -> tuple[str | None, ...]:
  """Logical axis names of a norm parameter or state: per-feature vectors are ``("norm",)``."""
  return ("norm",) if value.ndim == 1 else (None,) * value.ndim


_REGISTRY: dict[str, NormSpec] = {}
_ALIASES = {
    "ln": "layer_norm", "layernorm": "layer_norm", "rms": "rms_norm", "rmsnorm": "rms_norm",
    "crms": "crms_norm", "crmsnorm": "crms_norm", "l2": "l2_norm", "gn": "group_norm",
    "bn": "batch_norm", "bcn": "batch_channel_norm", "pn": "power_norm", "powernorm": "power_norm",
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
  """The spec for ``name`` (canonical or alias); ValueError with the closest match otherwise."""
  key = _ALIASES.get(name, name) if isinstance(name, str) else name
  if key not in _REGISTRY:
    choices = names() + sorted(_ALIASES)
    close = closest(name, choices)
    hint = f" Did you mean {close!r}?" if close else ""
    raise ValueError(f"unknown norm {name!r}.{hint} Valid norms: {names()} "
                     f"(aliases: {sorted(_ALIASES)})")
  return _REGISTRY[key]


# ---------------------------------------------------------------------------------------------
# Initializers shared by the kinds below.

def _features(x: Any, axis: Any) -> tuple[int, ...]:
  return param_shape(x.shape, canonical_axes(len(x.shape), axis))


def _affine_init(shape: tuple[int, ...], o: Mapping[str, Any], *, use_bias_default: bool = True) -> Params:
  """scale (ones, or zeros under a 1+w offset) and bias (zeros), each when enabled."""
  params = {}
  if o.get("use_scale", True):
    params["scale"] = jnp.full(shape, 1.0 - o.get("scale_offset", 0.0), o["param_dtype"])
  if o.get("use_bias", use_bias_default):
    params["bias"] = jnp.zeros(shape, o["param_dtype"])
  return params


def _register(name: str, fn: Callable[..., Any], summary: str, defaults: Mapping[str, Any],
              apply: Callable[..., tuple[Array, State]], init_params: Callable[..., Params],
              init_state: Callable[..., State] | None = None, call_options: tuple[str, ...] = (),
              acts_on: str = "activations") -> None:
  register(NormSpec(name, fn, summary, MappingProxyType(dict(defaults)), call_options, apply,
                    init_params, init_state, acts_on))


_F32 = {"param_dtype": jnp.float32}
# impl: pallas_kernels.IMPLS; "auto" runs the fused kernel only where it was measured faster than XLA.
_TOKEN = {"axis": -1, "eps": 1e-6, "use_scale": True, "scale_offset": 0.0, "casting": "f32",
          "impl": "auto", **_F32}


def _token_norm(fn: Callable[..., Array]) -> Callable[..., tuple[Array, State]]:
  """The XLA reference ``fn``, or the ``pallas_kernels`` op of the same name when ``impl`` asks."""
  def apply(x, p, s, o, train, out_scale=1.0):
    del train
    options = dict(eps=o["eps"], out_scale=out_scale, scale_offset=o["scale_offset"],
                   casting=o["casting"])
    last_axis = canonical_axes(x.ndim, o["axis"]) == (x.ndim - 1,)
    if o["impl"] == "xla" or (o["impl"] == "auto" and not last_axis):
      return fn(x, p.get("scale"), p.get("bias"), axis=o["axis"], **options), s
    if not last_axis:
      raise ValueError(f"norm {fn.__name__!r} with impl={o['impl']!r} normalizes the last axis only; "
                       f"got axis={o['axis']!r}")
    # Looked up per call: pallas_kernels imports normjax.norms, so it may still be initializing here.
    kernel_op = getattr(pallas_kernels, fn.__name__)
    return kernel_op(x, p.get("scale"), p.get("bias"), impl=o["impl"], **options), s
  return apply


def _token_init(key, x, o):
  del key
  return _affine_init(_features(x, o["axis"]), o)


_register("layer_norm", standard.layer_norm, "LayerNorm (x - mean) / sqrt(var + eps)",
          {**_TOKEN, "use_bias": True}, _token_norm(standard.layer_norm), _token_init,
          call_options=("out_scale",))
_register("rms_norm", standard.rms_norm, "RMSNorm x / sqrt(mean(x^2) + eps)",
          {**_TOKEN, "use_bias": False}, _token_norm(standard.rms_norm), _token_init,
          call_options=("out_scale",))
_register("crms_norm", standard.crms_norm, "Compressed RMSNorm on the d-1 stored coordinates",
          {**_TOKEN, "use_bias": False}, _token_norm(standard.crms_norm), _token_init,
          call_options=("out_scale",))

_register("l2_norm", standard.l2_norm, "nGPT unit-norm projection x / ||x||",
          {"axis": -1, "eps": 1e-6, "use_scale": False, **_F32},
          lambda x, p, s, o, train: (standard.l2_norm(x, p.get("scale"), axis=o["axis"], eps=o["eps"]), s),
          lambda key, x, o: _affine_init(_features(x, o["axis"]), o, use_bias_default=False))


def _dyt_init(key, x, o):
  del key
  return {"alpha": jnp.asarray(o["alpha_init"], o["param_dtype"]), **_affine_init(_features(x, -1), o)}


_register("dyt", standard.dyt, "Dynamic Tanh scale * tanh(alpha * x) + bias",
          {"alpha_init": 0.5, "use_scale": True, "use_bias": True, **_F32},
          lambda x, p, s, o, train: (standard.dyt(x, p["alpha"], p.get("scale"), p.get("bias")), s),
          _dyt_init)

_register("fixed_norm", standard.fixed_norm, "LayerNorm with a fixed per-layer std (LN removal)",
          {"axis": -1, "center": True, "std_init": 1.0, "use_scale": True, "use_bias": True, **_F32},
          lambda x, p, s, o, train: (standard.fixed_norm(x, s["std"], p.get("scale"), p.get("bias"),
                                                         axis=o["axis"], center=o["center"]), s),
          lambda key, x, o: _affine_init(_features(x, o["axis"]), o),
          lambda x, o: {"std": jnp.asarray(o["std_init"], jnp.float32)})

_register("identity", standard.identity, "no normalization", {},
          lambda x, p, s, o, train: (x, s), lambda key, x, o: {})

_GROUP = {"num_groups": 32, "eps": 1e-5, "batch_axes": (0,), **_F32}

_register("group_norm", standard.group_norm, "GroupNorm over (spatial, channels in group)",
          {**_GROUP, "use_scale": True, "use_bias": True},
          lambda x, p, s, o, train: (standard.group_norm(
              x, p.get("scale"), p.get("bias"), num_groups=o["num_groups"], eps=o["eps"],
              batch_axes=o["batch_axes"]), s),
          lambda key, x, o: _affine_init((x.shape[-1],), o))


def _running_init(x, o):
  shape = _features(x, o.get("axis", -1))
  return {"mean": jnp.zeros(shape, jnp.float32), "var": jnp.ones(shape, jnp.float32)}


def _batch_norm_apply(x, p, s, o, train, mask=None):
  y, mean, var = batch.batch_norm(x, p.get("scale"), p.get("bias"), s["mean"], s["var"], train=train,
                                  momentum=o["momentum"], eps=o["eps"], axis=o["axis"], mask=mask,
                                  axis_name=o["axis_name"])
  return y, {"mean": mean, "var": var}


_register("batch_norm", batch.batch_norm, "BatchNorm with running statistics",
          {"axis": -1, "momentum": 0.9, "eps": 1e-5, "axis_name": None, "use_scale": True,
           "use_bias": True, **_F32},
          _batch_norm_apply, lambda key, x, o: _affine_init(_features(x, o["axis"]), o),
          _running_init, call_options=("mask",))


def _bcn_init(key, x, o):
  del key
  channels, groups = x.shape[-1], o["num_groups"]
  bn = _affine_init((channels,), o)
  return {"bn_scale": bn["scale"], "bn_bias": bn["bias"], **_affine_init((groups,), o)}


def _bcn_apply(x, p, s, o, train, mask=None):
  y, mean, var = batch.batch_channel_norm(
      x, p["bn_scale"], p["bn_bias"], p["scale"], p["bias"], s["mean"], s["var"], train=train,
      num_groups=o["num_groups"], momentum=o["momentum"], eps=o["eps"], mask=mask)
  return y, {"mean": mean, "var": var}


_register("batch_channel_norm", batch.batch_channel_norm, "BatchNorm then per-sample group norm",
          {"num_groups": 32, "momentum": 0.9, "eps": 1e-5, **_F32},
          _bcn_apply, _bcn_init, _running_init, call_options=("mask",))


def _power_apply(x, p, s, o, train, mask=None):
  return power.power_norm(x, p.get("scale"), p.get("bias"), s, train=train, alpha_fwd=o["alpha_fwd"],
                          alpha_bwd=o["alpha_bwd"], eps=o["eps"], warmup_steps=o["warmup_steps"],
                          group_scaling=o["group_scaling"], backward=o["backward"], mask=mask)


_register("power_norm", power.power_norm, "PowerNorm: running quadratic mean, approximate backward",
          {"alpha_fwd": 0.9, "alpha_bwd": 0.9, "eps": 1e-5, "warmup_steps": 0, "group_scaling": 0,
           "backward": "paper", "use_scale": True, "use_bias": True, **_F32},
          _power_apply, lambda key, x, o: _affine_init((x.shape[-1],), o),
          lambda x, o: power.power_norm_init_state(x.shape[-1]), call_options=("mask",))


def _evo_init(key, x, o):
  del key
  return {**_affine_init((x.shape[-1],), o), "v": jnp.ones((x.shape[-1],), o["param_dtype"])}


def _evo_b0_apply(x, p, s, o, train):
  y, var = batch.evonorm_b0(x, p["scale"], p["bias"], p["v"], s["var"], train=train,
                            momentum=o["momentum"], eps=o["eps"])
  return y, {"var": var}


_register("evonorm_b0", batch.evonorm_b0, "EvoNorm-B0: x / max(batch std, v*x + instance std)",
          {"momentum": 0.9, "eps": 1e-5, **_F32}, _evo_b0_apply, _evo_init,
          lambda x, o: {"var": jnp.ones((x.shape[-1],), jnp.float32)})
_register("evonorm_s0", batch.evonorm_s0, "EvoNorm-S0: x * sigmoid(v*x) / group std",
          {**_GROUP}, lambda x, p, s, o, train: (batch.evonorm_s0(
              x, p["scale"], p["bias"], p["v"], num_groups=o["num_groups"], eps=o["eps"],
              batch_axes=o["batch_axes"]), s),
          _evo_init)

_register("weight_standardize", weight.weight_standardize,
          "Weight Standardization of a kernel, per output channel", {"eps": 1e-5, "variant": "paper"},
          lambda w, p, s, o, train: (weight.weight_standardize(w, eps=o["eps"], variant=o["variant"]), s),
          lambda key, w, o: {}, acts_on="weights")


def _sigma_apply(w, p, s, o, train):
  w_hat, u = weight.sigma_reparam(w, p["gamma"], s["u"], train=train, num_iters=o["num_iters"],
                                  eps=o["eps"])
  return w_hat, {"u": u}


def _sigma_init(key, w, o):
  del key
  gamma, _ = weight.sigma_reparam_init(w, gamma_init=o["gamma_init"])
  return {"gamma": gamma.astype(o["param_dtype"])}


_register("sigma_reparam", weight.sigma_reparam, "sigma-Reparam gamma / sigma(W) * W",
          {"gamma_init": "sigma", "num_iters": 1, "eps": 1e-12, **_F32},
          _sigma_apply, _sigma_init,
          lambda w, o: {"u": weight.sigma_reparam_init(w)[1].astype(jnp.float32)}, acts_on="weights")
