"""Data pipeline: offline datasets as TFDS array_record, read by step index, no TensorFlow.

Configs carry ``data.name``, ``data.data_dir`` ("" = ``$NORMJAX_DATA_DIR`` or
``~/.cache/normjax/tensorflow_datasets``), ``data.seq_len`` and ``data.tokenizer`` (text),
``data.text_dir`` (text_files), ``data.files`` and ``data.text_field`` (jsonl, parquet) and
``data.shuffle_seed``::

  dc = data.validate(cfg)                   # once, cheap: a DataConfig, or ConfigError naming
                                            # the field, the value and the choices
  data.info(dc)                             # kind, vocab_size | image_shape + num_classes, sizes
  batches = data.load(dc, "train", 32)      # builds on first use, cached under data_dir
  batch = batches.batch(step)               # depends on the step only, so resuming needs no state

Text sources, all packed the same way (``packed``, ``builders``; docs/data.md): ``stdlib_bytes``
(the running interpreter's standard-library ``*.py`` files), ``text_files`` (every text file under
``data.text_dir``), ``jsonl`` and ``parquet`` (records of ``data.files``), and any TFDS dataset
prepared in array_record format with a ``text`` feature (``"lm1b"``, ``"wiki40b/en:1.3.0"``).
Documents are tokenized (``tokenizers``: bytes, SentencePiece, Hugging Face; or a vocabulary
trained on the training split), each followed by EOS, and cut into 2049-token chunks of
``2049 // (seq_len + 1)`` windows. A text batch holds ``inputs``, ``targets``, ``segment_ids``,
``positions`` and ``loss_mask``, int32 [B, seq_len] each.

Image datasets: ``fashion_mnist_deb`` (the Debian package dataset-fashion-mnist),
``sklearn_digits`` (scikit-learn's 8x8 digits), ``auto_images`` (the first when installed, else the
second), or a prepared TFDS dataset with ``image`` (uint8, fixed [H, W, C]) and ``label``. Batches
are ``inputs`` float32 [B, H, W, C] in [0, 1] and ``labels`` int32 [B].

Prepare a catalogue dataset on a machine with internet access (building most needs TensorFlow)::

  pip install tensorflow-cpu tensorflow-datasets
  tfds build lm1b --file_format=array_record --data_dir=/data/tfds

then copy ``/data/tfds`` over and set ``data.name="lm1b"``, ``data.data_dir="/data/tfds"``. Only the
prepared files are read (no builder code, no download). Splits "train" and "validation" are used,
with "test" standing in for a missing "validation".
"""

from normjax.data.batches import Prefetched, StepIndexedBatches
from normjax.data.sources import DATASETS, DataConfig, info, load, resolve_name, validate

__all__ = ["DATASETS", "DataConfig", "Prefetched", "StepIndexedBatches", "info", "load", "resolve_name",
           "validate"]
