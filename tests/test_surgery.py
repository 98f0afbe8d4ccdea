"""Model surgery keeps the user's model as it was apart from the swap: hooks, train/eval flags, rollback."""

from __future__ import annotations

import torch
from torch import nn

import lightning_cbwc
from lightning_cbwc import RMSNorm
from lightning_cbwc.surgery import Undo, replace_module
from lightning_cbwc.verify import eval_mode, run


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.drop = nn.Dropout(0.5)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.drop(self.fc(x))))


def test_swapped_norm_keeps_the_layernorm_hooks():
    model = Block().double().eval()
    seen = []
    model.norm.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    handle = model.norm.register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    folded = lightning_cbwc.fold(model, (x,), inplace=True)
    assert isinstance(folded.norm, RMSNorm)
    seen.clear()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref)  # the forward hook (x2) still applies
    assert seen == ["pre"]  # and so does the pre-hook
    handle.remove()  # the user's handle removes the hook from the new module
    with torch.no_grad():
        assert not torch.allclose(folded(x), ref)


def test_replace_module_carries_the_train_flag_and_undo_puts_the_old_module_back():
    model = Block()
    model.norm.eval()  # a submodule in eval mode inside a model in train mode
    old = model.norm
    undo = Undo()
    new = RMSNorm.from_layer_norm(old)
    new.train()
    replace_module(model, old, new, undo)
    assert model.norm is new and not new.training and model.training
    undo.rollback()
    assert model.norm is old


def test_checks_keep_each_module_s_own_train_flag():
    model = Block().double().train()
    model.drop.eval()  # e.g. a frozen base that Lightning leaves in eval mode
    flags = {name: m.training for name, m in model.named_modules()}
    run(model, (torch.randn(2, 6, dtype=torch.float64),), None)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    lightning_cbwc.fold(model, (torch.randn(2, 6, dtype=torch.float64),), inplace=True)
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_swapped_norm_keeps_state_dict_hooks_and_instance_attributes():
    model = Block().double().eval()
    model.norm.tag = "user's"
    seen = []
    model.norm.register_state_dict_post_hook(lambda m, sd, prefix, meta: seen.append("saved"))
    model.norm.register_load_state_dict_post_hook(lambda m, keys: seen.append("loaded"))
    x = torch.randn(5, 6, dtype=torch.float64)
    folded = lightning_cbwc.fold(model, (x,), inplace=True)
    assert isinstance(folded.norm, RMSNorm) and folded.norm.tag == "user's"
    folded.load_state_dict(folded.state_dict())
    assert seen == ["saved", "loaded"]
