"""README.md runs as written: its Python blocks on the CPU (blocks marked ``<!-- readme-test: gpu -->`` need
CUDA, ``multi-rank`` ones are left to torchrun), the tutorial's commands parse, and with SEQPAR_TEST_TUTORIAL=1
the whole "Train on your own text" tutorial runs (a few minutes on the CPU)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!--\s*readme-test:\s*([\w-]+)")


def blocks():
    """(language, marker or None, code, line number) of every fenced block of README.md."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m and m.group(1):
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            mk = MARK.search(prev)
            out.append((m.group(1), mk.group(1) if mk else None, "\n".join(lines[i + 1 : j]), i + 1))
            i = j
        i += 1
    return out


PY = [(b[1], b[2], b[3]) for b in blocks() if b[0] == "python"]


@pytest.mark.parametrize("marker,code,line", PY, ids=[f"line{b[2]}" for b in PY])
def test_python_block(marker, code, line, tmp_path, monkeypatch):
    if marker == "multi-rank":
        pytest.skip("multi-rank block: run under torchrun")
    if marker == "gpu" and torch.cuda.device_count() < 8:
        pytest.skip("needs 8 CUDA GPUs")
    if marker == "after-tutorial":
        pytest.skip("needs the tutorial's export (test_tutorial runs it)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def _tutorial():
    (tut,) = [b for b in blocks() if b[1] == "tutorial"]
    (after,) = [b for b in blocks() if b[1] == "after-tutorial"]
    return tut[2], after[2]


def test_tutorial_commands_parse():
    """Every `seqpar ...` line of the tutorial is a valid command line of the CLI, train.py's overrides load."""
    from seqpar.cli import build_parser
    from seqpar.recipe import load_config

    commands, _ = _tutorial()
    seen = set()
    for cmd in commands.splitlines():
        argv = shlex.split(cmd.replace('"$SRC"', "input.py"))
        if argv[0] == "seqpar":
            build_parser().parse_args(argv[1:])
            seen.add(argv[1])
        elif argv[:2] == ["python", "train.py"]:
            load_config([], argv[2:])
            seen.add("train")
    assert seen == {"prepare", "train", "generate", "eval", "export"}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SEQPAR_TEST_TUTORIAL") != "1", reason="set SEQPAR_TEST_TUTORIAL=1 (a few minutes)")
def test_tutorial(tmp_path):
    commands, after = _tutorial()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # `seqpar` as the installed console script would run it; train.py from the repository
    script = (f'seqpar() {{ "{sys.executable}" -m seqpar "$@"; }}\npython() {{ "{sys.executable}" "$@"; }}\n'
              f"ln -s {ROOT / 'train.py'} train.py\nset -e\n{commands}\n")
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "def parse_args(" in p.stdout and re.search(r"loss \d+\.\d+ \| ppl", p.stdout)
    assert (tmp_path / "exported" / "argparse" / "model.safetensors").is_file()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(after, "README.md:after-tutorial", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
