"""Exports reload in a fresh process: a timm ViT made with non-default kwargs (safetensors, rebuilt from
cbwc.json alone) and an HF causal LM called with a non-tensor input (``use_cache=False``) in every format."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from lightning_cbwc import fold
from lightning_cbwc.export import export

RELOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file
    from lightning_cbwc import load_folded

    cases = json.loads(sys.argv[1])
    for case in cases:
        data = load_file(case["data"])
        kwargs = {k: data[k] for k in case["tensor_kwargs"]}
        kwargs.update(case["const_kwargs"])
        args = [data[k] for k in case["args"]]
        if case["format"] == "onnx":
            import onnxruntime as ort
            sess = ort.InferenceSession(case["path"], providers=["CPUExecutionProvider"])
            names = [i.name for i in sess.get_inputs()]
            feeds = {n: data[n if n in data else case["args"][k]].numpy() for k, n in enumerate(names)}
            out = torch.from_numpy(sess.run(None, feeds)[0])
        else:
            model = load_folded(case["path"])
            with torch.no_grad():
                out = model(*args, **kwargs)
            out = out if isinstance(out, torch.Tensor) else out[0]
        ref = data["expected"]  # the original model in float64
        err = float((out.double() - ref).abs().max() / ref.pow(2).mean().sqrt())
        print(case["name"], err)
        assert err <= case["bound"], (case["name"], err, case["bound"])
    """
)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.pow(2).mean().sqrt())


def _bound(original32: torch.Tensor, ref64: torch.Tensor) -> float:
    """What an artefact may miss the float64 truth by: 2x the float32 original's own error, plus a floor."""
    return 2 * _rel(original32, ref64) + 1e-6


def _reload_in_fresh_process(cases: list[dict]) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, json.dumps(cases)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_timm_vit_with_non_default_kwargs_reloads_from_the_record_alone(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    folded = fold(model, (x,))
    export(folded, tmp_path / "vit-safetensors", "safetensors", (x,))
    arch = json.loads((tmp_path / "vit-safetensors" / "cbwc.json").read_text())["architecture"]
    assert arch["kwargs"] == {"num_classes": 5, "in_chans": 3, "img_size": 32, "patch_size": 8}
    fresh = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(fresh.double())
        bound = _bound(model(fresh), expected)
    save_file({"x": fresh, "expected": expected}, tmp_path / "vit.safetensors")
    cases = []
    for fmt in ("safetensors", "pt2", "onnx"):
        result = export(folded, tmp_path / f"vit-{fmt}", fmt, (x,))
        path = result.path if fmt == "onnx" else tmp_path / f"vit-{fmt}"
        case = {"name": f"vit-{fmt}", "format": fmt, "path": str(path), "args": ["x"]}
        case |= {"data": str(tmp_path / "vit.safetensors"), "tensor_kwargs": [], "const_kwargs": {}}
        cases.append(case | {"bound": bound})
    _reload_in_fresh_process(cases)


def test_hf_causal_lm_with_use_cache_false_exports_and_reloads_in_every_format(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 40, (2, 8))
    example = {"input_ids": ids, "use_cache": False}
    folded = fold(model, (), example)
    fresh = torch.randint(0, 40, (3, 6))
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(input_ids=fresh, use_cache=False).logits
        bound = _bound(model(input_ids=fresh, use_cache=False).logits, expected)
    save_file({"input_ids": fresh, "expected": expected}, tmp_path / "lm.safetensors")
    cases = []
    for fmt in ("safetensors", "pt2", "onnx"):
        result = export(folded, tmp_path / fmt, fmt, (), example)
        assert result.ok, (fmt, result.max_error)
        path = tmp_path / fmt if fmt != "onnx" else result.path
        case = {
            "name": fmt,
            "format": fmt,
            "path": str(path),
            "args": [],
            "data": str(tmp_path / "lm.safetensors"),
        }
        case |= {"tensor_kwargs": ["input_ids"], "const_kwargs": {"use_cache": False}, "bound": bound}
        cases.append(case)
    record = json.loads((tmp_path / "pt2" / "cbwc.json").read_text())["exports"]["pt2"]
    assert "transformers.modeling_outputs" in record["imports"]
    out = _reload_in_fresh_process(cases)
    assert out.count("\n") == 3


@pytest.mark.parametrize("mode", ["project", "parametrize"])
def test_export_of_a_converted_model_needs_no_plan_and_reloads(tmp_path, mode):
    from test_exact_training import batch, one, stream_net, train

    from lightning_cbwc import load_folded

    net = stream_net(p=0.2)  # two sites exact at inference only: export folds them too
    train(net, one(torch.optim.Adam, lr=1e-2), steps=2, mode=mode)
    result = export(net, tmp_path, "safetensors", (batch(0)[0],))
    assert result.ok and len(result.plan.foldable) == 3
    loaded = load_folded(tmp_path, stream_net(p=0.2))
    fresh = batch(7, n=5)[0]
    with torch.no_grad():
        ref, out = net.eval()(fresh), loaded(fresh)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-10
    assert any(type(m).__name__ == "ParametrizationList" for m in net.modules()) == (mode == "parametrize")
