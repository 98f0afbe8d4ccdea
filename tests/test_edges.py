"""The edges of what the analysis sees: a minimal model per case that once came out wrongly "foldable".

Each model is folded in float64 and compared on fresh inputs of another batch size than the example:
equal to 1e-10, or the LayerNorm stays with a reason (never a silent change of output)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_fold_oracle, randomize_norm_affine
from torch import nn

import lightning_cbwc
from lightning_cbwc import RMSNorm, RMSNorm2d

D = 8


def _fresh_equal(model: nn.Module, folded: nn.Module, make) -> None:
    x = make(5)
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-10


def _fold(model: nn.Module, make) -> nn.Module:
    torch.manual_seed(0)
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.bias.normal_(0, 0.5)
                m.weight.uniform_(0.5, 1.5)
    folded = lightning_cbwc.fold(model, (make(2),), check=False)
    _fresh_equal(model, folded, make)
    return folded


def _tokens(n: int) -> torch.Tensor:
    return torch.randn(n, 3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))


class InsideAutocastOff(nn.Module):
    """The same LayerNorm module called at the top level and inside a region torch.export keeps as a
    higher-order op (HF disables autocast around rotary embeddings this way)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        h = self.fc(x)
        a = self.norm(h)
        with torch.autocast("cpu", enabled=False):
            b = self.norm(x + 1)  # not zero-mean: must stay LayerNorm here, so everywhere
        return self.head(a) + b.sum(-1, keepdim=True)


class InsideEnableGrad(InsideAutocastOff):
    def forward(self, x):
        h = self.fc(x)
        a = self.norm(h)
        with torch.enable_grad():
            b = self.norm(x + 1)
        return self.head(a) + b.sum(-1, keepdim=True)


class InsideCond(InsideAutocastOff):
    def forward(self, x):
        a = self.norm(self.fc(x))
        b = torch.cond(x.sum() > 0, lambda t: self.norm(t + 1), lambda t: self.norm(t - 1), (x,))
        return self.head(a) + b.sum(-1, keepdim=True)


@pytest.mark.parametrize("cls", [InsideAutocastOff, InsideEnableGrad, InsideCond])
def test_a_norm_also_called_inside_a_higher_order_region_stays(cls):
    model = cls()
    plan = lightning_cbwc.analyze(model.double().eval(), (_tokens(2),))
    site = plan["norm"]
    assert not site.foldable and "higher-order" in site.reason
    folded = _fold(cls(), _tokens)
    assert isinstance(folded.norm, nn.LayerNorm)


class SharedEmbedding(nn.Module):
    """One table registered under two names (encoder and decoder share it) and tied to the head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(11, D)
        self.encoder_embed = self.shared
        self.decoder_embed = self.shared
        self.enc_norm = nn.LayerNorm(D)
        self.dec_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 11, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, ids):
        e = self.enc_norm(self.encoder_embed(ids))  # foldable if the table is centered at the lookup...
        skip = self.decoder_embed(ids).sum(-1, keepdim=True)  # ...but the other name's lookup reads it too
        return self.head(e) + skip


def test_an_embedding_under_two_names_tied_to_the_head():
    def ids(n):
        return torch.randint(0, 11, (n, 4), generator=torch.Generator().manual_seed(n))

    _fold(SharedEmbedding(), ids)


class AddmmRowBias(nn.Module):
    """addmm with a (1, out) bias: the bias must be centered over its last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D))
        self.bias = nn.Parameter(torch.randn(1, D) + 1.0)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.norm(torch.addmm(self.bias, x, self.weight)))


def test_addmm_with_a_2d_bias():
    folded = _fold(AddmmRowBias(), lambda n: torch.randn(n, D, dtype=torch.float64))
    assert isinstance(folded.norm, RMSNorm)


