"""The demo: train a small ViT with CBWC on Fashion-MNIST for one epoch on the CPU, fold it, export it to ONNX,
check the export against the trained model, and time LayerNorm vs folded inference.

    python -m recipes.demo                 # or: lightning-cbwc demo
    python -m recipes.demo --train-size 55000 --epochs 2 --mode parametrize --out runs/demo

A couple of minutes on 2 CPU cores with the defaults (20k training images, a 4-block ViT on 7x7 patches).
Needs Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) or ``--data-dir``.
Prints the test accuracy of the trained model and of the exported ONNX model, the equivalence error of the
folded model (PyTorch and ONNX) against the trained one, and the latencies; writes ``OUT/demo.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lightning-cbwc demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--train-size", type=int, default=20000, help="training images (default 20000)")
    p.add_argument("--test-size", type=int, default=None, help="test images (default: all 10000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--mode", choices=("project", "parametrize"), default="parametrize", help="CBWC training mode"
    )
    p.add_argument("--no-cbwc", action="store_true", help="train with LayerNorm; fold only after training")
    p.add_argument("--latency-batch", type=int, default=256, help="batch size of the latency comparison")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per model")
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def onnx_session(path: str | Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # No busy-waiting after a run: spinning ORT threads would slow the PyTorch model timed next to it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_runner(session):
    name = session.get_inputs()[0].name

    def call(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return call


@torch.inference_mode()
def accuracy(predict, loader) -> float:
    right = total = 0
    for x, y in loader:
        right += int((predict(x).argmax(-1) == y).sum())
        total += len(y)
    return right / max(total, 1)


def train(args: argparse.Namespace, out: Path, console, threads: int):
    """Train the demo ViT (with the CBWC callback unless ``--no-cbwc``); (model, datamodule, report)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lightning_cbwc import CBWC
    from lightning_cbwc.data import FashionMNISTDataModule
    from lightning_cbwc.data.fashion_mnist import DEFAULT_DIR
    from recipes.image_classification import ViTClassifier

    L.seed_everything(args.seed, verbose=False)
    dm = FashionMNISTDataModule(
        data_dir=args.data_dir or DEFAULT_DIR,
        batch_size=args.batch_size,
        val_size=2000,
        train_size=args.train_size,
        test_size=args.test_size,
        seed=args.seed,
    )
    model = ViTClassifier(
        patch_size=7, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, lr=3e-3, warmup_steps=30
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(out, name="csv"),
        callbacks=[] if args.no_cbwc else [CBWC(mode=args.mode, model_attr="net")],
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=20,
    )
    what = "LayerNorm" if args.no_cbwc else f"CBWC + RMSNorm ({args.mode})"
    console.print(
        f"training a ViT ({sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters) with {what} "
        f"on {args.train_size} Fashion-MNIST images, {args.epochs} epoch(s), {threads} thread(s)"
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - t0
    test_acc = float(trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"])
    report = {
        "trained_with": what,
        "train_images": len(dm.train_set),
        "epochs": args.epochs,
        "train_seconds": train_s,
        "threads": threads,
        "test_acc": test_acc,
    }
    return model, dm, report


def fold_trained(model, trained_with_cbwc: bool, example: tuple):
    """(trained, LayerNorm, folded) networks: the trained network (its parametrizations removed), the
    LayerNorm network holding its weights and that network folded into CBWC + RMSNorm."""
    import lightning_cbwc

    trained = copy.deepcopy(model.net).cpu().eval()
    if trained_with_cbwc:
        lightning_cbwc.unparametrize(trained)
        ln = model.build_net().eval()
        ln.load_state_dict(trained.state_dict())
    else:
        ln = trained
    return trained, ln, lightning_cbwc.fold(ln, example, fuse_affine=True, check=True)


def export_onnx(folded, ln, example, out: Path, threads: int, x_test, ref, dm, report: dict, console) -> dict:
    """Export the folded and the LayerNorm networks to ONNX, check the folded one against the trained
    network (``ref``: its outputs on ``x_test``); returns the ONNX Runtime models to time."""
    from lightning_cbwc.export import export
    from lightning_cbwc.verify import max_relative_error

    try:
        r_fold = export(folded, out / "onnx_folded", "onnx", example)
        r_ln = export(ln, out / "onnx_layernorm", "onnx", example)
        ort_fold = ort_runner(onnx_session(r_fold.path, threads))
        ort_ln = ort_runner(onnx_session(r_ln.path, threads))
        report["onnx"] = {"folded": str(r_fold.path), "layernorm": str(r_ln.path)}
        report["equivalence_error"]["onnx_folded_vs_trained"] = max_relative_error(ref, ort_fold(x_test))
        report["onnx_test_acc"] = accuracy(ort_fold, dm.test_dataloader())
    except Exception as e:  # still report the PyTorch side
        console.print(f"[red]ONNX export failed: {type(e).__name__}: {e}[/]")
        report["onnx_error"] = f"{type(e).__name__}: {e}"
        return {}
    return {"ONNX Runtime LayerNorm": ort_ln, "ONNX Runtime folded (RMSNormalization)": ort_fold}


def print_table(report: dict, console) -> None:
    from rich.table import Table

    lat, batch = report["latency_ms"], report["latency_batch"]
    table = Table(title=f"CBWC demo: ViT on Fashion-MNIST ({report['trained_with']})", header_style="bold")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("test accuracy (PyTorch, trained)", f"{report['test_acc']:.4f}")
    if "onnx_test_acc" in report:
        table.add_row("test accuracy (ONNX, folded)", f"{report['onnx_test_acc']:.4f}")
    table.add_row("LayerNorms folded", report["plan"])
    for k, v in report["equivalence_error"].items():
        table.add_row(f"max rel. error {k.replace('_', ' ')}", f"{v:.2e}")
    for k, v in lat.items():
        table.add_row(f"latency {k} (batch {batch})", f"{v:.2f} ms")
    for a, b in (
        ("PyTorch LayerNorm", "PyTorch folded (RMSNorm)"),
        ("ONNX Runtime LayerNorm", "ONNX Runtime folded (RMSNormalization)"),
    ):
        if a in lat and b in lat:
            table.add_row(
                f"speed-up {a.split()[0]} {a.split()[1] if a.startswith('ONNX') else ''}".rstrip(),
                f"{lat[a] / lat[b]:.2f}x",
            )
    table.add_row("training time", f"{report['train_seconds']:.0f} s")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")

    from rich.console import Console

    from lightning_cbwc.timing import compare_latency
    from lightning_cbwc.verify import max_relative_error

    console = Console(highlight=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, dm, report = train(args, out, console, threads)

    # ---- fold: the LayerNorm network with the trained weights -> CBWC + RMSNorm
    example = (model.example_input_array,)
    trained, ln, folded = fold_trained(model, not args.no_cbwc, example)
    x_test = torch.stack([dm.test_set[i][0] for i in range(min(len(dm.test_set), args.latency_batch))])
    with torch.inference_mode():
        ref = trained(x_test)
        err_torch = max_relative_error(ref, folded(x_test))
        err_ln = max_relative_error(ln(x_test), folded(x_test))
    report["plan"] = folded.cbwc_plan.summary()
    report["equivalence_error"] = {"folded_vs_trained": err_torch, "folded_vs_layernorm": err_ln}

    # ---- export to ONNX and check the exported model against the trained one; latency
    models = {"PyTorch LayerNorm": ln, "PyTorch folded (RMSNorm)": folded}
    models.update(export_onnx(folded, ln, example, out, threads, x_test, ref, dm, report, console))
    report["latency_batch"] = len(x_test)
    report["latency_ms"] = compare_latency(models, (x_test,), repeats=args.repeats)
    (out / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    print_table(report, console)
    console.print(f"wrote {out / 'demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
