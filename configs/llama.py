r"""LLaMA on a byte-level corpus (the CPython standard library sources by default: no download).

Launch:
  python -m normjax.train --config=configs/llama.py:tiny --workdir=runs/llama_tiny
  python -m normjax.train --config=configs/llama.py:130m,norm=layer_norm,placement=mix --workdir=runs/x
  python -m normjax.train --config=configs/llama.py:tiny --config.model.norm.kind=dyt \
      --config.train.steps=100 --workdir=runs/dyt

Argument keys: variant (tiny, 20m, 60m, 130m, 350m, 1b), norm, placement, depth (0 = the variant's),
init, dtype, steps (0 = the variant's), impl (norm kernels: auto, xla, pallas).
"""

from __future__ import annotations

import ml_collections as mlc

from normjax import config as common

# name: (num_layers, d_model, num_heads, seq_len, batch_size, steps, lr, warmup)
VARIANTS = {
    "tiny": (4, 128, 4, 128, 16, 300, 3e-3, 30),  # CPU in about 2 minutes
    "20m": (6, 384, 6, 256, 64, 10_000, 1e-3, 1_000),
    "60m": (8, 512, 8, 256, 256, 10_000, 1e-3, 1_000),
    "130m": (12, 768, 12, 256, 512, 20_000, 1e-3, 2_000),  # LNS / Mix-LN harness sizes
    "350m": (24, 1024, 16, 256, 512, 60_000, 5e-4, 6_000),
    "1b": (24, 2048, 32, 256, 512, 100_000, 5e-4, 1_000),
}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = common.parse_arg(arg, variant="tiny", norm="rms_norm", placement="pre", depth=0, init="normal",
                         dtype="float32", steps=0, impl="auto")
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant={arg.variant!r} is unknown; choose one of {list(VARIANTS)}")
  layers, width, heads, seq_len, batch, steps, lr, warmup = VARIANTS[arg.variant]
  c = mlc.ConfigDict()
  c.seed = 0  # parameter init seed (data order has its own, data.shuffle_seed)
  c.model = mlc.ConfigDict(dict(
      name="llama",  # model family: llama or vit
      num_layers=arg.depth or layers,  # blocks L
      d_model=width,  # residual width
      num_heads=heads,  # attention heads
      num_kv_heads=0,  # grouped-query heads (0 = num_heads)
      mlp_dim=0,  # SwiGLU hidden width (0 = 8d/3 rounded up to 16)
      vocab_size=256,  # bytes
      tie_embeddings=False,  # head reuses the token embedding
      norm=dict(kind=arg.norm,  # normjax.norms.names()
                options={},  # that kind's options (eps, casting, ...)
                impl=arg.impl),  # xla, pallas (fused kernels), triton, auto (measured fastest)
      placement=dict(kind=arg.placement,  # normjax.placements.names()
                     final_norm=True,  # norm before the head
                     embed_norm=False,  # norm after the embedding (Peri-LN option)
                     mix_alpha=0.25,  # mix: fraction of Post-LN blocks
                     deepnorm_alpha=0.0),  # deepnorm residual gain (0 = (2L)^(1/4))
      init=dict(scheme=arg.init,  # normal, lir, scaled, deepnorm
                std=0.02),  # base std of the normal initializers
      dtype=arg.dtype,  # compute dtype: float32 or bfloat16
      param_dtype="float32",  # parameter dtype
      scan_layers=True,  # nnx.scan over depth (False: unrolled)
      remat="none",  # none, full, dots
      zero_mean_writers=False,  # W - mean_out(W) for residual writers (LN == RMSNorm exactly)
      compressed=False,  # d-1 stored residual coordinates (with norm crms_norm: Pre-CRMSNorm)
  ))
  c.data = mlc.ConfigDict(dict(
      name="stdlib_bytes",  # stdlib_bytes, text_files, or a prepared TFDS dataset name
      data_dir="",  # where datasets are built and cached ("" = $NORMJAX_DATA_DIR or ~/.cache/normjax)
      text_dir="",  # text_files: a directory of text files
      seq_len=seq_len,  # tokens (bytes) per example
      shuffle_seed=0,  # data order; batch(step) depends only on this and the step
  ))
  common.train_sections(c, steps=arg.steps or steps, batch_size=batch, lr=lr, warmup=warmup)
  return c
