r"""ViT on local images (Fashion-MNIST from the Debian package if installed, else scikit-learn digits).

Launch:
  python -m normjax.train --config=configs/vit.py:tiny --workdir=runs/vit_tiny
  python -m normjax.train --config=configs/vit.py:s16,norm=layer_norm,placement=peri --workdir=runs/s16

Argument keys: variant (tiny, s16, b16), norm, placement, depth, init, dtype, steps, impl. image_size,
channels and num_classes of 0 are read from the dataset; patch_size 0 makes a 4x4 patch grid.
"""

from __future__ import annotations

import ml_collections as mlc

from normjax import config as common

# name: (num_layers, d_model, num_heads, patch_size, batch_size, steps, lr, warmup)
VARIANTS = {
    "tiny": (4, 64, 4, 0, 64, 300, 3e-3, 30),  # CPU in about a minute
    "s16": (12, 384, 6, 16, 1024, 90_000, 1e-3, 10_000),  # ViT-S/16
    "b16": (12, 768, 12, 16, 1024, 90_000, 1e-3, 10_000),  # ViT-B/16
}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = common.parse_arg(arg, variant="tiny", norm="layer_norm", placement="pre", depth=0,
                         init="normal", dtype="float32", steps=0, impl="auto")
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant={arg.variant!r} is unknown; choose one of {list(VARIANTS)}")
  layers, width, heads, patch, batch, steps, lr, warmup = VARIANTS[arg.variant]
  c = mlc.ConfigDict()
  c.seed = 0  # parameter init seed
  c.model = mlc.ConfigDict(dict(
      name="vit",  # model family
      num_layers=arg.depth or layers,  # blocks L
      d_model=width,  # residual width
      num_heads=heads,  # attention heads
      mlp_dim=0,  # GELU hidden width (0 = 4d)
      image_size=0,  # square input side (0 = from the dataset)
      patch_size=patch,  # patch side (0 = image_size // 4)
      channels=0,  # input channels (0 = from the dataset)
      num_classes=0,  # classes (0 = from the dataset)
      pool="cls",  # cls token or mean pooling
      norm=dict(kind=arg.norm,  # normjax.norms.names()
                options={},  # that kind's options (eps, casting, ...)
                impl=arg.impl),  # xla, pallas (fused kernels), triton, auto (measured fastest)
      placement=dict(kind=arg.placement, final_norm=True, embed_norm=False, mix_alpha=0.25,
                     deepnorm_alpha=0.0),  # see configs/llama.py
      init=dict(scheme=arg.init, std=0.02),  # normal, lir, scaled, deepnorm
      dtype=arg.dtype,  # compute dtype
      param_dtype="float32",  # parameter dtype
      scan_layers=True,  # nnx.scan over depth
      remat="none",  # none, full, dots
      zero_mean_writers=False,  # W - mean_out(W) for residual writers (LN == RMSNorm exactly)
      compressed=False,  # d-1 stored residual coordinates (with norm crms_norm: Pre-CRMSNorm)
  ))
  c.data = mlc.ConfigDict(dict(
      name="auto_images",  # auto_images, fashion_mnist_deb, sklearn_digits, or a prepared TFDS name
      data_dir="",  # dataset cache ("" = $NORMJAX_DATA_DIR or ~/.cache/normjax)
      text_dir="",  # unused for images
      seq_len=0,  # unused for images
      shuffle_seed=0,  # data order
  ))
  common.train_sections(c, steps=arg.steps or steps, batch_size=batch, lr=lr, warmup=warmup)
  return c
