"""normjax.data: builds are cached and correct, batches are a pure function of the step, every
dataset layout (built-in text and images, prepared TFDS) reads back, and bad configs fail early."""

from __future__ import annotations

import functools
import gzip
import hashlib
import subprocess
import sys
import types
import zlib
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from normjax import data
from normjax.data import batches, builders, corpus
from normjax.data.tokenizers import Bytes

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64  # 2049 // 65 = 31 windows per chunk


def make_cfg(data_dir: Path | str, **changes) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(name="stdlib_bytes", data_dir=str(data_dir), seq_len=SEQ_LEN,
                                       text_dir="", shuffle_seed=0))
  cfg.update(changes)
  return cfg


def expected_chunks(root: str, relpaths: list[str]) -> list[bytes]:
  """Independent reference: files joined with a trailing b"\\0" each, cut into zero-padded 2049s."""
  stream = b"".join(Path(root, rel).read_bytes() + b"\0" for rel in relpaths)
  stream += b"\0" * (-len(stream) % 2049)
  return [stream[i:i + 2049] for i in range(0, len(stream), 2049)]


def stored_chunks(builder, split: str) -> list[bytes]:
  source = builder.as_data_source(split=split)
  return [r["chunk"].tobytes() for r in source.__getitems__(list(range(len(source))))]


def windows(batch: dict[str, np.ndarray]) -> list[bytes]:
  """Each row's full seq_len + 1 bytes: inputs plus the last target."""
  full = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
  return [row.astype(np.uint8).tobytes() for row in full]


def digest(batch: dict[str, np.ndarray]) -> str:
  return hashlib.sha256(b"".join(batch[k].tobytes() for k in sorted(batch))).hexdigest()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def stdlib(data_dir):
  cfg = make_cfg(data_dir)
  loaded = data.load(cfg, "train", 8)
  builder = builders.StdlibBytes(data_dir=str(data_dir), tokenizer=Bytes())
  return types.SimpleNamespace(cfg=cfg, batches=loaded, builder=builder, root=corpus.stdlib_root())


def test_stdlib_build_is_cached(stdlib, monkeypatch):
  info_file = Path(stdlib.builder.data_dir, "dataset_info.json")
  before = info_file.stat().st_mtime_ns

  def rebuild(*args, **kwargs):
    raise AssertionError("stdlib_bytes was rebuilt")

  monkeypatch.setattr(builders.StdlibBytes, "_split_generators", rebuild)
  data.load(stdlib.cfg, "validation", 4).batch(0)
  data.info(stdlib.cfg)
  assert info_file.stat().st_mtime_ns == before
  assert Path(stdlib.builder.data_dir).parent.name == corpus.stdlib_config_name()


def test_stdlib_splits_are_disjoint_by_file_and_hold_exactly_those_files(stdlib):
  meta = stdlib.builder.info.metadata
  train, valid = meta["files"]["train"], meta["files"]["validation"]
  assert meta["split_by"] == "file" and train and valid and not set(train) & set(valid)
  assert sorted(train + valid) == corpus.list_stdlib_files(stdlib.root)
  assert all(zlib.crc32(f.encode()) % 20 == 0 for f in valid)
  assert not any(zlib.crc32(f.encode()) % 20 == 0 for f in train)
  skipped = {"site-packages", "test", "tests", "idlelib"}
  assert not any(skipped & set(Path(f).parts[:-1]) for f in train + valid)
  for split, files in (("train", train), ("validation", valid)):
    want = expected_chunks(stdlib.root, files)
    assert sorted(stored_chunks(stdlib.builder, split)) == sorted(want)


def test_stdlib_batches_are_real_source_text(stdlib):
  x = stdlib.batches.batch(0)
  assert {k: (v.dtype, v.shape) for k, v in x.items()} == {
      k: (np.int32, (8, SEQ_LEN)) for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])
  stream = b"".join(expected_chunks(stdlib.root, stdlib.builder.info.metadata["files"]["train"]))
  text = b""
  for step in range(30):
    for window in windows(stdlib.batches.batch(step)):
      assert window in stream
      text += window
  assert b"def " in text and b"import" in text
  source = stdlib.builder.as_data_source(split="train")
  assert stdlib.batches.num_examples == len(source) * 31
  info = data.info(stdlib.cfg)
  assert info["kind"] == "text" and info["vocab_size"] == 256
  assert info["num_examples"]["train"] == stdlib.batches.num_examples
  assert sys.version.split()[0] in info["source"]


