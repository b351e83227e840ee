"""The tiny megatron-core GPTModel on the CPU: build, forward, teardown, rebuild."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from mixer.megatron.model import ModelConfig, SDPAttention, build_model, teardown


def test_build_teardown_twice_in_one_process() -> None:
    cfg = ModelConfig()
    params = []
    for _ in range(2):
        model = build_model(cfg, seed=5)
        try:
            assert parallel_state.model_parallel_is_initialized()
            assert torch.distributed.is_initialized()
            tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length))
            positions = torch.arange(cfg.seq_length).expand(3, -1)
            per_token = model(tokens, positions, None, labels=tokens)
            assert per_token.shape == (3, cfg.seq_length) and per_token.dtype == torch.float32
            # An untrained model is close to uniform over the 257 tokens.
            assert abs(per_token.mean().item() - math.log(cfg.vocab_size)) < 0.5
            logits = model(tokens, positions, None)
            assert logits.shape == (3, cfg.seq_length, cfg.vocab_size)
            params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        finally:
            teardown()
        assert not parallel_state.model_parallel_is_initialized()
        assert not torch.distributed.is_initialized()
    assert torch.equal(params[0], params[1])  # same seed, same initial weights


def test_sdpa_attention_is_causal_softmax_attention() -> None:
    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True
    )
    attn = SDPAttention(config, layer_number=1).eval()  # eval: no attention dropout
    s, b, h, d = 5, 2, 2, 8
    q, k, v = (torch.randn(s, b, h, d) for _ in range(3))
    out = attn(q, k, v, None)
    assert out.shape == (s, b, h * d)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    ref = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v).reshape(s, b, h * d)
    assert torch.allclose(out, ref, atol=1e-5)


def test_model_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=30, num_attention_heads=4).validate()
