"""A character-level tokenizer for the built-in tasks.

One id per character of printable ASCII and newline, plus `<pad>`, `<eos>`
and `<unk>` (ids 0, 1, 2). It is a real `tokenizers.Tokenizer` (a word-level
model over single characters), so it is saved as the same `tokenizer.json`
that Hugging Face models carry and is loaded by the same
`entropo.models.load_tokenizer`: the tiny model trained here and a real
checkpoint go through one code path.
"""

import json
import pathlib
import string

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers

from entropo.models import tokenizer as tokenizer_lib

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = (PAD, EOS, UNK)
# string.printable minus the rare whitespace characters (tab, CR, VT, FF).
CHARS = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")


def char_tokenizer(chars: str = CHARS) -> tokenizer_lib.Tokenizer:
  """A tokenizer with one id per character of `chars` (after the specials).

  Characters outside `chars` encode to `<unk>`; decoding skips the special
  tokens by default.
  """
  if len(set(chars)) != len(chars) or not chars:
    raise ValueError("chars must be non-empty and without repeats.")
  vocab = {token: i for i, token in enumerate(SPECIALS + tuple(chars))}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  # `[\s\S]` isolates every character, newline included.
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"),
                                           behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(SPECIALS))
  return tokenizer_lib.Tokenizer(tok, eos_ids=[vocab[EOS]], pad_id=vocab[PAD],
                                 source="char_tokenizer")


def save_tokenizer(tok: tokenizer_lib.Tokenizer, directory) -> pathlib.Path:
  """Writes `tokenizer.json` and `tokenizer_config.json` into `directory`.

  The config names the EOS and PAD tokens, so `load_tokenizer(directory)`
  gives back the same special ids, and the tokenizer class, so that
  `transformers.AutoTokenizer.from_pretrained(directory)` encodes and
  decodes exactly as entropo does.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tok.tokenizer.save(str(directory / tokenizer_lib.TOKENIZER_NAME))
  # `tokenizer_class`: without it `AutoTokenizer` picks the class of the
  # model's family (a Qwen2Tokenizer next to a qwen3 config.json), whose
  # own pre-tokenizer drops every space; the generic fast class reads
  # tokenizer.json as it is.
  config = {"tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": tok.id_to_token(tok.eos_id),
            "pad_token": tok.id_to_token(tok.pad_id)}
  if tok.bos_id is not None:
    config["bos_token"] = tok.id_to_token(tok.bos_id)
  (directory / "tokenizer_config.json").write_text(json.dumps(config,
                                                              indent=2))
  return directory