def test_windows_tile_each_chunk(stdlib):
  source = stdlib.builder.as_data_source(split="validation")
  fetch = batches.chunk_windows(source, SEQ_LEN, eos=0)
  chunk = source[1]["chunk"].tobytes()
  assert b"".join(windows(fetch(np.arange(31, 62)))) == chunk[:31 * 65]
  long_fetch = batches.chunk_windows(source, 2048, eos=0)
  assert windows(long_fetch(np.array([1]))) == [chunk]


def test_batches_depend_only_on_the_step(stdlib):
  a, b = data.load(stdlib.cfg, "train", 8), data.load(stdlib.cfg, "train", 8)
  for step in range(12):  # a's permutation cache is now warm; b's is cold
    a.batch(step)
  for step in (5, 0, 123_456):
    assert digest(a.batch(step)) == digest(b.batch(step))
  assert digest(a.batch(0)) != digest(a.batch(1))
  other_seed = data.load(make_cfg(stdlib.cfg.data_dir, shuffle_seed=1), "train", 8)
  assert digest(other_seed.batch(0)) != digest(a.batch(0))
  script = ("import sys, hashlib, ml_collections\nfrom normjax import data\n"
            "cfg = ml_collections.ConfigDict(dict(name='stdlib_bytes', data_dir=sys.argv[1], "
            "seq_len=int(sys.argv[2]), text_dir='', shuffle_seed=0))\n"
            "b = data.load(cfg, 'train', 8).batch(7)\n"
            "print(hashlib.sha256(b''.join(b[k].tobytes() for k in sorted(b))).hexdigest())\n")
  out = subprocess.run([sys.executable, "-c", script, stdlib.cfg.data_dir, str(SEQ_LEN)], cwd=REPO,
                       capture_output=True, text=True, check=True).stdout.split()[-1]
  assert out == digest(a.batch(7))


