"""The recipes (LightningCLI programs), their YAML configs, ``lightning-cbwc run``, the demo and the
reproduction script, on tiny slices of their real data.

Each fit runs in this process through the recipe's CLI class (``main(args=[...])``) with a tiny model and
``--trainer.fast_dev_run`` (or two steps where a checkpoint is needed), no loggers, no timing.  The CBWC tests
need ``lightning_cbwc.CBWC`` (the callback) and check that converting at setup leaves the step-0 validation
metric exactly where the LayerNorm model has it.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lightning_cbwc
from lightning_cbwc.cli import recipes as recipes_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
HAS_CBWC = hasattr(lightning_cbwc, "CBWC")
needs_cbwc = pytest.mark.skipif(not HAS_CBWC, reason="lightning_cbwc.CBWC (the callback) is not exported yet")

# no loggers, no progress bar, no timing, no ONNX: the tests check the wiring, not the numbers
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--export.latency_batch=0",
    "--export.formats=[safetensors]",
]
TINY_VIT = ["--model.patch_size=7", "--model.embed_dim=32", "--model.depth=2", "--model.num_heads=2"]
TINY_FASHION = ["--data.train_size=64", "--data.val_size=32", "--data.test_size=32", "--data.batch_size=16"]
TINY_GPT = [
    "--data.plays=[hamlet]",
    "--data.block_size=32",
    "--data.batch_size=4",
    "--data.val_samples=8",
    "--model.n_layer=1",
    "--model.n_head=2",
    "--model.n_embd=32",
]


@pytest.fixture(autouse=True)
def _recipes_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``recipes`` importable from the repository root; a bare ``sys.argv`` (LightningCLI warns when it gets
    both ``args=`` and command-line arguments, and pytest's are there)."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setattr(sys, "argv", ["pytest"])


@pytest.fixture(scope="module")
def fashion_mnist() -> Path:
    from test_data import ensure_fashion_mnist

    return ensure_fashion_mnist()


def recipe_of(config: Path) -> str:
    for name in ("image_classification", "image_convnext", "text_generation", "finetune"):
        if config.name.startswith(name):
            return name
    raise AssertionError(f"which recipe runs {config.name}?")


def run_cli(recipe: str, *args: str):
    import importlib

    return importlib.import_module(f"recipes.{recipe}").main([str(a) for a in args])


def fit(config: str, *args: str):
    """``python recipes/RECIPE.py fit -c configs/CONFIG ARGS`` in this process; the CLI object."""
    return run_cli(recipe_of(Path(config)), "fit", "-c", config_arg(config), *args)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def export_report(run_dir: Path) -> dict:
    """The ``report`` section of the export folder's sidecar (``export/cbwc.json``)."""
    return json.loads((run_dir / "export" / "cbwc.json").read_text())["report"]


def config_arg(name: str) -> str:
    return str(REPO / "configs" / name)


# ------------------------------------------------------------------------------------------ configs


def test_every_recipe_has_ln_and_cbwc_configs() -> None:
    names = {c.name for c in CONFIGS}
    for recipe in (
        "image_classification",
        "image_convnext",
        "text_generation",
        "finetune_bert_genre_scratch",
    ):
        assert {f"{recipe}_ln.yaml", f"{recipe}_cbwc.yaml"} <= names
    assert {
        "finetune_vit_digits_ln.yaml",
        "finetune_vit_digits_cbwc.yaml",
        "finetune_vit_digits_cbwc_lora.yaml",
    } <= names
    assert {"finetune_minilm_genre_ln_lora.yaml", "finetune_minilm_genre_cbwc_lora.yaml"} <= names
    for config in CONFIGS:
        text = yaml.safe_load(config.read_text())
        callbacks = (text.get("trainer") or {}).get("callbacks") or []
        has_cbwc = any(c.get("class_path") == "lightning_cbwc.CBWC" for c in callbacks)
        assert has_cbwc == ("_cbwc" in config.stem), config.name


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if "_cbwc" in config.stem and not HAS_CBWC:
        pytest.skip("lightning_cbwc.CBWC (the callback) is not exported yet")
    with pytest.raises(SystemExit) as exit_:
        run_cli(recipe_of(config), "fit", "-c", config, "--print_config")
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run_dir"] == yaml.safe_load(config.read_text())["run_dir"]
    assert printed["checkpoint"]["dirpath"] == "{run_dir}/checkpoints"
    assert printed["export"]["enabled"] is True
    loggers = [lg["class_path"] for lg in printed["trainer"]["logger"]]
    assert loggers == ["lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.WandbLogger"]
    wandb = printed["trainer"]["logger"][1]["init_args"]
    assert wandb["offline"] is True and wandb["save_dir"] == "{run_dir}"


