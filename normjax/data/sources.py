"""Name resolution, config validation, and opening a built-in or prepared TFDS dataset for reading.

``validate(section)`` checks a ``data`` config section once and returns a ``DataConfig``: the
resolved, typed settings plus what the model needs to know of the data (kind, vocabulary or image
shape and classes), read without building anything. ``info`` and ``load`` take that record and
never validate again (given a config section instead, they validate it first).

tensorflow_datasets is imported only inside the functions that read or build data or read a
prepared dataset's metadata: a machine without it (the GPU image may lack it) can still
``resolve_name`` and ``validate`` the built-ins.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import numpy as np

from normjax.data import batches, corpus, packed
from normjax.data.tokenizers import TokenizerConfig
from normjax.validation import ConfigError, closest

DATASETS = ("stdlib_bytes", "text_files", "jsonl", "parquet", "fashion_mnist_deb", "sklearn_digits")
TEXT_DATASETS = ("stdlib_bytes", "text_files", "jsonl", "parquet")
# (image shape, classes) of the built-in image datasets, known without building them
IMAGE_DATASETS = {"fashion_mnist_deb": ((28, 28, 1), 10), "sklearn_digits": ((8, 8, 1), 10)}
AUTO_IMAGES = "auto_images"
SPLITS = ("train", "validation")
_DEFAULT_DATA_DIR = "~/.cache/normjax/tensorflow_datasets"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """A validated ``data`` section (``validate``): resolved settings and what the data looks like."""
  name: str  # resolved: "auto_images" becomes the dataset it stands for
  data_dir: str  # absolute
  shuffle_seed: int
  kind: str  # "text" or "image"
  seq_len: int | None = None  # text: tokens per example
  text_dir: str | None = None  # text_files: the directory
  vocab_size: int | None = None  # text: the tokenizer's
  tokenizer: TokenizerConfig = TokenizerConfig()
  eos_id: int | None = None  # text: ends every document
  files: tuple[str, ...] = ()  # jsonl, parquet: the matched files
  text_field: str = "text"  # jsonl, parquet: the record field / column holding the text
  on_bad_line: str = "stop"  # jsonl: "stop" at a corrupt line, or "skip" it (counted)
  boundary_loss: bool = False  # text: also predict a document's first token from the one before
  image_shape: tuple[int, int, int] | None = None  # image: (H, W, C)
  num_classes: int | None = None  # image


def data_dir(cfg: Any) -> str:
  """``cfg.data_dir``, else ``$NORMJAX_DATA_DIR``, else ``~/.cache/normjax/tensorflow_datasets``."""
  path = cfg.get("data_dir") or os.environ.get("NORMJAX_DATA_DIR") or _DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(path))


def resolve_name(name: str) -> str:
  """``"auto_images"`` -> "fashion_mnist_deb" if its Debian package is installed, else
  "sklearn_digits"; any other name is returned unchanged."""
  if name != AUTO_IMAGES:
    return name
  return "fashion_mnist_deb" if corpus.fashion_mnist_files() is not None else "sklearn_digits"


def _choices(name: str) -> str:
  close = closest(name, DATASETS)
  hint = f"; did you mean {close!r}?" if close else ""
  return f"built-in: {list(DATASETS)} (or {AUTO_IMAGES!r}){hint}"


def _prepared_builder(name: str, root: str) -> Any:
  """Read-only tfds builder of a dataset prepared under ``root`` (from its files, no builder code),
  or None. ``name`` may carry a config and version: ``"wiki40b/en:1.3.0"``."""
  import tensorflow_datasets as tfds
  try:
    return tfds.core.read_only_builder.builder_from_files(name, data_dir=root)
  except (ValueError, FileNotFoundError):  # includes tfds' DatasetNotFoundError
    return None


def _split_names(builder: Any) -> dict[str, str]:
  """Our split name -> the dataset's: "validation", or "test" where there is no "validation"."""
  available = list(builder.info.splits)
  valid = "validation" if "validation" in available else "test"
  if "train" not in available or valid not in available:
    raise ConfigError(f"the prepared TFDS dataset at {builder.data_dir} has splits {available}; "
                      "need 'train' and 'validation' (or 'test')")
  return {"train": "train", "validation": valid}


