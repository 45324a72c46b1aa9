"""Export / load a trained TransNormerLLM: ``model.safetensors`` + ``config.json`` + ``tokenizer.json``.

``export_pretrained(model, DIR, tokenizer)`` writes the directory, ``load_pretrained(DIR)`` (=
``TransNormerLLM.from_pretrained(DIR)``) rebuilds the model with the same weights (bit-identical logits),
``load_checkpoint(PATH)`` reads a ``train.py`` Lightning checkpoint with the data / tokenizer settings it
carries under its ``"seqpar"`` key.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch

from .config import TNLConfig

MODEL_TYPE = "seqpar-transnormerllm"
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"

__all__ = ["export_pretrained", "load_pretrained", "load_checkpoint", "checkpoint_tokenizer", "MODEL_TYPE"]


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImportError("export needs the 'safetensors' package (pip install safetensors)") from None
    return st


def export_pretrained(model, out_dir: str, tokenizer=None, eos_id: Optional[int] = None,
                      extra: Optional[Dict[str, Any]] = None) -> str:
    """Write ``model`` (a TransNormerLLM) to ``out_dir``; returns ``out_dir``.

    Args:
        tokenizer: a :class:`seqpar.data.tokenizer.Tokenizer` (its tokenizer.json and EOS id are written) or None.
        eos_id: EOS id recorded in config.json when no tokenizer is given.
        extra: more JSON-serialisable entries for config.json (e.g. the training data settings).
    """
    from .transnormer import TransNormerLLM

    if not isinstance(model, TransNormerLLM):
        raise TypeError(f"model must be a TransNormerLLM, got {type(model).__name__}")
    st = _safetensors()
    os.makedirs(out_dir, exist_ok=True)
    # save_model drops tied duplicates (tie_embeddings) and load_model re-ties them
    st.save_model(model, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    dtypes = {str(p.dtype).replace("torch.", "") for p in model.parameters()}
    cfg = {
        "model_type": MODEL_TYPE,
        "architectures": ["TransNormerLLM"],
        "seqpar_config": model.config.to_dict(),
        "torch_dtype": dtypes.pop() if len(dtypes) == 1 else None,
        "vocab_size": model.config.vocab_size,
        "eos_token_id": tokenizer.eos_id if tokenizer is not None else eos_id,
    }
    if extra:
        cfg.update(extra)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    if tokenizer is not None:
        tokenizer.save(os.path.join(out_dir, TOKENIZER))
    return out_dir


def load_pretrained(path: str, device=None, dtype: Optional[torch.dtype] = None, **config_overrides):
    """TransNormerLLM from an exported directory (eval mode, on ``device``, in the saved dtype unless ``dtype``).

    ``config_overrides`` replace TNLConfig fields that do not change the weights (e.g. ``attn_backend``).
    """
    from .transnormer import TransNormerLLM

    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path) or not os.path.isfile(os.path.join(path, WEIGHTS)):
        raise ValueError(f"path: {path} is not an exported model directory (needs {CONFIG} and {WEIGHTS})")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("model_type") != MODEL_TYPE or "seqpar_config" not in meta:
        raise ValueError(f"path: {cfg_path} is not a seqpar config (model_type {meta.get('model_type')!r})")
    config = TNLConfig.from_dict({**meta["seqpar_config"], **config_overrides})
    saved = getattr(torch, meta["torch_dtype"]) if meta.get("torch_dtype") else None
    model = TransNormerLLM(config)
    if saved is not None:
        model = model.to(saved)
    _safetensors().load_model(model, os.path.join(path, WEIGHTS), strict=True)
    if device is not None:
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _torch_load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - older checkpoints with pickled objects in their hparams
        return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(path: str, device=None) -> Tuple[Any, Dict[str, Any]]:
    """(TransNormerLLM in eval mode, info) from a ``train.py`` / LitLM checkpoint file.

    ``info`` holds the checkpoint's ``"seqpar"`` entry (data settings, data meta.json, tokenizer json) when
    it has one, plus ``global_step``.
    """
    from .transnormer import TransNormerLLM

    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"ckpt: checkpoint file not found: {path}")
    ckpt = _torch_load(os.fspath(path))
    hp = ckpt.get("hyper_parameters") or {}
    if "config" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"ckpt: {path} is not a seqpar LitLM checkpoint (no hyper_parameters.config / state_dict)")
    model = TransNormerLLM(TNLConfig.from_dict(dict(hp["config"])))
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=True)
    if device is not None:
        model = model.to(device)
    info = dict(ckpt.get("seqpar") or {})
    info["global_step"] = ckpt.get("global_step")
    info["ckpt_path"] = os.path.abspath(path)
    return model.eval(), info


def checkpoint_tokenizer(info: Dict[str, Any], ckpt_path: Optional[str] = None):
    """The tokenizer a checkpoint was trained with: stored in it, else a tokenizer.json beside it or in its
    data directory, else (byte-level data, e.g. the embedded corpus) the bytes tokenizer."""
    from seqpar.data.tokenizer import Tokenizer, byte_tokenizer

    tok = info.get("tokenizer") or {}
    if tok.get("json"):
        return Tokenizer.from_json(tok["json"], eos_id=tok.get("eos_id"), kind=tok.get("kind", "file"), source=tok.get("source"))
    places = []
    if ckpt_path:
        d = os.path.dirname(os.path.abspath(ckpt_path))
        places += [os.path.join(d, TOKENIZER), os.path.join(os.path.dirname(d), TOKENIZER)]
    data_path = (info.get("data") or {}).get("path")
    if data_path:
        places.append(os.path.join(data_path if os.path.isdir(data_path) else os.path.dirname(data_path), TOKENIZER))
    for p in places:
        if os.path.isfile(p):
            with open(p) as f:
                return Tokenizer.from_json(f.read(), eos_id=(info.get("meta") or {}).get("eos_id"), source=p)
    kind = (info.get("data") or {}).get("kind", "corpus")
    if kind in ("corpus", None):
        return byte_tokenizer()
    raise ValueError(f"ckpt: no tokenizer stored in the checkpoint nor a {TOKENIZER} beside it or in its data directory")
