"""Norm placements as registered objects: where the norms sit around each residual branch.

One block definition (``normjax.models.block.Block``) serves LLaMA and ViT; for each sublayer
(attention, then MLP) it calls ``placement.apply(x, branch, norms, ctx)`` once. A placement names
the norm slots it needs (``norm_slots``, a subset of ("in", "out")) and combines them:

  pre        x + F(N(x))                         Pre-LN
  post       N(x + F(x))                         Post-LN
  peri       x + N_out(F(N_in(x)))               Peri-LN / sandwich (+ optional embedding norm)
  mix        post in blocks l <= floor(alpha L), pre after (Mix-LN, alpha 0.25)
  lns        x + F(N(x) / sqrt(l))               LayerNorm Scaling, l 1-based, not on the final norm
  deepnorm   N(alpha x + F(x)), alpha = (2L)^(1/4), with the DeepNet beta init (normjax.variance)
  post_only  x + N(F(x))                         OLMo-2 reordered norm
  none       x + F(x)                            no block norms (the final norm stays; weight-space
                                                 kinds such as sigma_reparam act on every dense kernel)

``ctx.layer`` is 1-based and may be a Python int (unrolled) or a traced scalar (under scan), so the
depth-dependent placements (mix, lns) work either way. With ``ctx.collect_stats`` the placement
also returns the per-sublayer statistics defined in ``docs/statistics.md`` (float32 scalars).
Equations and papers: ``docs/placements.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from normjax.validation import ConfigError, closest

Array = jax.Array
Branch = Callable[[Array], tuple[Array, dict[str, Array]]]
NormFn = Callable[..., Array]  # norm(x, out_scale=None) -> y


@dataclasses.dataclass(frozen=True)
class Context:
  layer: Any  # 1-based block index: int (unrolled) or traced scalar (scan)
  num_layers: int
  collect_stats: bool = False
  mix_alpha: float = 0.25
  deepnorm_alpha: float | None = None
  segments: Any = None  # ``layers.Segments`` of packed documents, for attention (None: one per row)


def _rms(x: Array) -> Array:
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def residual_stats(x: Array) -> dict[str, Array]:
  """Variance over all (b, t, j), mean per-token RMS, max |x|; float32 scalars."""
  xf = x.astype(jnp.float32)
  return {"resid_var": jnp.var(xf),
          "resid_rms": jnp.mean(jnp.sqrt(jnp.mean(jnp.square(xf), -1))),
          "max_abs": jnp.max(jnp.abs(xf))}


@dataclasses.dataclass(frozen=True)
class Placement:
  """A registered placement. Subclasses implement ``combine``; ``apply`` adds the statistics."""
  name: str
  norm_slots: tuple[str, ...]
  summary: str

  def combine(self, x: Array, branch: Branch, norms: dict[str, NormFn], ctx: Context
              ) -> tuple[Array, Array, dict[str, Array], Array | None, Array | None]:
    """Returns (x_new, branch_out, branch_aux, first norm input, first norm output)."""
    raise NotImplementedError

  def check(self, config: Any, spec: Any) -> None:
    """Config-time compatibility of this placement with a norm spec; ConfigError if impossible."""
    if spec.acts_on == "weights" and self.norm_slots:
      raise ConfigError(f"model.norm.kind={spec.name!r} transforms weights, not activations; use it with "
                       "model.placement.kind='none', where it reparametrizes every dense kernel")

  def apply(self, x: Array, branch: Branch, norms: dict[str, NormFn], ctx: Context
            ) -> tuple[Array, dict[str, Array]]:
    x_new, out, aux, norm_in, norm_out = self.combine(x, branch, norms, ctx)
    if not ctx.collect_stats:
      return x_new, {}
    return x_new, statistics(x_new, out, aux, norm_in, norm_out)


def statistics(x_new: Array, out: Array, aux: dict[str, Array], norm_in: Array | None,
               norm_out: Array | None, norm_in_rms: Array | None = None) -> dict[str, Array]:
  """One sublayer's statistics (``docs/statistics.md``); ``norm_in_rms`` when already known (from
  a kernel's row statistics) instead of recomputed from ``norm_in``."""
  nan = jnp.float32(jnp.nan)
  if norm_in_rms is None:
    norm_in_rms = nan if norm_in is None else _rms(norm_in)
  return {**residual_stats(x_new), "branch_rms": _rms(out), "norm_in_rms": norm_in_rms,
          "norm_out_rms": nan if norm_out is None else _rms(norm_out), **aux}


# add_norm(pending, x, out_scale, with_stats) -> (N(x + pending), x + pending, mean square of
# x + pending per row or None): the fused "add, then normalize" of a kernel (``residual=``).
AddNorm = Callable[..., tuple[Array, Array, Array | None]]