def _generic_kind(name: str, builder: Any) -> str:
  """"text" or "image" from a prepared dataset's features; ValueError if it has neither layout."""
  features = builder.info.features
  if "text" in features:
    return "text"
  if "image" in features and "label" in features:
    image = features["image"]
    if None in image.shape or len(image.shape) != 3 or image.np_dtype != np.uint8:
      raise ConfigError(f"data.name={name!r}: image feature {image} at {builder.data_dir} must be "
                        "uint8 with a fixed shape (H, W, C)")
    return "image"
  raise ConfigError(f"data.name={name!r}: the prepared TFDS dataset at {builder.data_dir} has "
                    f"features {list(features)}; need a 'text' feature, or 'image' and 'label'")


def validate(cfg: Any) -> DataConfig:
  """Checks a data config section without building or downloading anything; ConfigError names the
  field, its value and the valid choices. Reads only the metadata of prepared TFDS datasets."""
  if isinstance(cfg, DataConfig):
    return cfg
  name, root = resolve_name(cfg.name), data_dir(cfg)
  if os.path.exists(root) and not os.path.isdir(root):
    raise ConfigError(f"data.data_dir={cfg.data_dir!r} ({root}) is not a directory")
  seed = cfg.shuffle_seed
  if not isinstance(seed, int) or seed < 0:
    raise ConfigError(f"data.shuffle_seed={seed!r} must be an int >= 0")
  text_dir = cfg.get("text_dir", "")
  if name == "text_files":
    _check_text_dir(text_dir)
  if name == "fashion_mnist_deb" and corpus.fashion_mnist_files() is None and not glob.glob(
      os.path.join(root, name, "*", "dataset_info.json")):
    package = corpus.FASHION_MNIST_PACKAGE
    raise ConfigError(f"data.name={cfg.name!r} needs the Debian package {package} (apt-get install "
                      f"{package}), which is not installed; use {AUTO_IMAGES!r} to fall back to "
                      "'sklearn_digits'")
  common = dict(name=name, data_dir=root, shuffle_seed=seed, text_dir=text_dir or None)
  if name in TEXT_DATASETS:
    return _text_config(cfg, common)
  if name in IMAGE_DATASETS:
    shape, classes = IMAGE_DATASETS[name]
    return DataConfig(kind="image", image_shape=shape, num_classes=classes, **common)
  builder = _prepared_builder(name, root)
  if builder is None:
    raise ConfigError(f"data.name={cfg.name!r} is not a built-in dataset and no prepared TFDS "
                      f"dataset {name!r} was found in {root}; {_choices(name)}")
  kind = _generic_kind(name, builder)
  _split_names(builder)
  if kind == "text":
    return _text_config(cfg, common)
  features = builder.info.features
  return DataConfig(kind="image", image_shape=tuple(features["image"].shape),
                    num_classes=features["label"].num_classes, **common)


def _text_config(cfg: Any, common: dict[str, Any]) -> DataConfig:
  text = packed.validate(cfg, common["name"])
  return DataConfig(kind="text", seq_len=_check_seq_len(cfg.get("seq_len"), corpus.CHUNK_LEN),
                    **common, **dataclasses.asdict(text) | {"tokenizer": text.tokenizer})


def _check_text_dir(text_dir: str | None) -> None:
  if not text_dir:
    raise ConfigError(f"data.text_dir={text_dir!r} : data.name='text_files' needs a directory of "
                      "text files")
  if not os.path.isdir(text_dir):
    raise ConfigError(f"data.text_dir={text_dir!r} does not exist" if not os.path.exists(text_dir)
                      else f"data.text_dir={text_dir!r} is not a directory")
  if not corpus.list_text_files(text_dir):
    raise ConfigError(f"data.text_dir={text_dir!r} contains no (non-hidden) files")


def _check_seq_len(seq_len: Any, limit: int | None) -> int:
  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
    raise ConfigError(f"data.seq_len={seq_len!r} must be an int >= 1")
  if limit is not None and seq_len > limit:
    raise ConfigError(f"data.seq_len={seq_len} exceeds the stored chunk length {limit}; "
                      f"choose 1 <= seq_len <= {limit}")
  return seq_len


@dataclasses.dataclass(frozen=True)
class _Opened:
  """A prepared dataset and how to read it."""
  name: str
  kind: str  # "text" or "image"
  builder: Any  # tfds DatasetBuilder, prepared
  splits: dict[str, str]  # our split name -> the dataset's


