"""Packed text: segment ids, positions and the loss mask derived from EOS, the JSON Lines and Parquet
sources, vocabularies trained on the training split, and every bad source refused by name."""

from __future__ import annotations

import gzip
import json
import pathlib

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from normjax import config as common
from normjax import data
from normjax.data import batches, corpus, sources, tokenizers
from normjax.validation import ConfigError

DOCS = [f"document {i}: " + "word " * (i % 7) + "end." for i in range(400)]


def cfg(data_dir: pathlib.Path, **changes) -> ml_collections.ConfigDict:
  base = dict(name="jsonl", data_dir=str(data_dir), seq_len=32, text_dir="", shuffle_seed=0, files="",
              text_field="text", on_bad_line="stop", boundary_loss=False,
              tokenizer=dict(kind="bytes", path="", train_vocab=0))
  base.update(changes)
  return ml_collections.ConfigDict(base)


def test_segments_positions_and_loss_mask_come_from_eos():
  eos = 9
  window = np.asarray([[3, 4, eos, 5, 6, 7, eos, eos, eos]])  # [1, T + 1], T = 8
  b = batches.packed_batch(window, eos)
  np.testing.assert_array_equal(b["inputs"], [[3, 4, eos, 5, 6, 7, eos, eos]])
  np.testing.assert_array_equal(b["targets"], [[4, eos, 5, 6, 7, eos, eos, eos]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 3]])  # EOS ends its document
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 2, 3, 0]])
  # learned: next tokens and each document's EOS; masked: the first token of the next document
  # (predicted from the previous one) and padding (EOS after EOS)
  np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 1, 1, 1, 0, 0]])
  assert batches.packed_batch(window, eos, boundary_loss=True)["loss_mask"].all()


def write_jsonl(path: pathlib.Path, texts: list[str], field: str = "text", bad: dict[int, str] | None = None):
  lines = [json.dumps({field: t, "url": "x"}) for t in texts]
  for index, line in (bad or {}).items():
    lines[index] = line
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "wt") as f:
    f.write("\n".join(lines) + "\n")


def stream_of(c: ml_collections.ConfigDict, split: str) -> list[bytes]:
  """The documents of a split, in stored order: its chunks joined, split at EOS (byte 0)."""
  source = sources._open(data.validate(c)).builder.as_data_source(split=split)  # noqa: SLF001
  chunks = source.__getitems__(list(range(len(source))))
  return [d for d in b"".join(r["chunk"].tobytes() for r in chunks).split(b"\0") if d]


