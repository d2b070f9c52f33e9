"""megatron_tokenformer/evaluation.py: windowing and averaging against a plain computation, text input, errors.
(The end-to-end use through tools/evaluate_checkpoint.py is in tests/docs/test_workflow_commands.py.)"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.data.tokenizer import NullTokenizer
from megatron_tokenformer.evaluation import EvaluationError, evaluate_tokens, text_tokens
from megatron_tokenformer.model import TokenformerLM


def tiny_model():
    cfg = TokenformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=40,
                            qkv_num_param_tokens=4, proj_num_param_tokens=4, ffn_num_param_tokens=8,
                            make_vocab_size_divisible_by=16, init_method_std=0.3, value_init=0.3)
    return TokenformerLM(cfg, seed=3).eval()


def test_loss_is_the_token_mean_over_non_overlapping_windows():
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 40, size=8 * 5 + 3)  # 5 windows of 9 tokens, a remainder
    result = evaluate_tokens(model, tokens, seq_length=8, micro_batch_size=2)
    losses = []
    with torch.no_grad():
        for i in range(5):
            w = torch.as_tensor(tokens[i * 8:i * 8 + 9]).long()[None]
            logits = model(w[:, :-1])[..., :40].double()  # true vocabulary only
            losses.append(F.cross_entropy(logits[0], w[0, 1:], reduction="none"))
    expected = torch.cat(losses).mean().item()
    assert (result.samples, result.tokens) == (5, 40)
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(np.exp(expected), rel=1e-6)
    assert evaluate_tokens(model, tokens, 8, micro_batch_size=7, max_samples=2).tokens == 16


def test_text_documents_end_with_eod(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("1 2 3\n4\n\n\n5 6\n")  # NullTokenizer: text is integer ids; two blank-line documents
    tok = NullTokenizer(vocab_size=20)
    ids = text_tokens([str(path)], tok)
    assert ids.tolist() == [1, 2, 3, 4, tok.eod, 5, 6, tok.eod]
    with pytest.raises(EvaluationError, match="--text"):
        text_tokens([str(tmp_path / "missing.txt")], tok)


def test_errors_name_the_problem():
    model = tiny_model()
    with pytest.raises(EvaluationError, match="fewer than one window"):
        evaluate_tokens(model, np.arange(5), seq_length=8)
    with pytest.raises(EvaluationError, match=r"token id 45 is outside the model's vocabulary \(40\)"):
        evaluate_tokens(model, np.full(20, 45), seq_length=8)