def _open(cfg: DataConfig) -> _Opened:
  """The dataset of a validated config, building it into data_dir on first use: a built-in one, or
  the packed text of any text source (a prepared TFDS text dataset too)."""
  name, root = cfg.name, cfg.data_dir
  prepared = None
  if name not in DATASETS:
    builder = _prepared_builder(name, root)
    prepared = _Opened(name, cfg.kind, builder, _split_names(builder))
    if cfg.kind == "image":
      return prepared
  from normjax.data import builders  # imports tensorflow_datasets
  kwargs: dict[str, Any] = {}
  if cfg.kind == "text":
    kwargs["tokenizer"] = packed.tokenizer(cfg, prepared)
  if name == "text_files":
    kwargs["text_dir"] = cfg.text_dir
  if name in packed.RECORD_FORMATS:
    kwargs.update(files=cfg.files, text_field=cfg.text_field, records_format=name,
                  on_bad_line=cfg.on_bad_line)
  if prepared is not None:
    builder = builders.PreparedText(prepared=prepared.builder, splits=prepared.splits,
                                    data_dir=os.path.join(root, "packed"), file_format="array_record",
                                    **kwargs)
  else:
    builder = builders.BUILDERS[name](data_dir=root, file_format="array_record", **kwargs)
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except AssertionError as error:  # tfds refuses to write a split without examples
      if "No examples were yielded" not in str(error):
        raise
      raise ConfigError(f"data.name={name!r}: {error} (about 1 in 20 documents goes to validation, by "
                        "a hash of its name); give the source more documents") from None
  return _Opened(name, cfg.kind, builder, {s: s for s in SPLITS})


def _num_examples(opened: _Opened, split: str, cfg: DataConfig) -> int:
  stored = opened.builder.info.splits[opened.splits[split]].num_examples
  return stored * batches.windows_per_chunk(cfg.seq_len) if opened.kind == "text" else stored


def _source(opened: _Opened, cfg: DataConfig) -> str:
  info = opened.builder.info
  if opened.kind == "image":
    where = opened.builder.data_dir
    return (f"{opened.name}: {info.description} Cached at {where}" if opened.name in DATASETS else
            f"prepared TFDS dataset {opened.name!r} at {where} (splits {opened.splits})")
  tok = cfg.tokenizer
  vocabulary = "bytes" if tok.kind == "bytes" else f"{tok.kind} vocabulary of {cfg.vocab_size}"
  files = info.metadata.get("files")
  if opened.name in packed.FILE_SOURCES:
    what = (f"Python {info.metadata['python'].split()[0]} standard library"
            if opened.name == "stdlib_bytes" else "text files")
    what += (f" under {info.metadata['root']} ({len(files['train'])} train / "
             f"{len(files['validation'])} validation files, split by {info.metadata['split_by']})")
  elif opened.name in packed.RECORD_FORMATS:
    what = f"{len(cfg.files)} {opened.name} file(s), field {cfg.text_field!r}"
  else:
    what = f"prepared TFDS dataset {opened.name!r} ({info.metadata['prepared']})"
  return (f"{what}; {vocabulary}, packed in {corpus.CHUNK_LEN + 1}-token chunks, cached at "
          f"{opened.builder.data_dir}")


def info(cfg: DataConfig | Any) -> dict[str, Any]:
  """kind, vocab_size (text) or image_shape and num_classes (image), num_examples per split and a
  human-readable source. Builds a built-in dataset on first use."""
  cfg = validate(cfg)
  opened = _open(cfg)
  out: dict[str, Any] = {"kind": cfg.kind}
  if cfg.kind == "text":
    out["vocab_size"] = cfg.vocab_size
  else:
    out["image_shape"] = cfg.image_shape
    out["num_classes"] = cfg.num_classes
  out["num_examples"] = {split: _num_examples(opened, split, cfg) for split in SPLITS}
  out["source"] = _source(opened, cfg)
  return out


def load(cfg: DataConfig | Any, split: str, batch_size: int) -> batches.StepIndexedBatches:
  """Batches of ``split`` ("train" or "validation"), shuffled with ``cfg.shuffle_seed``; builds a
  built-in dataset on first use, then reads it by random access (no TensorFlow)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {list(SPLITS)}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
  cfg = validate(cfg)
  opened = _open(cfg)
  source = opened.builder.as_data_source(split=opened.splits[split])
  if opened.kind == "image":
    fetch = batches.image_examples(source)
  else:
    fetch = batches.chunk_windows(source, cfg.seq_len, cfg.eos_id, cfg.boundary_loss)
  return batches.StepIndexedBatches(_num_examples(opened, split, cfg), batch_size,
                                    cfg.shuffle_seed, fetch)