def test_jsonl_and_parquet_sources_pack_every_document_once(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", DOCS[:200])
  write_jsonl(tmp_path / "b.json.gz", DOCS[200:])
  table = pa.table({"text": DOCS, "id": list(range(len(DOCS)))})
  pq.write_table(table, tmp_path / "c.parquet")
  for name, files in (("jsonl", str(tmp_path / "*.json*")), ("parquet", str(tmp_path / "*.parquet"))):
    c = cfg(tmp_path / "tfds", name=name, files=files)
    info = data.info(c)
    assert "field 'text'" in info["source"] and info["vocab_size"] == 256
    seen = {split: stream_of(c, split) for split in ("train", "validation")}
    assert sorted(seen["train"] + seen["validation"]) == sorted(d.encode() for d in DOCS)
    assert 0 < len(seen["validation"]) < len(DOCS) / 5  # ~5 % by the hash of path:record


def test_a_corrupt_line_stops_with_file_and_line_or_is_skipped(tmp_path, capfd):
  # 400 records: the validation split (1 in 20 by a hash of path:line) is never empty by chance
  write_jsonl(tmp_path / "a.jsonl", DOCS, bad={7: "{not json", 9: json.dumps({"body": "x"})})
  stop = cfg(tmp_path / "tfds", files=str(tmp_path / "a.jsonl"))
  with pytest.raises(ConfigError, match=rf"{tmp_path / 'a.jsonl'}:8: Expecting property name .* "
                                        r"\(data.on_bad_line='stop'"):
    data.info(stop)
  skip = cfg(tmp_path / "tfds2", files=str(tmp_path / "a.jsonl"), on_bad_line="skip")
  data.info(skip)
  assert "skipped 2 bad line(s)" in capfd.readouterr().err
  seen = stream_of(skip, "train") + stream_of(skip, "validation")
  assert len(seen) == len(DOCS) - 2


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_a_vocabulary_trained_on_the_training_split_packs_the_data(tmp_path, kind):
  (tmp_path / "corpus").mkdir()
  for i in range(40):
    (tmp_path / "corpus" / f"f{i}.txt").write_text("\n".join(DOCS[i * 10:(i + 1) * 10]) + "\n")
  c = cfg(tmp_path / "tfds", name="text_files", text_dir=str(tmp_path / "corpus"),
          tokenizer=dict(kind=kind, path="", train_vocab=400))
  validated = data.validate(c)
  assert validated.vocab_size == 400  # known before anything is trained or built
  info = data.info(c)
  (trained,) = (tmp_path / "tfds" / "tokenizers").iterdir()
  assert trained.name.endswith(f"-{kind}-400" + (".model" if kind == "sentencepiece" else ".json"))
  tok = tokenizers.load(tokenizers.TokenizerConfig(kind=kind, path=str(trained)))
  batch = data.load(c, "train", 8).batch(0)
  assert batch["inputs"].max() < tok.vocab_size == 400
  # the windows decode back to corpus text, documents separated by EOS
  row = np.concatenate([batch["inputs"][0], batch["targets"][0, -1:]])
  texts = [tok.decode(part) for part in np.split(row, np.flatnonzero(row == tok.eos_id))]
  assert any("document" in t for t in texts)
  mtime = trained.stat().st_mtime_ns
  data.info(c)  # a second open trains nothing
  assert trained.stat().st_mtime_ns == mtime and "vocabulary of 400" in info["source"]


def test_model_vocab_comes_from_the_tokenizer_rounded_to_128(tmp_path):
  path = str(tmp_path / "t.json")
  tokenizers.train("hf", iter(DOCS), 300, path)
  config = common.load("configs/llama.py", {"data.tokenizer.kind": "hf", "data.tokenizer.path": path,
                                            "data.data_dir": str(tmp_path)})
  run = common.validate(config, 1)
  assert (run.data.vocab_size, run.model.vocab_size) == (300, 384)
  config.model.vocab_size = 256
  with pytest.raises(ConfigError, match=r"model.vocab_size=256 is smaller than the tokenizer's "
                                        r"vocabulary of 300"):
    common.validate(config, 1)


@pytest.mark.parametrize("changes, message", [
    (dict(files=""), r"data.files=\(\) : give the corpus files"),
    (dict(files="/nonexistent/*.jsonl"), r"data.files=\('/nonexistent/\*.jsonl',\): no file matches"),
    (dict(files="{dir}/notext.jsonl"),
     r"notext.jsonl:1: no field 'text' \(data.text_field\); the record has \['body', 'url'\]"),
    (dict(files="{dir}/empty.jsonl"), r"empty.jsonl: empty \(data.files\)"),
    (dict(name="parquet", files="{dir}/ints.parquet"),
     r"column 'text' \(data.text_field\) is int64, not text"),
    (dict(name="parquet", files="{dir}/ints.parquet", text_field="body"),
     r"no column 'body' \(data.text_field\); columns: \['text'\]"),
    (dict(files="{dir}/ok.jsonl", on_bad_line="ignore"),
     r"data.on_bad_line='ignore' is not valid; choose one of \['stop', 'skip'\]"),
    (dict(files="{dir}/ok.jsonl", tokenizer=dict(kind="sentencepiece", path="/nope.model", train_vocab=0)),
     r"data.tokenizer.path='/nope.model': no such file"),
    (dict(files="{dir}/ok.jsonl", tokenizer=dict(kind="hf", path="", train_vocab=0, vocab=3)),
     r"data.tokenizer.vocab is not a field"),
])
def test_bad_sources_fail_before_anything_is_built(tmp_path, changes, message):
  write_jsonl(tmp_path / "notext.jsonl", ["x"], field="body")
  write_jsonl(tmp_path / "ok.jsonl", ["x"])
  (tmp_path / "empty.jsonl").write_text("\n\n")
  pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
  changes = {k: v.format(dir=tmp_path) if isinstance(v, str) else v for k, v in changes.items()}
  with pytest.raises(ConfigError, match=message):
    data.validate(cfg(tmp_path / "tfds", **changes))
  assert not (tmp_path / "tfds").exists()


def test_pack_cuts_the_token_stream_into_chunks_padded_with_eos():
  docs = [np.arange(1, 1500), np.arange(1, 1000), np.arange(1, 3)]
  chunks = list(corpus.pack(docs, eos=0, dtype=np.uint16))
  stream = np.concatenate([np.append(d, 0) for d in docs])
  assert all(c.shape == (corpus.CHUNK_LEN + 1,) and c.dtype == np.uint16 for c in chunks)
  flat = np.concatenate(chunks)
  np.testing.assert_array_equal(flat[:len(stream)], stream)
  assert len(chunks) == 2 and not flat[len(stream):].any()


def test_the_c4_presets_name_what_the_user_must_provide(tmp_path):
  with pytest.raises(ConfigError, match=r"data.tokenizer.kind='sentencepiece' needs exactly one of "
                                        r"data.tokenizer.path"):
    common.validate(common.load("configs/llama.py:c4_130m"), 1)
  with pytest.raises(ConfigError, match=r"data.tokenizer.path='/data/t5/spiece.model': no such file"):
    common.validate(common.load("configs/llama.py:c4_130m",
                                {"data.tokenizer.path": "/data/t5/spiece.model"}), 1)
  model = str(tmp_path / "spiece.model")
  tokenizers.train("sentencepiece", iter(DOCS), 400, model)
  with pytest.raises(ConfigError, match=r"data.files=\(\) : give the corpus files"):
    common.validate(common.load("configs/llama.py:c4_130m", {"data.tokenizer.path": model}), 1)
  write_jsonl(tmp_path / "c4-train.00000-of-01024.json", DOCS)
  given = {"data.files": str(tmp_path / "c4-train.*.json"), "data.data_dir": str(tmp_path),
           "data.tokenizer.path": model}
  run = common.validate(common.load("configs/llama.py:c4_130m", given), 1)
  m = run.model  # GaLore's llama_130m.json, the papers' harness
  assert (m.num_layers, m.d_model, m.num_heads, m.hidden_dim, m.vocab_size) == (12, 768, 12, 2048, 512)
  assert (run.data.seq_len, run.optim.weight_decay, run.optim.clip_norm) == (256, 0.0, 0.0)


def test_a_source_whose_every_record_was_skipped_is_refused_by_name(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", ["x", "y", "z"], bad={0: "{", 2: "["})
  (tmp_path / "b.jsonl").write_text("\n".join(["{", "not json"]) + "\n")
  c = cfg(tmp_path / "tfds", files=str(tmp_path / "*.jsonl"), on_bad_line="skip")
  with pytest.raises(ConfigError, match=r"b.jsonl: no JSON record \(data.files\)"):
    data.validate(c)
  (tmp_path / "b.jsonl").unlink()  # a.jsonl: one record, "y"; its split has it, the other nothing
  with pytest.raises(ConfigError, match=r"data.name='jsonl': Failed to finalize writing of split "
                                        r"\"(train|validation)\": No examples were yielded. \(about 1 in 20"):
    data.info(c)


def test_a_vocabulary_trained_on_json_lines_reads_the_training_records_only(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", DOCS)
  c = cfg(tmp_path / "tfds", files=str(tmp_path / "a.jsonl"),
          tokenizer=dict(kind="sentencepiece", path="", train_vocab=320))
  info = data.info(c)
  (trained,) = (tmp_path / "tfds" / "tokenizers").iterdir()
  assert trained.name.endswith("-sentencepiece-320.model") and "vocabulary of 320" in info["source"]
  tok = tokenizers.load(tokenizers.TokenizerConfig(kind="sentencepiece", path=str(trained)))
  # every validation record decodes exactly from the packed stream
  source = sources._open(data.validate(c)).builder.as_data_source(split="validation")  # noqa: SLF001
  ids = np.concatenate([r["chunk"] for r in source.__getitems__(list(range(len(source))))])
  parts = np.split(ids, np.flatnonzero(ids == tok.eos_id))
  texts = [tok.decode(part[part != tok.eos_id]) for part in parts]
  expected = [d for i, d in enumerate(DOCS)
              if corpus.split_of(f"{tmp_path / 'a.jsonl'}:{i + 1}") == "validation"]
  assert [t for t in texts if t] == expected
