"""The token inspector's command line: ``python -m ranktuner_kernels.analysis.cli``.

Renders per-token ``p_t``, ``H_t``, rank, the Relative Rank Indicator ``I_t`` and a
weighting's weight as a self-contained HTML page, a PNG (the paper's layout; needs
matplotlib) and a terminal table. A thin wrapper around ``rk.inspect``
(:func:`ranktuner_kernels.analysis.render.inspect`). Two sources:

1. **Saved logits** (``torch.save`` of a dict)::

       python -m ranktuner_kernels.analysis.cli saved.pt --html out.html --png out.png

   with either ``{"logits": [N, V], "target": [N]}`` (row ``i`` scored against
   ``target[i]``, as ``rk.cross_entropy`` takes them; ``-100`` = ignored) or
   ``{"logits": [T, V] or [T-1, V], "token_ids": [T]}`` (a causal LM's output over the ids;
   optional ``"labels"`` ``[T]`` with ``-100`` at positions not to score). Optional
   ``"tokens"``: one display string per target / per id.

2. **A model checkpoint and a loader** (``module:function`` or ``path/to/file.py:function``)::

       python -m ranktuner_kernels.analysis.cli --model examples/tiny_lm.py:load_checkpoint \\
           --checkpoint examples/results/tiny_lm_ranktuner.pt \\
           --prompt $'12+7-3=?\\n' --text '12+7=19. 19-3=16. A: 16' --html t.html --png t.png

   The loader is called with the checkpoint path and returns a dict with ``"model"`` (ids
   ``[1, T]`` -> logits ``[1, T, V]`` or an object with ``.logits``) and ``"encode"``
   (``str -> list[int]``, no special tokens), optionally ``"token_strings"``
   (``ids -> list[str]``) or ``"decode"`` (``[id] -> str``), and ``"bos_id"`` (prepended).
   The prompt's tokens are shown but not scored (label ``-100``).

With no arguments it prints this help and exits with status 2 (like a usage error: nothing
was done); ``--help`` prints it and exits with 0.

``--weighting`` takes a name (``ranktuner``, ``dft``, ...; default ``sft``, as everywhere in
the library) or a config call such as ``"RankTuner(w0='one', xi='geo')"`` (a registered
weighting class with literal keyword arguments; nothing else is evaluated).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys

import torch

from ..weightings import WEIGHTINGS
from .render import inspect


def parse_weighting(text: str):
    """A weighting name, or ``Name(key=literal, ...)`` naming a config class of the package."""
    text = text.strip()
    if "(" not in text:
        return text
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"--weighting: cannot parse {text!r}") from e
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise ValueError(f"--weighting: expected Name(key=value, ...), got {text!r}")
    cls = next((c for c in WEIGHTINGS.values() if c.__name__ == node.func.id), None)
    if cls is None:
        raise ValueError(f"--weighting: no weighting class {node.func.id!r}; expected one of "
                         f"{[c.__name__ for c in WEIGHTINGS.values()]}")
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    return cls(**kwargs)


def load_callable(spec: str):
    """``module:function`` or ``path/to/file.py:function``."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"--model: expected module:function or file.py:function, got {spec!r}")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise ValueError(f"--model: no file {where!r}")
        mod_name = "_rk_inspect_loader_" + os.path.splitext(os.path.basename(path))[0]
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = module
        mspec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--model: {where} has no callable {name!r}")
    return fn


def _from_saved(path: str) -> dict:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "logits" not in data:
        raise ValueError(f"{path}: expected a dict with 'logits' and 'target' or 'token_ids'")
    kw = {"tokens": data.get("tokens")}
    if "target" in data:
        return {"source": data["logits"], "target": data["target"], **kw}
    if "token_ids" in data:
        return {"source": data["logits"], "token_ids": data["token_ids"], "labels": data.get("labels"), **kw}
    raise ValueError(f"{path}: expected 'target' (aligned) or 'token_ids' (causal) next to 'logits'")


def _from_model(loader_spec: str, checkpoint: str, prompt: str, text: str) -> dict:
    loaded = load_callable(loader_spec)(checkpoint)
    if not isinstance(loaded, dict) or "model" not in loaded or "encode" not in loaded:
        raise ValueError("--model: the loader must return a dict with 'model' and 'encode'")
    encode = loaded["encode"]
    bos = loaded.get("bos_id")
    head = ([bos] if bos is not None else []) + list(encode(prompt))
    ids = head + list(encode(text))
    labels = [-100] * len(head) + ids[len(head):]
    if "token_strings" in loaded:
        tokens = list(loaded["token_strings"](ids))
    else:
        tokens = None
    return {"source": loaded["model"], "token_ids": ids, "labels": labels, "tokens": tokens,
            "decode": loaded.get("decode") if tokens is None else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ranktuner_kernels.analysis.cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("saved", nargs="?", help="a .pt file of saved logits (see above)")
    ap.add_argument("--model", help="loader: module:function or path/to/file.py:function")
    ap.add_argument("--checkpoint", help="the file the loader reads")
    ap.add_argument("--prompt", default="", help="text before --text, shown but not scored")
    ap.add_argument("--text", help="the text to score (with --model)")
    ap.add_argument("--text-file", help="read --text from this file")
    ap.add_argument("--weighting", default="sft", help="name or config call (default sft)")
    ap.add_argument("--html", help="write the HTML page here")
    ap.add_argument("--png", help="write the PNG here (needs matplotlib)")
    ap.add_argument("--png-rows", default="p_t,entropy,indicator",
                    help="PNG panels from p_t,entropy,indicator,rank,weight (default: the paper's three)")
    ap.add_argument("--line-chars", type=int, default=100, help="PNG wrap width in characters (default 100)")
    ap.add_argument("--rows", type=int, default=60, help="terminal table rows (0: all; default 60)")
    ap.add_argument("--title", default="Token inspection")
    ap.add_argument("--impl", default="auto", choices=("auto", "reference", "triton"))
    if not (sys.argv[1:] if argv is None else argv):  # no arguments: the whole help, exit status 2 (nothing done)
        ap.print_help()
        return 2
    args = ap.parse_args(argv)

    if (args.saved is None) == (args.model is None):
        ap.error("give a saved .pt file or --model (with --checkpoint and --text)")
    if args.model is not None:
        if args.checkpoint is None:
            ap.error("--model needs --checkpoint")
        if args.text_file:
            with open(args.text_file, encoding="utf-8") as f:
                args.text = f.read()
        if args.text is None:
            ap.error("--model needs --text or --text-file")
    try:
        # a missing file: the loader's message (it may say what writes the file), no traceback
        kw = (_from_model(args.model, args.checkpoint, args.prompt, args.text) if args.model is not None
              else _from_saved(args.saved))
    except FileNotFoundError as e:
        print(f"error: {e.strerror or e}" + (f": {e.filename!r}" if e.filename else ""), file=sys.stderr)
        return 2
    source = kw.pop("source")
    try:
        for path in (args.html, args.png):
            if path and os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
        weighting = parse_weighting(args.weighting)
        inspect(source, weighting=weighting, html=args.html, png=args.png,
                           png_rows=tuple(r.strip() for r in args.png_rows.split(",") if r.strip()),
                           line_chars=args.line_chars, max_table_rows=args.rows or None, title=args.title,
                           impl=args.impl, **kw)
    except (ValueError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for label, path in (("html", args.html), ("png", args.png)):
        if path:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
