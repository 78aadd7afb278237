"""TFDS builders of the built-in datasets, written as array_record so that no TensorFlow is needed.

Features are ``tfds.features.Tensor`` with raw-bytes encoding (``tfds.features.Image`` and the
tfrecord format need TensorFlow); examples are keyed by their generation order, so the stored order
is the same in every process.

Text datasets are packed token chunks: every document is tokenized (``data.tokenizer``; batches of
documents, on the tokenizer library's threads), followed by the tokenizer's EOS, and the stream is
cut into ``{"chunk": [2049] tokens}`` (``corpus.pack``; uint8 ids for bytes, uint16 up to 65536).
The config name carries the source's key and the tokenizer's (``tokenizers.cache_suffix``), so a
changed corpus or vocabulary gets its own cache. Segment ids and positions are not stored: every
document ends with EOS, so the reader derives them exactly (``batches.chunk_windows``). Image
datasets store ``{"image": uint8 [H, W, 1], "label": int}``.
"""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from normjax.data import corpus, documents
from normjax.data.tokenizers import Tokenizer, cache_suffix, token_dtype

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
Example = tuple[int, dict[str, Any]]  # (key, features) as tfds expects from a generator
_BYTES = tfds.features.Encoding.BYTES  # raw bytes: 3x faster to write than int64 lists, smaller
_ENCODE_BATCH = 256  # documents per tokenizer call


def _chunk_info(builder: "_TextBuilder", description: str, **metadata: Any) -> tfds.core.DatasetInfo:
  # DatasetInfo is built directly: dataset_info_from_configs needs a dataset package with metadata.
  tok = builder.tokenizer
  chunk = tfds.features.Tensor(shape=(corpus.CHUNK_LEN + 1,), dtype=token_dtype(tok.vocab_size),
                               encoding=_BYTES)
  metadata.update(tokenizer=type(tok).__name__, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                  tokenizer_fingerprint=tok.fingerprint)
  return tfds.core.DatasetInfo(builder=builder, description=description,
                               features=tfds.features.FeaturesDict({"chunk": chunk}),
                               metadata=tfds.core.MetadataDict(metadata), disable_shuffling=True)


def _tokens(tokenizer: Tokenizer, texts: Iterable[str | bytes]) -> Iterator[np.ndarray]:
  """Each text's ids, tokenized ``_ENCODE_BATCH`` at a time."""
  batch: list[str | bytes] = []
  for text in texts:
    batch.append(text)
    if len(batch) == _ENCODE_BATCH:
      yield from tokenizer.encode(batch)
      batch = []
  if batch:
    yield from tokenizer.encode(batch)


def _packed_examples(tokenizer: Tokenizer, texts: Iterable[str | bytes], split: str | None = None
                     ) -> Iterator[Example]:
  """Chunks of the texts' token stream, keyed by position; only ``split``'s chunks unless None
  (``corpus.split_of_chunk``)."""
  dtype = token_dtype(tokenizer.vocab_size)
  for key, chunk in enumerate(corpus.pack(_tokens(tokenizer, texts), tokenizer.eos_id, dtype)):
    if split is None or corpus.split_of_chunk(key) == split:
      yield key, {"chunk": chunk}


def file_splits(root: str, relpaths: Sequence[str]) -> tuple[dict[str, list[str]], bool]:
  """The text files of each split (``corpus.split_of``) and whether the split is by file; when that
  leaves a split empty (a corpus of one file), every file goes to both and chunks are split by
  ``corpus.split_of_chunk`` instead."""
  texts = [rel for rel in relpaths if corpus.read_text(os.path.join(root, rel)) is not None]
  if not texts:
    raise ValueError(f"{root}: no text files (files containing NUL bytes count as binary)")
  files: dict[str, list[str]] = {"train": [], "validation": []}
  for rel in texts:
    files[corpus.split_of(rel)].append(rel)
  by_file = bool(files["train"] and files["validation"])
  return (files if by_file else {split: texts for split in files}), by_file


def file_texts(root: str, relpaths: Sequence[str]) -> Iterator[bytes]:
  """The bytes of each text file, in order."""
  return (corpus.read_text(os.path.join(root, rel)) for rel in relpaths)


