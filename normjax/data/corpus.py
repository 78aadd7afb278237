"""Raw sources on local disk: file listings, the split rule, packing tokens into chunks, Fashion-MNIST
lookup.

No tensorflow_datasets here, so ``resolve_name`` and ``validate`` work where tfds is not installed.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

CHUNK_LEN = 2048  # longest usable seq_len: each stored chunk is CHUNK_LEN + 1 bytes
SEPARATOR = b"\0"  # ends every file in the byte stream (the bytes tokenizer's EOS); text never has it
VALIDATION_MODULUS = 20  # crc32(relative path) % 20 == 0 -> validation (~5% of files)
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib"})
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# Where the Debian package puts its files when its dpkg file list cannot be read.
_FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_DPKG_INFO = "/var/lib/dpkg/info"


def split_of(relpath: str) -> str:
  """"train" or "validation" for a file, by a hash of its relative path (same in every process)."""
  return "validation" if zlib.crc32(relpath.encode()) % VALIDATION_MODULUS == 0 else "train"


def split_of_chunk(index: int) -> str:
  """The fallback rule when splitting by file leaves a split empty: chunk index % 20 == 0 ->
  "validation" (both splits non-empty from two chunks on)."""
  return "validation" if index % VALIDATION_MODULUS == 0 else "train"


def stdlib_root() -> str:
  """The running interpreter's standard-library directory."""
  return os.path.realpath(sysconfig.get_paths()["stdlib"])


def stdlib_config_name() -> str:
  """Builder config name for this interpreter, e.g. "cpython3.11.7-1a2b3c4d".

  Different Pythons (or a pyenv and a Debian 3.11.7) have different stdlibs, so the name carries the
  version and a hash of the stdlib path; two interpreters can share one data_dir.
  """
  version = ".".join(map(str, sys.version_info[:3]))
  return f"{sys.implementation.name}{version}-{zlib.crc32(stdlib_root().encode()):08x}"


def list_stdlib_files(root: str) -> list[str]:
  """Sorted relative paths of the stdlib's ``**/*.py``, without site-packages and test/idle dirs."""
  paths = glob.glob("**/*.py", root_dir=root, recursive=True)
  return sorted(p for p in paths if not STDLIB_SKIP_DIRS.intersection(p.split(os.sep)[:-1]))


def list_text_files(root: str) -> list[str]:
  """Sorted relative paths of the regular files under ``root``, skipping hidden files and dirs.

  Binary files are only recognised when read (``read_text``), so they are still listed here.
  """
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for name in filenames:
      path = os.path.join(dirpath, name)
      if not name.startswith(".") and os.path.isfile(path):
        found.append(os.path.relpath(path, root))
  return sorted(found)


def directory_key(root: str, relpaths: Sequence[str]) -> str:
  """Config name for a text directory: a hash of its absolute path and its files' sizes and mtimes.

  A different directory, or an edited one, therefore gets its own cache instead of stale data.
  """
  digest = hashlib.sha1(os.path.abspath(root).encode())
  for rel in relpaths:
    stat = os.stat(os.path.join(root, rel))
    digest.update(f"\0{rel}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
  return "dir-" + digest.hexdigest()[:16]


def file_source(name: str, text_dir: str | None = None) -> tuple[str, list[str], str]:
  """(root, sorted relative paths, cache key) of a file source: ``stdlib_bytes`` (keyed by the
  interpreter) or ``text_files`` under ``text_dir`` (keyed by ``directory_key``)."""
  if name == "stdlib_bytes":
    root = stdlib_root()
    return root, list_stdlib_files(root), stdlib_config_name()
  root = os.path.abspath(text_dir or "")
  relpaths = list_text_files(root)
  return root, relpaths, directory_key(root, relpaths)


def read_text(path: str) -> bytes | None:
  """The file's raw bytes, or None for a binary file (one containing a NUL byte)."""
  with open(path, "rb") as f:
    data = f.read()
  return None if SEPARATOR in data else data


def pack(documents: Iterable[np.ndarray], eos: int, dtype: Any) -> Iterator[np.ndarray]:
  """Cut the token stream ``doc_0 + [eos] + doc_1 + [eos] + ...`` into ``CHUNK_LEN + 1``-token
  chunks (``dtype [CHUNK_LEN + 1]``): documents are concatenated and split across chunks.

  Streams, so a corpus larger than memory works. The last chunk is padded with ``eos``; no token is
  dropped. For bytes (eos 0) this is the byte stream of the files, each followed by b"\\0".
  """
  size = CHUNK_LEN + 1
  pending: list[np.ndarray] = []
  length = 0
  end = np.asarray([eos], dtype)
  for document in documents:
    pending += [np.asarray(document, dtype), end]
    length += len(document) + 1
    if length >= size:
      stream = np.concatenate(pending)
      whole = len(stream) // size * size
      yield from stream[:whole].reshape(-1, size)
      pending, length = [stream[whole:]], len(stream) - whole
  if length:
    stream = np.concatenate(pending)
    yield np.concatenate([stream, np.full(size - len(stream), eos, dtype)])


def fashion_mnist_files(dpkg_info: str = _DPKG_INFO,
                        default_dir: str = _FASHION_MNIST_DEFAULT_DIR) -> dict[str, str] | None:
  """Paths of the four Fashion-MNIST idx files of the Debian package, or None if not installed.

  Reads the package's file list in ``dpkg_info`` as ``dpkg -L dataset-fashion-mnist`` does, falling
  back to the package's install directory; all four files must exist.
  """
  listed = []
  for listing in glob.glob(os.path.join(dpkg_info, FASHION_MNIST_PACKAGE + "*.list")):
    with open(listing) as f:
      listed += [line.strip() for line in f if line.strip().endswith("-ubyte.gz")]
  by_name = {os.path.basename(p): p for p in listed}
  files = {name: by_name.get(name, os.path.join(default_dir, name)) for name in FASHION_MNIST_FILES}
  return files if all(os.path.isfile(p) for p in files.values()) else None
