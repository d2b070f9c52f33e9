"""Data pipeline: tokenizers, Megatron-compatible indexed datasets, GPT samples, blending,
resumable data-parallel samplers. See docs/data.md."""

from .blending import BlendedDataset, parse_data_prefix
from .gpt_dataset import (
    GPTDataset,
    MockGPTDataset,
    build_train_valid_test_datasets,
    parse_split,
    split_document_ranges,
)
from .indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_fitting_dtype,
    merge_datasets,
)
from .samplers import MegatronPretrainingSampler, build_pretraining_data_loader
from .text_inputs import BadInputError
from .tokenizer import NullTokenizer, SentencePieceTokenizer, Tokenizer, TokenizerError, build_tokenizer

__all__ = [
    "BadInputError",
    "BlendedDataset",
    "DType",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "MegatronPretrainingSampler",
    "MockGPTDataset",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "best_fitting_dtype",
    "build_pretraining_data_loader",
    "build_tokenizer",
    "build_train_valid_test_datasets",
    "merge_datasets",
    "parse_data_prefix",
    "parse_split",
    "split_document_ranges",
]