def _image_info(builder: tfds.core.DatasetBuilder, description: str, shape: tuple[int, int, int],
                label: tfds.features.ClassLabel) -> tfds.core.DatasetInfo:
  image = tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=_BYTES)
  features = tfds.features.FeaturesDict({"image": image, "label": label})
  return tfds.core.DatasetInfo(builder=builder, description=description, features=features,
                               supervised_keys=("image", "label"))


def _image_examples(images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> Iterator[Example]:
  for key, image, label in zip(keys, images, labels):
    yield int(key), {"image": image, "label": int(label)}


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared settings of the built-in builders (abstract, so not registered with tfds)."""
  VERSION = tfds.core.Version("1.0.0")
  # tfds locates a packaged builder's checksums file through `importlib_resources`, which it only
  # requires (and which is only installed) on Python < 3.9; we download nothing, so skip the lookup.
  code_path = None


class _TextBuilder(_Builder, skip_registration=True):
  """A text source packed with ``tokenizer``; ``key`` names the source in the config name. Chunks
  are stored in stream order (no tfds shuffle), so a document cut between two chunks is stored in
  consecutive records."""
  VERSION = tfds.core.Version("2.0.0")  # 2: any tokenizer, stream order (1: bytes, hashed order)
  RELEASE_NOTES = {"2.0.0": "tokenized with data.tokenizer; chunks in stream order"}

  def __init__(self, *, tokenizer: Tokenizer, key: str, description: str, **kwargs: Any):
    self.tokenizer = tokenizer
    config = tfds.core.BuilderConfig(name=key + cache_suffix(tokenizer), description=description)
    super().__init__(config=config, **kwargs)


class _FilesBuilder(_TextBuilder, skip_registration=True):
  """Text files as documents, split by file (``file_splits``)."""
  root: str
  relpaths: Sequence[str]

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    files, by_file = file_splits(self.root, self.relpaths)
    self.info.metadata.update(root=self.root, split_by="file" if by_file else "chunk", files=files)
    return {split: self._generate_examples(rels, None if by_file else split)
            for split, rels in files.items()}

  def _generate_examples(self, relpaths: Sequence[str], split: str | None):
    return _packed_examples(self.tokenizer, file_texts(self.root, relpaths), split)


class StdlibBytes(_FilesBuilder):
  """The running interpreter's standard-library ``*.py`` files (one config per interpreter and
  tokenizer: ``corpus.stdlib_config_name``, so Pythons can share a data_dir)."""

  def __init__(self, *, tokenizer: Tokenizer, **kwargs: Any):
    self.root, self.relpaths, key = corpus.file_source("stdlib_bytes")
    super().__init__(tokenizer=tokenizer, key=key,
                     description=f"Python {sys.version.split()[0]} stdlib at {self.root}", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _chunk_info(self, f"Standard-library sources of Python {sys.version}, without "
                       "site-packages and test/idlelib directories, packed in 2049-token chunks.",
                       python=sys.version)


class TextFiles(_FilesBuilder):
  """Every text file under a directory (recursive; hidden and binary files skipped). The config
  name hashes the directory's path and its files' sizes and mtimes (``corpus.directory_key``)."""

  def __init__(self, *, text_dir: str, tokenizer: Tokenizer, **kwargs: Any):
    self.root, self.relpaths, key = corpus.file_source("text_files", text_dir)
    super().__init__(tokenizer=tokenizer, key=key, description=f"text files under {self.root}",
                     **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _chunk_info(self, f"Text files under {self.root}, packed in 2049-token chunks.")


class Records(_TextBuilder):
  """JSON Lines or Parquet files, one document per record (``data.text_field``); a record goes to
  "validation" iff ``corpus.split_of(its path:line or path:row)`` says so."""

  def __init__(self, *, files: Sequence[str], text_field: str, records_format: str, on_bad_line: str,
               tokenizer: Tokenizer, **kwargs: Any):
    self.files, self.text_field, self.records_format = list(files), text_field, records_format
    self.on_bad_line = on_bad_line
    super().__init__(tokenizer=tokenizer, key=documents.files_key(self.files, text_field),
                     description=f"{records_format} files {self.files[:3]}...", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _chunk_info(self, f"{len(self.files)} {self.records_format} file(s), field "
                       f"{self.text_field!r}, packed in 2049-token chunks.", files=self.files)

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split: str):
    texts = (text for doc, text in documents.read(self.records_format, self.files, self.text_field,
                                                   self.on_bad_line) if corpus.split_of(doc) == split)
    return _packed_examples(self.tokenizer, texts)


class PreparedText(_TextBuilder):
  """A prepared TFDS dataset with a ``text`` feature (lm1b, c4, wiki40b, ...), its examples packed
  as documents in their stored order, per split."""

  def __init__(self, *, prepared: Any, splits: dict[str, str], tokenizer: Tokenizer, **kwargs: Any):
    self.prepared, self.prepared_splits = prepared, splits
    key = f"{prepared.name}-{prepared.builder_config.name if prepared.builder_config else 'default'}"
    super().__init__(tokenizer=tokenizer, key=f"{key}-{prepared.version}".replace("/", "-"),
                     description=f"prepared TFDS {prepared.name} at {prepared.data_dir}", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _chunk_info(self, f"The text of prepared TFDS {self.prepared.name}, packed in 2049-token "
                       "chunks.", prepared=self.prepared.data_dir)

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    return {split: self._generate_examples(theirs) for split, theirs in self.prepared_splits.items()}

  def _generate_examples(self, split: str):
    return _packed_examples(self.tokenizer, prepared_texts(self.prepared, split))


def prepared_texts(prepared: Any, split: str) -> Iterator[str | bytes]:
  """The ``text`` of every example of a prepared dataset's ``split``, in stored order."""
  source = prepared.as_data_source(split=split)
  for start in range(0, len(source), 1024):
    for record in source.__getitems__(list(range(start, min(start + 1024, len(source))))):
      yield record["text"]


