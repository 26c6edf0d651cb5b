"""Hyper-parameter sweeps: a grid or random search where every trial is an ordinary run.

    launcher sweep digits trainer.max_steps=100 --grid optim.lr=1e-3,1e-2 --grid trainer.micro_batch=16,32
    launcher sweep digits --random optim.lr=loguniform:1e-4:1e-1 --random model.dropout=uniform:0:0.5 --trials 8
    launcher sweep-status digits-sweep-1a2b3c4d

Every trial's full config is loaded and validated before anything is created or submitted. Each
trial is a normal run directory `<sweep>-tNN` (own checkpoints; `launcher status/logs/cancel` work on
it). The sweep itself is a small record, `<runs_dir>/sweeps/<sweep>.json`, naming its trials. The
default sweep name hashes the sweep spec, so re-running the same command finds the same trials and
resumes them. On Slurm all trials go out as one job array; locally they run one after another.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from launcher import backends
from schema import RECIPES_DIR, ClusterConfig, RecipeConfig, find_config, load_cluster, load_recipe
from schema.errors import UsageError
from schema.names import check_name
from launcher.runs import Run, prepare_run, runs_root
from schema.secrets import redact_text

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
# States after which a trial needs nothing more; "completed" trials are not started again on a re-run.
DONE_STATES = {"completed"}
ACTIVE_STATES = {"running", "pending", "requeued", "submitted", "configuring", "completing", "suspended"}


# ----------------------------------------------------------------------------- the search space
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
        return {"recipe": self.recipe, "fixed": _shown(self.fixed), "grid": _shown(self.grid),
                "random": _shown(self.random), "trials": self.trials, "seed": self.seed}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Trial:
    name: str  # run name, `<sweep>-tNN`
    overrides: tuple[str, ...]  # this trial's own overrides (after the fixed ones)


def _shown(overrides: tuple[str, ...]) -> list[str]:
    return [redact_text(item) for item in overrides]


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
            raise UsageError(f"--grid {item!r}: empty value in {raw!r}", hint=f"separate values with single commas")
        axes.append((key, values))
    return axes


def parse_random(items: list[str]) -> list[tuple[str, str, list[str]]]:
    """`optim.lr=loguniform:1e-4:1e-1` -> ("optim.lr", "loguniform", ["1e-4", "1e-1"]), bounds checked."""
    out = []
    for item in items:
        key, raw = _key_value(item, "--random")
        dist, _, args = raw.partition(":")
        if dist not in DISTRIBUTIONS:
            raise UsageError(f"--random {item!r}: unknown distribution {dist!r}", hint=f"use one of uniform:LOW:HIGH, "
                             "loguniform:LOW:HIGH, randint:LOW:HIGH, choice:A,B,...")
        if dist == "choice":
            values = split_values(args)
            if not args or any(v == "" for v in values):
                raise UsageError(f"--random {item!r}: choice needs values", hint=f"e.g. {key}=choice:16,32")
            out.append((key, dist, values))
            continue
        bounds = args.split(":")
        number = int if dist == "randint" else float
        try:
            low, high = (number(b) for b in bounds) if len(bounds) == 2 else (None, None)
        except ValueError:
            low = high = None
        if low is None or not low < high:
            raise UsageError(f"--random {item!r}: {dist} needs two {number.__name__} bounds LOW:HIGH with LOW < HIGH",
                             hint=f"e.g. {key}={dist}:{'1:8' if dist == 'randint' else '1e-4:1e-1'}")
        if dist == "loguniform" and low <= 0:
            raise UsageError(f"--random {item!r}: loguniform bounds must be > 0")
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
    rng = random.Random(spec.seed)
    points = list(itertools.product(*[[f"{k}={v}" for v in values] for k, values in axes]))
    combos = []
    for point in points:
        for _ in range(spec.trials):
            combos.append(tuple(point) + tuple(f"{k}={sample(d, a, rng)}" for k, d, a in dists))
    width = max(2, len(str(len(combos) - 1)))
    return [Trial(f"{sweep_name}-t{i:0{width}d}", combo) for i, combo in enumerate(combos)]


def default_sweep_name(spec: SweepSpec) -> str:
    return f"{Path(spec.recipe).stem}-sweep-{spec.digest()}"


# ----------------------------------------------------------------------------- validation
def resolve_trials(spec: SweepSpec, trials: list[Trial], cluster: ClusterConfig,
                   cluster_name: str) -> list[RecipeConfig]:
    """Load and check every trial's config; the first bad one stops the sweep before anything exists."""
    backend = backends.get(cluster)
    recipes = []
    for trial in trials:
        try:
            recipe = load_recipe(spec.recipe, list(spec.fixed) + list(trial.overrides))
            cluster.check_recipe(recipe, f"cluster config {cluster_name}")
            backend.check(recipe, cluster)
        except UsageError as err:
            raise UsageError(f"trial {trial.name} ({' '.join(trial.overrides)}) is invalid; nothing was created "
                             f"or submitted:\n{err}") from None
        recipes.append(recipe)
    if cluster.backend == "slurm":
        check_one_shape(trials, recipes, cluster)
    return recipes


