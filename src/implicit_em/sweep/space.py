"""The search space of a sweep: a YAML file mapping ``scripts/train.py`` config keys to distributions.

    params:
      model.net.lambda_tc: {type: float, low: 0.01, high: 10.0, log: true}
      model.n_components: {type: int, low: 32, high: 256, step: 32}
      model.net.selection: {type: categorical, choices: [row, component]}
    metric: val_probe_accuracy      # optional: the default of --metric
    direction: maximize             # optional: the default of --direction

Each key becomes ``--<key> <value>`` on the trial's command line. A file that does not read, or a distribution
that is not one of these three with valid bounds, is refused with one line naming it (before any trial runs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from implicit_em.errors import ConfigError

#: the fields each distribution takes (``type`` included) and those it needs
FIELDS = {
    "float": ({"type", "low", "high", "log", "step"}, {"low", "high"}),
    "int": ({"type", "low", "high", "log", "step"}, {"low", "high"}),
    "categorical": ({"type", "choices"}, {"choices"}),
}
TOP_LEVEL = {"params", "metric", "direction"}
DIRECTIONS = ("maximize", "minimize")
#: options a sweep sets for every trial itself
OWNED = {
    "trainer.default_root_dir": "each trial's run directory is under --root",
    "ckpt_path": "every trial is a new run",
    "report.split": "trials are scored on the validation split",
    "threads": "--workers splits the cores between the trials",
}
KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class Param:
    """One searched setting: ``name`` (a train.py config key) and its distribution."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The value an Optuna trial draws for this setting."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def grid(self) -> list:
        """Every value of a discrete distribution, for the grid sampler."""
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None:
            raise ConfigError(f"--sampler grid needs discrete values: give {self.name} a step, or make it categorical")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else [round(v, 12) for v in values]

    def first(self) -> Any:
        """A valid value (to check the key against train.py's options before any trial)."""
        return self.choices[0] if self.type == "categorical" else self.low


@dataclass(frozen=True)
class SearchSpace:
    """The searched settings, and the file's defaults for the metric and its direction."""

    params: tuple[Param, ...]
    metric: str | None = None
    direction: str | None = None

    def suggest(self, trial) -> dict[str, Any]:
        return {p.name: p.suggest(trial) for p in self.params}

    def grid(self) -> dict[str, list]:
        return {p.name: p.grid() for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def first(self) -> dict[str, Any]:
        return {p.name: p.first() for p in self.params}

    def as_dict(self) -> dict:
        """The space as plain data (stored with the study, logged to W&B)."""
        out = {}
        for p in self.params:
            fields = {"type": p.type, "low": p.low, "high": p.high, "log": p.log or None, "step": p.step}
            if p.type == "categorical":
                fields = {"type": p.type, "choices": list(p.choices)}
            out[p.name] = {k: v for k, v in fields.items() if v is not None}
        return out


def option_value(value: Any) -> str:
    """A value as train.py's command line takes it (YAML spelling: true, null, 0.5, row)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def as_options(params: Mapping[str, Any]) -> list[str]:
    """``{"model.net.lambda_tc": 0.5}`` -> ``["--model.net.lambda_tc", "0.5"]``."""
    return [a for name, value in params.items() for a in (f"--{name}", option_value(value))]


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file; any problem is a :class:`ConfigError` naming the file and the fix."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space {path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"--space {path} is not valid YAML{line}: {getattr(e, 'problem', None) or e}") from None
    return parse_space(doc, str(path))


def parse_space(doc: Any, source: str = "the space file") -> SearchSpace:
    """The :class:`SearchSpace` of a loaded YAML document (see the module docstring for the format)."""
    hint = "e.g. params: {model.net.lambda_tc: {type: float, low: 0.1, high: 10, log: true}}"
    if not isinstance(doc, dict) or not isinstance(doc.get("params"), dict) or not doc["params"]:
        raise ConfigError(f"{source} must be a mapping with a non-empty 'params:' mapping ({hint})")
    unknown = set(doc) - TOP_LEVEL
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(str, sorted(unknown)))} (allowed: params, metric, "
                          "direction)")  # fmt: skip
    metric, direction = doc.get("metric"), doc.get("direction")
    if metric is not None and not isinstance(metric, str):
        raise ConfigError(f"{source}: metric must be a metrics.json key (got {metric!r})")
    if direction is not None and direction not in DIRECTIONS:
        raise ConfigError(f"{source}: direction must be maximize or minimize (got {direction!r})")
    params = tuple(parse_param(str(name), spec, source) for name, spec in doc["params"].items())
    return SearchSpace(params, metric, direction)


def parse_param(name: str, spec: Any, source: str) -> Param:
    """One entry of ``params:``, checked: its key, its type, its fields and their ranges."""
    where = f"{source}: params.{name}"
    if not KEY.match(name):
        raise ConfigError(f"{where}: not a train.py config key (dotted names such as model.net.lambda_tc)")
    if name in OWNED:
        raise ConfigError(f"{where}: the sweep sets {name} itself ({OWNED[name]})")
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in FIELDS:
        raise ConfigError(f"{where} must be a mapping with type float, int or categorical (got {spec!r})")
    allowed, needed = FIELDS[kind]
    if set(spec) - allowed or needed - set(spec):
        raise ConfigError(f"{where}: a {kind} takes {', '.join(sorted(allowed - {'type'}))} (needs "
                          f"{', '.join(sorted(needed))}; got {', '.join(sorted(map(str, spec)))})")  # fmt: skip
    if kind == "categorical":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list (got {choices!r})")
        if not all(c is None or isinstance(c, (str, int, float, bool)) for c in choices):
            raise ConfigError(f"{where}: choices must be numbers, strings, true/false or null (got {choices!r})")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: choices repeat a value ({choices!r})")
        return Param(name, kind, choices=tuple(choices))
    number = int if kind == "int" else (int, float)
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for field, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
            raise ConfigError(f"{where}: {field} must be {'an integer' if kind == 'int' else 'a number'} "
                              f"(got {value!r})")  # fmt: skip
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false (got {log!r})")
    if not low < high if kind == "float" else not low <= high:
        raise ConfigError(f"{where}: low must be below high (got low {low}, high {high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log distribution needs low > 0 (got {low})")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: step must be > 0 (got {step})")
    if log and step is not None and not (kind == "int" and step == 1):
        raise ConfigError(f"{where}: log and step do not combine; drop one")
    if kind == "float":
        low, high, step = float(low), float(high), None if step is None else float(step)
    return Param(name, kind, low, high, log, step)