class FashionMnistDeb(_Builder):
  """Fashion-MNIST from the Debian package dataset-fashion-mnist: train 60k, validation = t10k."""
  def _info(self) -> tfds.core.DatasetInfo:
    return _image_info(self, "Fashion-MNIST (Xiao et al. 2017), 28x28 grey, from the Debian "
                       f"package {corpus.FASHION_MNIST_PACKAGE}.", (28, 28, 1),
                       tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES))

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    files = corpus.fashion_mnist_files()
    if files is None:
      raise FileNotFoundError(f"Fashion-MNIST files not found; install the Debian package: "
                              f"apt-get install {corpus.FASHION_MNIST_PACKAGE}")
    return {split: self._generate_examples(files[f"{prefix}-images-idx3-ubyte.gz"],
                                           files[f"{prefix}-labels-idx1-ubyte.gz"])
            for split, prefix in (("train", "train"), ("validation", "t10k"))}

  def _generate_examples(self, images_path: str, labels_path: str):
    with gzip.open(images_path) as f:
      images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(labels_path) as f:
      labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return _image_examples(images, labels, np.arange(len(labels)))


class SklearnDigits(_Builder):
  """scikit-learn's bundled 8x8 digits (1797 images); index % 5 == 0 -> validation (80/20)."""
  def _info(self) -> tfds.core.DatasetInfo:
    return _image_info(self, "sklearn.datasets.load_digits(): 8x8 grey digits, values 0..16 "
                       "stored as min(16 * value, 255).", (8, 8, 1),
                       tfds.features.ClassLabel(num_classes=10))

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    from sklearn.datasets import load_digits  # sklearn imports slowly; only builds need it
    digits = load_digits()
    images = np.minimum(digits.images * 16, 255).astype(np.uint8)[..., None]
    index = np.arange(len(images))
    validation = index % 5 == 0
    return {split: self._generate_examples(images[mask], digits.target[mask], index[mask])
            for split, mask in (("train", ~validation), ("validation", validation))}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray):
    return _image_examples(images, labels, keys)


BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "stdlib_bytes": StdlibBytes, "text_files": TextFiles, "jsonl": Records, "parquet": Records,
    "fashion_mnist_deb": FashionMnistDeb, "sklearn_digits": SklearnDigits}