def test_the_mean_output_of_native_layer_norm_carries_the_shift():
    """Seen through the shift rule directly: the mean output moves with the centering shift, so a writer
    whose shift reaches the model output through it is unsafe."""
    from lightning_cbwc.analysis.facts import Multi, Shift
    from lightning_cbwc.analysis.rules import LayerNormOp

    class Ctx:
        args = ("x", [D], None, None)
        where = "in norm"

        def shift(self, a):
            return Shift(frozenset({1}), frozenset({"fc.bias"})) if a == "x" else None

        def shape(self, a):
            return (2, D)

        def escape(self, s, why):
            raise AssertionError(why)

    out = LayerNormOp(multi=True).shift(Ctx())
    assert isinstance(out, Multi) and out.items[0] is None and out.items[1].writers == {"fc.bias"}


class DataDependentShape(nn.Module):
    """A boolean-mask selection gives a tensor whose size depends on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        h = self.norm(self.fc(x))
        kept = h[h.sum(-1) > 0]
        return self.head(h) + kept.sum()


def test_data_dependent_shapes_do_not_crash_the_analysis():
    folded = _fold(DataDependentShape(), lambda n: torch.randn(n, D, dtype=torch.float64))
    assert isinstance(folded.norm, RMSNorm)


class SharedBiasConsumer(nn.Module):
    """The norm feeds ``a``, whose bias ``b`` shares: fusing beta into it would change ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.a = nn.Linear(D, 4)
        self.b = nn.Linear(D, 4)
        self.b.bias = self.a.bias

    def forward(self, x):
        return self.a(self.norm(self.fc(x))) + self.b(x)


class ReadsGamma(nn.Module):
    """The forward reads the norm's gamma itself: fuse_affine must not set it to None."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.a = nn.Linear(D, 4)

    def forward(self, x):
        return self.a(self.norm(self.fc(x))) * self.norm.weight.sum()


@pytest.mark.parametrize("cls", [SharedBiasConsumer, ReadsGamma])
def test_fuse_affine_only_rewrites_private_parameters(cls):
    torch.manual_seed(0)
    model = cls().double().eval()
    with torch.no_grad():
        model.norm.bias.normal_()
        model.norm.weight.uniform_(0.5, 1.5)

    def make(n):
        return torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))

    folded = lightning_cbwc.fold(model, (make(2),), fuse_affine=True, check=False)
    assert folded.cbwc_fused == [] and folded.norm.weight is not None
    _fresh_equal(model, folded, make)


class TaggedLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass with the stock forward (it only adds a method)."""

    def describe(self) -> str:
        return "tagged"


class CustomForwardLayerNorm(nn.LayerNorm):
    """A subclass that changes the forward: not a LayerNorm the analysis may swap."""

    def forward(self, x):
        return super().forward(x) * 2


class FunctionalLayerNorm(nn.LayerNorm):
    """Its own forward, which is the module's layer_norm all the same: swapped (read off the captured call)."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class OtherEpsLayerNorm(nn.LayerNorm):
    """A layer_norm with an eps of its own, not the module's: an RMSNorm with ``self.eps`` would differ."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, 1e-2)


@pytest.mark.parametrize(
    "cls, swapped",
    [
        (TaggedLayerNorm, True),
        (FunctionalLayerNorm, True),
        (CustomForwardLayerNorm, False),
        (OtherEpsLayerNorm, False),
    ],
)
def test_layernorm_subclasses_with_the_stock_forward_fold(cls, swapped):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.norm = cls(D)
            self.head = nn.Linear(D, 2)

        def forward(self, x):
            return self.head(self.norm(self.fc(x)))

    folded = _fold(Net(), lambda n: torch.randn(n, D, dtype=torch.float64))
    assert isinstance(folded.norm, RMSNorm) == swapped