def test_run_command_is_the_recipe_fit(capsys: pytest.CaptureFixture[str]) -> None:
    config = config_arg("image_classification_ln.yaml")
    with pytest.raises(SystemExit):
        run_cli("image_classification", "fit", "-c", config, "--print_config")
    direct = capsys.readouterr().out
    with pytest.raises(SystemExit):
        recipes_cli.dispatch(["run", "image_classification", "-c", config, "--print_config"])
    assert capsys.readouterr().out == direct
    assert recipes_cli.recipe_args("text_generation", ["sample", "--ckpt", "x"])[0] == "sample"
    assert recipes_cli.recipe_args("finetune", ["-c", "x.yaml"])[:1] == ["fit"]
    assert recipes_cli.list_recipes() == [
        "finetune",
        "image_classification",
        "image_convnext",
        "text_generation",
    ]
    assert recipes_cli.dispatch(["inspect", "x"]) is None
    assert recipes_cli.dispatch(["run", "no_such_recipe"]) == 2


# ------------------------------------------------------------------------------ image classification


def test_image_classification_fit(fashion_mnist: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ln"
    cli = fit(
        "image_classification_ln.yaml",
        *QUIET,
        *TINY_VIT,
        *TINY_FASHION,
        "--trainer.fast_dev_run=2",
        f"--run_dir={run_dir}",
        "--validate_before_fit=true",
        "--test_after_fit=true",
    )
    assert cli.trainer.global_step == 2
    s = summary(run_dir)
    assert s["val"] and 0 <= s["val"][-1]["val/acc"] <= 1
    assert s["step0"]["step"] == 0 and s["test"]["test/acc"] >= 0 and s["step_ms"]["steps"] >= 1
    report = export_report(run_dir)
    assert report["plan"].startswith("5 of 5") and report["max_error"] < 1e-4
    assert report["trained_with_cbwc"] is False
    assert Path(report["artifacts"]["safetensors"]["path"]).is_file()
    sidecar = json.loads((run_dir / "export" / "cbwc.json").read_text())  # the plan is a section of it too
    assert len(sidecar["plan"]["sites"]) == 5
    assert not (run_dir / "export" / "report.json").exists()


@needs_cbwc
def test_image_classification_cbwc_step0_matches_ln(fashion_mnist: Path, tmp_path: Path) -> None:
    common = [*QUIET, *TINY_VIT, *TINY_FASHION, "--trainer.fast_dev_run=1", "--validate_before_fit=true"]
    fit("image_classification_ln.yaml", *common, f"--run_dir={tmp_path / 'ln'}")
    cli = fit("image_classification_cbwc.yaml", *common, f"--run_dir={tmp_path / 'cbwc'}")
    ln, cbwc = summary(tmp_path / "ln")["step0"], summary(tmp_path / "cbwc")["step0"]
    assert cbwc["val/loss"] == pytest.approx(ln["val/loss"], rel=1e-5, abs=1e-6)
    assert cbwc["val/acc"] == ln["val/acc"]
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in cli.model.net.modules())
    report = export_report(tmp_path / "cbwc")
    assert report["trained_with_cbwc"] is True and report["max_error"] < 1e-4
    assert (tmp_path / "cbwc" / "cbwc_export").is_dir()  # the callback's export_dir, "{run_dir}" filled in


