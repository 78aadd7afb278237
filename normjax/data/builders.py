"""TFDS builders of the built-in datasets, written as array_record so that no TensorFlow is needed.

Features are ``tfds.features.Tensor`` with raw-bytes encoding (``tfds.features.Image`` and the
tfrecord format need TensorFlow); examples are keyed by their generation order, so the stored order
is the same in every process. Text datasets store ``{"chunk": uint8 [2049]}`` and list their files
per split in ``info.metadata["files"]``; image datasets store ``{"image": uint8 [H, W, 1],
"label": int}``.
"""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from normjax.data import corpus

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
Example = tuple[int, dict[str, Any]]  # (key, features) as tfds expects from a generator
_BYTES = tfds.features.Encoding.BYTES  # raw bytes: 3x faster to write than int64 lists, smaller


def _chunk_info(builder: tfds.core.DatasetBuilder, description: str,
                **metadata: Any) -> tfds.core.DatasetInfo:
  # DatasetInfo is built directly: dataset_info_from_configs needs a dataset package with metadata.
  chunk = tfds.features.Tensor(shape=(corpus.CHUNK_LEN + 1,), dtype=np.uint8, encoding=_BYTES)
  return tfds.core.DatasetInfo(builder=builder, description=description,
                               features=tfds.features.FeaturesDict({"chunk": chunk}),
                               metadata=tfds.core.MetadataDict(metadata))


def _chunk_splits(builder: tfds.core.GeneratorBasedBuilder, root: str,
                  relpaths: Sequence[str]) -> dict[str, Iterator[Example]]:
  """Split the text files by ``corpus.split_of``; if that leaves a split empty (say, a corpus of one
  file), split the chunks by ``corpus.split_of_chunk`` instead. The rule and the file lists go to
  ``info.metadata``."""
  texts = [rel for rel in relpaths if corpus.read_text(os.path.join(root, rel)) is not None]
  if not texts:
    raise ValueError(f"{root}: no text files (files containing NUL bytes count as binary)")
  files: dict[str, list[str]] = {"train": [], "validation": []}
  for rel in texts:
    files[corpus.split_of(rel)].append(rel)
  by_file = bool(files["train"] and files["validation"])
  builder.info.metadata.update(root=root, split_by="file" if by_file else "chunk",
                               files=files if by_file else {split: texts for split in files})
  if by_file:
    return {split: builder._generate_examples(root, rels) for split, rels in files.items()}
  return {split: builder._generate_examples(root, texts, split) for split in files}


def _chunk_examples(root: str, relpaths: Sequence[str], split: str | None) -> Iterator[Example]:
  """Chunks of the files' byte stream, keyed by position; only ``split``'s chunks unless None."""
  documents = (corpus.read_text(os.path.join(root, rel)) for rel in relpaths)
  for key, chunk in enumerate(corpus.chunk_documents(documents)):
    if split is None or corpus.split_of_chunk(key) == split:
      yield key, {"chunk": np.frombuffer(chunk, np.uint8)}


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


class StdlibBytes(_Builder):
  """The running interpreter's standard-library ``*.py`` files as a byte corpus.

  One config per interpreter (``corpus.stdlib_config_name``): Pythons can share a data_dir.
  """
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=corpus.stdlib_config_name(),
      description=f"Python {sys.version.split()[0]} stdlib at {corpus.stdlib_root()}")]

  def _info(self) -> tfds.core.DatasetInfo:
    return _chunk_info(self, f"Standard-library sources of Python {sys.version}, without "
                       "site-packages and test/idlelib directories, as 2049-byte chunks.",
                       python=sys.version)

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    root = corpus.stdlib_root()
    return _chunk_splits(self, root, corpus.list_stdlib_files(root))

  def _generate_examples(self, root: str, relpaths: Sequence[str], split: str | None = None):
    return _chunk_examples(root, relpaths, split)


class TextFiles(_Builder):
  """Every text file under a directory (recursive; hidden and binary files skipped) as bytes.

  The config name hashes the directory's path and its files' sizes and mtimes
  (``corpus.directory_key``): each directory, and each edit of it, gets its own cache.
  """
  def __init__(self, *, text_dir: str, **kwargs: Any):
    self._root = os.path.abspath(text_dir)
    self._relpaths = corpus.list_text_files(self._root)
    config = tfds.core.BuilderConfig(name=corpus.directory_key(self._root, self._relpaths),
                                     description=f"text files under {self._root}")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _chunk_info(self, f"Text files under {self._root} as 2049-byte chunks.")

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    return _chunk_splits(self, self._root, self._relpaths)

  def _generate_examples(self, root: str, relpaths: Sequence[str], split: str | None = None):
    return _chunk_examples(root, relpaths, split)


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
    "stdlib_bytes": StdlibBytes, "text_files": TextFiles, "fashion_mnist_deb": FashionMnistDeb,
    "sklearn_digits": SklearnDigits}
