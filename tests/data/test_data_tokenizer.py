import random

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from asap.data import SubwordTokenizer, load_or_train_tokenizer


_STEMS = ["play", "work", "watch", "movie", "act", "direct", "great", "bad", "plot", "scene", "music"]
_SUFFIXES = ["", "s", "ed", "ing", "er", "ers"]


def _corpus(num=300, seed=0):
    rng = random.Random(seed)
    words = [stem + suffix for stem in _STEMS for suffix in _SUFFIXES]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))).capitalize() + rng.choice([".", "!", "?"])
        for _ in range(num)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return SubwordTokenizer.train(_corpus(), vocab_size=200, min_frequency=2)


def test_special_ids(tokenizer):
    assert tokenizer.pad_id == 0
    assert len({tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id}) == 3
    assert 3 < tokenizer.vocab_size <= 200


def test_cls_first_padding_and_mask(tokenizer):
    texts = ["Great movie.", "Bad plot, bad acting, bad music, bad scenes!", ""]
    input_ids, padding_mask = tokenizer.encode_batch(texts, max_length=64)
    assert input_ids.dtype == torch.int64 and padding_mask.dtype == torch.bool
    singles = [tokenizer.encode_batch([text], max_length=64)[0][0] for text in texts]  # no padding when alone
    assert input_ids.shape == (3, max(len(s) for s in singles))
    for row, mask, single in zip(input_ids, padding_mask, singles):
        assert row[0] == tokenizer.cls_id
        assert int(mask.sum()) == len(single) and bool(mask[: len(single)].all())
        assert torch.equal(row[: len(single)], single)
        assert bool((row[len(single) :] == tokenizer.pad_id).all())
    assert singles[2].tolist() == [tokenizer.cls_id]  # an empty text is [CLS] alone


def test_subwords_decode_back_to_the_lowercased_text(tokenizer):
    ids, _ = tokenizer.encode_batch(["Directing Players watched"], max_length=32)
    assert tokenizer.decode(ids[0].tolist()) == "directing players watched"
    assert tokenizer.unk_id not in ids[0].tolist()


@pytest.mark.parametrize("max_length", [1, 2, 5, 9])
def test_truncation(tokenizer, max_length):
    long_text = " ".join(["watching"] * 40)
    full = tokenizer.encode_ids([long_text], max_length=10_000)[0]
    ids, mask = tokenizer.encode_batch([long_text, "bad"], max_length=max_length)
    assert ids.shape[1] == max_length and bool(mask[0].all())
    assert ids[0].tolist() == full[:max_length]


def test_bad_max_length(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode_batch(["a"], max_length=0)
    with pytest.raises(TypeError, match="single string"):
        tokenizer.encode_ids("a text", max_length=4)


# Known words, punctuation, accents (precomposed and combining), "z" (unseen in training: a word holding
# it is one [UNK]), between runs of every kind of separator: a cut inside a word would change the ids.
_PIECE = st.sampled_from([stem + suffix for stem in _STEMS for suffix in _SUFFIXES] + list(".,!zÉé\u0301"))
_WORD = st.lists(_PIECE, min_size=1, max_size=4).map("".join)
_SEPARATOR = st.text(alphabet=" \n\t\r\x1c\u00a0\u3000", min_size=1, max_size=12)
_TEXT = st.lists(st.one_of(_WORD, _SEPARATOR), max_size=12).map("".join)


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(_TEXT, min_size=1, max_size=6), max_length=st.integers(1, 12))
@example(texts=["watching\x1cplaying played"], max_length=2)  # \x1c is deleted, not a word boundary
def test_truncation_equals_encoding_in_full(tokenizer, texts, max_length):
    # max_length=10_000 encodes these texts in full; the short max_length path encodes only a head.
    full = tokenizer.encode_ids(texts, max_length=10_000)
    assert tokenizer.encode_ids(texts, max_length=max_length) == [row[:max_length] for row in full]


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    tokenizer.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left behind
    loaded = SubwordTokenizer.load(path)
    texts = _corpus(num=20, seed=1) + ["unseen zebra words"]
    for a, b in zip(tokenizer.encode_batch(texts, max_length=16), loaded.encode_batch(texts, max_length=16)):
        assert torch.equal(a, b)
    for attribute in ("vocab_size", "pad_id", "cls_id", "unk_id"):
        assert getattr(loaded, attribute) == getattr(tokenizer, attribute)


def test_save_replaces_an_existing_file(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("old")
    tokenizer.save(path)
    assert SubwordTokenizer.load(path).vocab_size == tokenizer.vocab_size


def test_load_missing_and_corrupt(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        SubwordTokenizer.load(tmp_path / "nothing.json")
    good = tmp_path / "good.json"
    tokenizer.save(good)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(good.read_text()[: len(good.read_text()) // 2])
    with pytest.raises(ValueError, match="corrupt.json is not a valid tokenizer"):
        SubwordTokenizer.load(corrupt)


def test_load_or_train_caches(tmp_path):
    path = tmp_path / "tokenizer.json"
    first = load_or_train_tokenizer(path, _corpus(), vocab_size=150)
    assert path.is_file()

    def must_not_be_read():
        raise AssertionError("texts were read although the tokenizer is cached")
        yield

    second = load_or_train_tokenizer(path, must_not_be_read(), vocab_size=150)
    texts = ["great plot", "bad acting"]
    assert torch.equal(first.encode_batch(texts, max_length=8)[0], second.encode_batch(texts, max_length=8)[0])


def test_lowercase_option():
    corpus = ["Great GREAT great"] * 20
    cased = SubwordTokenizer.train(corpus, vocab_size=100, min_frequency=1, lowercase=False)
    uncased = SubwordTokenizer.train(corpus, vocab_size=100, min_frequency=1, lowercase=True)
    assert cased.encode_ids(["Great"], max_length=10) != cased.encode_ids(["great"], max_length=10)
    assert uncased.encode_ids(["Great"], max_length=10) == uncased.encode_ids(["great"], max_length=10)


@pytest.mark.parametrize("kwargs", [{"vocab_size": 3}, {"min_frequency": 0}])
def test_bad_training_options(kwargs):
    with pytest.raises(ValueError):
        SubwordTokenizer.train(["a b c"], **kwargs)


def test_failed_save_leaves_no_temporary_file(tokenizer, tmp_path):
    target = tmp_path / "tokenizer.json"
    (target / "occupied").mkdir(parents=True)  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        tokenizer.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


def test_training_on_a_single_string_is_refused():
    with pytest.raises(TypeError, match="single string"):
        SubwordTokenizer.train("a whole corpus in one string", vocab_size=50)
