"""CBWC under FSDP2: Lightning's ModelParallelStrategy on 2 CPU processes (gloo), the network sharded with
``fully_shard`` in ``configure_model``; run as a script in a subprocess (the launcher re-runs it for rank 1).

After the steps, the full weights equal a single-process CBWC run on the same global batches (float64, up to
the order of the gradient reduction), the writers are centered, and the consolidated checkpoint loads into the LayerNorm model."""

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
    import os
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader, Subset, TensorDataset

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
        def __init__(self, shard):
            super().__init__()
            torch.manual_seed(0)
            self.model = Net().double()  # float64: the runs must agree up to reduction order only
            self.shard = shard

        def configure_model(self):
            if self.shard:
                mesh = self.device_mesh["data_parallel"]
                for layer in (self.model.fc1, self.model.fc2):
                    fully_shard(layer, mesh=mesh)
                fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)


    class Dump(Callback):
        def __init__(self, out):
            self.out = Path(out)

        def on_fit_end(self, trainer, pl_module):
            sd = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                  for k, v in pl_module.state_dict().items()}
            col = max_writer_column_mean(pl_module)
            if trainer.global_rank == 0:
                torch.save({"sd": sd, "col": col, "norm": type(pl_module.model.norm1).__name__},
                           self.out / f"{trainer.world_size}.pt")


    if __name__ == "__main__":
        mode, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, 6, generator=g, dtype=torch.float64)
        data = TensorDataset(x, torch.randint(0, 3, (32,), generator=g))
        if devices == 2:
            strategy = ModelParallelStrategy(
                data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
            )
            batch = 4
        else:
            strategy, batch = "auto", 8  # the same global batches on one process
        lit = Lit(shard=devices == 2)
        if devices == 2:  # rank r gets rows r, r + 2, ...: each step's two halves are the single run's batch
            data = Subset(data, range(int(os.environ.get("LOCAL_RANK", 0)), len(data), 2))
        trainer = pl.Trainer(
            strategy=strategy, accelerator="cpu", devices=devices, max_steps=4, logger=False,
            use_distributed_sampler=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[CBWC(mode=mode, model_attr="model"), Dump(out)],
        )
        trainer.fit(lit, DataLoader(data, batch_size=batch))
        trainer.save_checkpoint(str(Path(out) / f"{devices}.ckpt"))
    """
)


def _run(tmp_path: Path, mode: str, devices: int) -> None:
    _run_script(tmp_path, "fsdp2_script.py", SCRIPT, mode, str(tmp_path), str(devices))


def _run_script(tmp_path: Path, name: str, text: str, *args: str) -> None:
    script = tmp_path / name
    script.write_text(text)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root, LIGHTNING_CBWC_DISABLE_KERNELS="1")
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["project", "parametrize"])
def test_fsdp2_two_processes_equal_one_process_and_load_into_layernorm(tmp_path, mode):
    _run(tmp_path, mode, 2)
    _run(tmp_path, mode, 1)
    sharded, single = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in (2, 1))
    assert sharded["norm"] == single["norm"] == "RMSNorm"
    assert set(sharded["sd"]) == set(single["sd"]) and not any("parametrizations" in k for k in sharded["sd"])
    for k, v in single["sd"].items():
        torch.testing.assert_close(sharded["sd"][k], v, rtol=1e-10, atol=1e-12, msg=k)
    assert sharded["col"] < 1e-12
    # the consolidated checkpoint is the LayerNorm model's: strict load, same function
    sys.path.insert(0, str(tmp_path))
    try:
        import fsdp2_script
    finally:
        sys.path.remove(str(tmp_path))
    ckpt = torch.load(tmp_path / "2.ckpt", weights_only=True)
    vanilla = fsdp2_script.Lit(shard=False)
    vanilla.load_state_dict(ckpt["state_dict"], strict=True)
    assert isinstance(vanilla.model.norm1, torch.nn.LayerNorm)
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    trained = fsdp2_script.Lit(shard=False)
    trained.load_state_dict(single["sd"])
    from lightning_cbwc import convert

    convert(trained.model, (x[:2],), mode=mode)
    trained.load_state_dict(single["sd"])
    with torch.no_grad():
        ref, got = trained.model(x), vanilla.model(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-10


META_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_cbwc
    from lightning_cbwc import CBWC
    from lightning_cbwc.training.projection import max_writer_column_mean
    import fsdp2_script


    class Lit(fsdp2_script.Lit):
        '''The network built on the meta device in configure_model, converted, then sharded (FSDP2's deferred
        init: Lightning materializes it with to_empty + reset_parameters).'''

        def __init__(self, cbwc):
            pl.LightningModule.__init__(self)
            self.cbwc, self.model = cbwc, None

        def configure_model(self):
            if self.model is not None:
                return
            with torch.device("meta"):
                self.model = fsdp2_script.Net().double()
            if self.cbwc:
                example = torch.empty(2, 4, 6, dtype=torch.float64, device="meta")
                lightning_cbwc.convert(self.model, (example,), mode="project")
            self.shard = True
            super().configure_model()


    if __name__ == "__main__":
        cbwc, out = sys.argv[1] == "cbwc", Path(sys.argv[2])
        torch.manual_seed(0)  # the same materialized init in both runs
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 4, 6, generator=g, dtype=torch.float64),
                             torch.randint(0, 3, (32,), generator=g))
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                         save_distributed_checkpoint=False)
        lit = Lit(cbwc)
        trainer = pl.Trainer(
            strategy=strategy, accelerator="cpu", devices=2, max_steps=4, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[CBWC(mode="project", model_attr="model")] if cbwc else [],
        )
        trainer.fit(lit, DataLoader(data, batch_size=4))
        sd = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
              for k, v in lit.state_dict().items()}
        col = max_writer_column_mean(lit.model) if cbwc else None
        if trainer.global_rank == 0:
            torch.save({"sd": sd, "col": col, "norm": type(lit.model.norm1).__name__},
                       out / f"{'cbwc' if cbwc else 'ln'}.pt")
    """
)


@pytest.mark.slow
def test_fsdp2_meta_device_init_in_configure_model_trains_like_layernorm(tmp_path):
    """Built on the meta device and converted in configure_model, sharded, materialized by Lightning: the
    writers are re-centered before the first step, and after 4 Adam steps on 2 processes the CBWC model
    computes what the LayerNorm model trained the same way computes (float64)."""
    (tmp_path / "fsdp2_script.py").write_text(SCRIPT)
    for variant in ("cbwc", "ln"):
        _run_script(tmp_path, "fsdp2_meta.py", META_SCRIPT, variant, str(tmp_path))
    cbwc, ln = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("cbwc", "ln"))
    assert cbwc["norm"] == "RMSNorm" and ln["norm"] == "LayerNorm"
    assert cbwc["col"] < 1e-12
    sys.path.insert(0, str(tmp_path))
    try:
        import fsdp2_script
    finally:
        sys.path.remove(str(tmp_path))
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    outs = []
    for run in (cbwc, ln):
        net = fsdp2_script.Net().double()
        net.load_state_dict({k.removeprefix("model."): v for k, v in run["sd"].items()}, strict=True)
        with torch.no_grad():
            outs.append(net(x))
    assert float((outs[0] - outs[1]).abs().max() / outs[1].abs().max()) < 1e-10