def check_one_shape(trials: list[Trial], recipes: list[RecipeConfig], cluster: ClusterConfig) -> None:
    """A Slurm job array has one set of #SBATCH options, so every trial must ask for the same resources."""
    from launcher.backends.slurm import executor_parameters

    def shape(recipe: RecipeConfig) -> dict[str, Any]:
        params = executor_parameters(recipe, cluster, Run("sweep", Path(".")))
        return {k: v for k, v in params.items() if k != "job_name"}

    first = shape(recipes[0])
    for trial, recipe in zip(trials[1:], recipes[1:]):
        if shape(recipe) != first:
            a, b = recipes[0].parallel, recipe.parallel
            varied = sorted({o.split("=", 1)[0] for o in trial.overrides if o.startswith("parallel.")})
            raise UsageError(
                f"trial {trial.name} asks for parallel.nodes={b.nodes} parallel.procs_per_node={b.procs_per_node} "
                f"but {trials[0].name} for parallel.nodes={a.nodes} parallel.procs_per_node={a.procs_per_node}: "
                f"a Slurm job array submits every trial with the same resources (one set of #SBATCH options)"
                f"{' (varied: ' + ', '.join(varied) + ')' if varied else ''}; nothing was submitted",
                hint="keep parallel.* fixed in a sweep, or run one sweep per resource shape")


# ----------------------------------------------------------------------------- the sweep record
def sweeps_dir(root: Path) -> Path:
    return root / "sweeps"


def record_path(root: Path, name: str) -> Path:
    return sweeps_dir(root) / f"{name}.json"


def read_record(root: Path, name: str) -> dict[str, Any]:
    path = record_path(root, name)
    if not path.exists():
        known = sorted(p.stem for p in sweeps_dir(root).glob("*.json")) if sweeps_dir(root).exists() else []
        raise UsageError(f"{path}: no such sweep (sweeps in {sweeps_dir(root)}: {', '.join(known) or 'none'})")
    return json.loads(path.read_text())


def write_record(root: Path, name: str, record: dict[str, Any]) -> None:
    path = record_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)  # atomic, like run.json


def new_record(spec: SweepSpec, name: str, cluster: ClusterConfig, trials: list[Trial],
               recipe: RecipeConfig, root: Path) -> dict[str, Any]:
    """The existing record when the same sweep runs again; a different spec under the same name is refused."""
    path = record_path(root, name)
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("spec") != spec.to_dict():
            raise UsageError(f"sweep {name!r} already exists with another spec ({path})",
                             hint="choose another --name, or leave --name out to name the sweep by its spec")
        record["cluster"] = cluster.name
        return record
    return {"name": name, "recipe": recipe.name, "cluster": cluster.name, "spec": spec.to_dict(),
            "best_metric": recipe.checkpoint.best_metric or "val/acc", "best_mode": recipe.checkpoint.best_mode,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "launches": 0, "arrays": [],
            "trials": [{"run_name": t.name, "overrides": _shown(t.overrides), "job_id": None} for t in trials]}


# ----------------------------------------------------------------------------- running
def cmd_sweep(args: argparse.Namespace) -> int:
    find_config(args.recipe, RECIPES_DIR, "recipe")  # an unknown recipe is reported once, not per trial
    random_items = list(args.random)
    if random_items and args.trials is None:
        raise UsageError("--random needs --trials N (how many samples to draw)")
    spec = SweepSpec(args.recipe, tuple(args.overrides), tuple(args.grid), tuple(random_items),
                     args.trials if args.trials is not None else 1, args.seed)
    name = args.name or check_name("default sweep name", default_sweep_name(spec))
    trials = expand(spec, name)
    for trial in trials:  # `<sweep>-tNN` must itself be a valid run name (length)
        check_name("trial run name (a shorter --name makes it fit)", trial.name)
    cluster = load_cluster(args.cluster)
    recipes = resolve_trials(spec, trials, cluster, args.cluster)  # all of them, before anything exists
    check_name("recipe name", recipes[0].name)
    root = runs_root(cluster, args.runs_dir)
    record = new_record(spec, name, cluster, trials, recipes[0], root)
    todo = []
    for trial, recipe in zip(trials, recipes):
        why = _skip_reason(Run(trial.name, root / trial.name))
        if why:
            print(f"trial {trial.name}: {why}; not started again", flush=True)
        else:
            todo.append((trial, recipe))
    record["launches"] += 1
    write_record(root, name, record)
    print(f"sweep {name}: {len(trials)} trials of {recipes[0].name} ({cluster.backend} backend), "
          f"{len(todo)} to run; record {record_path(root, name)}", flush=True)
    if cluster.backend == "slurm":
        code = _submit_array(todo, cluster, root, record, args)
        if code == 0 and args.wait:
            code = _wait_all(root, record)
    else:
        code = _run_locally(todo, cluster, root, record)
    if args.wait or cluster.backend != "slurm":
        print_table(root, record, record["best_metric"], record["best_mode"])
    return code