class PreNorm(Placement):
  """``x + F(N(x) * in_scale)``: the norm reads the residual stream and the branch output is added
  back to it, so the add can wait for the next sublayer's norm and run inside its kernel
  (``apply_deferred``, used when the norms are kernels)."""

  def in_scale(self, ctx: Context) -> Any:
    return None

  def combine(self, x, branch, norms, ctx):
    h = norms["in"](x, out_scale=self.in_scale(ctx))
    out, aux = branch(h)
    return x + out, out, aux, x, h

  def apply_deferred(self, stream: tuple[Array, Array], branch: Branch, add_norm: AddNorm,
                     ctx: Context) -> tuple[tuple[Array, Array], dict[str, Array]]:
    """``stream = (x, pending)``: the residual stream is ``x + pending``, not yet added. Returns
    ``((x + pending, F(N(x + pending))), stats)``, the same values as ``apply`` on ``x + pending``,
    with ``norm_in_rms`` from the kernel's row statistics when it gives them."""
    x, pending = stream
    h, s, row_mean_square = add_norm(pending, x, self.in_scale(ctx), ctx.collect_stats)
    out, aux = branch(h)
    if not ctx.collect_stats:
      return (s, out), {}
    norm_in_rms = None if row_mean_square is None else jnp.sqrt(jnp.mean(row_mean_square))
    return (s, out), statistics(s + out, out, aux, s, h, norm_in_rms)


class Pre(PreNorm):
  pass


class Post(Placement):
  def combine(self, x, branch, norms, ctx):
    out, aux = branch(x)
    s = x + out
    y = norms["out"](s)
    return y, out, aux, s, y


class Peri(Placement):
  def combine(self, x, branch, norms, ctx):
    h = norms["in"](x)
    out, aux = branch(h)
    return x + norms["out"](out), out, aux, x, h


class PostOnly(Placement):
  def combine(self, x, branch, norms, ctx):
    out, aux = branch(x)
    y = norms["out"](out)
    return x + y, out, aux, out, y


class NoNorm(Placement):
  def combine(self, x, branch, norms, ctx):
    out, aux = branch(x)
    return x + out, out, aux, None, None


class LayerNormScaling(PreNorm):
  def in_scale(self, ctx):
    return (1.0 / math.sqrt(ctx.layer) if isinstance(ctx.layer, int)
            else jax.lax.rsqrt(jnp.asarray(ctx.layer, jnp.float32)))


def deepnorm_alpha(ctx_or_layers: Any, override: float | None = None) -> float:
  """DeepNet decoder-only residual gain (2L)^(1/4) unless overridden."""
  if override is not None:
    return override
  num_layers = getattr(ctx_or_layers, "num_layers", ctx_or_layers)
  return (2.0 * num_layers) ** 0.25


class DeepNorm(Placement):
  def combine(self, x, branch, norms, ctx):
    out, aux = branch(x)
    s = deepnorm_alpha(ctx, ctx.deepnorm_alpha) * x + out
    y = norms["out"](s)
    return y, out, aux, s, y


class MixLN(Placement):
  """Post-LN for l <= floor(alpha L), Pre-LN after; one norm per sublayer, the branch runs once.

  With a traced layer index the choice is made with ``where`` on the branch input and on the
  output, so F is evaluated once and the norm twice (elementwise cost only).
  """

  def check(self, config, spec):
    super().check(config, spec)
    if spec.stateful:
      raise ConfigError(f"model.placement.kind='mix' with stateful norm {spec.name!r}: the norm is "
                       "evaluated in both positions under scan, which would update its state twice")

  def combine(self, x, branch, norms, ctx):
    num_post = math.floor(ctx.mix_alpha * ctx.num_layers)
    if isinstance(ctx.layer, int):
      return (POST if ctx.layer <= num_post else PRE).combine(x, branch, _mix_norms(norms), ctx)
    is_post = jnp.asarray(ctx.layer) <= num_post
    normed_x = norms["in"](x)
    out, aux = branch(jnp.where(is_post, x, normed_x))
    s = x + out
    normed_s = norms["in"](s)
    return (jnp.where(is_post, normed_s, s), out, aux, jnp.where(is_post, s, x),
            jnp.where(is_post, normed_s, normed_x))


def _mix_norms(norms: dict[str, NormFn]) -> dict[str, NormFn]:
  """Mix-LN uses one norm per sublayer in either position."""
  return {"in": norms["in"], "out": norms["in"]}


PRE = Pre("pre", ("in",), "x + F(N(x))")
POST = Post("post", ("out",), "N(x + F(x))")

_REGISTRY: dict[str, Placement] = {}


def register(placement: Placement) -> Placement:
  if placement.name in _REGISTRY:
    raise ValueError(f"placement {placement.name!r} is already registered")
  _REGISTRY[placement.name] = placement
  return placement


for _placement in (PRE, POST, Peri("peri", ("in", "out"), "x + N_out(F(N_in(x)))"),
                   MixLN("mix", ("in",), "post for l <= floor(alpha L), pre after"),
                   LayerNormScaling("lns", ("in",), "x + F(N(x) / sqrt(l))"),
                   DeepNorm("deepnorm", ("out",), "N(alpha x + F(x))"),
                   PostOnly("post_only", ("out",), "x + N(F(x))"),
                   NoNorm("none", (), "x + F(x)")):
  register(_placement)


def names() -> list[str]:
  """Registered placement names, sorted."""
  return sorted(_REGISTRY)


def get(name: str) -> Placement:
  """The placement called ``name``; ConfigError naming the value, the closest match and the choices."""
  if name not in _REGISTRY:
    close = closest(name, names())
    hint = f" Did you mean {close!r}?" if close else ""
    raise ConfigError(f"unknown placement {name!r}.{hint} Valid placements: {names()}")
  return _REGISTRY[name]
