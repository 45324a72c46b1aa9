"""The ``seqpar`` command (also ``python -m seqpar``): prepare, generate, eval, export.

    seqpar prepare --input notes.txt --out data/notes --tokenizer train-bpe --vocab-size 2048
    python train.py data.kind=memmap data.path=data/notes ...
    seqpar generate --ckpt runs/default/checkpoints/last.ckpt --prompt "def main(" --max-new-tokens 200
    seqpar eval --ckpt runs/default/checkpoints/last.ckpt --data data/notes
    seqpar export --ckpt runs/default/checkpoints/last.ckpt --out exported/notes
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


class CLIError(ValueError):
    pass


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive int, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive int, got {s!r}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", metavar="{prepare,generate,eval,export}")
    sub.required = True

    q = sub.add_parser("prepare", help="text files -> train.bin / val.bin / tokenizer.json / meta.json")
    q.add_argument("--input", "-i", nargs="+", required=True, help=".txt (or any plain text), .jsonl, .jsonl.gz, .parquet")
    q.add_argument("--out", "-o", required=True, help="output directory")
    q.add_argument("--tokenizer", default="bytes", help="bytes | train-bpe | path to tokenizer.json | Hugging Face hub name")
    q.add_argument("--vocab-size", type=_positive_int("--vocab-size"), default=8192, help="train-bpe vocabulary size")
    q.add_argument("--val-fraction", type=float, default=0.05, help="share of the tokens for val.bin, in [0, 1)")
    q.add_argument("--field", default="text", help="JSON field / parquet column holding the text")
    q.add_argument("--eos-token", default=None, help="EOS token of a FILE / NAME tokenizer (default: a usual name)")
    q.add_argument("--workers", type=_positive_int("--workers"), default=None, help="encoding processes (default: CPUs)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="sample a continuation of a prompt from a checkpoint")
    g.add_argument("--ckpt", required=True, help="train.py checkpoint (.ckpt) or an exported directory")
    g.add_argument("--prompt", default="", help="text to continue (empty: start from EOS)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")

    e = sub.add_parser("eval", help="loss and perplexity of a checkpoint over a whole split")
    e.add_argument("--ckpt", required=True, help="train.py checkpoint (.ckpt) or an exported directory")
    e.add_argument("--data", default=None,
                   help="prepared directory (its val.bin), a .bin file or a text file (default: the checkpoint's data)")
    e.add_argument("--split", default="val", choices=("val", "train"), help="split of a prepared directory")
    e.add_argument("--seq-len", type=_positive_int("--seq-len"), default=None, help="window length (default: training's)")
    e.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8)
    e.add_argument("--device", default=None)

    x = sub.add_parser("export", help="checkpoint -> model.safetensors + config.json + tokenizer.json")
    x.add_argument("--ckpt", required=True)
    x.add_argument("--out", "-o", required=True)
    return p


# ------------------------------------------------------------------------------------------------ helpers
def _device(name: Optional[str]):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device must be cpu or cuda[:N], got {name!r}") from None


def load_model_and_tokenizer(ckpt: str, device=None):
    """(model, tokenizer, info) from a train.py checkpoint or an exported directory."""
    from seqpar.data.tokenizer import Tokenizer, byte_tokenizer
    from seqpar.models import TransNormerLLM
    from seqpar.models.export import CONFIG, TOKENIZER, checkpoint_tokenizer, load_checkpoint

    if os.path.isdir(ckpt):
        if not os.path.isfile(os.path.join(ckpt, CONFIG)):
            raise CLIError(f"--ckpt: {ckpt} is a directory without {CONFIG} (give a .ckpt file or an exported directory)")
        model = TransNormerLLM.from_pretrained(ckpt, device=device)
        import json

        with open(os.path.join(ckpt, CONFIG)) as f:
            meta = json.load(f)
        tp = os.path.join(ckpt, TOKENIZER)
        if os.path.isfile(tp):
            with open(tp) as f:
                tok = Tokenizer.from_json(f.read(), eos_id=meta.get("eos_token_id"), source=tp)
        else:
            tok = byte_tokenizer()
        return model, tok, {"data": meta.get("seqpar_data") or {}}
    model, info = load_checkpoint(ckpt, device=device)
    tok = checkpoint_tokenizer(info, ckpt)
    if tok.vocab_size > model.config.vocab_size:
        raise CLIError(f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is {model.config.vocab_size}")
    return model, tok, info


class _Streamer:
    """Prints a growing decoded text incrementally (holds back an incomplete UTF-8 character)."""

    def __init__(self, tok, out=None):
        self.tok, self.ids, self.shown, self.out = tok, [], 0, out or sys.stdout

    def __call__(self, new_ids) -> None:
        self.ids.append(int(new_ids[0]))
        text = self.tok.decode([i for i in self.ids if i != self.tok.eos_id])
        stable = text.rstrip("\ufffd")
        if len(stable) > self.shown:
            self.out.write(stable[self.shown:])
            self.out.flush()
            self.shown = len(stable)

    def finish(self) -> None:
        text = self.tok.decode([i for i in self.ids if i != self.tok.eos_id])
        if len(text) > self.shown:
            self.out.write(text[self.shown:])
        self.out.write("\n")
        self.out.flush()


# ------------------------------------------------------------------------------------------------ commands
def cmd_prepare(a) -> int:
    from seqpar.data.prepare import prepare

    meta = prepare(a.input, a.out, tokenizer=a.tokenizer, vocab_size=a.vocab_size, val_fraction=a.val_fraction,
                   field=a.field, eos_token=a.eos_token, workers=a.workers, progress=False if a.no_progress else None)
    print(f"seqpar prepare: {a.out}: {meta['documents']} documents, {meta['train_tokens']} train + {meta['val_tokens']} "
          f"val tokens ({meta['dtype']}), vocab_size {meta['vocab_size']}, eos_id {meta['eos_id']}, "
          f"tokenizer {meta['tokenizer']['kind']}")
    print(f"train on it: python train.py data.kind=memmap data.path={a.out}")
    return 0


def cmd_generate(a) -> int:
    import torch

    if a.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    device = _device(a.device)
    model, tok, _ = load_model_and_tokenizer(a.ckpt, device)
    ids = tok.encode(a.prompt) if a.prompt else []
    if not ids:
        ids = [tok.eos_id]  # an empty prompt starts a new document
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(a.seed) if a.seed is not None else None
    sys.stdout.write(a.prompt)
    sys.stdout.flush()
    stream = _Streamer(tok)
    try:
        model.generate(prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       generator=gen, eos_id=tok.eos_id, on_token=stream)
    finally:
        stream.finish()
    return 0


def _eval_tokens(a, tok, info):
    import numpy as np

    from seqpar.data.prepare import read_meta

    path = a.data or (info.get("data") or {}).get("path")
    if not path:
        raise CLIError("--data is needed: the checkpoint records no data directory")
    if os.path.isdir(path):
        meta = read_meta(path)
        f = os.path.join(path, f"{a.split}.bin")
        if meta is None or not os.path.isfile(f):
            raise CLIError(f"--data: {path} has no meta.json / {a.split}.bin (prepare it with seqpar prepare)")
        return np.memmap(f, dtype=meta["dtype"], mode="r"), f
    if not os.path.isfile(path):
        raise CLIError(f"--data: not found: {path}")
    if path.endswith(".bin"):
        meta = read_meta(path) or info.get("meta") or {}
        dtype = meta.get("dtype") or (info.get("data") or {}).get("dtype") or "uint16"
        return np.memmap(path, dtype=dtype, mode="r"), path
    from seqpar.data.prepare import iter_documents

    ids = []
    for doc in iter_documents([path]):
        ids += tok.encode(doc) + [tok.eos_id]
    return np.asarray(ids, dtype=np.int64), path


def cmd_eval(a) -> int:
    import numpy as np
    import torch

    device = _device(a.device)
    model, tok, info = load_model_and_tokenizer(a.ckpt, device)
    tokens, where = _eval_tokens(a, tok, info)
    n = len(tokens)
    if n < 2:
        raise CLIError(f"--data: {where} holds {n} tokens, at least 2 are needed")
    V = model.config.vocab_size
    seq_len = a.seq_len or int((info.get("data") or {}).get("seq_len") or 256)
    starts = list(range(0, n - 1, seq_len))  # windows of seq_len predictions: every token after the first once
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(starts), a.batch_size):
            chunk = starts[b : b + a.batch_size]
            L = min(seq_len, n - 1 - chunk[0])
            x = torch.full((len(chunk), L + 1), -1, dtype=torch.long)
            for r, s in enumerate(chunk):
                w = np.asarray(tokens[s : s + L + 1], dtype=np.int64)
                x[r, : len(w)] = torch.from_numpy(w)
            if int(x.max()) >= V:
                raise CLIError(f"--data: token id {int(x.max())} >= the model's vocab_size {V} (other tokenizer?)")
            labels = x[:, 1:].clone()
            labels[labels < 0] = -100
            inp = x[:, :-1].clamp(min=0).to(device)
            out = model(inp, labels=labels.to(device), return_logits=False)
            total += float(out.loss) * int(out.num_tokens)
            count += int(out.num_tokens)
    loss = total / count
    print(f"seqpar eval: {where}: loss {loss:.4f} | ppl {math.exp(min(loss, 700)):.3f} | tokens {count} | seq_len {seq_len}")
    return 0


def cmd_export(a) -> int:
    from seqpar.models.export import export_pretrained

    if os.path.isdir(a.ckpt):
        raise CLIError("--ckpt must be a .ckpt file written by train.py")
    model, tok, info = load_model_and_tokenizer(a.ckpt, "cpu")
    data = {k: v for k, v in (info.get("data") or {}).items() if isinstance(v, (str, int, float, bool, type(None)))}
    export_pretrained(model, a.out, tok, extra={"seqpar_data": data, "global_step": info.get("global_step")})
    print(f"seqpar export: {a.out} (model.safetensors, config.json, tokenizer.json); load it with "
          f"TransNormerLLM.from_pretrained({a.out!r})")
    return 0


COMMANDS = {"prepare": cmd_prepare, "generate": cmd_generate, "eval": cmd_eval, "export": cmd_export}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (CLIError, ValueError, TypeError, ImportError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"seqpar {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
