"""Tokenizer loading: a byte-level BPE trained here, saved as tokenizer.json."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers

from entropo.models import Tokenizer
from entropo.models import load_tokenizer

SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|endoftext|>"]
CORPUS = [
    "Using the numbers 3, 7 and 25, make 46.",
    "The answer is (25 + 3) * 7 / 4 - 3 = 46.",
    "entropy-preserving reinforcement learning",
] * 5
TEXTS = [
    "The answer is 46.",
    "  leading and trailing spaces  ",
    "new\nlines\tand tabs",
    "unseen: Ünïcødé ✓ 🙂 ¿qué?",
    "",
]


def _build(with_bos=False) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  if with_bos:
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>",
                                               tok.token_to_id("<|bos|>"))])
  return tok


@pytest.fixture(name="directory")
def _directory(tmp_path):
  _build().save(str(tmp_path / "tokenizer.json"))
  return tmp_path


def _write(directory, name, content):
  (directory / name).write_text(json.dumps(content))


def test_round_trip(directory):
  tok = load_tokenizer(directory)
  assert isinstance(tok, Tokenizer)
  assert tok.vocab_size == 300
  for text in TEXTS:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text
  # Merges learnt from the corpus make it shorter than its bytes.
  assert len(tok.encode(CORPUS[1])) < len(CORPUS[1].encode())
  assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
  with pytest.raises(TypeError, match="encode takes a str"):
    tok.encode([1, 2])


def test_path_may_name_the_file(directory):
  tok = load_tokenizer(directory / "tokenizer.json")
  assert tok.decode(tok.encode(TEXTS[0])) == TEXTS[0]


def test_special_tokens_from_model_files(directory):
  ids = {t: _build().token_to_id(t) for t in SPECIALS}
  _write(directory, "tokenizer_config.json", {
      "eos_token": "<|end|>",
      # Older files write special tokens as AddedToken dictionaries.
      "pad_token": {"__type": "AddedToken", "content": "<|pad|>"},
      "bos_token": None,
  })
  _write(directory, "generation_config.json", {
      "eos_token_id": [ids["<|endoftext|>"], ids["<|end|>"]],
      "bos_token_id": ids["<|bos|>"],
  })
  _write(directory, "config.json", {"eos_token_id": 7, "pad_token_id": 8})
  tok = load_tokenizer(directory)
  # The tokenizer's EOS first, then everything generate stops on.
  assert tok.eos_id == ids["<|end|>"]
  assert tok.eos_ids == (ids["<|end|>"], ids["<|endoftext|>"])
  assert tok.pad_id == ids["<|pad|>"]
  assert tok.bos_id == ids["<|bos|>"]
  text = "The answer is 46.<|end|><|pad|>"
  encoded = tok.encode(text)
  assert encoded[-2:] == [ids["<|end|>"], ids["<|pad|>"]]
  assert tok.decode(encoded) == "The answer is 46."
  assert tok.decode(encoded, skip_special_tokens=False) == text


def test_special_ids_from_config_json(directory):
  _write(directory, "config.json", {"eos_token_id": 3, "pad_token_id": 0,
                                    "bos_token_id": None})
  tok = load_tokenizer(directory)
  assert (tok.eos_id, tok.eos_ids, tok.pad_id, tok.bos_id) == (3, (3,), 0,
                                                               None)


def test_special_tokens_map(directory):
  _write(directory, "special_tokens_map.json", {"eos_token": "<|endoftext|>",
                                                "pad_token": "<|end|>"})
  tok = load_tokenizer(directory)
  assert tok.eos_id == tok.token_to_id("<|endoftext|>")
  assert tok.pad_id == tok.token_to_id("<|end|>")
  assert tok.id_to_token(tok.pad_id) == "<|end|>"


def test_missing_special_tokens(directory):
  tok = load_tokenizer(directory)
  assert tok.eos_ids == () and tok.bos_id is None
  with pytest.raises(ValueError, match=r"No EOS token .*eos_token=\.\.\."):
    _ = tok.eos_id
  with pytest.raises(ValueError, match=r"No PAD token .*pad_token=\.\.\."):
    _ = tok.pad_id
  tok = load_tokenizer(directory, eos_token="<|end|>", pad_token="<|end|>")
  assert tok.eos_ids == (tok.token_to_id("<|end|>"),)
  assert tok.pad_id == tok.eos_id


def test_overrides_win(directory):
  _write(directory, "tokenizer_config.json", {"eos_token": "<|end|>"})
  tok = load_tokenizer(directory, eos_token="<|endoftext|>")
  assert tok.eos_ids == (tok.token_to_id("<|endoftext|>"),)


def test_unknown_special_tokens(directory):
  with pytest.raises(ValueError, match="'<eos>' \\(eos_token=\\) is not in "
                     "the vocabulary"):
    load_tokenizer(directory, eos_token="<eos>")
  _write(directory, "tokenizer_config.json", {"pad_token": "[PAD]"})
  with pytest.raises(ValueError, match=r"'\[PAD\]' \(pad_token\) is not in"):
    load_tokenizer(directory)
  _write(directory, "tokenizer_config.json", {})
  _write(directory, "config.json", {"eos_token_id": 300})
  with pytest.raises(ValueError, match=r"eos id 300 is outside the "
                     r"vocabulary \[0, 300\)"):
    load_tokenizer(directory)


def test_post_processor_special_tokens(tmp_path):
  _build(with_bos=True).save(str(tmp_path / "tokenizer.json"))
  tok = load_tokenizer(tmp_path)
  bos = tok.token_to_id("<|bos|>")
  assert tok.encode("46")[0] == bos
  assert tok.encode("46", add_special_tokens=False) == tok.encode("46")[1:]
  assert tok.decode(tok.encode("46")) == "46"


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
    load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="other.json not found"):
    load_tokenizer(tmp_path / "other.json")


def test_char_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
  """A warm start's (or an export's) folder: `transformers.AutoTokenizer`
  next to a qwen3 config.json encodes and decodes as entropo does (it
  loaded a Qwen2Tokenizer that dropped every space before
  `tokenizer_class` was written)."""
  transformers = pytest.importorskip("transformers")
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from entropo import models as models_lib  # pylint: disable=g-import-not-at-top
  from entropo import tasks  # pylint: disable=g-import-not-at-top
  tok = tasks.char_tokenizer()
  config = models_lib.ModelConfig(
      vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
      num_layers=1, num_heads=2, num_kv_heads=1, qk_norm=True,
      tie_word_embeddings=True, family="qwen3", max_position_embeddings=32)
  models_lib.save_pretrained(
      models_lib.Transformer(config, rngs=nnx.Rngs(0)), tmp_path)
  tasks.save_tokenizer(tok, tmp_path)
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for text in ("3 7 25>46:", "(25+3)*7 / 4", "  two  spaces\n"):
    ids = auto.encode(text, add_special_tokens=False)
    assert ids == tok.encode(text, add_special_tokens=False), text
    assert auto.decode(ids) == text
  assert (auto.eos_token_id, auto.pad_token_id) == (tok.eos_id, tok.pad_id)
