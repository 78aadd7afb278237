"""Tokenizers: bytes, SentencePiece and Hugging Face ``tokenizers`` behind one interface, trained
offline on standard-library text, loaded from their files, round-tripping text exactly."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from normjax.data import tokenizers
from normjax.data.tokenizers import TokenizerConfig
from normjax.validation import ConfigError

TEXTS = ["def f(x):\n    return x + 1  # ü 日本\n", "\tindented\n\n  two  spaces ", "",
         "emoji 🙂 and NUL-free bytes ~!@#$%^&*()"]


@pytest.fixture(scope="module")
def lines() -> list[str]:
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:40]
  return [line for f in files for line in open(f, errors="replace").read().splitlines(keepends=True)
          if line.strip()]


@pytest.fixture(scope="module", params=["sentencepiece", "hf"])
def trained(request, lines, tmp_path_factory) -> tuple[str, str]:
  path = str(tmp_path_factory.mktemp("tok") / ("t.model" if request.param == "sentencepiece" else "t.json"))
  tokenizers.train(request.param, iter(lines), 512, path)
  return request.param, path


def test_bytes_are_the_utf8_bytes_and_nul_ends_a_document():
  tok = tokenizers.load(TokenizerConfig())
  (ids,) = tok.encode(["aü"])
  assert ids.dtype == np.int32 and ids.tolist() == [97, 0xC3, 0xBC]
  assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (256, 0, None)
  assert tok.decode([*ids, 0]) == "aü"


def test_trained_vocabularies_load_from_their_file_and_round_trip_text(trained):
  kind, path = trained
  assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]
  tok = tokenizers.load(TokenizerConfig(kind=kind, path=path))
  assert tok.vocab_size == 512
  encoded = tok.encode(TEXTS)
  assert [tok.decode(ids) for ids in encoded] == TEXTS
  assert all(ids.dtype == np.int32 and (ids < tok.vocab_size).all() for ids in encoded)
  # a trained vocabulary compresses its own kind of text: fewer tokens than bytes
  code = "import os\nfrom collections import defaultdict\n\ndef main():\n    return None\n"
  assert len(tok.encode([code])[0]) < 0.6 * len(code.encode())
  assert tok.eos_id not in np.concatenate(encoded)  # encode adds no special tokens
  expected_eos = 2 if kind == "sentencepiece" else 0  # </s>, <|endoftext|>
  assert tok.eos_id == expected_eos and len(tok.fingerprint) == 64


def test_fingerprint_is_the_file_content(trained, lines, tmp_path):
  kind, path = trained
  other = str(tmp_path / os.path.basename(path))
  tokenizers.train(kind, iter(lines[::2]), 512, other)
  load = lambda p: tokenizers.load(TokenizerConfig(kind=kind, path=p)).fingerprint
  assert load(path) != load(other)
  copy = tmp_path / ("copy" + os.path.splitext(path)[1])
  copy.write_bytes(open(path, "rb").read())
  assert load(str(copy)) == load(path)


def test_a_hugging_face_file_without_an_end_of_document_token_is_refused(tmp_path):
  from tokenizers import Tokenizer, models
  path = tmp_path / "tokenizer.json"
  Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
  with pytest.raises(ConfigError, match=r"no end-of-document token in the vocabulary \(looked for"):
    tokenizers.load(TokenizerConfig(kind="hf", path=str(path)))


@pytest.mark.parametrize("fields, message", [
    (dict(kind="bpe"),
     r"data.tokenizer.kind='bpe' is not valid; choose one of \['bytes', 'sentencepiece', 'hf'\]"),
    (dict(kind="hf"), r"needs exactly one of data.tokenizer.path .* and data.tokenizer.train_vocab"),
    (dict(kind="sentencepiece", path="/nonexistent/t.model"),
     r"data.tokenizer.path='/nonexistent/t.model': no such file \(a SentencePiece .model\)"),
    (dict(kind="bytes", train_vocab=512), r"kind='bytes' takes no path and no train_vocab"),
    (dict(kind="hf", train_vocab=100), r"train_vocab=100 is too small"),
    (dict(kind="hf", train_vocab=-1), r"train_vocab=-1 must be an int >= 0"),
])
def test_bad_tokenizer_settings_name_the_field(fields, message):
  with pytest.raises(ConfigError, match=message):
    TokenizerConfig(**fields)


def test_a_file_of_the_wrong_kind_is_refused(trained):
  kind, path = trained
  other = "hf" if kind == "sentencepiece" else "sentencepiece"
  with pytest.raises(ConfigError, match=rf"data.tokenizer.path='{path}' is not a"):
    tokenizers.load(TokenizerConfig(kind=other, path=path))
