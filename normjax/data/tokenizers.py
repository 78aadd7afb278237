"""Tokenizers: text to int32 ids behind one small interface, over the maintained libraries.

  tok = tokenizers.load(TokenizerConfig(kind="sentencepiece", path="/models/t5/spiece.model"))
  ids = tok.encode(["first document", "second"])   # list of int32 [n_i], no BOS/EOS added
  tok.decode(ids[0]); tok.vocab_size; tok.eos_id; tok.bos_id; tok.fingerprint

Kinds:

* ``bytes``: UTF-8 bytes, vocabulary 256; the end of a document is byte 0 (NUL), the separator
  the byte corpora always used.
* ``sentencepiece``: a SentencePiece ``.model`` file (T5's and LLaMA-2's tokenizers are such
  files), through the ``sentencepiece`` package. Its EOS piece ends documents.
* ``hf``: a Hugging Face ``tokenizer.json`` (GPT-2's and LLaMA-3's byte-level BPE, any other),
  through the ``tokenizers`` package. The end-of-document token is the first of ``EOS_TOKENS``
  the vocabulary has.

``train(kind, texts, vocab_size, path)`` trains a ``sentencepiece`` (BPE, byte fallback) or ``hf``
(GPT-2-style byte-level BPE) vocabulary offline on an iterable of texts and writes it to ``path``.
``fingerprint`` is the SHA-256 of the tokenizer file, so a dataset tokenized with it is cached under
that key and a changed file is never mistaken for the old one.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np

from normjax.validation import ConfigError, check_choice

KINDS = ("bytes", "sentencepiece", "hf")
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>")
HF_EOS = "<|endoftext|>"  # the end-of-document token of vocabularies ``train`` makes with kind "hf"


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """``data.tokenizer``: which tokenizer, from which file, or trained on the corpus."""
  kind: str = "bytes"  # one of KINDS
  path: str = ""  # the .model / tokenizer.json file; "" with train_vocab > 0: trained on the data
  train_vocab: int = 0  # > 0: train this many tokens on the training split (kind sentencepiece/hf)

  def __post_init__(self):
    check_choice(self.kind, "data.tokenizer.kind", KINDS)
    if not isinstance(self.train_vocab, int) or self.train_vocab < 0:
      raise ConfigError(f"data.tokenizer.train_vocab={self.train_vocab!r} must be an int >= 0")
    if self.kind == "bytes" and (self.path or self.train_vocab):
      raise ConfigError("data.tokenizer.kind='bytes' takes no path and no train_vocab (its vocabulary "
                        f"is the 256 byte values); got path={self.path!r}, train_vocab={self.train_vocab}")
    if self.kind != "bytes" and bool(self.path) == bool(self.train_vocab):
      raise ConfigError(f"data.tokenizer.kind={self.kind!r} needs exactly one of data.tokenizer.path "
                        f"(a file) and data.tokenizer.train_vocab (> 0: train one); got path="
                        f"{self.path!r}, train_vocab={self.train_vocab}")
    if self.train_vocab and self.train_vocab < 300:
      raise ConfigError(f"data.tokenizer.train_vocab={self.train_vocab} is too small: a byte-level "
                        "vocabulary starts from 256 symbols; use >= 300")
    if self.path and not os.path.isfile(self.path):
      raise ConfigError(f"data.tokenizer.path={self.path!r}: no such file (a "
                        f"{'SentencePiece .model' if self.kind == 'sentencepiece' else 'tokenizer.json'})")


class Tokenizer(abc.ABC):
  """The interface: ids are int32; ``encode`` adds no special tokens (the packer adds EOS)."""
  vocab_size: int
  eos_id: int
  bos_id: int | None
  fingerprint: str  # identifies the vocabulary: the file's SHA-256, or "bytes"

  @abc.abstractmethod
  def encode(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
    """Each text's ids, ``int32 [n_i]`` (bytes are read as UTF-8, undecodable bytes replaced)."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """The text of ``ids`` (special tokens dropped)."""


