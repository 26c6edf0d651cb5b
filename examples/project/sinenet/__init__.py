"""sinenet: a tiny regression project, the kind of code a team brings to the launcher.

Nothing here knows the launcher: `model.mlp` builds an nn.Module, `data.sines` returns the train and
validation data sets, `metrics.mae` scores a batch. A recipe names them by import path
(recipes/sines.yaml); train_ddp.py uses them from a plain torchrun script.
"""
