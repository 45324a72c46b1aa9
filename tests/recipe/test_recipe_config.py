"""seqpar.recipe: schema holes closed (strict override types, --print-config checks, list keys, --help,
vocab vs data) and the thin train.py entry point."""
from __future__ import annotations

import os

import numpy as np
import pytest

from seqpar import recipe
from seqpar.recipe import ConfigError, load_config, resolve_layout


def _config_error(argv, capsys=None) -> str:
    with pytest.raises(SystemExit) as e:
        recipe.main(argv)
    text = str(e.value.code)
    assert text.startswith("train.py: config error: ") and "\n" not in text, text
    return text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.overrides.activation_checkpointing=maybe"],
         "model.overrides.activation_checkpointing must be one of ('none', 'selective', 'full', 'auto')"),
        (["model.overrides.activation_checkpointing=3"],
         "model.overrides.activation_checkpointing must be bool or str, got 3 (int)"),
        (["model.activation_checkpointing=sometimes"],
         "model.activation_checkpointing must be one of ('none', 'selective', 'full', 'auto')"),
        (["model.overrides.n_layers=2.5"], "model.overrides.n_layers must be int, got 2.5"),
        (["model.overrides.n_layers=true"], "model.overrides.n_layers must be int, got True"),
        (["model.overrides.dropout=lots"], "model.overrides.dropout must be float, got 'lots'"),
        (["model.overrides.head_dim=abc"], "model.overrides.head_dim must be int or null"),
        (["optim.betas=0.9"], "optim.betas must be a list, e.g. optim.betas=[0.9,0.95], got 0.9"),
        (["optim.betas=[0.9]"], "optim.betas must be two values in [0, 1), got [0.9]"),
        (["parallel.fsdp=maybe"], "'maybe' is not a valid bool"),
    ],
)
def test_schema_errors_are_one_line(overrides, message):
    assert message in _config_error(["trainer.accelerator=cpu", *overrides])


def test_valid_overrides_pass_the_type_check():
    cfg = load_config([], ["model.overrides.activation_checkpointing=true", "model.overrides.dropout=0",
                           "model.overrides.head_dim=null", "model.overrides.attn_scale=1"])
    recipe.check_values(cfg)  # int accepted for float, null for Optional


def test_activation_checkpointing_key():
    """model.activation_checkpointing (default auto) sets the TNLConfig field unless the overrides do; true /
    false spell full / none; auto with activation_offload is full."""
    from seqpar.recipe.builders import build_model_config

    def policy(*overrides):
        cfg = load_config([], list(overrides))
        recipe.check_values(cfg)
        return build_model_config(cfg).activation_checkpointing

    assert policy() == "auto"
    assert policy("model.activation_checkpointing=selective") == "selective"
    assert policy("model.activation_checkpointing=true") == "full"
    assert policy("model.activation_checkpointing=false") == "none"
    assert policy("model.activation_checkpointing=selective", "model.overrides.activation_checkpointing=false") == "none"
    assert policy("model.overrides.activation_checkpointing=true") == "full"
    assert policy("model.overrides.activation_offload=true") == "full"


def test_print_config_runs_the_value_checks(capsys):
    text = _config_error(["optim.lr=-1", "parallel.sp=3", "--print-config", "trainer.accelerator=cpu"])
    assert "optim.lr must be > 0, got -1.0" in text
    text = _config_error(["parallel.sp=3", "--print-config", "trainer.accelerator=cpu"])
    assert "parallel.sp=3 must divide the world size 1 (choose among [1])" in text
    assert recipe.main(["--print-config", "trainer.accelerator=cpu", "parallel.fsdp=true"]) == 0
    out = capsys.readouterr().out
    assert "fsdp: true" in out


def test_help_lists_every_key_with_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as e:
        recipe.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    cfg = load_config([], [])
    for section in ("model", "data", "parallel", "optim", "trainer"):
        for key, value in cfg[section].items():
            line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"{section}.{key} ")), None)
            assert line is not None, f"{section}.{key} missing from --help"
            assert len(line.split("=", 1)[1].split()) >= 2, line  # a default and a meaning
    assert "parallel.fsdp" in out and "seed" in out


def test_memmap_vocab_smaller_than_token_ids_fails_before_training(tmp_path):
    ids = np.arange(2000, dtype=np.uint16) % 300  # ids up to 299; the tiny model has 256
    ids.tofile(tmp_path / "tokens.bin")
    text = _config_error(["--config", "configs/debug.yaml", "data.kind=memmap", f"data.path={tmp_path / 'tokens.bin'}",
                          f"trainer.out_dir={tmp_path}"])
    assert "data: the train tokens reach id 299 but the model's vocab_size is 256" in text, text
    assert "model.overrides.vocab_size >= 300" in text


def test_layout_and_fsdp_key():
    cfg = load_config([], ["trainer.accelerator=cpu", "trainer.devices=4", "parallel.sp=2", "data.seq_len=64",
                           "parallel.fsdp=true"])
    lay = resolve_layout(cfg)
    assert (lay["world"], lay["sp"], lay["dp"], lay["fsdp"]) == (4, 2, 2, True)
    assert load_config([], []).parallel.fsdp is False
    with pytest.raises(ConfigError, match=r"parallel.sp=3 must divide the world size 4"):
        resolve_layout(load_config([], ["trainer.accelerator=cpu", "trainer.devices=4", "parallel.sp=3"]))


def test_extra_callbacks_from_env(monkeypatch, tmp_path):
    from seqpar.recipe.callbacks import EXTRA_CALLBACKS_ENV, extra_callbacks_from_env

    f = tmp_path / "cb.py"
    f.write_text("import pytorch_lightning as pl\nclass C(pl.Callback):\n    pass\ndef make():\n    return C()\n")
    monkeypatch.setenv(EXTRA_CALLBACKS_ENV, f"{f}:make")
    (cb,) = extra_callbacks_from_env()
    assert type(cb).__name__ == "C"
    monkeypatch.setenv(EXTRA_CALLBACKS_ENV, "nonsense")
    with pytest.raises(ValueError, match="module:factory"):
        extra_callbacks_from_env()


def test_train_py_is_thin():
    from pathlib import Path

    src = (Path(__file__).resolve().parents[2] / "train.py").read_text()
    assert len(src.splitlines()) <= 60 and "from seqpar.recipe import" in src


def test_step_logger_runs_before_the_max_steps_checkpoint(tmp_path):
    """The last per-step line times training steps: StepLogger's on_train_batch_end runs before LastCheckpoint's
    (which writes last.ckpt at max_steps), so that write is not in the line's tokens/s."""
    from seqpar.recipe import build
    from seqpar.recipe.preemption import LastCheckpoint
    from seqpar.recipe.progress import StepLogger

    cfg = load_config([os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug.yaml")],
                      ["trainer.accelerator=cpu", f"trainer.out_dir={tmp_path}", "trainer.progress_bar=false"])
    trainer = build(cfg, resolve_layout(cfg))[0]
    kinds = [type(cb) for cb in trainer.callbacks]
    assert kinds.index(StepLogger) < kinds.index(LastCheckpoint)