TINY_CONVNEXT = ["--model.dims=[8,16,16,16]", "--model.depths=[1,1,1,1]"]


@needs_cbwc
def test_image_convnext_replace_all_and_plain_swap(fashion_mnist: Path, tmp_path: Path) -> None:
    """ConvNeXt (exactness partially broken): the default CBWC folds the stem's LayerNorm only and keeps the
    block ones; replace="all" swaps every one, marks the rest approximate, and its export is the trained
    network (its exact site still LayerNorm's function); the plain swap leaves no LayerNorm and centers nothing."""
    common = [*QUIET, *TINY_CONVNEXT, *TINY_FASHION, "--trainer.fast_dev_run=1"]
    exact = fit("image_convnext_cbwc.yaml", *common, f"--run_dir={tmp_path / 'cbwc'}")
    kept = [m for m in exact.model.net.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert kept and export_report(tmp_path / "cbwc")["max_error"] < 1e-4
    approx = fit(
        "image_convnext_cbwc.yaml",
        *common,
        "--trainer.callbacks.replace=all",
        f"--run_dir={tmp_path / 'all'}",
    )
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in approx.model.net.modules())
    report = export_report(tmp_path / "all")
    assert "swapped approximately" in report["plan"]
    assert report["errors"]["exact_sites_vs_layernorm"] < 1e-5 and report["max_error"] < 1e-5
    plain = fit(
        "image_convnext_ln.yaml",
        *common,
        "--trainer.callbacks+=recipes._callbacks.PlainRMSNorm",
        "--export.enabled=false",
        f"--run_dir={tmp_path / 'rms'}",
    )
    net = plain.model.net
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in net.modules())
    assert not torch.nn.utils.parametrize.is_parametrized(net.stem[0])
    assert net.stem[0].weight.mean(1).abs().max() > 1e-3  # nothing centered
    assert summary(tmp_path / "rms")["test"] is not None


def test_plain_rmsnorm_swap_keeps_everything_but_the_mean() -> None:
    """swap_every_norm: same parameters (objects), flags, hooks; RMSNorm's function (no mean removed)."""
    from lightning_cbwc.norm import RMSNorm
    from lightning_cbwc.surgery import swap_every_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)).double()
    ln = model[1]
    ln.eval()
    seen = []
    ln.register_forward_hook(lambda m, i, o: seen.append(1))
    weight, bias = ln.weight, ln.bias
    assert swap_every_norm(model) == ["1"]
    norm = model[1]
    assert isinstance(norm, RMSNorm) and norm.weight is weight and norm.bias is bias and not norm.training
    assert not norm.centered_input  # no zero-mean promise: RMSNorm on any input, on every backend
    x = torch.randn(5, 6, dtype=torch.float64)
    h = model[0](x)
    expected = h / h.pow(2).mean(-1, keepdim=True).add(ln.eps).sqrt() * weight + bias
    torch.testing.assert_close(norm(h), expected, rtol=1e-12, atol=1e-12)
    assert seen  # the user's hook moved over
    assert swap_every_norm(model) == []


# ----------------------------------------------------------------------------------- text generation


