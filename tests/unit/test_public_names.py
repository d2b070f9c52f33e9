"""The package's public names (megatron_tokenformer/__init__.py): the family-neutral names and the first
(Tokenformer) names a user imports today are the same objects, from the package and from their modules."""

import importlib

import pytest

import megatron_tokenformer

NEUTRAL_AND_FIRST = [("ModelConfig", "TokenformerConfig", "megatron_tokenformer.config"),
                     ("GPTModel", "TokenformerLM", "megatron_tokenformer.model.language_model"),
                     ("LanguageModelEmbedding", "TokenformerEmbedding", "megatron_tokenformer.model.language_model")]


@pytest.mark.parametrize("neutral, first, module", NEUTRAL_AND_FIRST)
def test_both_names_import_and_are_the_same_object(neutral, first, module):
    home = importlib.import_module(module)
    assert getattr(home, neutral) is getattr(home, first)
    assert getattr(megatron_tokenformer, neutral) is getattr(megatron_tokenformer, first) is getattr(home, neutral)
    assert getattr(home, neutral).__name__ == neutral  # the class carries the neutral name
    assert {neutral, first} <= set(dir(megatron_tokenformer))


def test_model_package_exports_both_names():
    from megatron_tokenformer import model
    from megatron_tokenformer.model import GPTModel, LanguageModelEmbedding, TokenformerEmbedding, TokenformerLM
    assert GPTModel is TokenformerLM and LanguageModelEmbedding is TokenformerEmbedding
    names = {"GPTModel", "TokenformerLM", "LanguageModelEmbedding", "TokenformerEmbedding", "KVCache"}
    assert names <= set(model.__all__)


def test_the_first_names_build_the_baseline_gpt_too():
    from megatron_tokenformer import TokenformerConfig, TokenformerLM
    from megatron_tokenformer.model.transformer import TransformerBlock, transformer_config
    config = transformer_config(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=20)
    assert isinstance(config, TokenformerConfig)
    assert isinstance(TokenformerLM(config).layers[0], TransformerBlock)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchModel"):
        megatron_tokenformer.NoSuchModel  # noqa: B018
