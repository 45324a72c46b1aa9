"""The train.py recipe, importable: config schema and checks, layout, builders, callbacks, ``main(argv)``.

Importing this package does not import Lightning (config errors fail fast); ``build`` does.
"""
from .config import ConfigError, TrainConfig, check_model_overrides, check_values, config_help, load_config, parse_args
from .elastic import destroy_process_group, init_torchelastic_process_group, is_rank_zero
from .layout import is_torchelastic, resolve_layout
from .run import main


def build(cfg, layout, callbacks=None):
    """(trainer, model, datamodule, ckpt_path, ckpt_dir) of a run; see :func:`seqpar.recipe.builders.build`."""
    from .builders import build as _build

    return _build(cfg, layout, callbacks)


__all__ = ["main", "build", "ConfigError", "TrainConfig", "load_config", "parse_args", "check_values",
           "check_model_overrides", "config_help", "resolve_layout", "is_torchelastic",
           "init_torchelastic_process_group", "destroy_process_group", "is_rank_zero"]