def test_text_generation_fit_and_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "gpt"
    cli = fit(
        "text_generation_ln.yaml",
        *QUIET,
        *TINY_GPT,
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.val_check_interval=2",
        "--test_after_fit=false",
        f"--run_dir={run_dir}",
    )
    model = cli.model
    assert model.hparams.vocab == cli.datamodule.vocab and model.hparams.block_size == 32
    assert model.net.config.n_positions == 32 and model.net.config.vocab_size == len(cli.datamodule.vocab)
    s = summary(run_dir)
    assert s["val"][-1]["val/ppl"] > 1
    assert export_report(run_dir)["max_error"] < 1e-4
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    capsys.readouterr()
    text = run_cli("text_generation", "sample", "--ckpt", ckpt, "--prompt", "HAMLET:", "--num_chars", "25")
    assert text.startswith("HAMLET:") and len(text) == len("HAMLET:") + 25
    assert text in capsys.readouterr().out
    greedy = [
        run_cli(
            "text_generation",
            "sample",
            "--ckpt",
            ckpt,
            "--temperature",
            "0",
            "--num_chars",
            "10",
            "--seed",
            str(s),
        )
        for s in (1, 2)
    ]
    assert greedy[0] == greedy[1]


# ----------------------------------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def vit_checkpoint(fashion_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image_classification LN checkpoint (two steps of a tiny ViT): the fine-tuning start."""
    run_dir = tmp_path_factory.mktemp("vit_pretrain")
    sys_argv = sys.argv
    sys.argv = ["pytest"]
    try:
        fit(
            "image_classification_ln.yaml",
            *QUIET,
            *TINY_VIT,
            *TINY_FASHION,
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--export.enabled=false",
            f"--run_dir={run_dir}",
        )
    finally:
        sys.argv = sys_argv
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


TINY_DIGITS = ["--data.init_args.train_size=64", "--data.init_args.batch_size=16"]


def test_finetune_vit_lora(vit_checkpoint: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ft"
    cli = fit(
        "finetune_vit_digits_ln.yaml",
        *QUIET,
        *TINY_DIGITS,
        f"--model.init_args.checkpoint={vit_checkpoint}",
        "--model.init_args.lora_r=4",
        "--trainer.fast_dev_run=2",
        f"--run_dir={run_dir}",
    )
    model = cli.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("net.head.") for n in trainable)
    pre = torch.load(vit_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    # the backbone started from the checkpoint (LoRA wraps qkv: its base layer holds the pretrained weight)
    assert torch.equal(model.net.patch_embed.proj.weight, pre["net.patch_embed.proj.weight"])
    s = summary(run_dir)
    assert s["step0"] is not None and s["trainable_params"] < s["params"]
    report = export_report(run_dir)
    assert report["max_error"] < 1e-4 and report["plan"].startswith("5 of 5")  # LoRA merged, then folded


def test_finetune_missing_checkpoint_says_what_to_run(tmp_path: Path) -> None:
    # jsonargparse wraps errors raised while instantiating a subclass-mode model in a ValueError
    with pytest.raises((FileNotFoundError, ValueError), match="image_classification.py fit"):
        fit(
            "finetune_vit_digits_ln.yaml",
            *QUIET,
            f"--model.init_args.checkpoint={tmp_path / 'nope.ckpt'}",
            f"--run_dir={tmp_path}",
        )


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_finetune_never_unpickles_code_from_a_checkpoint(tmp_path: Path, capsys) -> None:
    """A checkpoint carrying a pickled callable is refused by torch.load(weights_only=True), not executed."""
    from recipes.finetune import load_pretrained_vit

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _RunsCodeWhenUnpickled()}}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_pretrained_vit(str(path))
    assert "this ran" not in capsys.readouterr().out


@needs_cbwc
def test_finetune_vit_cbwc_step0_matches_ln(vit_checkpoint: Path, tmp_path: Path) -> None:
    common = [
        *QUIET,
        *TINY_DIGITS,
        f"--model.init_args.checkpoint={vit_checkpoint}",
        "--trainer.fast_dev_run=1",
    ]
    fit("finetune_vit_digits_ln.yaml", *common, "--model.init_args.lora_r=4", f"--run_dir={tmp_path / 'ln'}")
    fit(
        "finetune_vit_digits_cbwc_lora.yaml",
        *common,
        "--model.init_args.lora_r=4",
        f"--run_dir={tmp_path / 'cbwc'}",
    )
    ln, cbwc = summary(tmp_path / "ln")["step0"], summary(tmp_path / "cbwc")["step0"]
    assert cbwc["val/loss"] == pytest.approx(ln["val/loss"], rel=1e-5, abs=1e-6)
    assert cbwc["val/acc"] == ln["val/acc"]
    assert export_report(tmp_path / "cbwc")["max_error"] < 1e-4