class InPlaceStream(nn.Module):
    """``h += r`` and ``h *= c`` on the stream (HF Falcon's ``mlp_output += attention_output``, CTRL's
    ``inputs_embeds *= sqrt(d)``); ``mode`` adds the aliasing traps an in-place rule must not fold."""

    def __init__(self, mode: str = "private") -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.mode == "view_read_later":  # a view of h, read after h changes in place
            v = h[..., :]
            h += 1.0
            return self.head(self.norm(v))
        if self.mode == "write_through_view":  # part of h overwritten through a view
            h[..., :2] += 1.0
            return self.head(self.norm(h))
        if self.mode == "input":  # the model writes to its own input
            x += 1.0
            return self.head(self.norm(self.a(x)))
        h += self.b(x)
        h *= 2.0
        h.sub_(self.b(x), alpha=0.5)
        return self.head(self.norm(h))


def test_in_place_ops_on_a_private_tensor_fold():
    folded = _fold(InPlaceStream(), _tokens)
    assert isinstance(folded.norm, RMSNorm)


@pytest.mark.parametrize("mode", ["view_read_later", "write_through_view"])
def test_in_place_ops_that_other_readers_see_keep_the_norm(mode):
    model = InPlaceStream(mode).double().eval()
    plan = lightning_cbwc.analyze(model, (_tokens(2),))
    assert not plan.foldable and plan.sites[0].reason
    folded = lightning_cbwc.fold(model, (_tokens(2),))  # nothing folded: same function
    _fresh_equal(model, folded, _tokens)


def test_a_model_that_writes_to_its_input_folds_and_leaves_the_example_alone():
    model = InPlaceStream("input").double().eval()
    example = _tokens(2)
    before = example.clone()
    folded = lightning_cbwc.fold(model, (example,))
    assert torch.equal(example, before)
    assert isinstance(folded.norm, RMSNorm)
    x = _tokens(5)
    with torch.no_grad():
        assert float((folded(x.clone()) - model(x.clone())).abs().max()) <= 1e-12


