r"""LLaMA and GPT-2 decoders on a byte-level corpus (the CPython standard library sources by
default: no download).

Launch:
  python -m normjax.train --config=configs/llama.py:tiny --workdir=runs/llama_tiny
  python -m normjax.train --config=configs/llama.py:130m,norm=layer_norm,placement=mix --workdir=runs/x
  python -m normjax.train --config=configs/llama.py:tiny --config.model.norm.kind=dyt \
      --config.train.steps=100 --workdir=runs/dyt
  python -m normjax.train --config=configs/llama.py:gpt2_tiny --workdir=runs/gpt2_tiny
  python -m normjax.train --config=configs/llama.py:tiny --config.train.init_from=hf/llama-dir \
      --workdir=runs/finetune   # start from a Hugging Face directory or a normjax checkpoint

Argument keys: variant (a key of VARIANTS), norm (unset: the variant's family's), placement, depth,
init, dtype, steps, impl (norm kernels: auto, xla, pallas). depth and steps left unset mean the
variant's. Every section the run reads is below; any field can be overridden with
--config.<section>.<field>=value.
"""

from __future__ import annotations

import ml_collections as mlc

from normjax import config as common
from normjax import norms, variance
from normjax.train import adamp, conda
from normjax.data.tokenizers import TokenizerConfig

# The 130m-1b sizes and their lr/steps/warmup are the LLaMA harness shared by the Mix-LN
# (arXiv:2412.13795) and LayerNorm Scaling (arXiv:2502.05795) papers, itself from GaLore
# (arXiv:2403.03507): C4, sequence 256, batch 512. 20m/60m are smaller steps of the same ladder.
# These run on the byte-level standard library; the c4_* variants below are the papers' runs.
VARIANTS = {
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, seq_len=128, batch_size=16, steps=300,
                 lr=3e-3, warmup_steps=30),  # CPU in about 2 minutes
    # tiny on BPE tokens: a 1024-token byte-level BPE vocabulary trained on the standard library's
    # training files (once, cached next to the dataset), documents packed with segment ids
    "tiny_bpe": dict(num_layers=4, d_model=128, num_heads=4, seq_len=128, batch_size=16, steps=300,
                     lr=3e-3, warmup_steps=30, tokenizer=dict(kind="hf", train_vocab=1024)),
    "20m": dict(num_layers=6, d_model=384, num_heads=6, seq_len=256, batch_size=64, steps=10_000,
                lr=1e-3, warmup_steps=1_000),
    "60m": dict(num_layers=8, d_model=512, num_heads=8, seq_len=256, batch_size=256, steps=10_000,
                lr=1e-3, warmup_steps=1_000),
    "130m": dict(num_layers=12, d_model=768, num_heads=12, seq_len=256, batch_size=512, steps=20_000,
                 lr=1e-3, warmup_steps=2_000),  # Mix-LN / LNS 130M
    "350m": dict(num_layers=24, d_model=1024, num_heads=16, seq_len=256, batch_size=512, steps=60_000,
                 lr=5e-4, warmup_steps=6_000),  # LNS 350M
    "1b": dict(num_layers=24, d_model=2048, num_heads=32, seq_len=256, batch_size=512, steps=100_000,
               lr=5e-4, warmup_steps=1_000),  # Mix-LN / LNS 1B
}
# GPT-2 (Radford et al. 2019): learned absolute positions, tanh-GELU MLP of width 4d, biases on every
# dense layer, LayerNorm with bias (eps 1e-5), head tied to the token embedding. gpt2_124m is GPT-2
# small's shape; on the byte-level corpus its vocabulary is the tokenizer's, not GPT-2's 50257.
_GPT2 = dict(name="gpt2", norm="layer_norm", norm_options={"eps": 1e-5}, tie_embeddings=True)
VARIANTS.update({
    "gpt2_tiny": dict(VARIANTS["tiny"], **_GPT2),
    "gpt2_124m": dict(_GPT2, num_layers=12, d_model=768, num_heads=12, seq_len=1024, batch_size=512,
                      steps=20_000, lr=6e-4, warmup_steps=2_000),
})
# The papers' runs: C4 (en) as JSON Lines (data.files: the c4-train.*.json.gz files you have), T5's
# SentencePiece vocabulary (data.tokenizer.path: its spiece.model, 32000 tokens), sequence 256,
# batch 512 (131K tokens per step), Adam without weight decay or clipping, warmup + cosine to 10 %.
# Widths, depths, heads and SwiGLU widths are GaLore's configs/llama_*.json, which both papers use.
_C4 = dict(seq_len=256, batch_size=512, data="jsonl", weight_decay=0.0, clip_norm=0.0,
           tokenizer=dict(kind="sentencepiece"))