TINY_GENRE = [
    "--data.init_args.lines_per_class=8",
    "--data.init_args.eval_lines_per_class=4",
    "--data.init_args.max_length=16",
    "--model.init_args.max_length=16",
    "--data.init_args.batch_size=4",
    "--trainer.fast_dev_run=1",
]


@pytest.mark.slow
def test_finetune_minilm_lora(tmp_path: Path) -> None:
    run_dir = tmp_path / "ln"
    cli = fit("finetune_minilm_genre_ln_lora.yaml", *QUIET, *TINY_GENRE, f"--run_dir={run_dir}")
    assert cli.model.hparams.lora_r == 8
    report = export_report(run_dir)
    assert report["plan"].startswith("1 of 13") and report["max_error"] < 1e-4  # post-LN: embeddings LN only
    if HAS_CBWC:  # the step-0 metric is the pretrained model's, with CBWC too
        fit("finetune_minilm_genre_cbwc_lora.yaml", *QUIET, *TINY_GENRE, f"--run_dir={tmp_path / 'cbwc'}")
        ln, cbwc = summary(run_dir)["step0"], summary(tmp_path / "cbwc")["step0"]
        assert cbwc["val/loss"] == pytest.approx(ln["val/loss"], rel=1e-5, abs=1e-6)
        assert cbwc["val/acc"] == ln["val/acc"]


def test_bert_from_scratch_config_overrides() -> None:
    from recipes.finetune import MiniLMClassifier

    overrides = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    model = MiniLMClassifier(pretrained=False, config_overrides=overrides, max_length=8)
    config = model.net.encoder.config
    assert (config.num_hidden_layers, config.hidden_size) == (1, 32)
    fresh = model.build_net()  # the same architecture again (what the export's LayerNorm reference uses)
    fresh.load_state_dict(model.net.state_dict())
    with pytest.raises(ValueError, match="pretrained: false"):
        MiniLMClassifier(pretrained=True, config_overrides=overrides)


# -------------------------------------------------------------------------------- demo / reproduce


@pytest.mark.slow
def test_demo(fashion_mnist: Path, tmp_path: Path) -> None:
    from recipes import demo

    argv = f"--out {tmp_path} --train-size 128 --test-size 64 --batch-size 32 --latency-batch 8 --repeats 2"
    assert demo.main(argv.split()) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["plan"].startswith("9 of 9")
    assert max(report["equivalence_error"].values()) < 1e-4
    assert {"PyTorch LayerNorm", "PyTorch folded (RMSNorm)"} <= set(report["latency_ms"])
    if "onnx" in report:
        assert report["onnx_test_acc"] == pytest.approx(report["test_acc"], abs=2 / 64)


def fake_run(folder: Path, acc: float, step0: float, step_ms: float) -> None:
    folder.mkdir(parents=True)
    data = {
        "train": [{"step": 1, "loss": 2.0}, {"step": 10, "loss": 1.0}],
        "val": [{"step": 10, "val/acc": acc - 0.01, "val/loss": 1.0}],
        "step0": {"step": 0, "val/acc": step0},
        "test": {"step": 10, "test/acc": acc},
        "step_ms": {"median": step_ms, "mean": step_ms, "steps": 9},
    }
    (folder / "summary.json").write_text(json.dumps(data))
    (folder / "export").mkdir()
    report = {"max_error": 2e-7, "latency_ms": {"layernorm": 10.0, "folded": 9.0}}
    (folder / "export" / "cbwc.json").write_text(json.dumps({"report": report}))


