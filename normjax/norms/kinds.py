"""The built-in norm kinds, one declaration each: the pure function, its option record, and the
adapters from the registry contract (``normjax.norms.registry``) to the function's arguments."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from normjax.norms import batch, power, prepbn, standard, unified, weight
from normjax.norms._util import canonical_axes, param_shape
from normjax.norms.registry import (BatchChannelOptions, BatchOptions, DyTOptions, EvoB0Options,
                                    FixedOptions, GroupOptions, L2Options, LayerNormOptions,
                                    NoOptions, NormSpec, Params, PowerOptions, PRepBNOptions,
                                    SigmaOptions, TokenOptions, UnifiedOptions, WSOptions,
                                    register)


def _features(x: Any, axis: Any) -> tuple[int, ...]:
  return param_shape(x.shape, canonical_axes(len(x.shape), axis))


def _affine(shape: tuple[int, ...], o: Any, *, scale: bool = True, bias: bool = True) -> Params:
  """scale (ones, or zeros under a 1+w offset) and bias (zeros), each when the record enables it."""
  params = {}
  if scale and getattr(o, "use_scale", True):
    params["scale"] = jnp.full(shape, 1.0 - getattr(o, "scale_offset", 0.0), o.param_dtype)
  if bias and getattr(o, "use_bias", True):
    params["bias"] = jnp.zeros(shape, o.param_dtype)
  return params


def _token_apply(fn):
  def apply(x, p, s, o, train, out_scale=1.0):
    del train
    return fn(x, p.get("scale"), p.get("bias"), axis=o.axis, eps=o.eps, out_scale=out_scale,
              scale_offset=o.scale_offset, casting=o.casting), s
  return apply


def _token_init(key, x, o):
  del key
  return _affine(_features(x, o.axis), o)


for _name, _fn, _summary, _options in (
    ("layer_norm", standard.layer_norm, "LayerNorm (x - mean) / sqrt(var + eps)", LayerNormOptions),
    ("rms_norm", standard.rms_norm, "RMSNorm x / sqrt(mean(x^2) + eps)", TokenOptions),
    ("crms_norm", standard.crms_norm, "Compressed RMSNorm on the d-1 stored coordinates", TokenOptions)):
  register(NormSpec(name=_name, fn=_fn, summary=_summary, options_type=_options,
                    apply_fn=_token_apply(_fn), init_params_fn=_token_init, call_options=("out_scale",)))

register(NormSpec(
    name="l2_norm", fn=standard.l2_norm, summary="nGPT unit-norm projection x / ||x||",
    options_type=L2Options,
    apply_fn=lambda x, p, s, o, train: (standard.l2_norm(x, p.get("scale"), axis=o.axis, eps=o.eps), s),
    init_params_fn=lambda key, x, o: _affine(_features(x, o.axis), o, bias=False)))

register(NormSpec(
    name="dyt", fn=standard.dyt, summary="Dynamic Tanh scale * tanh(alpha * x) + bias",
    options_type=DyTOptions,
    apply_fn=lambda x, p, s, o, train: (standard.dyt(x, p["alpha"], p.get("scale"), p.get("bias")), s),
    init_params_fn=lambda key, x, o: {"alpha": jnp.asarray(o.alpha_init, o.param_dtype),
                                      **_affine(_features(x, -1), o)}))

register(NormSpec(
    name="fixed_norm", fn=standard.fixed_norm,
    summary="LayerNorm with a fixed per-layer std (LN removal)", options_type=FixedOptions,
    apply_fn=lambda x, p, s, o, train: (standard.fixed_norm(
        x, s["std"], p.get("scale"), p.get("bias"), axis=o.axis, center=o.center), s),
    init_params_fn=lambda key, x, o: _affine(_features(x, o.axis), o),
    init_state_fn=lambda x, o: {"std": jnp.asarray(o.std_init, jnp.float32)}))

register(NormSpec(
    name="identity", fn=standard.identity, summary="no normalization", options_type=NoOptions,
    apply_fn=lambda x, p, s, o, train: (x, s), init_params_fn=lambda key, x, o: {}))

register(NormSpec(
    name="group_norm", fn=standard.group_norm,
    summary="GroupNorm over (spatial, channels in group)", options_type=GroupOptions,
    apply_fn=lambda x, p, s, o, train: (standard.group_norm(
        x, p.get("scale"), p.get("bias"), num_groups=o.num_groups, eps=o.eps,
        batch_axes=o.batch_axes), s),
    init_params_fn=lambda key, x, o: _affine((x.shape[-1],), o)))


def _running_init(x, o):
  shape = _features(x, getattr(o, "axis", -1))
  return {"mean": jnp.zeros(shape, jnp.float32), "var": jnp.ones(shape, jnp.float32)}


def _batch_norm_apply(x, p, s, o, train, mask=None):
  y, mean, var = batch.batch_norm(x, p.get("scale"), p.get("bias"), s["mean"], s["var"], train=train,
                                  momentum=o.momentum, eps=o.eps, axis=o.axis, mask=mask,
                                  axis_name=o.axis_name)
  return y, {"mean": mean, "var": var}


register(NormSpec(
    name="batch_norm", fn=batch.batch_norm, summary="BatchNorm with running statistics",
    options_type=BatchOptions, apply_fn=_batch_norm_apply,
    init_params_fn=lambda key, x, o: _affine(_features(x, o.axis), o), init_state_fn=_running_init,
    call_options=("mask",), mixes_positions=True))


def _bcn_init(key, x, o):
  del key
  bn = _affine((x.shape[-1],), o)
  return {"bn_scale": bn["scale"], "bn_bias": bn["bias"], **_affine((o.num_groups,), o)}


def _bcn_apply(x, p, s, o, train, mask=None):
  y, mean, var = batch.batch_channel_norm(
      x, p["bn_scale"], p["bn_bias"], p["scale"], p["bias"], s["mean"], s["var"], train=train,
      num_groups=o.num_groups, momentum=o.momentum, eps=o.eps, mask=mask)
  return y, {"mean": mean, "var": var}


register(NormSpec(
    name="batch_channel_norm", fn=batch.batch_channel_norm,
    summary="BatchNorm then per-sample group norm", options_type=BatchChannelOptions,
    apply_fn=_bcn_apply, init_params_fn=_bcn_init, init_state_fn=_running_init,
    call_options=("mask",), mixes_positions=True))


def _power_apply(x, p, s, o, train, mask=None):
  return power.power_norm(x, p.get("scale"), p.get("bias"), s, train=train, alpha_fwd=o.alpha_fwd,
                          alpha_bwd=o.alpha_bwd, eps=o.eps, warmup_steps=o.warmup_steps,
                          group_scaling=o.group_scaling, backward=o.backward, mask=mask)


register(NormSpec(
    name="power_norm", fn=power.power_norm,
    summary="PowerNorm: running quadratic mean, approximate backward", options_type=PowerOptions,
    apply_fn=_power_apply, init_params_fn=lambda key, x, o: _affine((x.shape[-1],), o),
    init_state_fn=lambda x, o: power.power_norm_init_state(x.shape[-1]), call_options=("mask",),
    mixes_positions=True, backward_state=("nu",)))


def _unified_apply(x, p, s, o, train, mask=None):
  return unified.unified_norm(x, p.get("scale"), p.get("bias"), s, train=train,
                              warmup_steps=o.warmup_steps, outlier_filtration=o.outlier_filtration,
                              hold_steps=o.hold_steps, ratio_clip=o.ratio_clip, momentum=o.momentum,
                              eps=o.eps, mask=mask)


register(NormSpec(
    name="unified_norm", fn=unified.unified_norm,
    summary="Unified Normalization: windowed geometric-mean statistics, compensated backward",
    options_type=UnifiedOptions, apply_fn=_unified_apply,
    init_params_fn=lambda key, x, o: _affine((x.shape[-1],), o),
    init_state_fn=lambda x, o: unified.unified_norm_init_state(x.shape[-1], o.window, o.grad_window),
    call_options=("mask",), mixes_positions=True, backward_state=("ema_gz", "buffer_gz")))


def _prepbn_init(key, x, o):
  del key
  c = x.shape[-1]
  ln = {"ln_scale": jnp.ones((c,), o.param_dtype)}
  if o.ln == "layer_norm":
    ln["ln_bias"] = jnp.zeros((c,), o.param_dtype)
  return {**ln, "bn_scale": jnp.full((c,), o.bn_scale_init, o.param_dtype),
          "bn_bias": jnp.zeros((c,), o.param_dtype), "eta": jnp.asarray(o.eta_init, o.param_dtype)}


def _prepbn_apply(x, p, s, o, train, mask=None):
  return prepbn.prepbn(x, p["ln_scale"], p.get("ln_bias"), p["bn_scale"], p["bn_bias"], p["eta"],
                       s["mean"], s["var"], s["step"], train=train, warmup_steps=o.warmup_steps,
                       decay_steps=o.decay_steps, ln=o.ln, momentum=o.momentum, eps=o.eps,
                       ln_eps=o.ln_eps, mask=mask)


register(NormSpec(
    name="prepbn", fn=prepbn.prepbn, summary="PRepBN: LayerNorm annealed into BN(x) + eta x",
    options_type=PRepBNOptions, apply_fn=_prepbn_apply, init_params_fn=_prepbn_init,
    init_state_fn=lambda x, o: {**_running_init(x, o), "step": jnp.zeros((), jnp.float32)},
    call_options=("mask",), mixes_positions=True))


def _evo_init(key, x, o):
  del key
  return {**_affine((x.shape[-1],), o), "v": jnp.ones((x.shape[-1],), o.param_dtype)}


def _evo_b0_apply(x, p, s, o, train):
  y, var = batch.evonorm_b0(x, p["scale"], p["bias"], p["v"], s["var"], train=train,
                            momentum=o.momentum, eps=o.eps)
  return y, {"var": var}


register(NormSpec(
    name="evonorm_b0", fn=batch.evonorm_b0,
    summary="EvoNorm-B0: x / max(batch std, v*x + instance std)", options_type=EvoB0Options,
    apply_fn=_evo_b0_apply, init_params_fn=_evo_init,
    init_state_fn=lambda x, o: {"var": jnp.ones((x.shape[-1],), jnp.float32)}, mixes_positions=True))

register(NormSpec(
    name="evonorm_s0", fn=batch.evonorm_s0, summary="EvoNorm-S0: x * sigmoid(v*x) / group std",
    options_type=GroupOptions,
    apply_fn=lambda x, p, s, o, train: (batch.evonorm_s0(
        x, p["scale"], p["bias"], p["v"], num_groups=o.num_groups, eps=o.eps,
        batch_axes=o.batch_axes), s),
    init_params_fn=_evo_init))

register(NormSpec(
    name="weight_standardize", fn=weight.weight_standardize,
    summary="Weight Standardization of a kernel, per output channel", options_type=WSOptions,
    apply_fn=lambda w, p, s, o, train: (weight.weight_standardize(w, eps=o.eps, variant=o.variant), s),
    init_params_fn=lambda key, w, o: {}, acts_on="weights"))


def _sigma_apply(w, p, s, o, train):
  w_hat, u = weight.sigma_reparam(w, p["gamma"], s["u"], train=train, num_iters=o.num_iters, eps=o.eps)
  return w_hat, {"u": u}


def _sigma_init(key, w, o):
  del key
  gamma, _ = weight.sigma_reparam_init(w, gamma_init=o.gamma_init)
  return {"gamma": gamma.astype(o.param_dtype)}


register(NormSpec(
    name="sigma_reparam", fn=weight.sigma_reparam, summary="sigma-Reparam gamma / sigma(W) * W",
    options_type=SigmaOptions, apply_fn=_sigma_apply, init_params_fn=_sigma_init,
    init_state_fn=lambda w, o: {"u": weight.sigma_reparam_init(w)[1].astype(jnp.float32)},
    acts_on="weights"))
