"""Token-by-token generation with the KV cache: a folded model generates the original's tokens.

Greedy ``generate()`` on tiny random GPT-2 and OPT models (local configs), float32, fresh prompts of other
batch and length than the fold's example.  Identical tokens can only be promised where the float64 model's
top-2 logit margin is far above float32 rounding; the test asserts that margin first, so a failure says which
of the two broke.
"""

from __future__ import annotations

import pytest
import torch

import lightning_cbwc as lc

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 24


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=128)
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 0
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.OPTConfig(
        hidden_size=64,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        vocab_size=500,
        max_position_embeddings=128,
    )
    return transformers.OPTForCausalLM(cfg).eval()


def greedy(model, prompt, scores: bool = False):
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=True,
        pad_token_id=model.config.pad_token_id,
        output_scores=scores,
        return_dict_in_generate=scores,
    )


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_folded_model_generates_the_original_tokens(name):
    model = tiny(name)
    example = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    folded = lc.fold(model, (example,), {"use_cache": False})
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in folded.modules())
    prompt = torch.randint(3, 500, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        truth = greedy(model.double(), prompt, scores=True)
        model.float()
        margins = torch.stack(truth.scores).topk(2, dim=-1).values.diff(dim=-1).abs()
        assert margins.min() > 1e-4, "float64 near-tie: pick another seed"
        original = greedy(model, prompt)
        got = greedy(folded, prompt)
    assert torch.equal(original, truth.sequences)
    assert torch.equal(got, original)
