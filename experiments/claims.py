"""Check every published number against the file it names: the README's results table and prose.

    python experiments/claims.py [README.md ...]

The results table has four columns: ``| result | number | command | source |``. The
*number* cell holds only the claimed numbers (``**81.4%** test``, ``**7.4** vs 87.5``); the
*source* cell names, for each of them in order, ``experiments/<file>.json#<key path>``,
separated by ``;`` (``#<key path>`` alone reuses the previous file). A key path is dotted
keys, ``[i]`` list indices, ``[key]`` for a key with dots in it, or ``[key=value]`` selectors
(``#versus_random.levels[val_accuracy=0.35].random_hits``; ``[variant=default,minutes=10]`` when
one key does not pick a single item). A number with a trailing ``%``
is compared with 100 x a fraction (or with a value already above 1 as is); every number
must equal its file's value at the precision it is written with. The check fails on a
mismatch, a number without a source, a source without a number, or a missing file or key.
``tests/test_claims.py`` runs it in CI.

Prose (``PROSE_FILES``: the README outside its results table, and the docs named there) is
checked the same way. A *measured* number there is one written with decimals, a ``%`` or ``x``,
a sign (``+13``, ``-0.4 pts``), thousands commas, or a unit (``s``, ``min``, ``img/s``, ``MiB``,
``epochs``, ``trials``, ``points``, ...); bare integers (``5 blocks``, ``seed 0``, ``Part A``)
are counts and settings, not checked. Code spans, fenced blocks, link targets and images are
not prose. Each block (a paragraph, a list item, a table row, a heading) names the sources of
its numbers, in order, in one or more comments ``<!-- ev: SOURCE; SOURCE -->``. A source is
``file#key.path`` under ``experiments/`` (JSON, YAML or CSV; a CSV is its list of rows) or
``conf/`` (settings), or a ``.py`` module under ``inat/`` or ``experiments/`` (a default or constant: ``inat/config.py#TrainConfig.epochs``), ``#key.path`` alone reuses the previous file, and it may be
an expression of sources and constants joined by `` - ``, `` + ``, `` * ``, `` / ``
(``#table[1].mean - #table[0].mean``; ``#total_seconds / 60``). A source that holds a string
(a sentence a report stores) is matched when the number appears in it as written; ``SOURCE {n}``
stands for the block's next n numbers from one source.
"""
from __future__ import annotations

import csv
import importlib
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
# A measured number in prose: decimals, %, x, a sign, thousands commas or a unit (see above).
UNIT = (r"(?:%|x(?!\w)|\s?(?:ms|s|min|minutes|h|hours|img/s|images/s|frames/s|MB|MiB|GB|GiB|KB|kB|epochs?|"
        r"trials?|images|points|pts|params|parameters|MACs|seconds|hits?|bytes)(?![\w/]))")
PROSE_NUMBER = re.compile(r"(?<![\w.+])(?:(?<![\w\-])(?P<sign>[+\-−]))?"
                          r"(?P<body>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
                          r"(?:e-?\d+)?(?P<unit>" + UNIT + r")?(?!\w|\.\d|,\d{3})")
EVIDENCE = re.compile(r"<!--\s*ev:\s*(.*?)\s*-->", re.S)
NOT_PROSE = re.compile(r"<!--.*?-->|`[^`]*`|\]\([^)]*\)|<img[^>]*>|https?://\S+", re.S)
# Files whose prose is checked number by number: the README and every page under docs/.
PROSE_FILES = ("README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")))
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
            if not isinstance(node, dict) and hasattr(node, key):
                node = getattr(node, key)
                continue
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"no key '{key}'")
            node = node[key]
        elif "=" in index:  # [key=value] or [key=value,key2=value2]: every condition holds
            # a comma starts a new condition only where a key= follows, so a value may hold commas
            conditions = [part.split("=", 1) for part in re.split(r",(?=\s*[\w.]+=)", index)]
            match = [item for item in node if isinstance(item, dict)
                     and all(_same(item.get(field.strip()), want.strip()) for field, want in conditions)]
            if len(match) != 1:
                raise KeyError(f"[{index}] matches {len(match)} items, not 1")
            node = match[0]
        elif re.fullmatch(r"-?\d+", index):
            node = node[int(index)]
        else:  # a key with dots in it: params[train.lr]
            node = node[index]
    return node


def _same(value: Any, want: str) -> bool:
    try:
        return abs(float(value) - float(want)) < 1e-9
    except (TypeError, ValueError):
        return str(value) == want


SHOWN = re.compile(r"(?P<sign>[+\-−])?(?P<mantissa>[\d,]+(?:\.(?P<decimals>\d+))?)(?:e(?P<exponent>-?\d+))?\s*(?P<unit>.*)")
PERCENT_UNITS = ("%", "pts", "points")


