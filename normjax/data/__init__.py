"""Data pipeline: offline datasets as TFDS array_record, read by step index, no TensorFlow.

Configs carry ``data.name``, ``data.data_dir`` ("" = ``$NORMJAX_DATA_DIR`` or
``~/.cache/normjax/tensorflow_datasets``), ``data.seq_len`` (text), ``data.text_dir`` (text_files)
and ``data.shuffle_seed``::

  dc = data.validate(cfg)                   # once, cheap: a DataConfig, or ConfigError naming
                                            # the field, the value and the choices
  data.info(dc)                             # kind, vocab_size | image_shape + num_classes, sizes
  batches = data.load(dc, "train", 32)      # builds on first use, cached under data_dir
  batch = batches.batch(step)               # depends on the step only, so resuming needs no state

Built-in datasets (``DATASETS``), all available offline:

* ``stdlib_bytes``: the running interpreter's standard-library ``*.py`` files, bytes (vocab 256).
* ``text_files``: every text file under ``data.text_dir``, bytes.
* ``fashion_mnist_deb``: Fashion-MNIST 28x28x1 from the Debian package dataset-fashion-mnist.
* ``sklearn_digits``: scikit-learn's 8x8x1 digits (1797 images).
* ``auto_images`` resolves to ``fashion_mnist_deb`` when the package is installed, else
  ``sklearn_digits``.

Text is stored as 2049-byte chunks of the files' concatenation, each file followed by byte 0; a file
goes to "validation" iff ``zlib.crc32(relative path) % 20 == 0`` (if that leaves a split empty,
e.g. for a single file, chunk ``i`` goes to "validation" iff ``i % 20 == 0``). Each chunk holds
``2049 // (seq_len + 1)`` windows of ``seq_len + 1`` bytes and every window is one example:
``inputs = window[:-1]``, ``targets = window[1:]``, int32 [B, seq_len]. Images are
``inputs`` float32 [B, H, W, C] in [0, 1] and ``labels`` int32 [B].

Any other ``data.name`` is read as a TFDS dataset already prepared in array_record format under
``data.data_dir``; the name may include a config and version (``"wiki40b/en:1.3.0"``). Prepare it
on a machine with internet access (building most catalogue datasets needs TensorFlow too)::

  pip install tensorflow-cpu tensorflow-datasets
  tfds build lm1b --file_format=array_record --data_dir=/data/tfds
  tfds build cifar10 --file_format=array_record --data_dir=/data/tfds

then copy ``/data/tfds`` over and set ``data.name="lm1b"`` (or "cifar10") and
``data.data_dir="/data/tfds"``. Only the prepared files are read (no builder code, no download).
Supported layouts: a ``text`` feature (each example's UTF-8 bytes are ONE window, truncated or
padded with byte 0 to ``seq_len + 1``, so N = number of examples), or ``image`` (uint8, fixed
[H, W, C]; tfds ``Image`` features are decoded with Pillow) plus ``label`` (ClassLabel). Splits
"train" and "validation" are used, with "test" standing in for a missing "validation".
"""

from normjax.data.batches import StepIndexedBatches
from normjax.data.sources import DATASETS, DataConfig, info, load, resolve_name, validate

__all__ = ["DATASETS", "DataConfig", "StepIndexedBatches", "info", "load", "resolve_name", "validate"]
