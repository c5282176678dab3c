"""Tokenizers of Hugging Face model directories (`tokenizer.json`).

`load_tokenizer(path)` wraps `tokenizers.Tokenizer.from_file` (the Rust
library; `transformers` is not needed) and finds the special tokens that
sampling needs, from the files a model directory carries:

* EOS: `eos_id` is `tokenizer_config.json`'s `eos_token` (the token a chat
  model ends its turn with), else the first of `generation_config.json`'s
  `eos_token_id`, else `config.json`'s. `eos_ids` adds every id
  `generation_config.json` stops on, so that `sample(..., eos_id=tok.eos_ids)`
  stops where `transformers`' `generate` would.
* PAD: `tokenizer_config.json`'s `pad_token` (or `special_tokens_map.json`'s),
  else `pad_token_id` of `generation_config.json` or `config.json`.
* BOS: the same way; optional (None when absent).

A token the files do not define is only an error when asked for, and the
error says how to supply it (`load_tokenizer(..., pad_token=...)`).
"""

import json
import pathlib
from collections.abc import Iterable, Sequence

import tokenizers

TOKENIZER_NAME = "tokenizer.json"
_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_ID_FILES = ("generation_config.json", "config.json")


class Tokenizer:
  """Text <-> token ids, with the special ids the sampler needs.

  Attributes:
    tokenizer: the wrapped `tokenizers.Tokenizer`.
    eos_ids: every end-of-sequence id, the primary one first (may be empty).
    bos_id: the beginning-of-sequence id, or None.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *,
               eos_ids: Sequence[int] = (), pad_id: int | None = None,
               bos_id: int | None = None, source: str = "the tokenizer"):
    self.tokenizer = tokenizer
    self.eos_ids = tuple(int(i) for i in eos_ids)
    self._pad_id = None if pad_id is None else int(pad_id)
    self.bos_id = None if bos_id is None else int(bos_id)
    self._source = source
    for name, ids in (("eos", self.eos_ids), ("pad", (self._pad_id,)),
                      ("bos", (self.bos_id,))):
      for i in ids:
        if i is not None and not 0 <= i < self.vocab_size:
          raise ValueError(f"{name} id {i} is outside the vocabulary "
                           f"[0, {self.vocab_size}) of {source}.")

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (may be below the model's V)."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def eos_id(self) -> int:
    """The primary end-of-sequence id. Raises ValueError if none is known."""
    if not self.eos_ids:
      raise ValueError(
          f"No EOS token is defined for {self._source} (looked for "
          f"eos_token in {' / '.join(_TOKEN_FILES)} and eos_token_id in "
          f"{' / '.join(_ID_FILES)}); pass load_tokenizer(..., eos_token=...)."
      )
    return self.eos_ids[0]

  @property
  def pad_id(self) -> int:
    """The padding id. Raises ValueError if none is known."""
    if self._pad_id is None:
      raise ValueError(
          f"No PAD token is defined for {self._source} (looked for "
          f"pad_token in {' / '.join(_TOKEN_FILES)} and pad_token_id in "
          f"{' / '.join(_ID_FILES)}); pass load_tokenizer(..., pad_token=...),"
          f" e.g. the EOS token."
      )
    return self._pad_id

  def encode(self, text: str, *, add_special_tokens: bool = True
             ) -> list[int]:
    """Token ids of `text` (with the tokenizer's BOS etc. by default)."""
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str; got {type(text).__name__}.")
    return self.tokenizer.encode(
        text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], *,
                   add_special_tokens: bool = True) -> list[list[int]]:
    """`encode` of each text (unpadded)."""
    return [e.ids for e in self.tokenizer.encode_batch(
        list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True
             ) -> str:
    """The text of `ids` (a list, or a 1-D int array)."""
    return self.tokenizer.decode([int(i) for i in ids],
                                 skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.tokenizer.id_to_token(int(token_id))


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  with open(path) as f:
    return json.load(f)


def _token_content(token) -> str | None:
  """A special token as `tokenizer_config.json` writes it: str or dict."""
  if isinstance(token, dict):
    return token.get("content")
  return token


def _ids(value) -> list[int]:
  if value is None:
    return []
  if isinstance(value, int):
    return [value]
  return [int(v) for v in value]


def load_tokenizer(path, *, eos_token: str | None = None,
                   pad_token: str | None = None) -> Tokenizer:
  """Loads `tokenizer.json` and the special tokens of a model directory.

  Args:
    path: a model directory, or the path of a `tokenizer.json` (its
      directory is searched for the other files).
    eos_token, pad_token: token strings overriding what the files say.

  Raises:
    FileNotFoundError: no `tokenizer.json`.
    ValueError: a special token that is not in the vocabulary.
  """
  path = pathlib.Path(path)
  file = path / TOKENIZER_NAME if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(
        f"{file} not found (entropo reads the fast-tokenizer file "
        f"{TOKENIZER_NAME}; slow sentencepiece/vocab files are not supported)."
    )
  directory = file.parent
  tokenizer = tokenizers.Tokenizer.from_file(str(file))

  def lookup(token: str, where: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f"Special token {token!r} ({where}) is not in the "
                       f"vocabulary of {file}.")
    return token_id

  token_cfg = {}
  for name in reversed(_TOKEN_FILES):  # tokenizer_config.json wins
    token_cfg.update({k: v for k, v in _read_json(directory / name).items()
                      if v is not None})
  id_cfg = {}
  for name in reversed(_ID_FILES):  # generation_config.json wins
    id_cfg.update({k: v for k, v in _read_json(directory / name).items()
                   if v is not None})

  def special(kind: str, override: str | None) -> list[int]:
    if override is not None:
      return [lookup(override, f"{kind}_token=")]
    content = _token_content(token_cfg.get(f"{kind}_token"))
    found = [lookup(content, f"{kind}_token")] if content else []
    return found + [i for i in _ids(id_cfg.get(f"{kind}_token_id"))
                    if i not in found]

  eos = special("eos", eos_token)
  pad = special("pad", pad_token)
  bos = special("bos", None)
  return Tokenizer(tokenizer, eos_ids=eos, pad_id=pad[0] if pad else None,
                   bos_id=bos[0] if bos else None, source=str(file))