VARIANTS.update({
    # Mix-LN Table 1: 71M, 1.1B tokens (10K steps of 131K tokens count padding too)
    "c4_71m": dict(_C4, num_layers=12, d_model=512, num_heads=8, mlp_dim=1368, steps=10_000,
                   lr=1e-3, warmup_steps=1_000),
    # Mix-LN Table 1 / LNS Table 1: 130M, 2.2B tokens
    "c4_130m": dict(_C4, num_layers=12, d_model=768, num_heads=12, mlp_dim=2048, steps=20_000,
                    lr=1e-3, warmup_steps=2_000),
    # Mix-LN Table 1 / LNS Table 1: 250M, 3.9B tokens
    "c4_250m": dict(_C4, num_layers=24, d_model=768, num_heads=16, mlp_dim=2560, steps=40_000,
                    lr=1e-3, warmup_steps=4_000),
    # LNS Table 1: 350M, 6.0B tokens (lr 5e-4)
    "c4_350m": dict(_C4, num_layers=24, d_model=1024, num_heads=16, mlp_dim=2736, steps=60_000,
                    lr=5e-4, warmup_steps=6_000),
    # Mix-LN Table 1 (5B tokens) / LNS Table 1 (8.9B tokens): 1B, 100K steps
    "c4_1b": dict(_C4, num_layers=24, d_model=2048, num_heads=32, mlp_dim=5461, steps=100_000,
                  lr=5e-4, warmup_steps=1_000),
})


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = common.parse_arg(arg, variant="tiny", norm=common.placeholder(str), placement="pre",
                         depth=common.placeholder(int), init="normal", dtype="float32",
                         steps=common.placeholder(int), impl="auto")
  common.check_choice(arg.variant, "variant", list(VARIANTS))
  v = VARIANTS[arg.variant]
  c = mlc.ConfigDict()
  c.seed = 0  # parameter init seed (data order has its own, data.shuffle_seed)
  c.model = mlc.ConfigDict(dict(
      name=v.get("name", "llama"),  # model family: llama or gpt2 (decoders), vit
      num_layers=v["num_layers"] if arg.depth is None else arg.depth,  # blocks L
      d_model=v["d_model"],  # residual width
      num_heads=v["num_heads"],  # attention heads
      num_kv_heads=common.placeholder(int),  # grouped-query heads (None = num_heads)
      head_size=common.placeholder(int),  # per-head width (None = d_model / num_heads)
      mlp=common.placeholder(str),  # swiglu, gelu, gelu_tanh (None = the family's)
      mlp_dim=common.placeholder(int, v.get("mlp_dim")),  # None = 8d/3 up to 16 (SwiGLU), 4d (GELU)
      vocab_size=common.placeholder(int),  # None = the tokenizer's, rounded up to a multiple of 128
      positions=common.placeholder(str),  # rope or learned (None = the family's)
      max_positions=1024,  # learned positions: the longest sequence
      rope_theta=10_000.0,  # rotary embedding base
      tie_embeddings=v.get("tie_embeddings", False),  # head reuses the token embedding
      dense_bias=common.placeholder(bool),  # biases on dense layers (None = the family's)
      # DyT's LLM recipe (arXiv:2503.10622) with norm=dyt: alpha_0 by width, no bias, embed_scale
      embed_scale=arg.norm == "dyt",  # a learnable scalar after the embedding, init sqrt(d)
      norm=dict(kind=arg.norm or v.get("norm", "rms_norm"),  # normjax.norms.names()
                # that kind's options (eps, casting, ...; not impl or param_dtype)
                options=(dict(v.get("norm_options", {})) if arg.norm is None
                         else norms.dyt_llm_options(v["d_model"]) if arg.norm == "dyt" else {}),
                impl=arg.impl),  # xla, pallas (fused kernels), triton, auto (measured fastest)
      placement=dict(kind=arg.placement,  # normjax.placements.names()
                     final_norm=True,  # norm before the head
                     embed_norm=False,  # norm after the embedding (Peri-LN option)
                     mix_alpha=0.25,  # mix: fraction of Post-LN blocks
                     deepnorm_alpha=common.placeholder(float)),  # deepnorm gain (None = (2L)^(1/4))
      init=dict(scheme=arg.init,  # normal, lir, scaled, deepnorm
                std=0.02,  # base std of the normal initializers
                base="family"),  # family: the decoders' N(0, std^2); gpt2 is the same for them
      dtype=arg.dtype,  # compute dtype: float32 or bfloat16
      param_dtype="float32",  # parameter dtype (norm parameters too)
      scan_layers=True,  # nnx.scan over depth (False: unrolled)
      remat="none",  # none, full, dots
      zero_mean_writers=False,  # W - mean_out(W) for residual writers (LN == RMSNorm exactly)
      reparam="none",  # "sigma": every dense layer gamma / sigma(W) * W (arXiv:2303.06296)
      compressed=False,  # d-1 stored residual coordinates (with norm crms_norm: Pre-CRMSNorm)
  ))
  c.data = mlc.ConfigDict(dict(
      # the documents: stdlib_bytes (the Python standard library), text_files, jsonl, parquet, or a
      # prepared TFDS text dataset name (lm1b, c4, ...); packed with data.tokenizer
      name=v.get("data", "stdlib_bytes"),
      data_dir="",  # where datasets are built and cached ("" = $NORMJAX_DATA_DIR or ~/.cache/normjax)
      text_dir="",  # text_files: a directory of text files
      files=v.get("files", ""),  # jsonl, parquet: a glob of the corpus files (/data/c4/en/c4-train.*.json.gz)
      text_field="text",  # jsonl, parquet: the field / column holding a document's text
      on_bad_line="stop",  # jsonl: a corrupt line stops the build (file:line), or "skip" (counted)
      tokenizer=common.section(TokenizerConfig()),  # kind: bytes, sentencepiece, hf; path; train_vocab
      seq_len=v["seq_len"],  # tokens per example
      boundary_loss=False,  # also predict a document's first token from the previous document
      shuffle_seed=0,  # data order; batch(step) depends only on this and the step
  ))
  c.data.tokenizer.update(v.get("tokenizer", {}))
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
      weight_decay=v.get("weight_decay", 0.1),  # decoupled weight decay on the decayed parameters
      decay_norms_and_biases=False,  # also decay norm parameters and dense biases (MaxText, nanodo do)
      clip_norm=v.get("clip_norm", 1.0),  # global gradient-norm clip (0 = off)
      adamp=common.section(adamp.AdamPOptions()),  # delta, wd_ratio, nesterov
      conda=common.section(conda.CondaOptions()),  # update_proj_gap, scale
  ))
  # Target Variance Rescaling (arXiv:2503.17500): every, target_std, threshold, per_layer_target,
  # defaults in normjax.variance.TVRConfig.
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
