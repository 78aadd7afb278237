r"""ViT on local images (Fashion-MNIST from the Debian package if installed, else scikit-learn digits).

Launch:
  python -m normjax.train --config=configs/vit.py:tiny --workdir=runs/vit_tiny
  python -m normjax.train --config=configs/vit.py:s16,norm=layer_norm,placement=peri --workdir=runs/s16

Argument keys: variant (a key of VARIANTS), norm, placement, depth, init, dtype, steps, impl. Image
size, channels and classes left unset (None) are read from the dataset; an unset patch size makes a
4x4 patch grid. Every section the run reads is below.
"""

from __future__ import annotations

import ml_collections as mlc

from normjax import config as common
from normjax import variance
from normjax.train import adamp, conda

# s16/b16: ViT-S/16 and ViT-B/16 (Dosovitskiy et al., arXiv:2010.11929; the S size from DeiT,
# arXiv:2012.12877) with the ImageNet schedule of "Better plain ViT baselines" (arXiv:2205.01580).
VARIANTS = {
    "tiny": dict(num_layers=4, d_model=64, num_heads=4, patch_size=None, batch_size=64, steps=300,
                 lr=3e-3, warmup_steps=30),  # CPU in about a minute
    "s16": dict(num_layers=12, d_model=384, num_heads=6, patch_size=16, batch_size=1024,
                steps=90_000, lr=1e-3, warmup_steps=10_000),
    "b16": dict(num_layers=12, d_model=768, num_heads=12, patch_size=16, batch_size=1024,
                steps=90_000, lr=1e-3, warmup_steps=10_000),
}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = common.parse_arg(arg, variant="tiny", norm="layer_norm", placement="pre",
                         depth=common.placeholder(int), init="normal", dtype="float32",
                         steps=common.placeholder(int), impl="auto")
  common.check_choice(arg.variant, "variant", list(VARIANTS))
  v = VARIANTS[arg.variant]
  c = mlc.ConfigDict()
  c.seed = 0  # parameter init seed
  c.model = mlc.ConfigDict(dict(
      name="vit",  # model family
      num_layers=v["num_layers"] if arg.depth is None else arg.depth,  # blocks L
      d_model=v["d_model"],  # residual width
      num_heads=v["num_heads"],  # attention heads
      mlp=common.placeholder(str),  # gelu_tanh (None: big_vision's), gelu (exact), swiglu
      mlp_dim=common.placeholder(int),  # hidden width (None = 4d)
      image_size=common.placeholder(int),  # square input side (None = from the dataset)
      patch_size=common.placeholder(int, v["patch_size"]),  # patch side (None = image_size // 4)
      channels=common.placeholder(int),  # input channels (None = from the dataset)
      num_classes=common.placeholder(int),  # classes (None = from the dataset)
      pool="cls",  # cls token or mean pooling
      norm=dict(kind=arg.norm,  # normjax.norms.names()
                options={},  # that kind's options (eps, casting, ...; not impl or param_dtype)
                impl=arg.impl),  # xla, pallas (fused kernels), triton, auto (measured fastest)
      placement=dict(kind=arg.placement,  # normjax.placements.names()
                     final_norm=True,  # norm before the head
                     embed_norm=False,  # norm after the patch embedding (Peri-LN option)
                     mix_alpha=0.25,  # mix: fraction of Post-LN blocks
                     deepnorm_alpha=common.placeholder(float)),  # deepnorm gain (None = (2L)^(1/4))
      init=dict(scheme=arg.init,  # normal, lir, scaled, deepnorm
                std=0.02,  # base std of the normal initializers
                # family: big_vision's ViT init (does not read std); gpt2: every matrix N(0, std^2)
                base="family"),
      dtype=arg.dtype,  # compute dtype
      param_dtype="float32",  # parameter dtype (norm parameters too)
      scan_layers=True,  # nnx.scan over depth
      remat="none",  # none, full, dots
      zero_mean_writers=False,  # W - mean_out(W) for residual writers (LN == RMSNorm exactly)
      reparam="none",  # "sigma": every dense layer gamma / sigma(W) * W (arXiv:2303.06296)
      compressed=False,  # d-1 stored residual coordinates (with norm crms_norm: Pre-CRMSNorm)
  ))
  c.data = mlc.ConfigDict(dict(
      name="auto_images",  # auto_images, fashion_mnist_deb, sklearn_digits, or a prepared TFDS name
      data_dir="",  # dataset cache ("" = $NORMJAX_DATA_DIR or ~/.cache/normjax)
      shuffle_seed=0,  # data order; batch(step) depends only on this and the step
  ))
  c.train = mlc.ConfigDict(dict(
      steps=v["steps"] if arg.steps is None else arg.steps,  # optimizer steps
      # start from these weights and their architecture (the model section then only sets dtype,
      # param_dtype, scan_layers, remat, norm.impl): a Hugging Face directory, a normjax model
      # directory (python -m normjax.convert) or a training workdir; "" = a fresh init
      init_from="",
      batch_size=v["batch_size"],  # global batch (split over the data and fsdp mesh axes)
      log_every=10,  # steps between metrics.jsonl rows
      eval_every=100,  # steps between validation passes (and one at the end; 0 = only at the end)
      eval_steps=4,  # validation batches per pass
      # which parameters train: all, norms (only the norms' gains, biases, alphas: BatchNorm-only
      # training, LayerNorm tuning) or a regular expression searched in each path, e.g. "norm|head"
      trainable="all",
  ))
  c.optim = mlc.ConfigDict(dict(
      name="adamw",  # adamw | adamp (arXiv:2006.08217) | conda (arXiv:2509.24218); options below
      lr=v["lr"],  # peak learning rate of the warmup + cosine schedule
      warmup_steps=v["warmup_steps"],  # linear warmup from 0
      min_lr_ratio=0.1,  # cosine decays to lr * min_lr_ratio at train.steps
      b1=0.9,  # AdamW beta1
      b2=0.95,  # AdamW beta2
      eps=1e-8,  # AdamW epsilon
      weight_decay=0.1,  # decoupled weight decay on the decayed parameters
      decay_norms_and_biases=False,  # also decay norm parameters and dense biases
      clip_norm=1.0,  # global gradient-norm clip (0 = off)
      adamp=common.section(adamp.AdamPOptions()),  # delta, wd_ratio, nesterov
      conda=common.section(conda.CondaOptions()),  # update_proj_gap, scale
  ))
  # Target Variance Rescaling (arXiv:2503.17500): defaults in normjax.variance.TVRConfig.
  c.tvr = common.section(variance.TVRConfig(), enabled=False)
  c.ckpt = mlc.ConfigDict(dict(
      every=100,  # steps between asynchronous orbax saves (0 = only at the end)
      keep=3,  # good checkpoints kept (their next step was finite), besides the newest
  ))
  c.stats = mlc.ConfigDict(dict(
      every=25,  # steps between per-depth statistics rows (0 = off; costs a second compiled step)
  ))
  c.mesh = mlc.ConfigDict(dict(
      data=-1,  # data-parallel axis size (-1 = all devices left)
      fsdp=1,  # parameter-sharding axis size
      tensor=1,  # tensor-parallel axis size
      num_devices=0,  # devices to use (0 = all visible; on several processes, all of them)
      # the batch axis split over processes (hosts) first: "data" (parameters replicated per host,
      # the cheaper collectives) or "fsdp" (parameters sharded across hosts too); the other takes
      # the processes left, tensor stays within a host
      across_processes="data",
  ))
  return c