class Bytes(Tokenizer):
  vocab_size, eos_id, bos_id, fingerprint = 256, 0, None, "bytes"

  def encode(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
    return [np.frombuffer(t if isinstance(t, bytes) else t.encode(), np.uint8).astype(np.int32)
            for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if i != self.eos_id).decode(errors="replace")


def _str(text: str | bytes) -> str:
  return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class SentencePiece(Tokenizer):
  def __init__(self, path: str):
    import sentencepiece as spm
    try:
      self.sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as error:
      raise ConfigError(f"data.tokenizer.path={path!r} is not a SentencePiece model: {error}") from None
    if self.sp.eos_id() < 0:
      raise ConfigError(f"data.tokenizer.path={path!r}: the SentencePiece model has no EOS piece, "
                        "which ends every document when packing")
    self.vocab_size, self.eos_id = self.sp.get_piece_size(), self.sp.eos_id()
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.fingerprint = _sha256(path)

  def encode(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
    ids = self.sp.encode([_str(t) for t in texts], num_threads=os.cpu_count())
    return [np.asarray(i, np.int32) for i in ids]

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])


class HuggingFace(Tokenizer):
  def __init__(self, path: str):
    import tokenizers
    try:
      self.tok = tokenizers.Tokenizer.from_file(path)
    except Exception as error:  # noqa: BLE001 - the library raises plain Exceptions for bad files
      raise ConfigError(f"data.tokenizer.path={path!r} is not a tokenizer.json: {error}") from None
    vocab = self.tok.get_vocab(with_added_tokens=True)
    eos = next((t for t in EOS_TOKENS if t in vocab), None)
    if eos is None:
      raise ConfigError(f"data.tokenizer.path={path!r}: no end-of-document token in the vocabulary "
                        f"(looked for {list(EOS_TOKENS)}), which ends every document when packing")
    bos = next((t for t in BOS_TOKENS if t in vocab), None)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    self.eos_id, self.bos_id = vocab[eos], (vocab[bos] if bos else None)
    self.fingerprint = _sha256(path)

  def encode(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
    # encode_batch runs on the library's own threads
    encoded = self.tok.encode_batch([_str(t) for t in texts], add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encoded]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode([int(i) for i in ids])


def cache_suffix(tokenizer: Tokenizer) -> str:
  """What a dataset's cache name adds for its tokenizer: nothing for bytes (the byte datasets keep
  their names), else the kind and the vocabulary file's hash."""
  if isinstance(tokenizer, Bytes):
    return ""
  return f"-{'sp' if isinstance(tokenizer, SentencePiece) else 'hf'}{tokenizer.fingerprint[:16]}"


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype that stores ids below ``vocab_size``."""
  return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def load(cfg: TokenizerConfig, path: str | None = None) -> Tokenizer:
  """The tokenizer of ``cfg``; ``path`` overrides ``cfg.path`` (a vocabulary ``train`` wrote)."""
  path = path or cfg.path
  if cfg.kind == "bytes":
    return Bytes()
  return SentencePiece(path) if cfg.kind == "sentencepiece" else HuggingFace(path)


def train(kind: str, texts: Iterable[str], vocab_size: int, path: str) -> None:
  """Trains a ``kind`` ("sentencepiece" or "hf") BPE vocabulary of ``vocab_size`` on ``texts``
  (lines or documents) and writes it to ``path`` (atomically: a killed training leaves no file)."""
  tmp = f"{path}.{os.getpid()}.tmp"
  if kind == "sentencepiece":
    import sentencepiece as spm
    prefix = tmp[:-len(".tmp")]
    # BPE with byte fallback (no unknown characters); ids 0-2 are <pad>, <s> (BOS), </s> (EOS) and
    # unknown is 3, the LLaMA-2/T5 convention of a pad, bos, eos and unk piece
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        # text round-trips exactly (code keeps its newlines and indentation): no NFKC, no
        # whitespace collapsing
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False, num_threads=os.cpu_count(), minloglevel=2)
    os.replace(prefix + ".model", path)
    os.remove(prefix + ".vocab")
    return
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[HF_EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  tok.save(tmp)
  os.replace(tmp, path)