def test_each_epoch_is_a_fresh_permutation(stdlib):
  loaded = data.load(stdlib.cfg, "validation", 100)  # 100 does not divide N: a batch straddles
  n = loaded.num_examples
  seen = np.concatenate([loaded.indices(step) for step in range(-(-2 * n // 100))])
  epoch0, epoch1 = seen[:n], seen[n:2 * n]
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
  assert (epoch0 != epoch1).mean() > 0.99


def test_sklearn_digits_epoch_covers_every_image_once(data_dir):
  from sklearn.datasets import load_digits
  cfg = make_cfg(data_dir, name="sklearn_digits")
  info = data.info(cfg)
  assert (info["kind"], info["image_shape"], info["num_classes"]) == ("image", (8, 8, 1), 10)
  assert info["num_examples"] == {"train": 1437, "validation": 360}
  loaded = data.load(cfg, "validation", 120)  # 3 steps = one epoch
  x = loaded.batch(0)
  assert (x["inputs"].dtype, x["inputs"].shape, x["labels"].dtype) == (np.float32, (120, 8, 8, 1),
                                                                       np.int32)
  assert 0 <= x["inputs"].min() and x["inputs"].max() <= 1 and set(x["labels"]) <= set(range(10))
  epoch = [loaded.batch(step) for step in range(3)]
  got = sorted((np.round(b["inputs"][i] * 255).astype(np.uint8).tobytes(), int(b["labels"][i]))
               for b in epoch for i in range(120))
  digits = load_digits()
  images = np.minimum(digits.images * 16, 255).astype(np.uint8)[..., None]
  want = sorted((images[i].tobytes(), int(digits.target[i])) for i in range(0, 1797, 5))
  assert got == want
  assert digest(loaded.batch(3)) != digest(loaded.batch(0))  # epoch 1 is in a new order


def write_files(root: Path, files: dict[str, bytes]) -> None:
  for rel, content in files.items():
    Path(root, rel).parent.mkdir(parents=True, exist_ok=True)
    Path(root, rel).write_bytes(content)


def test_text_files_split_by_file_and_keyed_by_directory(tmp_path, data_dir):
  names = [f"sub/doc{i}.txt" for i in range(200)]
  valid_name = next(n for n in names if corpus.split_of(n) == "validation")
  train_names = [n for n in names if corpus.split_of(n) == "train"][:2]
  texts = {n: (f"== {n} ==\n" + "lorem ipsum dolor " * 300).encode()
           for n in [valid_name] + train_names}
  first = tmp_path / "first"
  write_files(first, {**texts, "blob.bin": b"\x00\x01binary", ".hidden.txt": b"secret",
                      ".git/HEAD": b"secret: refs/heads/main"})
  cfg = make_cfg(data_dir, name="text_files", text_dir=str(first), seq_len=32)
  info = data.info(cfg)
  assert info["kind"] == "text" and str(first) in info["source"]
  builder = builders.TextFiles(text_dir=str(first), data_dir=str(data_dir), tokenizer=Bytes())
  meta = builder.info.metadata
  assert meta["files"] == {"train": sorted(train_names), "validation": [valid_name]}
  assert sorted(stored_chunks(builder, "validation")) == sorted(
      expected_chunks(str(first), [valid_name]))
  batch_text = b"".join(windows(data.load(cfg, "train", 16).batch(0)))
  assert b"lorem ipsum" in batch_text and b"secret" not in batch_text

  # One file: the file rule leaves validation empty, so chunks are split by index instead.
  second = tmp_path / "second"
  write_files(second, {"only.txt": ("single file corpus\n" * 2000).encode()})
  data.load(make_cfg(data_dir, name="text_files", text_dir=str(second)), "validation", 4).batch(0)
  other = builders.TextFiles(text_dir=str(second), data_dir=str(data_dir), tokenizer=Bytes())
  assert other.data_dir != builder.data_dir and Path(builder.data_dir).is_dir()
  assert other.info.metadata["split_by"] == "chunk"
  chunks = expected_chunks(str(second), ["only.txt"])
  assert sorted(stored_chunks(other, "validation")) == sorted(
      c for i, c in enumerate(chunks) if i % 20 == 0)
  assert sorted(stored_chunks(other, "train")) == sorted(c for i, c in enumerate(chunks) if i % 20)

  before = corpus.directory_key(str(second), ["only.txt"])
  (second / "only.txt").write_bytes(b"edited\n" * 5000)
  assert corpus.directory_key(str(second), ["only.txt"]) != before


def write_idx(path: Path, array: np.ndarray, header: int) -> None:
  with gzip.open(path, "wb") as f:
    f.write(b"\0" * header + array.tobytes())


def test_fashion_mnist_deb_from_a_fake_package(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  share = tmp_path / "usr/share/datasets/fashion-mnist"
  share.mkdir(parents=True)
  arrays = {}
  for prefix, n in (("train", 30), ("t10k", 10)):
    arrays[prefix] = rng.integers(0, 256, (n, 28, 28), np.uint8), rng.integers(0, 10, n, np.uint8)
    write_idx(share / f"{prefix}-images-idx3-ubyte.gz", arrays[prefix][0], 16)
    write_idx(share / f"{prefix}-labels-idx1-ubyte.gz", arrays[prefix][1], 8)
  dpkg = tmp_path / "dpkg"
  dpkg.mkdir()
  (dpkg / "dataset-fashion-mnist.list").write_text(
      "/.\n/usr/share/datasets\n" + "".join(f"{p}\n" for p in sorted(share.iterdir())))
  lookup = functools.partial(corpus.fashion_mnist_files, dpkg_info=str(dpkg),
                             default_dir=str(tmp_path / "absent"))
  monkeypatch.setattr(corpus, "fashion_mnist_files", lookup)
  assert data.resolve_name("auto_images") == "fashion_mnist_deb"
  cfg = make_cfg(tmp_path / "tfds", name="auto_images")
  info = data.info(cfg)
  assert info["image_shape"] == (28, 28, 1)
  assert info["num_examples"] == {"train": 30, "validation": 10}
  x = data.load(cfg, "validation", 10).batch(0)
  images, labels = arrays["t10k"]
  got = sorted(zip((np.round(x["inputs"] * 255).astype(np.uint8)[..., 0]).tolist(), x["labels"]))
  assert got == sorted(zip(images.tolist(), labels.astype(np.int32)))
  (share / "t10k-labels-idx1-ubyte.gz").unlink()
  assert corpus.fashion_mnist_files() is None
  assert data.resolve_name("auto_images") == "sklearn_digits"


def test_fashion_mnist_deb_real_package(data_dir):
  if corpus.fashion_mnist_files() is None:
    pytest.skip("Debian package dataset-fashion-mnist is not installed")
  info = data.info(make_cfg(data_dir, name="fashion_mnist_deb"))
  assert info["num_examples"] == {"train": 60000, "validation": 10000}


def test_resolve_name(monkeypatch):
  monkeypatch.setattr(corpus, "fashion_mnist_files", lambda: None)
  assert data.resolve_name("auto_images") == "sklearn_digits"
  monkeypatch.setattr(corpus, "fashion_mnist_files", lambda: {"train-images-idx3-ubyte.gz": "x"})
  assert data.resolve_name("auto_images") == "fashion_mnist_deb"
  assert [data.resolve_name(n) for n in data.DATASETS + ("lm1b",)] == list(data.DATASETS) + ["lm1b"]


TINY_TEXTS = {"train": ["short", "a line that is longer than sixteen bytes", "é ü"],
              "test": ["held out", "x" * 40]}


class TinyTextCorpus(tfds.core.GeneratorBasedBuilder):
  """Stands in for a user-prepared TFDS text dataset (lm1b): a ``text`` feature, a test split."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # as in builders._Builder: skips a lookup needing importlib_resources

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(texts) for split, texts in TINY_TEXTS.items()}

  def _generate_examples(self, texts):
    for key, text in enumerate(texts):
      yield key, {"text": text}


def test_prepared_tfds_datasets_by_name(tmp_path, data_dir, stdlib):
  TinyTextCorpus(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = make_cfg(tmp_path, name="tiny_text_corpus", seq_len=15)
  info = data.info(cfg)
  # packed like every text source: the examples' bytes, each ended by EOS (byte 0), in 2049-token
  # chunks of 2049 // 16 = 128 windows; each split's stream fits one chunk
  assert info["kind"] == "text" and info["num_examples"] == {"train": 128, "validation": 128}
  loaded = data.load(cfg, "validation", 128)
  every = b"".join(windows(loaded._fetch(np.arange(128))))  # in the prepared dataset's stored order
  documents = [d for d in every.split(b"\0") if d]
  assert sorted(documents) == sorted(t.encode() for t in TINY_TEXTS["test"])
  stream_length = sum(len(t.encode()) + 1 for t in TINY_TEXTS["test"])  # then EOS padding only
  assert every.index(documents[-1]) + len(documents[-1]) == stream_length - 1

  # Our own build read back through the generic path gives the built-in batches (built here first:
  # under xdist the test that builds it may run on another worker).
  builtin = make_cfg(data_dir, name="sklearn_digits")
  builtin_batch = data.load(builtin, "train", 32).batch(3)
  generic = make_cfg(data_dir, name="sklearn_digits:1.0.0")
  assert "prepared TFDS dataset" in data.info(generic)["source"]
  assert digest(data.load(generic, "train", 32).batch(3)) == digest(builtin_batch)

  chunks = make_cfg(data_dir, name=f"stdlib_bytes/{corpus.stdlib_config_name()}")
  with pytest.raises(ValueError, match=r"features \['chunk'\]; need a 'text' feature"):
    data.validate(chunks)


@pytest.mark.parametrize("changes, expected", [
    (dict(name="stdlib_byte"), ["data.name='stdlib_byte' is not a built-in dataset",
                                "no prepared TFDS dataset 'stdlib_byte'", "'stdlib_bytes'",
                                "'sklearn_digits'", "'auto_images'"]),
    (dict(name="text_files"), ["data.text_dir='' : data.name='text_files' needs a directory"]),
    (dict(name="text_files", text_dir="/nope"), ["data.text_dir='/nope' does not exist"]),
    (dict(seq_len=5000), ["data.seq_len=5000 exceeds the stored chunk length 2048"]),
    (dict(seq_len=0), ["data.seq_len=0 must be an int >= 1"]),
    (dict(shuffle_seed=-1), ["data.shuffle_seed=-1 must be an int >= 0"]),
])
def test_validate_names_field_value_and_choices(tmp_path, changes, expected):
  with pytest.raises(ValueError) as error:
    data.validate(make_cfg(tmp_path, **changes))
  for part in expected:
    assert part in str(error.value)
  if changes.get("name") == "stdlib_byte":
    assert str(tmp_path) in str(error.value)


def test_validate_builds_nothing_and_load_checks_its_arguments(tmp_path):
  empty, text_dir = tmp_path / "tfds", tmp_path / "texts"
  empty.mkdir()
  write_files(text_dir, {"a.txt": b"hello"})
  for changes in (dict(), dict(name="sklearn_digits", seq_len=10**6), dict(name="auto_images"),
                  dict(name="text_files", text_dir=str(text_dir))):
    data.validate(make_cfg(empty, **changes))
  assert list(empty.iterdir()) == []
  with pytest.raises(ValueError, match=r"split='test' must be one of \['train', 'validation'\]"):
    data.load(make_cfg(empty), "test", 8)
  with pytest.raises(ValueError, match="batch_size=0"):
    data.load(make_cfg(empty), "train", 0)
  assert list(empty.iterdir()) == []


def test_validate_works_without_tensorflow_datasets(tmp_path):
  # The GPU machine's image may have no tensorflow_datasets.
  script = ("import sys\nsys.modules['tensorflow_datasets'] = None\n"
            "import ml_collections\nfrom normjax import data\n"
            "cfg = ml_collections.ConfigDict(dict(name='auto_images', data_dir=sys.argv[1], "
            "seq_len=8, text_dir='', shuffle_seed=0))\n"
            "data.validate(cfg)\nprint(data.resolve_name('auto_images'))\n")
  out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, check=True).stdout.split()
  assert out[-1] in ("sklearn_digits", "fashion_mnist_deb")
  assert not any(tmp_path.iterdir())