def test_reproduce_report_from_runs(tmp_path: Path) -> None:
    from recipes import reproduce

    out = tmp_path / "runs"
    for variant, accs in (("ln", (0.80, 0.82)), ("cbwc", (0.81, 0.83)), ("rms", (0.70, 0.71))):
        for seed, acc in enumerate(accs):
            fake_run(reproduce.run_dir(out, "finetune_vit", variant, seed), acc, 0.1, 5.0)
    results = tmp_path / "docs" / "results.md"
    argv = f"--report-only --seeds 2 --tasks finetune_vit --out {out} --results {results}"
    assert reproduce.main(argv.split()) == 0
    text = results.read_text()
    assert "| finetune_vit | LayerNorm | 2 | n/a | acc 0.8100 ± 0.0141 |" in text
    assert "| finetune_vit | CBWC + RMSNorm (exact) | 2 | n/a | acc 0.8200 ± 0.0141 |" in text
    assert (
        "| finetune_vit | RMSNorm (plain swap) | 2 | all swapped, none centered | acc 0.7050 ± 0.0071 |"
        in text
    )
    # 0.01 apart with a pooled std of 0.0141: within; plain RMSNorm 0.105 below: outside
    assert (
        "CBWC + RMSNorm (exact): acc 0.8200 ± 0.0141 vs LayerNorm's 0.8100 ± 0.0141: 0.0100 better, **within"
        in text
    )
    assert (
        "RMSNorm (plain swap): acc 0.7050 ± 0.0071 vs LayerNorm's 0.8100 ± 0.0141: 0.1050 worse, **outside"
        in text
    )
    assert "python recipes/finetune.py fit -c configs/finetune_vit_digits_cbwc.yaml" in text
    assert "PlainRMSNorm --export.enabled=false" in text
    assert "## Machine" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "docs" / "results" / "finetune_vit.png").is_file()


def test_reproduce_dry_run_lists_every_run(capsys: pytest.CaptureFixture[str]) -> None:
    from recipes import reproduce
    from recipes._tasks import TASKS

    assert reproduce.main(["--dry-run", "--seeds", "2", "--budget", "tiny"]) == 0
    commands = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    assert len(commands) == sum(len(t.variants) for t in TASKS) * 2  # (task, variant) x seeds
    assert all("--test_after_fit=true" in c for c in commands)
    all_runs = [c for c in commands if "/cbwc_all/" in c]
    assert all_runs and all("--trainer.callbacks.replace=all" in c and "_cbwc" in c for c in all_runs)
    plain = [c for c in commands if "/rms/" in c]
    assert plain and all("PlainRMSNorm" in c and "_ln" in c for c in plain)
    assert {t.name for t in TASKS} >= {"image_convnext", "bert_scratch", "text_generation_long"}
    assert reproduce.main(["--dry-run", "--seeds", "1", "--budget", "tiny", "--variants", "ln,rms"]) == 0
    commands = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    assert commands and all("/ln/" in c or "/rms/" in c for c in commands)


@pytest.mark.slow
@needs_cbwc
def test_reproduce_tiny(fashion_mnist: Path, tmp_path: Path) -> None:
    from recipes import reproduce
    from recipes._tasks import TASKS, VARIANT_LABEL

    results = tmp_path / "results.md"
    argv = f"--budget tiny --seeds 1 --out {tmp_path / 'runs'} --results {results}"  # every task, a few steps
    assert reproduce.main([*argv.split(), "--latency-repeats", "2"]) == 0
    text = results.read_text()
    for task in TASKS:
        for variant in task.variants:
            assert f"| {task.name} | {VARIANT_LABEL[variant]} | 1 |" in text, (task.name, variant)
    rows = {ln.split(" | ")[0] + ln.split(" | ")[1]: ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "swapped approximately" in rows['| bert_scratchCBWC + RMSNorm (replace="all")']
    assert "swapped approximately" in rows['| image_convnextCBWC + RMSNorm (replace="all")']