def _hf_folds_every_layernorm(model: nn.Module) -> None:
    """Every LayerNorm of an HF causal LM folds, float64-exact on fresh ids of other batch and length."""
    no_cache = {"use_cache": False}
    model = model.eval().double()
    folded = lightning_cbwc.fold(model, (torch.randint(300, (2, 9)),), no_cache)
    assert all(s.foldable for s in folded.cbwc_plan.sites), str(folded.cbwc_plan)
    ids = torch.randint(300, (3, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(ids, **no_cache).logits, folded(ids, **no_cache).logits
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-10


@pytest.mark.parametrize(
    "arch",
    [
        {"new_decoder_architecture": False, "parallel_attn": True},
        {"new_decoder_architecture": False, "parallel_attn": False},
        {"new_decoder_architecture": True, "num_kv_heads": 2},
    ],
    ids=["falcon-7b-style", "sequential", "falcon-40b-style"],
)
def test_hf_falcon_folds_every_layernorm(arch):
    """``mlp_output += attention_output``: an in-place add on the stream."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **arch
    )
    _hf_folds_every_layernorm(transformers.FalconForCausalLM(cfg))


def test_hf_ctrl_scaled_embeddings_in_place_fold():
    """``inputs_embeds *= sqrt(d)``: an in-place scale of the embeddings."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.CTRLConfig(vocab_size=300, n_embd=32, n_layer=2, n_head=4, dff=64, n_positions=64)
    _hf_folds_every_layernorm(transformers.CTRLLMHeadModel(cfg))


def _tiny_biogpt(**overrides) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = {
        "vocab_size": 300,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "scale_embedding": True,
    }
    return transformers.BioGptForCausalLM(transformers.BioGptConfig(**{**cfg, **overrides}))


def test_hf_biogpt_scaled_embedding_subclass_tied_folds(tmp_path):
    """``BioGptScaledWordEmbedding(nn.Embedding)`` (lookup times sqrt(d)) tied to the head: centered at its
    output by a hook (its class kept); every LayerNorm folds, and the export reloads with the hook."""
    from lightning_cbwc.centering import centers_lookup_output
    from lightning_cbwc.export import export, load_folded

    model = _tiny_biogpt()
    _hf_folds_every_layernorm(model)
    model = model.float().eval()
    ids = torch.randint(300, (2, 9))
    folded = lightning_cbwc.fold(model, (ids,), {"use_cache": False})
    emb = folded.biogpt.embed_tokens
    assert type(emb) is type(model.biogpt.embed_tokens) and centers_lookup_output(emb)
    assert not centers_lookup_output(model.biogpt.embed_tokens)  # the original is left alone
    export(folded, tmp_path, "safetensors", (ids,), {"use_cache": False})
    loaded = load_folded(tmp_path)
    assert centers_lookup_output(loaded.biogpt.embed_tokens)
    fresh = torch.randint(300, (3, 11))
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(fresh, use_cache=False).logits
        own = model(fresh, use_cache=False).logits
        got = loaded(fresh, use_cache=False).logits

    def rel(t):
        return float((t.double() - truth).abs().max() / truth.pow(2).mean().sqrt())

    assert rel(got) <= 2 * rel(own) + 1e-6


class ScaledTable(nn.Embedding):
    """An Embedding subclass whose forward adds to the rows: not a scaled lookup, so not centered at its output."""

    def forward(self, ids):
        return super().forward(ids) + self.weight[:1]


def test_embedding_subclass_that_adds_is_not_centered_at_its_output():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = ScaledTable(20, 8)
            self.norm = nn.LayerNorm(8)

        def forward(self, ids):
            h = self.norm(self.emb(ids))
            return h @ self.emb.weight.T

    model = Tied().double().eval()
    site = lightning_cbwc.analyze(model, (torch.randint(20, (2, 5)),))["norm"]
    assert not site.foldable, site


def test_hf_biogpt_cbwc_trains_like_layernorm():
    """convert() with the scaled, tied embedding centered by its hook: float64 losses equal LayerNorm's."""
    ln = _tiny_biogpt(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layerdrop=0.0)
    ln = ln.double().train()
    cb = copy.deepcopy(ln)
    plan = lightning_cbwc.convert(cb, (torch.randint(300, (2, 9)),), {"use_cache": False})
    assert all(s.foldable for s in plan.sites)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ln, cb)]
    lightning_cbwc.attach(opts[1], cb)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(300, (3, 11), generator=g)
        losses = []
        for m, opt in zip((ln, cb), opts, strict=True):
            opt.zero_grad()
            loss = m(ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-10 * abs(losses[0])


def test_hf_bart_scaled_shared_embedding_folds_both_embedding_norms():
    """BART: one ``BartScaledWordEmbedding`` shared by encoder, decoder and the tied head; post-LN, so the two
    embedding LayerNorms fold and the rest keep theirs (each reads a LayerNorm's output)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        scale_embedding=True,
    )
    model = transformers.BartForConditionalGeneration(cfg).eval().double()

    def inputs(batch, src, tgt, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 100, (batch, src), generator=g)
        return ids, {
            "decoder_input_ids": torch.randint(3, 100, (batch, tgt), generator=g),
            "use_cache": False,
        }

    ids, kw = inputs(2, 9, 7, 0)
    folded = lightning_cbwc.fold(model, (ids,), kw)
    folds = {s.name for s in folded.cbwc_plan.foldable}
    assert folds == {"model.encoder.layernorm_embedding", "model.decoder.layernorm_embedding"}
    ids, kw = inputs(3, 12, 5, 1)
    with torch.no_grad():
        ref, got = model(ids, **kw).logits, folded(ids, **kw).logits
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-10


class PartRowGather(nn.Module):
    """``gather`` with an index narrower than the rows: picks the first half of each centered row."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D // 2)

    def forward(self, x):
        h = self.proj(x)
        idx = torch.arange(h.shape[1], device=h.device).flip(0)
        return self.norm(torch.gather(h, 1, idx.view(1, -1, 1).expand(h.shape[0], -1, D // 2)))


def test_gather_of_part_of_each_row_keeps_its_layer_norm():
    def make(b):
        return torch.randn(b, 6, D, dtype=torch.float64)

    folded = _fold(PartRowGather(), make)
    site = folded.cbwc_plan["norm"]
    assert not site.foldable and "part of each row" in site.reason, site
    assert isinstance(folded.norm, nn.LayerNorm)


def _tiny_vit_mae(cls_name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTMAEConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        mask_ratio=0.5,
    )
    return getattr(transformers, cls_name)(cfg).eval().double()


@pytest.mark.parametrize("cls_name", ["ViTMAEModel", "ViTMAEForPreTraining"])
def test_hf_vit_mae_folds_every_layernorm(cls_name):
    """ViT-MAE shuffles tokens with ``gather`` on an index ``unsqueeze(-1).repeat(1, 1, d).to(device)``
    (whole rows picked): every LayerNorm folds, the decoder's with its mask token, exact on fresh noise."""
    model = _tiny_vit_mae(cls_name)

    def inputs(batch, seed):
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(batch, 3, 32, 32, generator=g, dtype=torch.float64)
        return (pixels,), {"noise": torch.rand(batch, 16, generator=g, dtype=torch.float64)}

    args, kwargs = inputs(2, 0)
    folded = lightning_cbwc.fold(model, args, kwargs)
    assert folded.cbwc_plan.sites and all(s.foldable for s in folded.cbwc_plan.sites), str(folded.cbwc_plan)
    assert_fold_oracle(model, folded, [inputs(3, 1), inputs(1, 2)])


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """torchvision's ``LayerNorm2d``: channels moved last, the module's layer_norm, moved back; the traps move
    them back to another place (H and W swapped) or add the input."""

    def __init__(self, channels: int, mode: str = "stock") -> None:
        super().__init__(channels)
        self.mode = mode

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        if self.mode == "swap_hw":
            return y.permute(0, 3, 2, 1)
        y = y.permute(0, 3, 1, 2)
        return y + x if self.mode == "residual" else y


@pytest.mark.parametrize("mode, swapped", [("stock", True), ("swap_hw", False), ("residual", False)])
def test_channels_first_layernorm_subclass_is_read_off_the_graph(mode, swapped):
    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, D, 2, stride=2)
            self.norm = ChannelsFirstLayerNorm(D, mode)
            self.head = nn.Conv2d(D, 2, 1)

        def forward(self, x):
            return self.head(self.norm(self.conv(x)))

    folded = _fold(Stem(), lambda n: torch.randn(n, 3, 8, 8, dtype=torch.float64))
    assert isinstance(folded.norm, RMSNorm2d) == swapped, folded.cbwc_plan
    (site,) = folded.cbwc_plan.sites
    assert site.foldable == swapped and (site.layout == "channels_first" or not swapped), site


def test_torchvision_convnext_folds_its_stem_layernorm2d():
    """torchvision's ConvNeXt: the stem ``LayerNorm2d`` (after the patchify conv) becomes RMSNorm2d; the rest
    read the residual stream or a depthwise conv.  Exact on fresh images of other sizes."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5).double().eval()
    randomize_norm_affine(model, std=0.5)
    folded = lightning_cbwc.fold(model, (torch.randn(2, 3, 32, 32, dtype=torch.float64),))
    assert [s.name for s in folded.cbwc_plan.foldable] == ["features.0.1"], folded.cbwc_plan
    assert isinstance(folded.features[0][1], RMSNorm2d)
    assert type(model.features[0][1]).__name__ == "LayerNorm2d"  # the original is left alone
    g = torch.Generator().manual_seed(1)
    fresh = [
        torch.randn(3, 3, 48, 48, generator=g, dtype=torch.float64),
        torch.randn(1, 3, 32, 64, generator=g, dtype=torch.float64),
    ]
    assert_fold_oracle(model, folded, [(x,) for x in fresh])


class ValueIntoStream(nn.Module):
    """Pre-LN attention through ``scaled_dot_product_attention`` whose merged heads are added to the stream with
    no output projection: the value projection writes into the stream.  Traps: the value also used as the key,
    or read by the mask (centering it changes the attention weights)."""

    def __init__(self, heads: int, mode: str = "qkv") -> None:
        super().__init__()
        self.heads, self.mode = heads, mode
        self.inp = nn.Linear(D, D)
        self.ln1 = nn.LayerNorm(D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        h = self.inp(x)
        bsz, t, _ = h.shape
        z = self.ln1(h)
        q, k, v = self.q(z), self.k(z), self.v(z)
        mask = v.sum(-1)[:, None, None, :] if self.mode == "mask_from_v" else None
        q, k, v = (u.view(bsz, t, self.heads, D // self.heads).transpose(1, 2) for u in (q, k, v))
        k = v if self.mode == "k_is_v" else k  # one node as key and value
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.head(self.norm(h + a.transpose(1, 2).reshape(bsz, t, D)))


@pytest.mark.parametrize(
    "heads, mode, reason",
    [
        (1, "qkv", None),
        (2, "qkv", "within each head"),
        (1, "k_is_v", "attention weights"),
        (1, "mask_from_v", "attention weights"),
    ],
)
def test_a_value_projection_through_sdpa_into_the_stream(heads, mode, reason):
    folded = _fold(ValueIntoStream(heads, mode), _tokens)
    site = folded.cbwc_plan["norm"]
    assert site.foldable == (reason is None), site
    if reason is not None:
        assert reason in site.reason, site
    else:
        assert {w.param for w in site.writers} >= {"v.weight", "v.bias"}


class SharedLayerScale(nn.Module):
    """One LayerScale ``g`` after the MLPs of two pre-LN blocks (a LayerScale shared by two blocks).  Traps:
    ``g`` also used elsewhere, or also after a writer whose output reaches no folded norm."""

    def __init__(self, mode: str = "blocks") -> None:
        super().__init__()
        self.mode = mode
        self.inp, self.f1, self.f2, self.f3 = (nn.Linear(D, D) for _ in range(4))
        self.g = nn.Parameter(torch.rand(D) + 0.5)
        self.ln1, self.ln2, self.norm = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.g * self.f1(self.ln1(h))
        h = h + self.g * self.f2(torch.relu(self.ln2(h)))
        out = self.head(self.norm(h))
        if self.mode == "other_use":
            out = out + (self.g * x).sum(-1, keepdim=True)
        elif self.mode == "other_writer":
            out = out + (self.g * self.f3(x)).sum(-1, keepdim=True)
        return out


@pytest.mark.parametrize(
    "mode, reason",
    [("blocks", None), ("other_use", "also used other than"), ("other_writer", "also scales f3")],
)
def test_a_layer_scale_shared_by_two_blocks(mode, reason):
    folded = _fold(SharedLayerScale(mode), _tokens)
    for name in ("ln2", "norm"):
        site = folded.cbwc_plan[name]
        assert site.foldable == (reason is None) and (reason is None or reason in site.reason), site
    if reason is None:
        assert {w.scale for w in folded.cbwc_plan.writers if w.scale} == {"g"}
        assert bool((folded.g == 1).all())


def test_a_shared_layer_scale_trains_like_layernorm():
    """convert(): both writers centered scaled by the one trainable LayerScale; float64 losses equal LN's."""
    torch.manual_seed(0)
    ln = SharedLayerScale().double().train()
    cb = copy.deepcopy(ln)
    plan = lightning_cbwc.convert(cb, (_tokens(2),))
    assert all(s.foldable for s in plan.sites), plan
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ln, cb)]
    lightning_cbwc.attach(opts[1], cb)
    for step in range(4):
        x, target = _tokens(3 + step), torch.randn(3 + step, 3, 2, dtype=torch.float64)
        losses = []
        for m, opt in zip((ln, cb), opts, strict=True):
            opt.zero_grad()
            loss = F.mse_loss(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-10 * abs(losses[0]), (step, losses)
