"""What a Bayesian sweep searches: the spec the user gave (its hash names the sweep), the trial names, and
the --param distributions as Optuna's."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.sweeps.space import parse_random, shown
from jobs.schema.errors import UsageError

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class BayesSpec:
    """What the user asked for; its hash names the sweep."""

    recipe: str  # recipe name or path, as given
    fixed: tuple[str, ...]  # overrides shared by every trial
    params: tuple[str, ...]  # `key=distribution:args`, as --random takes them
    trials: int  # the budget: trials the study may hold, whatever their outcome
    seed: int  # seeds TPE
    prune: bool  # ASHA may stop trials after an evaluation (jobs.schema.study)

    def to_dict(self) -> dict[str, Any]:
        """As stored in the sweep record: credentials inside override values are masked."""
        return {"search": "bayes", "recipe": self.recipe, "fixed": shown(self.fixed), "params": shown(self.params),
                "trials": self.trials, "seed": self.seed, "prune": self.prune}

    def raw(self) -> dict[str, Any]:
        """worker.json: as given, for the workers that build trials on the nodes."""
        return {"recipe": self.recipe, "fixed": list(self.fixed), "params": list(self.params),
                "trials": self.trials, "seed": self.seed, "prune": self.prune}

    @classmethod
    def from_raw(cls, data: dict[str, Any]) -> "BayesSpec":
        return cls(data["recipe"], tuple(data["fixed"]), tuple(data["params"]), data["trials"], data["seed"],
                   data["prune"])

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]

    def space(self) -> list[tuple[str, str, list[str]]]:
        """The parsed --param items, checked (the same distributions and errors as --random)."""
        if not self.params:
            raise UsageError("--search bayes needs at least one --param KEY=DIST:ARGS",
                             hint="e.g. --param optim.lr=loguniform:1e-4:1e-1")
        parsed = parse_random(list(self.params), "--param")
        keys = [key for key, _, _ in parsed]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise UsageError(f"--param {', '.join(repeated)} given more than once; give each key once")
        if self.trials < 1:
            raise UsageError(f"--trials {self.trials} must be >= 1 (the number of trials the study may run)")
        return parsed


def default_name(spec: BayesSpec) -> str:
    return f"{Path(spec.recipe).stem}-bayes-{spec.digest()}"


def trial_name(sweep: str, number: int, budget: int) -> str:
    return f"{sweep}-t{number:0{max(2, len(str(budget - 1)))}d}"


def distributions(space: list[tuple[str, str, list[str]]]) -> dict[str, "optuna.distributions.BaseDistribution"]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, dist, args in space:
        if dist == "choice":
            out[key] = CategoricalDistribution(args)  # the override texts: parsed as YAML like any override
        elif dist == "randint":
            out[key] = IntDistribution(int(args[0]), int(args[1]))
        else:
            out[key] = FloatDistribution(float(args[0]), float(args[1]), log=dist == "loguniform")
    return out


def override_text(value: Any) -> str:
    """A suggested value as override text; a float keeps every digit, so the run trains with exactly
    the value the study holds."""
    return repr(float(value)) if isinstance(value, float) else str(value)


def corners(space: list[tuple[str, str, list[str]]]) -> list[tuple[str, ...]]:
    """Override sets that reach every bound and every choice: if each loads, every suggestion will. A bound is
    written as a suggestion is (`override_text`): `uniform:0:1` on an int key suggests 0.53, so 0.0, not 0."""
    def text(dist: str, arg: str) -> str:
        return arg if dist == "choice" else override_text(int(arg) if dist == "randint" else float(arg))

    def at(i: int) -> tuple[str, ...]:
        return tuple(f"{k}={text(dist, args[min(i, len(args) - 1)])}" for k, dist, args in space)

    return [at(i) for i in range(max(len(args) for _, _, args in space))]
