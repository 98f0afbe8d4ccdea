"""CBWC under DDP: 2 CPU processes (gloo), run as a script in a subprocess (Lightning's ddp launcher re-runs
the script for rank 1, and pytest must not be forked)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_cbwc import CBWC
    from lightning_cbwc.training.projection import max_writer_column_mean


    class Net(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.stem = nn.Linear(6, d)
            self.norm1 = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, 2 * d)
            self.fc2 = nn.Linear(2 * d, d)
            self.norm2 = nn.LayerNorm(d)
            self.head = nn.Linear(d, 3)

        def forward(self, x):
            h = self.stem(x)
            h = h + self.fc2(torch.relu(self.fc1(self.norm1(h))))
            return self.head(self.norm2(h).mean(1))


    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = Net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)


    class Dump(Callback):
        def __init__(self, out):
            self.out = Path(out)

        def on_fit_end(self, trainer, pl_module):
            sd = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save({"sd": sd, "col": max_writer_column_mean(pl_module),
                        "norm": type(pl_module.model.norm1).__name__},
                       self.out / f"rank{trainer.global_rank}.pt")


    if __name__ == "__main__":
        strategy, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 4, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
        lit = Lit()
        trainer = pl.Trainer(
            strategy=strategy, accelerator="cpu", devices=2, max_steps=4, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[CBWC(mode=mode, model_attr="model"), Dump(out)],
        )
        trainer.fit(lit, DataLoader(data, batch_size=4))
        if trainer.global_rank == 0:
            # after ddp_spawn the main process gets the trained weights back into its (unconverted) module
            torch.save({"sd": lit.state_dict(), "norm": type(lit.model.norm1).__name__}, Path(out) / "main.pt")
    """
)


def _run(tmp_path: Path, strategy: str, mode: str) -> dict:
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{strategy}-{mode}"
    out.mkdir()
    # the pure-torch RMSNorm: no C++ kernel build / build-lock wait in the child processes
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root, LIGHTNING_CBWC_DISABLE_KERNELS="1")
    proc = subprocess.run(
        [sys.executable, str(script), strategy, mode, str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {p.stem: torch.load(p, weights_only=False) for p in out.glob("*.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["project", "parametrize"])
def test_ddp_two_processes_identical_and_centered(tmp_path, mode):
    res = _run(tmp_path, "ddp", mode)
    r0, r1 = res["rank0"], res["rank1"]
    assert r0["norm"] == r1["norm"] == "RMSNorm"
    assert set(r0["sd"]) == set(r1["sd"]) and not any("parametrizations" in k for k in r0["sd"])
    for k in r0["sd"]:
        assert torch.equal(r0["sd"][k], r1["sd"][k]), k
    assert r0["col"] < 1e-6 and r1["col"] < 1e-6


@pytest.mark.slow
def test_ddp_spawn_returns_trained_weights_to_the_main_process(tmp_path):
    res = _run(tmp_path, "ddp_spawn", "project")
    r0, r1, main = res["rank0"], res["rank1"], res["main"]
    for k in r0["sd"]:
        assert torch.equal(r0["sd"][k], r1["sd"][k]), k
        assert torch.equal(r0["sd"][k], main["sd"][k]), k  # plain keys: loads into the unconverted module
    assert main["norm"] == "LayerNorm"  # the main process never ran setup: a LayerNorm model, same function
