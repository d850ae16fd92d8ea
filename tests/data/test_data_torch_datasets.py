import pytest
import torch
from torch.utils.data import DataLoader

from asap.data import (
    ImageClassificationDataset,
    ImageData,
    SubwordTokenizer,
    TextClassificationDataset,
    TextData,
    channel_mean_std,
    collate_image,
    collate_text,
)

TEXTS = ["good film", "bad film, bad plot", "a film", "good good good good good plot", "plot"]


@pytest.fixture(scope="module")
def text_data():
    return TextData(TEXTS, torch.tensor([1, 0, 0, 1, 0]), ("neg", "pos"))


@pytest.fixture(scope="module")
def tokenizer():
    return SubwordTokenizer.train(TEXTS * 5, vocab_size=60, min_frequency=1)


def test_text_dataset_items_are_the_tokenizer_ids(text_data, tokenizer):
    dataset = TextClassificationDataset(text_data, tokenizer, 4)
    assert len(dataset) == len(TEXTS)
    expected = tokenizer.encode_ids(TEXTS, max_length=4)
    for i in range(len(TEXTS)):
        ids, label = dataset[i]
        assert ids.dtype == torch.int64 and ids.tolist() == expected[i]
        assert label.dtype == torch.int64 and int(label) == int(text_data.labels[i])
    assert dataset.lengths.tolist() == [len(row) for row in expected]


def test_collate_text_matches_encode_batch(text_data, tokenizer):
    dataset = TextClassificationDataset(text_data, tokenizer, 6)
    batch = collate_text([dataset[i] for i in (0, 3, 4)])
    input_ids, padding_mask = tokenizer.encode_batch([TEXTS[i] for i in (0, 3, 4)], max_length=6)
    assert torch.equal(batch["input_ids"], input_ids) and torch.equal(batch["padding_mask"], padding_mask)
    assert batch["labels"].tolist() == [1, 1, 0] and batch["labels"].dtype == torch.int64
    assert batch["input_ids"].shape[1] == int(dataset.lengths[[0, 3, 4]].max())


def test_text_dataloader(text_data, tokenizer):
    loader = DataLoader(TextClassificationDataset(text_data, tokenizer, 8), batch_size=2, collate_fn=collate_text)
    batches = list(loader)
    assert [b["labels"].numel() for b in batches] == [2, 2, 1]
    assert all(bool(b["padding_mask"][:, 0].all()) for b in batches)  # [CLS] is always a real token


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 3, 8, 8), generator=generator, dtype=torch.uint8)
    return ImageData(pixels, torch.tensor([0, 1, 2, 0, 1, 2]), ("a", "b", "c"))


def test_normalisation(images):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    dataset = ImageClassificationDataset(images, mean=mean, std=std)
    image, label = dataset[2]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 8) and int(label) == 2
    for c in range(3):
        expected = (images.images[2, c].double() / 255 - mean[c]) / std[c]
        torch.testing.assert_close(image[c].double(), expected, rtol=1e-6, atol=1e-6)


def test_scalar_statistics_broadcast(images):
    a = ImageClassificationDataset(images, mean=0.5, std=0.25)[0][0]
    b = ImageClassificationDataset(images, mean=[0.5] * 3, std=[0.25] * 3)[0][0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    ({"mean": (0.5, 0.5), "std": 1.0}, "mean needs one value per channel"),
    ({"mean": 0.5, "std": (1.0, 0.0, 1.0)}, "std must be positive"),
    ({"mean": 0.5, "std": 1.0, "crop_padding": -1}, "crop_padding"),
    ({"mean": 0.5, "std": 1.0, "seed": -1}, "seed must be non-negative"),
])  # fmt: skip
def test_bad_options(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageClassificationDataset(images, **kwargs)


def _shifted(image, dy, dx):
    """``image`` moved by (dy, dx) pixels, zeros filling in: an independent translation."""
    out = torch.zeros_like(image)
    height, width = image.shape[1:]
    ys, yd = (slice(0, height - dy), slice(dy, height)) if dy >= 0 else (slice(-dy, height), slice(0, height + dy))
    xs, xd = (slice(0, width - dx), slice(dx, width)) if dx >= 0 else (slice(-dx, width), slice(0, width + dx))
    out[:, yd, xd] = image[:, ys, xs]
    return out


def test_augmentation_is_a_shift_and_maybe_a_flip(images):
    dataset = ImageClassificationDataset(images, mean=0.0, std=1.0, augment=True, crop_padding=2, seed=3)
    seen_flip = seen_plain = False
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for i in range(len(images)):
            augmented = dataset[i][0]
            original = images.images[i].float() / 255
            shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
            plain = any(torch.equal(augmented, _shifted(original, dy, dx)) for dy, dx in shifts)
            flipped = any(torch.equal(augmented, _shifted(original.flip(-1), dy, dx)) for dy, dx in shifts)
            assert plain or flipped
            seen_plain |= plain
            seen_flip |= flipped
    assert seen_plain and seen_flip


def test_augmentation_is_reproducible_and_changes_with_epoch(images):
    def epoch_images(seed, epoch):
        dataset = ImageClassificationDataset(images, mean=0.0, std=1.0, augment=True, seed=seed)
        dataset.set_epoch(epoch)
        return torch.stack([dataset[i][0] for i in range(len(images))])

    assert torch.equal(epoch_images(0, 1), epoch_images(0, 1))
    assert not torch.equal(epoch_images(0, 1), epoch_images(0, 2))
    assert not torch.equal(epoch_images(0, 1), epoch_images(1, 1))


def test_no_flip_option(images):
    dataset = ImageClassificationDataset(images, mean=0.0, std=1.0, augment=True, crop_padding=0, hflip=False)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        assert all(torch.equal(dataset[i][0], images.images[i].float() / 255) for i in range(len(images)))


def test_no_augmentation_by_default(images):
    dataset = ImageClassificationDataset(images, mean=0.0, std=1.0)
    dataset.set_epoch(5)
    assert torch.equal(dataset[1][0], images.images[1].float() / 255)


def test_collate_image(images):
    dataset = ImageClassificationDataset(images, mean=0.5, std=0.5)
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate_image)))
    assert batch["images"].shape == (4, 3, 8, 8) and batch["images"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 1, 2, 0]


def test_channel_mean_std(images):
    mean, std = channel_mean_std(images)
    pixels = images.images.double().div(255).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), pixels.mean(1))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), pixels.std(1, unbiased=False))