def matches(text: str, value: Any) -> bool:
    """True when ``value`` written at the precision of ``text`` (with its unit) reads ``text``.

    A fraction (|value| <= 1) is shown x 100 when the unit is ``%``, ``pts`` or ``points``."""
    m = SHOWN.fullmatch(text.strip())
    if isinstance(value, str):  # a sentence the file stores: the number must be in it, as written
        number = text.split()[0].replace("\u2212", "-")
        return re.search(r"(?<![\w.])" + re.escape(number) + r"(?![\d.]\d)", value) is not None
    if m is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    shown = float(m.group("mantissa").replace(",", "")) * (-1 if m.group("sign") in ("-", "−") else 1)
    value = float(value)
    if m.group("unit").strip() in PERCENT_UNITS and abs(value) <= 1:
        value *= 100
    decimals = len(m.group("decimals") or "")
    if m.group("exponent"):  # scientific: compare significant digits
        exponent = int(m.group("exponent"))
        return abs(shown * 10 ** exponent - value) <= 0.5 * 10 ** (exponent - decimals) * (1 + 1e-9)
    return abs(shown - value) <= 0.5 * 10 ** -decimals + 1e-9


def _measured(m: re.Match) -> bool:
    return bool(m.group("sign") or m.group("unit") or "." in m.group("body") or "," in m.group("body"))


