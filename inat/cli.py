"""Command-line preprocessing done before Hydra parses ``sys.argv``.

Two things Hydra's grammar cannot do for us: the design card's ``finetune=partial_k=3``
shorthand (not valid Hydra syntax) is rewritten to ``finetune=partial finetune.k=3``, and an
unknown key gets the nearest valid key in its message instead of Hydra's bare refusal.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from typing import List, Optional

from inat.config import Config

GROUPS = {"data", "model", "act", "filters", "aug", "finetune", "optim", "mode"}
_SHORTHAND = re.compile(r"^finetune=(?P<strategy>[a-z_]+?)_k=(?P<k>-?\d+)$")


def rewrite_shorthand(argv: List[str]) -> List[str]:
    """Expand ``finetune=partial_k=3`` into ``finetune=partial finetune.k=3``."""
    out: List[str] = []
    for arg in argv:
        m = _SHORTHAND.match(arg)
        if m:
            out += [f"finetune={m['strategy']}", f"finetune.k={m['k']}"]
        else:
            out.append(arg)
    return out


def unknown_key_message(key: str) -> Optional[str]:
    """Return a sentence naming the nearest valid key if ``key`` is not in the schema."""
    node = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return None  # below a leaf (e.g. a list index): Hydra checks the rest
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            prefix = ".".join(parts[:depth])
            valid = sorted(fields)
            near = difflib.get_close_matches(part, valid, n=1, cutoff=0.5)
            where = f" in '{prefix}'" if prefix else ""
            hint = f"did you mean '{'.'.join(parts[:depth] + [near[0]])}'? " if near else ""
            return f"Unknown config key '{key}'{where}: {hint}valid keys are {', '.join(valid)}."
        field = fields[part]
        node = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        node = type(node) if dataclasses.is_dataclass(node) else None
    return None


def check_overrides(argv: List[str]) -> Optional[str]:
    """First error sentence among ``key=value`` overrides whose key is not in the schema."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if key.startswith(("hydra", "~", "+hydra", "++hydra")):
            continue
        key = key.lstrip("+")
        if "/" in key or key in GROUPS:
            continue  # a group choice (act=mish): Hydra lists the valid options itself
        msg = unknown_key_message(key)
        if msg:
            return msg
    return None


def prepare_argv() -> None:
    """Rewrite ``sys.argv`` in place and exit with one sentence on an unknown key."""
    args = rewrite_shorthand(sys.argv[1:])
    msg = check_overrides(args)
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = args