def _skip_reason(run: Run) -> Optional[str]:
    """Completed trials are kept; a trial still queued or running must not get a second job."""
    if not run.info_path.exists():
        return None
    state = trial_state(run)
    if state in DONE_STATES:
        return "already completed"
    if state in ACTIVE_STATES:
        return f"still {state}"
    return None


def trial_state(run: Run) -> str:
    """`backends.status(run)`'s state (the Slurm backend also knows array elements that never started)."""
    if not run.info_path.exists():
        return "not started"
    return backends.status(run).get("state", "unknown")


def _set_trial_job(record: dict[str, Any], run_name: str, job_id: Optional[str]) -> None:
    for entry in record["trials"]:
        if entry["run_name"] == run_name:
            entry["job_id"] = job_id


def _run_locally(todo: list[tuple[Trial, RecipeConfig]], cluster: ClusterConfig, root: Path,
                 record: dict[str, Any]) -> int:
    """One trial after another through the local backend; an interrupted trial stops the sweep."""
    from launcher.backends import local

    failed = []
    for i, (trial, recipe) in enumerate(todo):
        run = prepare_run(recipe, cluster, trial.name, root, "auto")
        print(f"[{i + 1}/{len(todo)}] trial {trial.name}: {' '.join(trial.overrides)}", flush=True)
        code = local.launch(recipe, cluster, run)
        result = run.result()
        if result.signal:  # Ctrl-C / SIGTERM reached the ranks: they saved; resume by re-running
            print(f"trial {trial.name} stopped by {result.signal} at step {result.step}; the sweep stops "
                  "here (run the same command again to resume it)", file=sys.stderr, flush=True)
            return 1
        if code != 0 or result.outcome != "completed":
            failed.append(trial.name)
            print(f"trial {trial.name} failed (exit code {code}); logs: {run.dir / 'logs'}", file=sys.stderr,
                  flush=True)
    if failed:
        print(f"{len(failed)} trial(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _submit_array(todo: list[tuple[Trial, RecipeConfig]], cluster: ClusterConfig, root: Path,
                  record: dict[str, Any], args: argparse.Namespace) -> int:
    """All remaining trials as one Slurm job array: element i runs `rank_main(<trial i's run dir>)`."""
    from launcher.backends.slurm import make_executor, rank_main

    if not todo:
        return 0
    runs = [prepare_run(recipe, cluster, trial.name, root, "auto") for trial, recipe in todo]
    # A folder per launch, as for single runs: job ids repeat after a controller reset.
    folder = sweeps_dir(root) / record["name"] / "submitit" / f"launch-{record['launches']}"
    # The array's job name is the sweep's; its resources are every trial's (checked to be one shape).
    executor = make_executor(todo[0][1], cluster, Run(record["name"], folder), folder)
    if args.max_parallel:
        executor.update_parameters(array_parallelism=args.max_parallel)
    jobs = executor.map_array(rank_main, [str(run.dir) for run in runs])
    for run, job in zip(runs, jobs):
        run.update(job_id=job.job_id, job_ids=run.info().job_ids + [job.job_id],
                   submitit_folder=str(folder), state="submitted", sweep=record["name"])
        _set_trial_job(record, run.name, job.job_id)
    array_id = jobs[0].job_id.split("_")[0]
    record["arrays"].append(array_id)
    write_record(root, record["name"], record)
    print(f"submitted Slurm job array {array_id} ({len(jobs)} trials) for sweep {record['name']} "
          f"(table: launcher sweep-status {record['name']})", flush=True)
    return 0


