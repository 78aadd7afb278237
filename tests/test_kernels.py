"""Pallas norm kernels against the XLA reference (``normjax.norms``), forward and gradients.

On CPU every kernel runs in Pallas interpret mode; on a GPU the same tests run the compiled kernels.
Tolerances: float32 1e-5; bfloat16 2e-2 against the float32 reference, or twice XLA's own bfloat16 error
where rounded cotangents make a sum cancel; reduced parameter gradients relative to their largest entry.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grid import pairwise, params
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from pallas_kernels import Stats, auto, kernels

KINDS = ("layer_norm", "rms_norm", "crms_norm")
SHAPES = ((1, 128), (7, 1000), (64, 256), (5, 4096))  # ragged rows, a non-power-of-two width
OPS = {kind: getattr(pk, kind) for kind in KINDS}


def _inputs(shape, dtype, seed=0):
  n, d = shape
  k = jax.random.split(jax.random.key(seed + n * d), 5)
  # Multiples of 1/16 below 8 in magnitude: x + residual is exact even in bfloat16, so the reference
  # (float32) and the op (which rounds the new residual stream to x's dtype) normalize the same values.
  x = (jax.random.randint(k[0], shape, -56, 72) / 16).astype(dtype)
  residual = (jax.random.randint(k[1], shape, -64, 64) / 16).astype(dtype)
  scale = (1.0 + 0.2 * jax.random.normal(k[2], (d,))).astype(dtype)
  bias = (0.1 * jax.random.normal(k[3], (d,))).astype(dtype)
  cotangent = jax.random.normal(k[4], shape, jnp.float32)
  return x, residual, scale, bias, cotangent


def _run(kind, impl, x, residual, scale, bias, out_scale, cotangent, **options):
  """Forward outputs and the gradients of <cotangent, y> (+ <cotangent, s>) w.r.t. every input."""
  def loss(x, residual, scale, bias, out_scale):
    out = OPS[kind](x, scale, bias, residual=residual, out_scale=out_scale, return_stats=True,
                    impl=impl, **options)
    y, stats = out[0], out[-1]
    value = jnp.sum(y.astype(jnp.float32) * cotangent)
    if residual is not None:
      value += jnp.sum(jnp.sin(out[1].astype(jnp.float32)))
    return value, (out[:-1], stats)

  grads, outs = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
      x, residual, scale, bias, out_scale)
  return outs, grads


def _close(name, got, want, dtype, xla_same_dtype=None):
  """f32: 1e-5. bf16: 2e-2 abs+rel against the f32 reference, or no worse than twice XLA's own error
  in bf16 where rounding the bf16 cotangents makes a sum cancel (dx = norm part + residual part)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)
    return
  bound = 2e-2 + 2e-2 * np.abs(want)
  if xla_same_dtype is not None:
    bound = np.maximum(bound, 2 * np.abs(np.asarray(xla_same_dtype, np.float32) - want).max())
  err = np.abs(got - want)
  assert (err <= bound).all(), (name, err.max(), np.unravel_index(np.argmax(err - bound), err.shape))


