"""Training recipes: LightningCLI programs with YAML configs in ``configs/``.

    python recipes/image_classification.py fit -c configs/image_classification_cbwc.yaml
    lightning-cbwc run image_classification -c configs/image_classification_cbwc.yaml   # the same

The programs are ``image_classification``, ``text_generation`` and ``finetune`` (plus ``demo`` and
``reproduce``).  What they share lives in small private modules, and everything general in the library:

- ``_cli``: :class:`RecipeCLI`, a LightningCLI with a ``run_dir`` (every output path defaults to a ``{run_dir}``
  template), loggers (CSV + offline Weights & Biases) and three always-on callbacks with their own config
  sections: ``checkpoint`` (ModelCheckpoint), ``summary`` and ``export``.
- ``_callbacks``: ``RunSummary`` (curves, final metrics and the training step time, as one JSON file) and
  ``ExportFolded`` (at the end of fit, fold the trained network, check it, write it, time it).
- ``_export``: the fold-check-write-time step behind ``ExportFolded``.
- ``_optim``: AdamW parameter groups and the warm-up + cosine schedule.
- ``_steps``: the classification training / validation / test steps.

The recipes' LightningModules keep the network in ``self.net`` (an ``nn.Module`` called as
``net(*example_input_array)`` that returns a tensor) and can rebuild a fresh LayerNorm copy with ``build_net()``.
"""
