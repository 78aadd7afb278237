"""Text datasets: the settings of a text source and its tokenizer, checked before anything is built,
and the packed dataset opened (its vocabulary trained first when ``data.tokenizer.train_vocab``).

Sources (``data.name``): ``stdlib_bytes`` and ``text_files`` (files, one document each),
``jsonl`` and ``parquet`` (``data.files`` globs, one document per record's ``data.text_field``),
or a prepared TFDS dataset with a ``text`` feature. All of them go through one packer
(``builders``), whichever tokenizer.

A trained vocabulary is saved under ``<data_dir>/tokenizers/`` with the source's key in its name.
It is trained once, on the training split only, so a run and its resume read the identical file;
the packed dataset is keyed by that file's hash.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from typing import Any

from normjax.data import corpus, documents, tokenizers
from normjax.data.tokenizers import TokenizerConfig
from normjax.validation import BOOLEANS, ConfigError, check_choice

FILE_SOURCES = ("stdlib_bytes", "text_files")
RECORD_FORMATS = ("jsonl", "parquet")
TRAINED_EOS = {"sentencepiece": 2, "hf": 0}  # the EOS id of a vocabulary ``tokenizers.train`` writes
TRAIN_LINES = 2_000_000  # lines of the training split a vocabulary is trained on, at most


@dataclasses.dataclass(frozen=True)
class TextSettings:
  """The validated text fields of a ``data`` section."""
  tokenizer: TokenizerConfig
  vocab_size: int
  eos_id: int
  files: tuple[str, ...] = ()  # jsonl/parquet: the matched files
  text_field: str = "text"
  on_bad_line: str = "stop"
  boundary_loss: bool = False  # also train on the first token of the next document


def validate(cfg: Any, name: str) -> TextSettings:
  """Checks the text fields of a data section (the tokenizer file, the corpus files and their text
  field); reads a tokenizer file for its vocabulary, builds nothing."""
  section = cfg.get("tokenizer") or {}
  known = {f.name for f in dataclasses.fields(TokenizerConfig)}
  unknown = sorted(set(section) - known)
  if unknown:
    raise ConfigError(f"data.tokenizer.{unknown[0]} is not a field; fields: {sorted(known)}")
  tok = TokenizerConfig(**dict(section))
  boundary_loss = cfg.get("boundary_loss", False)
  if not isinstance(boundary_loss, bool):
    raise ConfigError(f"data.boundary_loss={boundary_loss!r} must be a bool ({list(BOOLEANS)})")
  common = dict(text_field=cfg.get("text_field", "text"), boundary_loss=boundary_loss,
                on_bad_line=check_choice(cfg.get("on_bad_line", "stop"), "data.on_bad_line",
                                         documents.BAD_LINE))
  if name in RECORD_FORMATS:
    patterns = cfg.get("files") or ()
    files = documents.expand([patterns] if isinstance(patterns, str) else list(patterns), "data.files")
    if name == "jsonl":
      documents.check_jsonl(files, common["text_field"], common["on_bad_line"])
    else:
      documents.check_parquet(files, common["text_field"])
    common["files"] = tuple(files)
  if tok.kind == "bytes":
    return TextSettings(tok, 256, 0, **common)
  if tok.train_vocab:
    return TextSettings(tok, tok.train_vocab, TRAINED_EOS[tok.kind], **common)
  loaded = tokenizers.load(tok)
  return TextSettings(tok, loaded.vocab_size, loaded.eos_id, **common)


def source_key(cfg: Any) -> str:
  """The name of a validated text config's source, as its cache names use it."""
  if cfg.name in FILE_SOURCES:
    return corpus.file_source(cfg.name, cfg.text_dir)[2]
  if cfg.name in RECORD_FORMATS:
    return documents.files_key(cfg.files, cfg.text_field)
  return cfg.name.replace("/", "-").replace(":", "-")


def _training_lines(cfg: Any, prepared: Any) -> Iterator[str]:
  """Lines of the training split's documents, as the vocabulary is trained on them."""
  from normjax.data import builders
  if cfg.name in FILE_SOURCES:
    root, relpaths, _ = corpus.file_source(cfg.name, cfg.text_dir)
    files, _ = builders.file_splits(root, relpaths)
    texts: Iterator[Any] = builders.file_texts(root, files["train"])
  elif cfg.name in RECORD_FORMATS:
    texts = (text for doc, text in documents.read(cfg.name, cfg.files, cfg.text_field, cfg.on_bad_line)
             if corpus.split_of(doc) == "train")
  else:
    texts = builders.prepared_texts(prepared.builder, prepared.splits["train"])
  lines = (line for text in texts
           for line in (text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                        ).splitlines(keepends=True) if line.strip())
  return itertools.islice(lines, TRAIN_LINES)


def tokenizer(cfg: Any, prepared: Any = None) -> tokenizers.Tokenizer:
  """The tokenizer of a validated text config; a ``train_vocab`` vocabulary is trained (once, on
  the training split) into ``<data_dir>/tokenizers/`` first."""
  tok = cfg.tokenizer
  if not tok.train_vocab:
    return tokenizers.load(tok)
  ext = ".model" if tok.kind == "sentencepiece" else ".json"
  path = os.path.join(cfg.data_dir, "tokenizers", f"{source_key(cfg)}-{tok.kind}-{tok.train_vocab}{ext}")
  if not os.path.isfile(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"training a {tok.kind} vocabulary of {tok.train_vocab} on {cfg.name}'s training split "
          f"into {path}")
    tokenizers.train(tok.kind, _training_lines(cfg, prepared), tok.train_vocab, path)
  return tokenizers.load(tok, path)
