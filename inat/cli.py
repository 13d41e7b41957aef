"""Command-line preprocessing done before Hydra parses ``sys.argv``.

Things Hydra's grammar and error reporting cannot do for us: the design card's
``finetune=partial_k=3`` shorthand (not valid Hydra syntax) is rewritten to
``finetune=partial finetune.k=3``; an unknown key gets the nearest valid key in its message;
and the command is composed once here, so every composition or parse error (a wrong type, a
mistyped group choice) and every out-of-range value becomes one ``error:`` sentence with
exit code 2 instead of Hydra's multi-line block. This is the one place that translates them.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException, OverrideParseException

from inat.config import Config, config_errors, register_configs
from inat.errors import InatError
from inat.record import remember
from inat.sweep.space import sweep_errors

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Hydra flags after which composing the command ourselves would not match what Hydra does.
_PASSTHROUGH_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--version", "--config-path", "-cp",
                      "--config-name", "-cn", "--config-dir", "-cd", "--shell-completion", "-sc", "--package", "-p",
                      "--resolve", "--experimental-rerun")

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


def _field_of(key: str) -> Optional[dataclasses.Field]:
    """The schema field named by a dotted key, or None when the key is not a schema field."""
    node = Config
    found = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        found = fields[part]
        node = found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default
        node = type(node) if dataclasses.is_dataclass(node) else None
    return found


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "List[str]": "a list of names like [a,b]", "List[int]": "a list of integers like [1,2]"}


def expected_kind(key: str) -> Optional[str]:
    """What the schema expects at ``key`` in words ("an integer", "a list of names like [a,b]")."""
    field = _field_of(key)
    if field is None:
        return None
    kind = str(field.type).replace("typing.", "")
    optional = kind.startswith("Optional[")
    kind = kind[len("Optional["):-1] if optional else kind
    if kind not in _KINDS:
        return None
    return _KINDS[kind] + (" or null" if optional else "")


def unknown_key_message(key: str) -> Optional[str]:
    """Return a sentence naming the nearest valid key if ``key`` is not in the schema."""
    node = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            parent = ".".join(parts[:depth])
            kind = expected_kind(parent)
            if kind and not kind.startswith("a list"):  # a scalar has no sub-keys
                return f"'{parent}' is a single value ({kind}), so '{key}' does not exist; set it with {parent}=VALUE."
            return None  # below a list or a free-form value: Hydra checks the rest
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


# Hydra runs exactly one of these per command and says so with a traceback (exit 1) otherwise.
_EXCLUSIVE = {"--run": "--run", "-r": "--run", "--multirun": "-m", "-m": "-m", "--cfg": "--cfg", "-c": "--cfg",
              "--info": "--info", "-i": "--info", "--shell-completion": "--shell-completion",
              "-sc": "--shell-completion"}


def exclusive_flags_message(argv: List[str]) -> Optional[str]:
    """One sentence when ``argv`` combines Hydra flags of which a command takes only one (-m with --cfg)."""
    given = list(dict.fromkeys(_EXCLUSIVE[a.split("=", 1)[0]] for a in argv if a.split("=", 1)[0] in _EXCLUSIVE))
    if len(given) < 2:
        return None
    hint = ("; to see a sweep's configuration leave out -m (`python run.py --cfg hydra` with the same overrides shows "
            "hydra.sweeper and hydra.sweep)" if "-m" in given and "--cfg" in given else "")
    return (f"{' and '.join(given)} cannot be given together, as a command does one of --run, -m (--multirun), --cfg, "
            f"--info or --shell-completion{hint}.")


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


def _value_of(key: str, overrides: List[str]) -> str:
    """The text given for ``key`` on the command line (the last override of it wins)."""
    for arg in reversed(overrides):
        name, _, value = arg.partition("=")
        if name.lstrip("+~") == key:
            return value
    return ""


def composition_message(err: Exception, overrides: List[str]) -> str:
    """One sentence for an exception Hydra or OmegaConf raised while composing ``overrides``."""
    text = str(err)
    if isinstance(err, MissingConfigException) or "Could not find '" in text:
        m = re.search(r"Could not find '([^']+)'", text)
        group, _, choice = (m.group(1) if m else "").rpartition("/")
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        if group and options:
            return f"{group}={choice} is not a valid choice: valid are {', '.join(options)}."
    if isinstance(err, OverrideParseException):
        bad = next((o for o in overrides if o.split("=", 1)[0] in text or o in text), None) or " ".join(overrides)
        return f"Could not parse the override '{bad}' ({text.splitlines()[0]}); see python run.py --help for the syntax."
    m = re.match(r"Could not override '([^']+)'. No match in the defaults list", text)
    if m:
        return f"'{m.group(1)}' is not chosen by default, so add it with a plus: +{m.group(1)}={_value_of(m.group(1), overrides)}."
    if "requires --multirun" in text:
        return f"{text.splitlines()[0]}: add -m (or --multirun) to sweep, or give one value."
    cause = err.__cause__ or err
    key = getattr(cause, "full_key", None)
    if key:
        kind = expected_kind(str(key))
        if kind:
            return f"{key} must be {kind}, got '{_value_of(str(key), overrides)}'."
        first = str(getattr(cause, "msg", cause)).strip().splitlines()[0]
        return f"{key}: {first}."
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def output_folder_error(key: str, folder: str) -> Optional[str]:
    """Why Hydra could not create or write the output folder ``folder`` (set by ``key``), or None.

    Hydra creates the folder and writes ``.hydra/`` before any inat code runs, so a folder
    below a file or in a read-only place would end in Hydra's traceback; checked here first.
    """
    path = Path(folder).absolute()
    if path.exists() and not path.is_dir():
        return f"{key}='{folder}' is a file; choose a folder for the run's outputs."
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{key}='{folder}' lies inside '{existing}', which is a file; choose another folder."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{key}='{folder}' cannot be written ('{existing}' is read-only for this user); choose another folder."
    return None


def compose_command(overrides: List[str], multirun: bool) -> Tuple[Any, List[str]]:
    """Compose ``overrides`` as Hydra will; returns the config and the sweep expressions left out.

    Under ``-m`` the sweep expressions (``choice(...)``, ``interval(...)``) cannot be composed:
    they are left out and returned for ``sweep_errors``. A parse or composition error is
    InatError with its one sentence.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's parse errors
        raise InatError(composition_message(err, overrides)) from None
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()] if multirun else []
    plain = [o for o in overrides if o not in sweeps]
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="run"):
            cfg = compose("config", overrides=plain, return_hydra_config=True)
    except Exception as err:  # noqa: BLE001 - composition errors come in many types
        raise InatError(composition_message(err, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg, sweeps


def command_errors(cfg: Any, sweeps: List[str], multirun: bool) -> List[str]:
    """Every range, choice, output-folder and search-space problem of a composed command, one sentence each."""
    try:
        errors = config_errors(cfg)
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        folder_error = output_folder_error(key, str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
    except Exception:  # noqa: BLE001 - e.g. a ${hydra:...} value only Hydra's run can resolve: the run validates
        return []
    if folder_error:
        errors.append(folder_error)
    if multirun:
        sweeper = cfg.hydra.sweeper
        params = dict(sweeper.params) if "params" in sweeper and sweeper.params else {}
        errors += sweep_errors(sweeper.get("n_trials"), params, sweeps)
    return errors


def check_command(args: List[str]) -> Optional[str]:
    """Compose the command as Hydra will and return the first error sentence, or None.

    Sweep expressions (``choice(...)``, ``interval(...)``) are left out of the composition
    and checked by ``sweep_errors`` instead; each trial's values are validated by the run.
    """
    if any(a.split("=", 1)[0] in _PASSTHROUGH_FLAGS for a in args):
        return None
    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        cfg, sweeps = compose_command([a for a in args if not a.startswith("-")], multirun)
    except InatError as err:
        return str(err)
    errors = command_errors(cfg, sweeps, multirun)
    return errors[0] if errors else None


def fail(message: str) -> None:
    """Print the one ``error:`` sentence and exit with code 2 (bad input)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def prepare_argv() -> None:
    """Rewrite ``sys.argv`` in place and exit with one sentence on any bad key, type or value."""
    args = rewrite_shorthand(sys.argv[1:])
    msg = exclusive_flags_message(args) or check_overrides(args)
    if msg is None and os.environ.get("HYDRA_FULL_ERROR") != "1":
        msg = check_command(args)
    if msg:
        fail(msg)
    run_dir = _value_of("hydra.run.dir", args)
    multirun = any(a in ("-m", "--multirun") for a in args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not run_dir and not multirun:
        # Hydra's default folder is the start time, which differs between ranks started in different
        # seconds or on different nodes; training.build.check_same_run_dir catches the rest.
        fail("Under torchrun every rank must write to one run folder: set hydra.run.dir=RUN_DIR "
             "(the default is named by the start time, which differs between ranks).")
    if run_dir and not multirun:
        remember(Path(run_dir))  # before Hydra rewrites its record there (see inat.record)
    sys.argv[1:] = args