def _wait_all(root: Path, record: dict[str, Any], poll_s: float = 3.0, lost_after_s: float = 120.0) -> int:
    """Block until every submitted trial stops for good (requeues included); 0 if all completed."""
    from launcher.backends.slurm import TERMINAL, array_states

    pending = {e["run_name"]: e["job_id"] for e in record["trials"] if e.get("job_id")}
    final: dict[str, str] = {}
    unknown_since: dict[str, float] = {}
    try:
        while pending:
            arrays = {a: array_states(a) for a in sorted({str(j).split("_")[0] for j in pending.values()})}
            for run_name, job_id in list(pending.items()):
                state = arrays[str(job_id).split("_")[0]].get(job_id, "UNKNOWN")
                if state == "UNKNOWN":  # neither sacct nor squeue knows it: wait a while, then give up
                    if time.monotonic() - unknown_since.setdefault(run_name, time.monotonic()) > lost_after_s:
                        final[run_name] = "UNKNOWN (Slurm has no record of it)"
                        del pending[run_name]
                    continue
                unknown_since.pop(run_name, None)
                # rank 0 marks "requeued" before `scontrol requeue`; the job runs again and marks "running"
                if state in TERMINAL and Run(run_name, root / run_name).info().state != "requeued":
                    final[run_name] = state
                    del pending[run_name]
            if pending:
                time.sleep(poll_s)
    except KeyboardInterrupt:  # only the waiting stops: the array keeps running on the cluster
        print(f"\nstopped waiting; {len(pending)} trial(s) still queued or running "
              f"(launcher sweep-status {record['name']})", file=sys.stderr)
        return 130
    bad = {n: s for n, s in final.items()
           if s != "COMPLETED" or Run(n, root / n).result().outcome != "completed"}
    for run_name, state in bad.items():
        print(f"trial {run_name}: Slurm {state}; logs: launcher logs {run_name}", file=sys.stderr)
    return 1 if bad else 0


# ----------------------------------------------------------------------------- status table
def _latest_logged(run: Run, metric: str) -> tuple[Optional[int], Optional[float]]:
    """The last value of `metric` in metrics.jsonl, for trials without a result yet."""
    path = run.dir / "metrics.jsonl"
    step, value = None, None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if metric in row:
                step, value = row.get("step"), row[metric]
    return step, value


def trial_rows(root: Path, record: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    rows = []
    for entry in record["trials"]:
        run = Run(entry["run_name"], root / entry["run_name"])
        state = trial_state(run)
        result = run.result()
        final = metric in result.metrics
        step, value = (result.step, result.metrics[metric]) if final else _latest_logged(run, metric)
        rows.append({"run": run.name, "overrides": " ".join(entry["overrides"]), "state": state,
                     "step": step if step is not None else result.step, "metric": value, "final": final})
    return rows


def sort_rows(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best first; trials without the metric last, in trial order (`sorted` is stable)."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r["metric"] is None, sign * r["metric"] if r["metric"] is not None else 0.0))


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    header = ["trial", "state", "step", metric, "overrides"]
    cells = [[r["run"], r["state"], "-" if r["step"] is None else str(r["step"]),
              "-" if r["metric"] is None else f"{r['metric']:.4f}{'' if r['final'] else '*'}", r["overrides"]]
             for r in rows]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *cells]]
    if any(r["metric"] is not None and not r["final"] for r in rows):
        lines.append("* latest logged value: the trial has not finished")
    return "\n".join(lines)


def print_table(root: Path, record: dict[str, Any], metric: str, mode: str) -> None:
    rows = sort_rows(trial_rows(root, record, metric), mode)
    print(f"sweep {record['name']}: {len(rows)} trials of {record['recipe']} on {record['cluster']}, "
          f"by {metric} ({mode}), best first")
    print(format_table(rows, metric), flush=True)


def cmd_sweep_status(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.cluster)
    root = runs_root(cluster, args.runs_dir)
    record = read_record(root, args.sweep)
    print_table(root, record, args.metric or record["best_metric"], args.mode or record["best_mode"])
    return 0


# ----------------------------------------------------------------------------- command line
def add_sweep_commands(sub: Any, add: Callable[[str, Callable[[argparse.Namespace], int], str],
                                               argparse.ArgumentParser]) -> None:
    """Register `sweep` and `sweep-status` with the CLI (`add` is build_parser's helper: --cluster, --runs-dir)."""
    p = add("sweep", cmd_sweep, "grid or random hyper-parameter search: one run per trial (a job array on Slurm)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, shared by every trial")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="try each value (repeat for a cartesian product)")
    p.add_argument("--random", action="append", default=[], metavar="KEY=DIST:ARGS",
                   help="sample: uniform:LOW:HIGH, loguniform:LOW:HIGH, randint:LOW:HIGH or choice:A,B,...")
    p.add_argument("--trials", type=int, help="random samples (per grid point when combined with --grid)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random samples (default 0)")
    p.add_argument("--name", help="sweep name (default: <recipe>-sweep-<hash of the sweep spec>)")
    p.add_argument("--wait", action="store_true", help="Slurm: block until every trial has finished for good")
    p.add_argument("--max-parallel", type=int, help="Slurm: run at most this many trials at once")
    p = add("sweep-status", cmd_sweep_status, "table of a sweep's trials, best first")
    p.add_argument("sweep")
    p.add_argument("--metric", help="rank by this metric (default: the recipe's checkpoint.best_metric or val/acc)")
    p.add_argument("--mode", choices=["max", "min"], help="whether larger or smaller is better "
                                                          "(default: the recipe's checkpoint.best_mode)")
