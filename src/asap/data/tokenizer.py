"""A WordPiece subword tokenizer (Hugging Face ``tokenizers``), trained on the training texts.

Why subwords: a word-level vocabulary either explodes or maps most of a review
to ``[UNK]``; a few thousand WordPiece units cover every word of the corpus.
The pipeline is BERT's: Unicode clean-up (optionally lower-casing and stripping
accents), a split on whitespace and punctuation, then greedy longest-match
WordPiece. Special tokens have fixed ids: ``[PAD] = 0``, ``[UNK] = 1``,
``[CLS] = 2``; every sequence starts with ``[CLS]``, whose output the
classifier reads.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from asap.io import atomic_write_text

PAD_TOKEN, UNK_TOKEN, CLS_TOKEN = "[PAD]", "[UNK]", "[CLS]"
#: Fixed so that collation (:func:`collate_text`) can pad without a tokenizer at hand.
PAD_ID = 0

_SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN)  # trainers give special tokens ids in this order
_ENCODE_CHUNK = 4096  # texts per call into the (multi-threaded) Rust encoder: bounds peak memory
# Only a head of this many characters per kept token is encoded at first (see ``encode_ids``).
_HEAD_CHARS_PER_TOKEN = 8
_T = TypeVar("_T", "SubwordTokenizer", "PretrainedTokenizer")


def _head(text: str, num_chars: int) -> str:
    """The first ``num_chars`` characters of ``text``, cut back to an ASCII space, tab or newline.

    Normalisation is character-local and the pre-tokenizer splits at these
    characters, so the tokens of the head are a prefix of the tokens of the text.
    """
    if len(text) <= num_chars:
        return text
    cut = max(text.rfind(separator, 0, num_chars + 1) for separator in " \t\n\r")
    return text[: max(cut, 0)]


class SubwordTokenizer:
    """A trained WordPiece tokenizer with ``[PAD]`` (id 0), ``[UNK]`` and ``[CLS]``.

    Build one with :meth:`train` or :meth:`load`; the constructor wraps an
    existing ``tokenizers.Tokenizer`` and checks its special tokens.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = {token: tokenizer.token_to_id(token) for token in _SPECIAL_TOKENS}
        missing = [token for token, index in ids.items() if index is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special token(s) {missing}")
        if ids[PAD_TOKEN] != PAD_ID:
            raise ValueError(f"tokenizer has {PAD_TOKEN} at id {ids[PAD_TOKEN]}, expected {PAD_ID}")
        self._tokenizer = tokenizer
        self.pad_id: int = PAD_ID
        self.unk_id: int = ids[UNK_TOKEN]
        self.cls_id: int = ids[CLS_TOKEN]

    @classmethod
    def train(
        cls, texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = True
    ) -> SubwordTokenizer:
        """Learn a WordPiece vocabulary from ``texts`` (pass the *training* split only).

        Args:
            texts: the corpus, consumed once.
            vocab_size: the largest vocabulary (special tokens included); a
                small corpus may yield fewer entries.
            min_frequency: a merge must occur this often to enter the
                vocabulary; 2 keeps one-off typos out.
            lowercase: lower-case and strip accents first (halves the
                vocabulary needed for topic and sentiment tasks).
        """
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not a single string")
        if vocab_size <= len(_SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed the {len(_SPECIAL_TOKENS)} special tokens, got {vocab_size}")
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(_SPECIAL_TOKENS),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SubwordTokenizer:
        """Read a tokenizer written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a valid tokenizer (corrupt, truncated,
                or missing the special tokens).
        """
        return _load(cls, path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON, atomically: a temporary file beside ``path``, then
        ``os.replace``, so a crash or a concurrent reader never sees half a file."""
        _write_atomic(path, self._tokenizer.to_str())

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the embedding table's size)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_ids(self, texts: Sequence[str], *, max_length: int) -> list[list[int]]:
        """Token ids of each text: ``[CLS]`` then the subwords, cut to ``max_length`` ids in all.

        Truncation would waste most of the encoding time on long documents, so
        only a head of about 8 characters per kept token, cut at whitespace, is
        encoded first; a text whose head gives too few tokens is encoded again
        in full. The result is identical to encoding every text in full.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for [CLS]), got {max_length}")
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        keep = max_length - 1
        ids = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = list(texts[start : start + _ENCODE_CHUNK])
            heads = [_head(text, keep * _HEAD_CHARS_PER_TOKEN) for text in chunk]
            rows = [encoding.ids[:keep] for encoding in self._encode(heads)]
            short = [i for i, row in enumerate(rows) if len(row) < keep and len(heads[i]) < len(chunk[i])]
            for i, encoding in zip(short, self._encode([chunk[i] for i in short])):
                rows[i] = encoding.ids[:keep]
            ids.extend([self.cls_id, *row] for row in rows)
        return ids

    def _encode(self, texts: list[str]) -> list:
        return self._tokenizer.encode_batch_fast(texts, add_special_tokens=False) if texts else []

    def encode_batch(self, texts: Sequence[str], *, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise and pad a batch.

        Returns:
            ``input_ids``: ``(B, T)`` int64, each row ``[CLS]`` + subwords,
            truncated to ``max_length`` and right-padded with ``pad_id`` to the
            longest row (``T <= max_length``); ``padding_mask``: ``(B, T)``
            bool, True = real token (the convention of ``key_padding`` masks
            in this library: True = attend).
        """
        if len(texts) == 0:
            raise ValueError("encode_batch needs at least one text")
        return pad_ids([torch.tensor(row, dtype=torch.int64) for row in self.encode_ids(texts, max_length=max_length)])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens (for inspection; lower-cased if trained so)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"SubwordTokenizer(vocab_size={self.vocab_size})"


class PretrainedTokenizer:
    """A pretrained model's own tokenizer: the ``tokenizers`` backend of a Hugging Face fast tokenizer.

    It encodes as the model's tokenizer does with ``truncation=True``: its
    normaliser, pre-tokeniser, vocabulary and post-processor (the special
    tokens, e.g. ``[CLS] ... [SEP]``), cut to ``max_length`` ids *including*
    the special tokens. Its padding id is saved in the file (as the file's
    padding setting), so a run reads it back without the model's folder;
    sequences are never padded here (:func:`pad_ids` pads a batch with
    :attr:`pad_id`).

    Build one from ``transformers_tokenizer.backend_tokenizer`` and its
    ``pad_token_id`` (see :func:`asap.integrations.transformers.pretrained_tokenizer`),
    or :meth:`load` a file written by :meth:`save`.
    """

    def __init__(self, tokenizer: Tokenizer, *, pad_id: int | None = None) -> None:
        if pad_id is None:
            padding = tokenizer.padding
            pad_id = None if padding is None else padding.get("pad_id")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"tokenizer has no padding id (got {pad_id!r}); a pretrained tokenizer needs a pad token")
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a private copy: truncation is set here
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        pad_token = self._tokenizer.id_to_token(pad_id)
        if pad_token is None:
            raise ValueError(f"padding id {pad_id} is not in the tokenizer's vocabulary")
        self.pad_id, self._pad_token = pad_id, pad_token
        self._max_length: int | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> PretrainedTokenizer:
        """Read a tokenizer written by :meth:`save` (``FileNotFoundError``/``ValueError`` naming the file)."""
        return _load(cls, path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer (with its padding id) as JSON, atomically."""
        copy = Tokenizer.from_str(self._tokenizer.to_str())
        copy.no_truncation()
        copy.enable_padding(pad_id=self.pad_id, pad_token=self._pad_token)
        _write_atomic(path, copy.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_ids(self, texts: Sequence[str], *, max_length: int) -> list[list[int]]:
        """Token ids of each text, special tokens included, at most ``max_length`` ids each."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        if max_length != self._max_length:
            try:
                self._tokenizer.enable_truncation(max_length)
            except Exception as err:  # the Rust side raises a bare Exception
                raise ValueError(f"cannot truncate to max_length={max_length}: {err}") from None
            self._max_length = max_length
        ids: list[list[int]] = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = list(texts[start : start + _ENCODE_CHUNK])
            try:
                encodings = self._tokenizer.encode_batch_fast(chunk, add_special_tokens=True)
            except Exception as err:  # e.g. max_length shorter than the special tokens
                raise ValueError(f"cannot encode with max_length={max_length}: {err}") from None
            ids.extend(encoding.ids for encoding in encodings)
        return ids

    def __repr__(self) -> str:
        return f"PretrainedTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id})"


def _load(cls: type[_T], path: str | os.PathLike) -> _T:
    """``cls(tokenizer)`` from the file ``path`` (each tokenizer class's ``load``): ``FileNotFoundError``
    for no file, ``ValueError`` naming the file for one that is not a tokenizer or that ``cls`` refuses."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tokenizer = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        raise ValueError(f"{path} is not a valid tokenizer JSON file: {err}") from err
    try:
        return cls(tokenizer)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _write_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`asap.io.atomic_write_text` into ``path``'s folder, created if needed."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def pad_ids(rows: Sequence[torch.Tensor], *, pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D int64 id tensors with ``pad_id`` (:data:`PAD_ID` by default) to the longest.

    Returns:
        ``(input_ids (B, T) int64, padding_mask (B, T) bool, True = real token)``.
    """
    lengths = torch.tensor([row.numel() for row in rows])
    input_ids = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=pad_id)
    padding_mask = torch.arange(input_ids.shape[1]) < lengths[:, None]
    return input_ids, padding_mask


def load_or_train_tokenizer(
    path: str | os.PathLike,
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    lowercase: bool = True,
) -> SubwordTokenizer:
    """Load the tokenizer cached at ``path``, or train one on ``texts`` and save it there.

    Kept beside a run's checkpoint so that evaluation and compilation tokenise
    exactly as training did. The cache is keyed by path only: delete the file
    (or use a new run directory) to retrain with other settings. ``texts`` is
    not read when the cache exists.
    """
    path = pathlib.Path(path)
    if path.exists():
        return SubwordTokenizer.load(path)
    tokenizer = SubwordTokenizer.train(texts, vocab_size=vocab_size, min_frequency=min_frequency, lowercase=lowercase)
    tokenizer.save(path)
    return tokenizer
