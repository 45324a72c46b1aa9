"""The markdown result files of the benchmarks: a header (device, versions, date, command) and the write."""
from __future__ import annotations

import datetime
import os
import sys
from typing import List, Optional

import torch


def header(title: str, script: str, device: Optional[str] = None) -> List[str]:
    """Lines opening a result file: the title, then device, torch and triton versions, date and the command
    (``python benchmarks/<script>`` with this process's arguments). device: None for the current GPU (or CPU)."""
    import triton

    if device is None:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return [f"# {title}", "",
            f"device: {device}; torch {torch.__version__}, triton {triton.__version__}; date {datetime.date.today()}; "
            f"command: `python benchmarks/{script} {' '.join(sys.argv[1:])}`", ""]


def write(out_dir: str, filename: str, lines: List[str]) -> str:
    """Write lines to out_dir/filename (creating out_dir), print them, return the path."""
    text = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, filename)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    return path


def parse_overrides(text: str, flag: str = "--set") -> dict:
    """'key=value,key2=value2' -> {key: value} with ints, floats, true/false and none parsed (TNLConfig overrides).
    Raises SystemExit naming ``flag`` on an item without '='."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag}: {item!r} is not key=value")
        low = raw.lower()
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null"):
            value = None
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key.strip()] = value
    return out