def _close_reduced(name, got, want, dtype, xla_same_dtype=None):
  """Parameter gradients: relative to the largest reference entry (f32 1e-4, bf16 5e-3)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  bound = (1e-4 if dtype == jnp.float32 else 5e-3) * max(np.abs(want).max(), 1e-6)
  if xla_same_dtype is not None:
    bound = max(bound, 2 * np.abs(np.asarray(xla_same_dtype, np.float32) - want).max())
  assert np.abs(got - want).max() <= bound, (name, np.abs(got - want).max(), bound)


def _compare(kind, shape, dtype, *, use_scale=True, use_bias=True, use_residual=True, offset=0.0,
             out_scale=0.7, casting="f32", config=None, impl="pallas"):
  x, residual, scale, bias, cotangent = _inputs(shape, dtype)
  args = (x, residual if use_residual else None, scale if use_scale else None,
          bias if use_bias else None, out_scale)
  options = dict(scale_offset=offset, casting=casting)
  (outs, stats), grads = _run(kind, impl, *args, cotangent, config=config, **options)
  # The reference: the same rounded inputs, computed in float32. In bf16 the cotangents themselves are
  # rounded, so XLA's own run in the input dtype bounds the error too. "hf"/"hf_legacy" round inside the
  # forward: its outputs are checked against that same-dtype XLA run.
  up = [None if a is None else jnp.asarray(a, jnp.float32) for a in args]
  (ref_outs, ref_stats), ref_grads = _run(kind, "xla", *up, cotangent, scale_offset=offset)
  same_outs, same_stats, same_grads = (None, None), (None, None), (None,) * 5
  if dtype != jnp.float32:
    (same_outs, same_stats), same_grads = _run(kind, "xla", *args, cotangent, **options)
  if casting in ("hf", "hf_legacy"):
    ref_outs, ref_stats = same_outs, same_stats
  for name, got, want, same in zip(("y", "new_residual"), outs, ref_outs, same_outs):
    assert got.dtype == dtype, name
    _close(name, got, want, dtype, same)
  for name, got, want, same in zip(Stats._fields, stats, ref_stats, same_stats):
    _close(name, got, want, dtype, same)
  names = ("dx", "dresidual", "dscale", "dbias", "dout_scale")
  for name, got, want, same, arg in zip(names, grads, ref_grads, same_grads, args):
    if arg is None:
      assert got is None, name
    elif name in ("dx", "dresidual"):
      _close(name, got, want, dtype, same)
    else:
      _close_reduced(name, got, want, dtype, same)


FEATURE_GRID = list(itertools.product(KINDS, SHAPES, (jnp.float32, jnp.bfloat16)))


def _id(value):
  if isinstance(value, tuple):
    return "x".join(map(str, value))
  return {jnp.float32: "f32", jnp.bfloat16: "bf16"}.get(value, str(value))


@pytest.mark.parametrize("kind,shape,dtype", params(FEATURE_GRID, pairwise(FEATURE_GRID), _id))
def test_every_feature_matches_reference(kind, shape, dtype):
  _compare(kind, shape, dtype, offset=0.5)


COMBOS = [c for c in itertools.product([False, True], repeat=5) if not (c[3] and not c[0])]
OPTION_GRID = [(kind,) + combo for kind in KINDS for combo in COMBOS]
OPTION_PAIRWISE = [(kind,) + combo for kind in KINDS for combo in pairwise(COMBOS)]  # per kind


@pytest.mark.parametrize("kind,use_scale,use_bias,use_residual,use_offset,use_out_scale",
                         params(OPTION_GRID, OPTION_PAIRWISE))
def test_option_combinations(kind, use_scale, use_bias, use_residual, use_offset, use_out_scale):
  _compare(kind, (7, 100), jnp.float32, use_scale=use_scale, use_bias=use_bias,
           use_residual=use_residual, offset=1.0 if use_offset else 0.0,
           out_scale=0.5 if use_out_scale else 1.0)


@pytest.mark.parametrize("casting", ["hf", "hf_legacy"])
@pytest.mark.parametrize("kind", KINDS)
def test_hf_castings_in_bfloat16(kind, casting):
  _compare(kind, (7, 1000), jnp.bfloat16, casting=casting)


def test_static_out_scale_is_folded_like_a_traced_one():
  x, _, scale, _, _ = _inputs((7, 100), jnp.float32)
  static = pk.rms_norm(x, scale, out_scale=0.25, impl="pallas")
  traced = jax.jit(lambda s: pk.rms_norm(x, scale, out_scale=s, impl="pallas"))(jnp.float32(0.25))
  np.testing.assert_allclose(static, traced, rtol=1e-6)
  np.testing.assert_allclose(static, 0.25 * pk.rms_norm(x, scale, impl="xla"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_row_stays_in_its_row(kind):
  x, _, scale, bias, cotangent = _inputs((9, 100), jnp.float32)
  x = x.at[4, 17].set(jnp.nan)
  y = OPS[kind](x, scale, bias, impl="pallas")
  dx = jax.grad(lambda x: jnp.sum(OPS[kind](x, scale, bias, impl="pallas") * cotangent))(x)
  others = np.arange(9) != 4
  assert np.isnan(np.asarray(y[4])).all()
  assert np.isfinite(np.asarray(y[others])).all() and np.isfinite(np.asarray(dx[others])).all()
  np.testing.assert_allclose(y[others], OPS[kind](x[others], scale, bias, impl="xla"), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_and_constant_rows(kind):
  d, eps = 100, 1e-6
  x = jnp.stack([jnp.zeros(d), jnp.full(d, 3.0), jnp.linspace(-1, 1, d)])
  bias = jnp.linspace(0, 1, d)
  y, stats = OPS[kind](x, None, bias, eps=eps, return_stats=True, impl="pallas")
  assert np.isfinite(np.asarray(y)).all()
  np.testing.assert_allclose(y[0], bias, atol=1e-6)  # a zero row: 0 * rsqrt(eps) + bias
  np.testing.assert_allclose(stats.rstd[0], 1 / np.sqrt(eps), rtol=1e-5)
  if kind == "layer_norm":  # a constant row has zero variance: only the bias survives
    np.testing.assert_allclose(y[1], bias, atol=1e-5)
  np.testing.assert_allclose(y, OPS[kind](x, None, bias, eps=eps, impl="xla"), atol=1e-5)
  dx = jax.grad(lambda x: jnp.sum(OPS[kind](x, None, bias, eps=eps, impl="pallas") ** 2))(x)
  assert np.isfinite(np.asarray(dx)).all()


def test_large_bfloat16_values():
  x = (jnp.linspace(-1e4, 1e4, 7 * 256).reshape(7, 256)).astype(jnp.bfloat16)
  for kind in KINDS:
    got = OPS[kind](x, impl="pallas")
    want = OPS[kind](x.astype(jnp.float32), impl="xla").astype(jnp.bfloat16)
    _close(kind, got, want, jnp.bfloat16)


def test_stats_give_the_variance_and_carry_no_gradient():
  x, *_ = _inputs((7, 100), jnp.float32)
  eps = 1e-6
  _, stats = pk.layer_norm(x, eps=eps, return_stats=True, impl="pallas")
  np.testing.assert_allclose(1 / stats.rstd ** 2 - eps, jnp.var(x, -1), rtol=1e-5)
  np.testing.assert_allclose(stats.mean, jnp.mean(x, -1), rtol=1e-5, atol=1e-6)
  _, rms = pk.rms_norm(x, eps=eps, return_stats=True, impl="pallas")
  np.testing.assert_allclose(1 / rms.rstd ** 2 - eps, jnp.mean(x ** 2, -1), rtol=1e-5)
  assert not np.asarray(rms.mean).any()
  for impl in ("pallas", "xla"):
    g = jax.grad(lambda x: jnp.sum(pk.rms_norm(x, return_stats=True, impl=impl)[1].rstd))(x)
    assert not np.asarray(g).any(), impl


def test_leading_dimensions_are_flattened_to_rows():
  x = jax.random.normal(jax.random.key(1), (2, 3, 5, 100))
  y, stats = pk.layer_norm(x, return_stats=True, impl="pallas")
  assert y.shape == x.shape and stats.rstd.shape == (2, 3, 5)
  np.testing.assert_allclose(y, pk.layer_norm(x, impl="xla"), atol=1e-5)


def test_backward_is_deterministic_and_partials_reduce_across_programs():
  x, _, scale, bias, cotangent = _inputs((64, 256), jnp.float32)
  config = pk.KernelConfig(bwd_block_rows=2, bwd_programs=5)  # 5 programs of 14 rows: ragged
  grad = jax.jit(jax.grad(lambda x, s, b: jnp.sum(
      pk.rms_norm(x, s, b, impl="pallas", config=config) * cotangent), (0, 1, 2)))
  first, second = grad(x, scale, bias), grad(x, scale, bias)
  for a, b in zip(first, second):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  ref = jax.grad(lambda x, s, b: jnp.sum(pk.rms_norm(x, s, b, impl="xla") * cotangent), (0, 1, 2))(
      x, scale, bias)
  for name, got, want in zip(("dx", "dscale", "dbias"), first, ref):
    _close_reduced(name, got, want, jnp.float32)


@pytest.mark.parametrize("kind,shape,dtype", [(kind, (13, 1000), jnp.float32) for kind in KINDS]
                         + [("layer_norm", (3, 16384), jnp.bfloat16)], ids=_id)
def test_wide_rows_loop_over_column_blocks(kind, shape, dtype):
  """Rows wider than ``kernels.WHOLE_ROW`` lanes run the column-blocked kernels (``wide.py``): by
  default at D=16384, forced at D=1000 with 128-column blocks (8 blocks, the last one ragged) and 3
  backward programs of 5 rows (the last one ragged)."""
  config = pk.KernelConfig(block_cols=128, bwd_programs=3) if shape[1] <= kernels.WHOLE_ROW else None
  assert kernels.default_config(*shape, config).block_cols < 1024 or shape[1] > kernels.WHOLE_ROW
  _compare(kind, shape, dtype, offset=0.5, config=config)


@pytest.mark.gpu_only
@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="impl='triton' runs through jax-triton on a GPU only")
@pytest.mark.parametrize("kind,shape,dtype", [(kind, shape, dtype) for kind in KINDS
                                              for shape in ((7, 1000), (64, 256), (5, 4096))
                                              for dtype in (jnp.float32, jnp.bfloat16)], ids=_id)
def test_triton_language_kernels_match_reference_on_a_gpu(kind, shape, dtype):
  """The Triton-language kernels (``impl='triton'``) against the reference, every option on."""
  _compare(kind, shape, dtype, offset=0.5, impl="triton")


def test_default_config_follows_the_measured_heuristics():
  cfg = kernels.default_config(16384, 4096)
  assert (cfg.block_rows, cfg.num_warps, cfg.bwd_block_rows, cfg.bwd_programs) == (2, 8, 1, 256)
  assert cfg.block_cols == 4096 and kernels.default_config(8, 8192).block_cols == 8192  # whole rows
  assert kernels.default_config(8, 16384).block_cols == kernels.WIDE_BLOCK_COLS  # looped over
  assert kernels.default_config(65536, 1024).bwd_programs == 512
  assert kernels.default_config(3, 1024).bwd_programs == 2  # never more programs than row pairs
  assert kernels.default_config(8, 128, pk.KernelConfig(block_rows=1)).block_rows == 1


def test_sharded_rows_under_a_mesh():
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
  x, residual, scale, bias, _ = _inputs((16, 100), jnp.float32)
  x, residual = x.reshape(8, 2, 100), residual.reshape(8, 2, 100)
  f = jax.jit(lambda x, r, s, b: pk.rms_norm(x, s, b, residual=r, return_stats=True, impl="pallas"))
  with jax.set_mesh(mesh):
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    y, s, stats = f(jax.device_put(x, rows), jax.device_put(residual, rows), scale, bias)
    assert y.sharding.is_equivalent_to(rows, y.ndim) and stats.rstd.sharding.is_equivalent_to(rows, 2)
    odd = jax.jit(lambda x: pk.layer_norm(x, impl="pallas"))(x[:3])  # 3 rows: not divisible
  want = pk.rms_norm(x, scale, bias, residual=residual, impl="xla")
  np.testing.assert_allclose(y, want[0], atol=1e-5)
  np.testing.assert_allclose(s, want[1], atol=1e-6)
  np.testing.assert_allclose(odd, pk.layer_norm(x[:3], impl="xla"), atol=1e-5)


def test_impl_dispatch():
  x = jnp.ones((3, 128))
  with pytest.raises(NotImplementedError, match="triton"):
    pk.rms_norm(x, impl="triton")
  np.testing.assert_allclose(pk.rms_norm(x, impl=("triton", "pallas")), pk.rms_norm(x, impl="xla"))
  with pytest.raises(ValueError, match=r"impl='palas' is not valid; choose one of \['xla', 'pallas'"):
    pk.rms_norm(x, impl="palas")
  with pytest.raises(NotImplementedError, match="widths up to"):
    pk.rms_norm(jnp.ones((1, pk.ops.MAX_WIDTH + 1)), impl="pallas")
  with pytest.raises(ValueError, match="residual must match x"):
    pk.rms_norm(x, residual=jnp.ones((3, 64)), impl="pallas")
  with pytest.raises(ValueError, match=r"scale has shape \(64,\)"):
    pk.layer_norm(x, jnp.ones(64), impl="xla")


def test_auto_never_picks_a_slower_kernel():
  table = {"H100": {auto.key("rms_norm", jnp.bfloat16, 4096, False): {"xla": 0.5, "pallas": 0.3},
                    auto.key("layer_norm", jnp.bfloat16, 4096, False): {"xla": 0.5, "pallas": 0.6}}}
  choose = lambda op, d, fused=False, dtype=jnp.bfloat16: auto.choose(
      op, (8, d), dtype, fused, table=table, device_kind="H100")
  assert choose("rms_norm", 4096) == "pallas"
  assert choose("layer_norm", 4096) == "xla"  # measured slower
  assert choose("rms_norm", 2048) == "xla"  # not measured
  assert choose("rms_norm", 4096, fused=True) == "xla"
  assert choose("rms_norm", 4096, dtype=jnp.float32) == "xla"
  assert auto.choose("rms_norm", (8, 4096), jnp.bfloat16, False) == "xla"  # CPU: always XLA
