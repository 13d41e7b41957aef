"""Check every number in the README's results table against the file it names.

    python experiments/claims.py [README.md]

The results table has four columns: ``| result | number | command | source |``. The
*number* cell holds only the claimed numbers (``**81.4%** test``, ``**7.4** vs 87.5``); the
*source* cell names, for each of them in order, ``experiments/<file>.json#<key path>``,
separated by ``;`` (``#<key path>`` alone reuses the previous file). A key path is dotted
keys and ``[i]`` list indices or ``[key=value]`` selectors
(``#versus_random.levels[val_accuracy=0.35].random_hits``). A number with a trailing ``%``
is compared with 100 x a fraction (or with a value already above 1 as is); every number
must equal its file's value at the precision it is written with. The check fails on a
mismatch, a number without a source, a source without a number, or a missing file or key.
``tests/test_claims.py`` runs it in CI.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

REPO = Path(__file__).resolve().parents[1]
HEADER = ("result", "number", "command", "source")
# A claimed number: optional sign, digits with thousands commas, decimals, exponent, then a unit.
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?(?P<unit>%|x)?(?![\w.])")
TOKEN = re.compile(r"\[([^\]]+)\]|([^.\[\]]+)")


@dataclass
class Claim:
    """One number of one table row and where it says it comes from."""

    row: str
    text: str
    source: Optional[str]


def rows_of_table(markdown: str) -> List[List[str]]:
    """The cells of each body row of the results table (the one whose header is HEADER)."""
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip().lower() for c in line.strip().strip("|").split("|")]
        if tuple(cells) == HEADER:
            body = []
            for row in lines[i + 2:]:
                if not row.strip().startswith("|"):
                    break
                body.append([c.strip() for c in row.strip().strip("|").split("|")])
            return body
    raise ValueError(f"no results table with the header | {' | '.join(HEADER)} |")


def claims(markdown: str) -> List[Claim]:
    """Every number of the number column paired with its source (None when it has none)."""
    out: List[Claim] = []
    for cells in rows_of_table(markdown):
        if len(cells) != len(HEADER):
            raise ValueError(f"row has {len(cells)} cells, not {len(HEADER)}: {' | '.join(cells)}")
        result, number, _, source = cells
        numbers = [m.group(0) for m in NUMBER.finditer(number.replace("*", ""))]
        text = source.removeprefix("source:").strip()
        sources = [s.strip() for s in text.split(";") if s.strip()] if text else []
        current = None
        resolved = []
        for s in sources:
            s = s.strip("`")
            if s.startswith("#"):
                if current is None:
                    raise ValueError(f"'{s}' in row '{result}' reuses a file, but none was named before it")
                s = current + s
            current = s.split("#", 1)[0]
            resolved.append(s)
        for i in range(max(len(numbers), len(resolved))):
            out.append(Claim(result, numbers[i] if i < len(numbers) else "", resolved[i] if i < len(resolved) else None))
    return out


def lookup(data: Any, path: str) -> Any:
    """The value at a key path (``a.b[0].c``, ``levels[val_accuracy=0.35].hits``) in JSON data."""
    node = data
    for index, key in TOKEN.findall(path):
        if key:
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"no key '{key}'")
            node = node[key]
        elif "=" in index:
            field, want = index.split("=", 1)
            match = [item for item in node if isinstance(item, dict) and _same(item.get(field), want)]
            if len(match) != 1:
                raise KeyError(f"[{index}] matches {len(match)} items, not 1")
            node = match[0]
        else:
            node = node[int(index)]
    return node


def _same(value: Any, want: str) -> bool:
    try:
        return abs(float(value) - float(want)) < 1e-9
    except (TypeError, ValueError):
        return str(value) == want


def matches(text: str, value: Any) -> bool:
    """True when ``value`` written at the precision of ``text`` (with its unit) reads ``text``."""
    unit = text[-1] if text[-1] in "%x" else ""
    shown = float(text.rstrip("%x").replace(",", ""))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    value = float(value)
    if unit == "%" and abs(value) <= 1:
        value *= 100
    mantissa = text.rstrip("%x").split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    if "e" in text:  # scientific: compare significant digits
        exponent = int(text.rstrip("%x").split("e")[1])
        return abs(shown - value) <= 0.5 * 10 ** (exponent - decimals) * (1 + 1e-9)
    return abs(shown - value) <= 0.5 * 10 ** -decimals + 1e-9


def check(readme: Path = REPO / "README.md") -> List[str]:
    """Every problem with the README's claimed numbers (empty: all true)."""
    problems = []
    cache: dict = {}
    for c in claims(readme.read_text()):
        if c.source is None:
            problems.append(f"'{c.row}': {c.text} has no source")
            continue
        if not c.text:
            problems.append(f"'{c.row}': source {c.source} has no number")
            continue
        file, _, path = c.source.partition("#")
        target = REPO / file
        if not file.startswith("experiments/") or not target.is_file():
            problems.append(f"'{c.row}': {c.text}: source file {file} is not a file under experiments/")
            continue
        if file not in cache:
            cache[file] = json.loads(target.read_text())
        try:
            value = lookup(cache[file], path)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            problems.append(f"'{c.row}': {c.text}: {c.source}: {err}")
            continue
        if not matches(c.text, value):
            problems.append(f"'{c.row}': README says {c.text}, {c.source} holds {value!r}")
    return problems


def main() -> None:
    readme = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "README.md"
    problems = check(readme)
    n = len(claims(readme.read_text()))
    for p in problems:
        print(p)
    print(f"{n} numbers checked, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
