"""Tiny Hugging Face models with random weights, built from their configs and saved with
``save_pretrained``: the offline stand-ins for downloaded checkpoints in the interop tests."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch's CPU build installs on Python 3.11 only "
                            "(the hf_test extra); the 3.12 leg runs without it")
transformers = pytest.importorskip("transformers")

VOCAB = 97
CONFIGS = {  # the cases the import must cover: GQA, untied and tied heads, head_dim != d / heads
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=50, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
        max_position_embeddings=64),
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=64, bos_token_id=0, eos_token_id=0),
    "vit": lambda: transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, image_size=16, patch_size=4,
                                          num_channels=3, num_labels=5),
}
CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "vit": "ViTForImageClassification"}


def build(name: str, *, seed: int = 0, dtype=None):
  """The transformers model of ``CONFIGS[name]``; weights perturbed away from their init (zero
  biases and unit gains would hide a wrong mapping)."""
  torch.manual_seed(seed)
  config = CONFIGS[name]()
  model = getattr(transformers, CLASSES[config.model_type])(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model if dtype is None else model.to(dtype)


def save(name: str, path: pathlib.Path, **kwargs) -> object:
  model = build(name, **kwargs)
  model.save_pretrained(path)
  return model


def inputs(name: str, batch: int = 2, length: int = 11) -> np.ndarray:
  """Token ids [B, T] for the decoders, images [B, H, W, C] in [0, 1] for the ViT."""
  rng = np.random.RandomState(0)
  if name == "vit":
    return rng.rand(batch, 16, 16, 3).astype(np.float32)
  return rng.randint(0, VOCAB, (batch, length))


def logits(model, x: np.ndarray) -> np.ndarray:
  """transformers' own forward, float32 logits."""
  with torch.no_grad():
    if x.ndim == 4:
      out = model(pixel_values=torch.tensor(x).permute(0, 3, 1, 2).to(model.dtype))
    else:
      out = model(torch.tensor(x))
  return out.logits.float().numpy()


def text_file(path: pathlib.Path) -> pathlib.Path:
  """A local text file of a few thousand words (this repository's Python sources, concatenated)."""
  root = pathlib.Path(__file__).resolve().parents[1] / "normjax"
  path.write_text("\n".join(p.read_text() for p in sorted(root.rglob("*.py"))[:12]))
  return path


def save_with_tokenizer(name: str, path: pathlib.Path, text: pathlib.Path, *, vocab: int = 300,
                        **kwargs) -> object:
  """A decoder of ``CONFIGS[name]`` whose vocabulary is a byte-level BPE (``tokenizer.json`` in the
  directory, as on the Hub) trained on ``text``: what ``experiments.analyze --hf`` reads."""
  from normjax.data import tokenizers
  path.mkdir(parents=True, exist_ok=True)
  tokenizers.train("hf", text.read_text().splitlines(), vocab, str(path / "tokenizer.json"))
  size = tokenizers.HuggingFace(str(path / "tokenizer.json")).vocab_size
  config = CONFIGS[name]()
  config.vocab_size = size
  torch.manual_seed(kwargs.pop("seed", 0))
  model = getattr(transformers, CLASSES[config.model_type])(config).eval()
  model.save_pretrained(path)
  return model
