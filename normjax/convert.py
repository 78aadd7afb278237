"""Exact conversion Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm (Jiang et al., NeurIPS 2023, arXiv:2305.14858).

``to_rms(model)`` takes a LLaMA, GPT-2 or ViT with LayerNorm in the ``pre`` (or ``lns``) placement and a
final norm, and returns a model with affine-free RMSNorm computing the same logits:

1. fold each norm's gain and bias into the dense layers that read its output (q, k, v; gate and up
   or fc1; the head for the final norm): ``W <- diag(g) W``, ``b <- b + beta W`` (Flax ``[in, out]``;
   under LNS ``b <- b + beta W / sqrt(l)``, since LayerNorm Scaling scales the bias with the rest);
2. re-centre everything that writes to the residual stream (token embedding rows; ViT patch
   embedding, positions and class token; attention ``o`` and MLP ``down``/``fc2``): subtract the mean
   over the OUTPUT axis from kernels and biases, so the stream has zero mean in every token and
   ``LayerNorm(x) == RMSNorm(x)`` with the same eps.

``to_crms(model)`` then stores only d-1 coordinates of the zero-mean stream: writers keep their
first d-1 output features and readers use ``W[:d-1] - W[d-1]`` (the dropped coordinate is minus the
sum of the others); the norm becomes ``crms_norm``. Tied embeddings are untied (the head absorbs the
final norm's gain), and reader biases are added when the LayerNorm had a bias.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from normjax import models, norms, placements, roles
from normjax.models.config import ModelConfig, NormConfig

SUBLAYERS = ("attn", "mlp")
CONVERTIBLE_PLACEMENTS = ("pre", "lns")


def _check_source(cfg: ModelConfig, kind: str) -> None:
  if norms.get(cfg.norm.kind).name != kind:
    raise ValueError(f"model.norm.kind={cfg.norm.kind!r}: this conversion starts from {kind!r}")
  if cfg.placement.kind not in CONVERTIBLE_PLACEMENTS:
    raise ValueError(f"model.placement.kind={cfg.placement.kind!r}: the conversion is exact only for "
                     f"{list(CONVERTIBLE_PLACEMENTS)}")
  if not cfg.placement.final_norm or cfg.placement.embed_norm:
    raise ValueError("the conversion needs model.placement.final_norm=True and embed_norm=False")


def _fold(norm: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
  """``dense(gain * x + beta)`` as one dense layer; kernels may carry a leading layer axis."""
  kernel = dense["kernel"]
  gain = norm.get("scale", jnp.ones(kernel.shape[:-1], kernel.dtype))
  out = {"kernel": gain[..., :, None] * kernel}
  bias = dense.get("bias", jnp.zeros(kernel.shape[:-2] + kernel.shape[-1:], kernel.dtype))
  if "bias" in norm:
    bias = bias + jnp.einsum("...i,...io->...o", norm["bias"], kernel)
  if "bias" in dense or "bias" in norm:
    out["bias"] = bias
  return out


def _centre(value: jax.Array) -> jax.Array:
  return value - jnp.mean(value, axis=-1, keepdims=True)


def _centre_dense(dense: dict[str, Any]) -> dict[str, Any]:
  return {name: _centre(value) for name, value in dense.items()}


def _in_scales(cfg: ModelConfig) -> jax.Array | None:
  """``[L]``: the placement's factor on each block's norm output (LNS: 1/sqrt(l)), or None."""
  placement = placements.get(cfg.placement.kind)
  scales = [placement.in_scale(placements.Context(layer=layer, num_layers=cfg.num_layers))
            for layer in range(1, cfg.num_layers + 1)]
  return None if scales[0] is None else jnp.asarray(scales, jnp.float32)


def to_rms(model: nnx.Module) -> nnx.Module:
  """Pre-LN model -> Pre-RMSNorm model with identical logits (see the module docstring)."""
  cfg = model.cfg
  _check_source(cfg, "layer_norm")
  p = models.params_of(model)
  blocks = dict(p["stack"]["blocks"])
  in_scale = _in_scales(cfg)
  for sublayer in SUBLAYERS:
    norm = dict(blocks.pop(f"{sublayer}_norm_in", {}))
    if "bias" in norm and in_scale is not None:  # LNS scales N(x)'s bias too: fold it per layer
      norm["bias"] = norm["bias"] * in_scale[:, None]
    blocks[sublayer] = {
        **blocks[sublayer],
        **{name: _fold(norm, blocks[sublayer][name]) for name in roles.readers(cfg.mlp_kind, sublayer)},
        **{name: _centre_dense(blocks[sublayer][name]) for name in roles.writers(cfg.mlp_kind, sublayer)}}
  out = {"stack": {"blocks": blocks}}
  final = p.get("final_norm", {})
  if cfg.causal:
    head = p["head"] if "head" in p else {"kernel": p["embed"].T}
    out["embed"] = _centre(p["embed"])
  else:
    head = p["head"]
    out["patch_embed"] = _centre_dense(p["patch_embed"])
  for name in ("position", "cls"):  # learned positions (GPT-2, ViT), the ViT class token
    if name in p:
      out[name] = _centre(p[name])
  out["head"] = _fold(final, head)
  ln = norms.get("layer_norm").options(**cfg.norm.options)
  # a LayerNorm bias folds into reader biases, so the converted model needs dense biases
  target = cfg.replace(norm=NormConfig("rms_norm", {"eps": ln.eps, "use_scale": False,
                                                    "use_bias": False}),
                       tie_embeddings=False, dense_bias=cfg.use_bias or ln.use_bias)
  return models.with_params(target, out)


def _compress_reader(dense: dict[str, Any]) -> dict[str, Any]:
  kernel = dense["kernel"]
  out = {"kernel": kernel[..., :-1, :] - kernel[..., -1:, :]}
  if "bias" in dense:
    out["bias"] = dense["bias"]
  return out


def _compress_writer(dense: dict[str, Any]) -> dict[str, Any]:
  return {name: value[..., :-1] for name, value in dense.items()}


def to_crms(model: nnx.Module, *, atol: float = 1e-5) -> nnx.Module:
  """Pre-RMSNorm model with a zero-mean stream (from ``to_rms``) -> Pre-CRMSNorm on d-1 coordinates."""
  cfg = model.cfg
  _check_source(cfg, "rms_norm")
  options = norms.get("rms_norm").options(**cfg.norm.options)
  if options.use_scale or options.use_bias:
    raise ValueError("to_crms needs affine-free RMSNorm (fold gains first: use to_rms)")
  p = models.params_of(model)
  writer_kernels = [p["stack"]["blocks"]["attn"]["o"]["kernel"]]
  writer_kernels.append(p["embed"] if cfg.causal else p["patch_embed"]["kernel"])
  worst = max(float(jnp.max(jnp.abs(jnp.mean(k, -1)))) for k in writer_kernels)
  if worst > atol:
    raise ValueError(f"the residual writers are not zero-mean (max |mean| {worst:.2e}); "
                     "convert a LayerNorm model with to_rms first")
  blocks = {key: dict(value) if isinstance(value, dict) else value
            for key, value in p["stack"]["blocks"].items()}
  for sublayer in SUBLAYERS:
    for name in roles.readers(cfg.mlp_kind, sublayer):
      blocks[sublayer][name] = _compress_reader(blocks[sublayer][name])
    for name in roles.writers(cfg.mlp_kind, sublayer):
      blocks[sublayer][name] = _compress_writer(blocks[sublayer][name])
  out = {"stack": {"blocks": blocks}, "head": _compress_reader(p["head"])}
  if cfg.causal:
    out["embed"] = p["embed"][:, :-1]
  else:
    out["patch_embed"] = _compress_writer(p["patch_embed"])
  for name in ("position", "cls"):
    if name in p:
      out[name] = p[name][..., :-1]
  target = cfg.replace(compressed=True, norm=NormConfig(
      "crms_norm", {"eps": options.eps, "use_scale": False, "use_bias": False}))
  return models.with_params(target, out)


def _probe(cfg: ModelConfig) -> jax.Array:
  """A fixed input for the command's logit check: tokens [2, 16] or images [2, H, W, C]."""
  key = jax.random.key(0)
  if cfg.causal:
    return jax.random.randint(key, (2, 16), 0, cfg.vocab_size)
  return jax.random.uniform(key, (2, cfg.image_size, cfg.image_size, cfg.channels))


