"""Data layer: official-format loaders, your own data, splits, a subword tokenizer, torch datasets.

Typical use::

    train = load_dataset("imdb", split="train", data_dir="shared/data")
    train_idx, val_idx = train_val_split(len(train), val_fraction=0.1, seed=0)
    tokenizer = load_or_train_tokenizer(run_dir / "tokenizer.json", train.subset(train_idx).texts, vocab_size=8000)
    loader = DataLoader(TextClassificationDataset(train.subset(train_idx), tokenizer, 512),
                        batch_size=32, shuffle=True, collate_fn=collate_text)

Your own data goes through the same call, named ``SCHEME:PATH``::

    train = load_dataset("csv:reviews.csv", split="train",
                         options=DataOptions(text_column="review", label_column="sentiment"))
    images = load_dataset("imagefolder:photos", split="test")
"""

from asap.data.containers import ImageData, TextData
from asap.data.custom import DataFileError, DataNotFoundError, DataOptions
from asap.data.hf_files import load_hf
from asap.data.image_folder import load_image_folder
from asap.data.image_loaders import read_cifar100_binary, read_idx_ubyte
from asap.data.paths import DEFAULT_DATA_ENV, resolve_data_dir
from asap.data.registry import (
    DATA_SOURCES,
    DATASETS,
    DatasetInfo,
    DatasetLoader,
    DataSource,
    DatasetSpec,
    dataset_info,
    load_dataset,
    parse_dataset_spec,
    register_dataset,
)
from asap.data.splits import stratified_head, stratified_split, train_val_split
from asap.data.table_files import load_csv, load_jsonl
from asap.data.text_loaders import clean_ag_news_text, clean_imdb_text, read_zhang_csv, unescape_zhang_text
from asap.data.tokenizer import PAD_ID, PretrainedTokenizer, SubwordTokenizer, load_or_train_tokenizer
from asap.data.torch_datasets import (
    ImageClassificationDataset,
    TextClassificationDataset,
    channel_mean_std,
    collate_image,
    collate_text,
)

__all__ = [
    "DATASETS",
    "DATA_SOURCES",
    "DEFAULT_DATA_ENV",
    "PAD_ID",
    "DataFileError",
    "DataNotFoundError",
    "DataOptions",
    "DataSource",
    "DatasetInfo",
    "DatasetLoader",
    "DatasetSpec",
    "ImageClassificationDataset",
    "ImageData",
    "PretrainedTokenizer",
    "SubwordTokenizer",
    "TextClassificationDataset",
    "TextData",
    "channel_mean_std",
    "clean_ag_news_text",
    "clean_imdb_text",
    "collate_image",
    "collate_text",
    "dataset_info",
    "load_csv",
    "load_dataset",
    "load_hf",
    "load_image_folder",
    "load_jsonl",
    "load_or_train_tokenizer",
    "parse_dataset_spec",
    "read_cifar100_binary",
    "read_idx_ubyte",
    "read_zhang_csv",
    "register_dataset",
    "resolve_data_dir",
    "stratified_head",
    "stratified_split",
    "train_val_split",
    "unescape_zhang_text",
]
