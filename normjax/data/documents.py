"""Documents from the files corpora ship in: JSON Lines (``.jsonl``, ``.json``, gzip-compressed
``.gz``: C4, OpenWebText, The Pile) and Parquet (FineWeb, any Hugging Face dataset export), each
document being one record's text field.

``check_*`` read only the first record (or the schema) of each file, so a wrong field or column
fails before anything is built. ``read_*`` yield ``(document id, text)`` in file order; the id
(``path:line`` or ``path:row``) decides the split (``corpus.split_of``). A line that is not JSON
stops the build naming the file and line, or, with ``on_bad_line="skip"``, is skipped and counted
in ``Skipped``.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

from normjax.validation import ConfigError

BAD_LINE = ("stop", "skip")


class Skipped:
  """Counts the records ``read_jsonl`` skipped (``on_bad_line="skip"``)."""

  def __init__(self) -> None:
    self.count = 0
    self.first: str | None = None  # "path:line: why" of the first one


def expand(patterns: Sequence[str], field: str) -> list[str]:
  """The sorted files matching ``patterns`` (globs); ConfigError naming ``field`` when none does."""
  if not patterns:
    raise ConfigError(f"{field}=() : give the corpus files (globs, e.g. /data/c4/en/c4-train.*.json.gz)")
  found = sorted({path for pattern in patterns for path in glob.glob(os.path.expanduser(pattern))
                  if os.path.isfile(path)})
  if not found:
    raise ConfigError(f"{field}={tuple(patterns)!r}: no file matches")
  return found


def files_key(paths: Sequence[str], field: str) -> str:
  """A cache name for these files and field: a hash of their paths, sizes and mtimes."""
  digest = hashlib.sha1(field.encode())
  for path in paths:
    stat = os.stat(path)
    digest.update(f"\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
  return "files-" + digest.hexdigest()[:16]


def _open(path: str) -> IO[str]:
  return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _text(record: Any, field: str, where: str) -> str:
  if not isinstance(record, dict) or field not in record:
    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ConfigError(f"{where}: no field {field!r} (data.text_field); the record has {fields}")
  text = record[field]
  if not isinstance(text, str):
    raise ConfigError(f"{where}: field {field!r} (data.text_field) is {type(text).__name__}, not text")
  return text


def check_jsonl(paths: Sequence[str], field: str, on_bad_line: str = "stop") -> None:
  """ConfigError when a file's first record is not JSON (with ``on_bad_line="skip"``: its first
  JSON record) or lacks the text ``field``."""
  for path in paths:
    with _open(path) as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            record = json.loads(line)
          except json.JSONDecodeError as error:
            if on_bad_line == "skip":
              continue
            raise ConfigError(f"{path}:{number}: not a JSON Lines file ({error})") from None
          _text(record, field, f"{path}:{number}")
          break
      else:
        raise ConfigError(f"{path}: {'no JSON record' if on_bad_line == 'skip' else 'empty'} (data.files)")


def read_jsonl(paths: Sequence[str], field: str, on_bad_line: str, skipped: Skipped
               ) -> Iterator[tuple[str, str]]:
  """``(path:line, text)`` of every record; a corrupt line stops with its file and line, or is
  skipped and counted (``on_bad_line``)."""
  for path in paths:
    with _open(path) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{number}"
        try:
          text = _text(json.loads(line), field, where)
        except (json.JSONDecodeError, ConfigError) as error:
          why = f"{where}: {error}" if isinstance(error, json.JSONDecodeError) else str(error)
          if on_bad_line == "stop":
            raise ConfigError(f"{why} (data.on_bad_line='stop'; 'skip' skips and counts such lines)"
                              ) from None
          skipped.count += 1
          skipped.first = skipped.first or why
          continue
        yield where, text


def check_parquet(paths: Sequence[str], field: str) -> None:
  """ConfigError when a file has no column ``field`` or it does not hold text."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  for path in paths:
    try:
      schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as error:
      raise ConfigError(f"{path}: not a Parquet file ({error})") from None
    if field not in schema.names:
      raise ConfigError(f"{path}: no column {field!r} (data.text_field); columns: {schema.names}")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise ConfigError(f"{path}: column {field!r} (data.text_field) is {kind}, not text (string)")


def read_parquet(paths: Sequence[str], field: str) -> Iterator[tuple[str, str]]:
  """``(path:row, text)`` of every row (null texts skipped), read in record batches."""
  import pyarrow.parquet as pq
  for path in paths:
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[field], batch_size=4096):
      for text in batch.column(0).to_pylist():
        if text is not None:
          yield f"{path}:{row}", text
        row += 1


def read(records_format: str, paths: Sequence[str], field: str, on_bad_line: str
         ) -> Iterator[tuple[str, str]]:
  """Every record's (id, text) of ``jsonl`` or ``parquet`` files, in file order; skipped JSON lines
  are counted and reported on stderr at the end."""
  if records_format == "parquet":
    yield from read_parquet(paths, field)
    return
  skipped = Skipped()
  yield from read_jsonl(paths, field, on_bad_line, skipped)
  if skipped.count:
    print(f"skipped {skipped.count} bad line(s) (data.on_bad_line='skip'); first: {skipped.first}",
          file=sys.stderr)
