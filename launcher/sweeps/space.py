"""The search space of a sweep, pure: parse `--grid`/`--random`, draw samples, expand into trials.

Nothing here reads a file or starts anything; every value stays override text (`key=value`), parsed
as YAML later like any override, so a trial's config is exactly what `launcher launch` would build.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from jobs.schema.errors import UsageError, short
from jobs.schema.secrets import redact_override

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
# Every trial's config is loaded and checked before anything exists (a few ms each), and on Slurm a sweep is
# one job array, which Slurm's default MaxArraySize (1001) caps at 1000 elements: more is refused, counted
# before the trials are built (a grid of 10 keys x 10 values would be 10^10 of them).
MAX_TRIALS = 1000
# A Bayesian sweep checks one config per choice before anything exists (`bayes.spec.corners`), and TPE learns
# little about a category it has tried once: a longer list is refused (a range of integers is randint's).
MAX_CHOICES = 100


@dataclass(frozen=True)
class SweepSpec:
    """What the user asked for; its hash names the sweep."""

    recipe: str  # recipe name or path, as given
    fixed: tuple[str, ...]  # overrides shared by every trial
    grid: tuple[str, ...]  # `key=v1,v2,...`, in command-line order
    random: tuple[str, ...]  # `key=distribution:args`
    trials: int  # random samples per grid point (1 without --random)
    seed: int  # seed of the random samples

    def to_dict(self) -> dict[str, Any]:
        """As stored in the sweep record: credentials inside override values are masked."""
        return {"recipe": self.recipe, "fixed": shown(self.fixed), "grid": shown(self.grid),
                "random": shown(self.random), "trials": self.trials, "seed": self.seed}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Trial:
    name: str  # run name, `<sweep>-tNN`
    overrides: tuple[str, ...]  # this trial's own overrides (after the fixed ones)


def shown(overrides: Iterable[str]) -> list[str]:
    """Override items as the sweep record stores them and lines show them: credentials masked (the whole
    value of a credential-named key, URL user info and `?token=` values in any other)."""
    return [redact_override(item) for item in overrides]


def split_values(raw: str) -> list[str]:
    """`1e-3,1e-2` -> two values; commas inside [...] or {...} belong to a YAML list or mapping."""
    values, depth, current = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def _key_value(item: str, flag: str) -> tuple[str, str]:
    control = next((ch for ch in item if ord(ch) < 0x20 or 0x7f <= ord(ch) < 0xa0), None)
    if control is not None:  # a newline would end a line of the trial's overrides in every file and log
        raise UsageError(f"{flag} {short(item)}: control character {control!r} in the value",
                         hint="give each sweep value as one line of printable text")
    key, sep, raw = item.partition("=")
    if not sep or not key or not raw:
        example = "optim.lr=1e-3,1e-2" if flag == "--grid" else "optim.lr=loguniform:1e-4:1e-1"
        raise UsageError(f"{flag} {item!r}: expected KEY=VALUES", hint=f"e.g. {flag} {example}")
    return key.strip(), raw


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    axes = []
    for item in items:
        key, raw = _key_value(item, "--grid")
        values = split_values(raw)
        if any(v == "" for v in values):
            raise UsageError(f"--grid {item!r}: empty value in {raw!r}", hint="separate values with single commas")
        axes.append((key, values))
    return axes


def parse_random(items: list[str], flag: str = "--random") -> list[tuple[str, str, list[str]]]:
    """`optim.lr=loguniform:1e-4:1e-1` -> ("optim.lr", "loguniform", ["1e-4", "1e-1"]), bounds checked.
    `flag` names the option in errors: `--param` of a Bayesian sweep takes the same distributions."""
    out = []
    for item in items:
        key, raw = _key_value(item, flag)
        dist, _, args = raw.partition(":")
        if dist not in DISTRIBUTIONS:
            raise UsageError(f"{flag} {item!r}: unknown distribution {dist!r}", hint="use one of uniform:LOW:HIGH, "
                             "loguniform:LOW:HIGH, randint:LOW:HIGH, choice:A,B,...")
        if dist == "choice":
            values = split_values(args)
            if not args or any(v == "" for v in values):
                raise UsageError(f"{flag} {item!r}: choice needs values", hint=f"e.g. {key}=choice:16,32")
            if len(values) > MAX_CHOICES:
                raise UsageError(f"{flag} {key}=choice:...: {len(values)} values, more than {MAX_CHOICES}",
                                 hint=f"for a range of integers use {key}=randint:LOW:HIGH; to try each value, --grid")
            out.append((key, dist, values))
            continue
        bounds = args.split(":")
        number = int if dist == "randint" else float
        try:
            low, high = (number(b) for b in bounds) if len(bounds) == 2 else (None, None)
        except ValueError:
            low = high = None
        if low is None or not low < high:
            raise UsageError(f"{flag} {item!r}: {dist} needs two {number.__name__} bounds LOW:HIGH with LOW < HIGH",
                             hint=f"e.g. {key}={dist}:{'1:8' if dist == 'randint' else '1e-4:1e-1'}")
        if dist == "loguniform" and low <= 0:
            raise UsageError(f"{flag} {item!r}: loguniform bounds must be > 0")
        out.append((key, dist, bounds))
    return out


def sample(dist: str, args: list[str], rng: random.Random) -> str:
    """One draw, as the text of an override value (parsed as YAML later, like any override)."""
    if dist == "choice":
        return rng.choice(args)
    if dist == "randint":
        return str(rng.randint(int(args[0]), int(args[1])))
    low, high = float(args[0]), float(args[1])
    if dist == "loguniform":
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    text = f"{value:.4g}"  # 4 significant digits: readable run tables, and plenty for a search
    return text if low <= float(text) <= high else repr(low if float(text) < low else high)


def expand(spec: SweepSpec, sweep_name: str) -> list[Trial]:
    """Cartesian product of the grid, times `trials` random samples per grid point, in a stable order."""
    axes = parse_grid(list(spec.grid))
    dists = parse_random(list(spec.random))
    keys = [k for k, _ in axes] + [k for k, _, _ in dists]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise UsageError(f"{', '.join(repeated)} given more than once in --grid/--random; give each key once")
    if not axes and not dists:
        raise UsageError("a sweep needs at least one --grid KEY=V1,V2 or --random KEY=DIST:ARGS")
    if spec.trials < 1:
        raise UsageError(f"--trials {spec.trials} must be >= 1")
    if spec.trials > 1 and not dists:
        raise UsageError(f"--trials {spec.trials} repeats identical grid points: it needs --random",
                         hint="to repeat with other seeds, add --grid trainer.seed=0,1,2")
    _refuse_too_many(axes, spec.trials)
    rng = random.Random(spec.seed)
    points = list(itertools.product(*[[f"{k}={v}" for v in values] for k, values in axes]))
    combos = []
    for point in points:
        for _ in range(spec.trials):
            combos.append(tuple(point) + tuple(f"{k}={sample(d, a, rng)}" for k, d, a in dists))
    width = max(2, len(str(len(combos) - 1)))
    return [Trial(f"{sweep_name}-t{i:0{width}d}", combo) for i, combo in enumerate(combos)]


def _refuse_too_many(axes: list[tuple[str, list[str]]], trials: int) -> None:
    count = math.prod(len(values) for _, values in axes) * trials
    if count > MAX_TRIALS:
        sizes = " x ".join([*(str(len(values)) for _, values in axes), *([f"--trials {trials}"] if trials > 1 else [])])
        raise UsageError(f"the sweep has {count} trials ({sizes}), more than {MAX_TRIALS}",
                         hint="split it into several sweeps (--name), or let --search bayes choose the trials")


def default_sweep_name(spec: SweepSpec) -> str:
    return f"{Path(spec.recipe).stem}-sweep-{spec.digest()}"