def blocks(markdown: str) -> List[tuple[int, str]]:
    """(first line number, text) of each prose block: paragraphs, list items, table rows and
    headings, fenced code and the results table left out."""
    out: List[tuple[int, List[str]]] = []
    fence = in_table = False
    for number, line in enumerate(markdown.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = not fence
            continue
        cells = tuple(c.strip().lower() for c in stripped.strip("|").split("|"))
        if cells == HEADER:
            in_table = True
        if in_table:
            in_table = stripped.startswith("|")
            if in_table:
                continue
        if fence or not stripped:
            out.append((number, []))
            continue
        starts = (stripped.startswith(("|", "#", "- ", "* ")) or re.match(r"\d+\. ", stripped)
                  or not out or not out[-1][1] or out[-1][1][-1].lstrip().startswith(("|", "#")))
        if starts:
            out.append((number, [line]))
        else:
            out[-1][1].append(line)
    return [(n, "\n".join(lines)) for n, lines in out if lines]


def _repeated(evidence: str) -> List[str]:
    """The sources of one comment, ``SOURCE {n}`` standing for n numbers from the same source."""
    out = []
    for source in (s.strip() for s in evidence.split(";") if s.strip()):
        m = re.fullmatch(r"(.*?)\s*\{(\d+)\}", source)
        out += [m.group(1)] * int(m.group(2)) if m else [source]
    return out


def prose_claims(markdown: str, name: str) -> List[Claim]:
    """Every measured number of the prose of ``markdown`` paired, in order, with its block's sources."""
    out: List[Claim] = []
    for line, text in blocks(markdown):
        sources = [s for ev in EVIDENCE.findall(text) for s in _repeated(ev)]
        numbers = [m.group(0) for m in PROSE_NUMBER.finditer(NOT_PROSE.sub(" ", text)) if _measured(m)]
        where = f"{name}:{line}"
        for i in range(max(len(numbers), len(sources))):
            out.append(Claim(where, numbers[i] if i < len(numbers) else "", sources[i] if i < len(sources) else None))
    return out


def load(file: str) -> Any:
    """The data of an evidence file: JSON, YAML, or a CSV as its list of rows (numbers parsed)."""
    target = REPO / file
    if not file.startswith(("experiments/", "conf/", "inat/")) or not target.is_file():
        raise FileNotFoundError(f"source file {file} is not a file under experiments/, conf/ or inat/")
    if file.endswith(".py"):  # a default setting: the module's names (dataclass fields read as their defaults)
        sys.path.insert(0, str(REPO))
        return importlib.import_module(file.removesuffix(".py").replace("/", "."))
    if file.endswith(".json"):
        return json.loads(target.read_text())
    if file.endswith((".yaml", ".yml")):
        import yaml  # the checker runs in the project's venv, which has PyYAML through Hydra
        return yaml.safe_load(target.read_text())
    if file.endswith(".csv"):
        with target.open(newline="") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    raise ValueError(f"source file {file} is not JSON, YAML or CSV")


def _number(text: str) -> Any:
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _operands(source: str) -> tuple[List[str], List[str]]:
    parts = re.split(r" ([-+*/]) ", source)
    return parts[0::2], parts[1::2]


def value_of(source: str, previous: Optional[str], cache: dict) -> tuple[Any, Optional[str]]:
    """The value ``source`` names (an expression of ``file#path`` terms and constants) and the
    file a following ``#path`` reuses."""
    terms, ops = _operands(source.strip("`"))
    values = []
    for term in terms:
        term = term.strip().strip("`")
        if re.fullmatch(r"-?\d+(?:\.\d+)?", term):
            values.append(float(term))
            continue
        if term.startswith("#"):
            if previous is None:
                raise ValueError(f"'{term}' reuses a file, but none was named before it")
            term = previous + term
        file, _, path = term.partition("#")
        previous = file
        if file not in cache:
            cache[file] = load(file)
        values.append(lookup(cache[file], path) if path else cache[file])
    result = values[0]
    for op, v in zip(ops, values[1:]):
        result = {"-": lambda a, b: a - b, "+": lambda a, b: a + b, "*": lambda a, b: a * b,
                  "/": lambda a, b: a / b}[op](float(result), float(v))
    return result, previous


def verify(found: List[Claim]) -> List[str]:
    """Every problem with a list of claims (empty: all true)."""
    problems = []
    cache: dict = {}
    previous: Optional[str] = None
    for c in found:
        if c.source is None:
            problems.append(f"'{c.row}': {c.text} has no source")
            continue
        if not c.text:
            problems.append(f"'{c.row}': source {c.source} has no number")
            continue
        try:
            value, previous = value_of(c.source, previous, cache)
        except (KeyError, IndexError, TypeError, ValueError, FileNotFoundError) as err:
            problems.append(f"'{c.row}': {c.text}: {c.source}: {err}")
            continue
        if not matches(c.text, value):
            problems.append(f"'{c.row}': the text says {c.text}, {c.source} holds {value!r}")
    return problems


# A results-table row's machine label and the torch CPU capability its evidence must record.
LABEL = re.compile(r"^\*\*\[(?P<label>[^\]]+)\]\*\*")
LABEL_CAPABILITY = {"AVX2": "AVX2", "AVX2 emulated": "AVX2", "AVX512-BF16": "AVX512", "Xeon AMX": "AVX512",
                    "Xeon AVX2 emulated": "AVX2"}
# A label whose capability torch does not tell apart needs a flag in the files' cpu_features too
# (the flags are the CPU's, so a Xeon restricted to AVX2 kernels still lists amx_bf16).
LABEL_FEATURE = {"Xeon AMX": "amx_bf16", "Xeon AVX2 emulated": "amx_bf16"}


def values(data: Any, key: str) -> list:
    """Every value stored under ``key`` anywhere in ``data``."""
    if isinstance(data, dict):
        return [v for k, v in data.items() if k == key] + [x for v in data.values() for x in values(v, key)]
    if isinstance(data, list):
        return [x for v in data for x in values(v, key)]
    return []


def recorded(data: Any, key: str = "cpu_capability") -> set:
    """Every value stored under ``key`` anywhere in ``data``, as text."""
    return {str(v) for v in values(data, key)}


def label_problems(found: List[Claim]) -> List[str]:
    """A labelled row ("**[AVX2]** ...") whose evidence files do not record that CPU capability."""
    problems = []
    rows: dict = {}
    previous = None
    for c in found:
        if c.source:
            previous = c.source.split("#", 1)[0] or previous
            rows.setdefault(c.row, set()).add(previous)
    for row, files in rows.items():
        m = LABEL.match(row)
        if not m:
            continue
        label = m.group("label")
        want = LABEL_CAPABILITY.get(label)
        if want is None:
            problems.append(f"'{row[:60]}': unknown machine label [{label}] (known: {', '.join(LABEL_CAPABILITY)})")
            continue
        have, feature_lists = set(), []
        for file in set(files):
            if file.endswith("/test.json"):  # a run's test record: its machine is in the run's summary.json
                files = files | {file.removesuffix("test.json") + "summary.json"}
        for file in files:
            try:
                data = load(file)
            except (OSError, ValueError):
                feature_lists.append([])  # an unreadable file records no flag
                continue
            have |= recorded(data)
            # a file without cpu_features counts as one empty list, so a required flag is missing there
            feature_lists += [f for f in values(data, "cpu_features") if isinstance(f, list)] or [[]]
        if have != {want}:
            problems.append(f"'{row[:60]}': labelled [{label}], but its files ({', '.join(sorted(files))}) record "
                            f"cpu_capability {sorted(have) or 'nowhere'}, not only {want}")
        feature = LABEL_FEATURE.get(label)
        if feature and not all(feature in features for features in feature_lists):
            problems.append(f"'{row[:60]}': labelled [{label}], but not every one of its files "
                            f"({', '.join(sorted(files))}) records {feature} in cpu_features")
    return problems


def check(readme: Path = REPO / "README.md") -> List[str]:
    """Every problem with the README's results table (empty: all true): numbers, then machine labels."""
    found = claims(readme.read_text())
    return verify(found) + label_problems(found)


def check_prose(path: Path) -> List[str]:
    """Every problem with the measured numbers of one file's prose (empty: all true)."""
    return verify(prose_claims(path.read_text(), str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name))


def main() -> None:
    readme = REPO / "README.md"
    table = claims(readme.read_text())
    problems = check(readme)
    prose = 0
    for name in PROSE_FILES:
        found = prose_claims((REPO / name).read_text(), name)
        prose += len(found)
        problems += verify(found)
    for p in problems:
        print(p)
    print(f"{len(table)} table numbers and {prose} prose numbers in {', '.join(PROSE_FILES)} checked, "
          f"{len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