def main(argv: list[str] | None = None) -> int:
  """``python -m normjax.convert SOURCE --to rms|crms --out DIR``: converts a Pre-LN model (an HF
  directory, a model directory or a training workdir), checks the logits on a fixed input and
  writes a model directory that ``train.init_from`` and ``interop.load`` read."""
  import argparse

  from normjax import interop
  from normjax.validation import ConfigError

  parser = argparse.ArgumentParser(prog="python -m normjax.convert", description=main.__doc__)
  parser.add_argument("source", help="an HF directory, a normjax model directory or a training workdir")
  parser.add_argument("--to", required=True, choices=("rms", "crms"))
  parser.add_argument("--out", required=True, help="the model directory to write")
  args = parser.parse_args(argv)
  try:
    cfg, model = interop.load(args.source, dtype="float32", param_dtype="float32")
    converted = to_rms(model) if args.to == "rms" else to_crms(to_rms(model))
  except (ConfigError, ValueError) as error:
    print(f"cannot convert {args.source}: {error}")
    return 2
  x = _probe(cfg)
  before, after = model(x)[0], converted(x)[0]
  rel = float(jnp.max(jnp.abs(after - before)) / jnp.max(jnp.abs(before)))
  path = interop.save(converted, args.out)
  print(f"{cfg.name} {cfg.norm.kind} -> {converted.cfg.norm.kind}: logits differ by {rel:.1e} "
        f"(max, relative) on a fixed input; written to {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
