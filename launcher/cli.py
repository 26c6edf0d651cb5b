"""`launcher` command line: a thin layer over config loading, run directories and backends.

Every command that starts runs begins with the same checks (`launcher.preflight.Target`); the
backend comes from the cluster config (`launcher.backends.get`), and commands use only its interface.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import yaml

from launcher import backends, sbatch
from launcher.backends.base import Backend
from launcher.backends.slurm_options import slurm_section
from launcher.preflight import Target
from jobs.schema.run_dir import Run
from launcher.runs import default_run_name, find_run, runs_root
from launcher.sweeps.bayes import BayesSpec, default_name as default_bayes_name, is_bayes, print_status, run_bayes, \
    summarize, table_record
from launcher.sweeps.record import read_record
from launcher.sweeps.space import SweepSpec, default_sweep_name
from launcher.sweeps.table import print_table, trial_rows
from launcher.sweeps.trials import run_sweep
from launcher.scripts import script_recipe
from jobs.schema import RecipeConfig, find_config, load_cluster, search_path, to_dict, to_yaml
from jobs.schema.errors import UsageError
from jobs.schema.names import check_name
from jobs.schema.recipe import TRAINER_SECTIONS
from jobs.schema.secrets import redact, redact_text


def cmd_show(args: argparse.Namespace) -> int:
    target = Target.load(args.cluster)
    recipe = target.recipe(args.recipe, args.overrides, check_backend=False, launching=False)
    runs = f"script {recipe.script.shown}" if recipe.script else f"gradient accumulation {recipe.grad_accum or 'auto'}"
    print(f"# recipe {recipe.name}: world size {recipe.parallel.world_size}, {runs}, "
          f"default run name {default_run_name(recipe)}")
    shown = {k: v for k, v in redact(to_dict(recipe)).items() if not (recipe.script and k in TRAINER_SECTIONS)}
    print(yaml.safe_dump(shown, sort_keys=False), end="")  # a script recipe: only the sections it uses
    print(f"# cluster {target.cluster.name}")
    print(to_yaml(target.cluster, redacted=True), end="")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    target = Target.load(args.cluster)
    recipe = target.recipe(args.recipe, args.overrides)  # all checked before a directory or a job exists
    return _launch(target, recipe, args)


def cmd_run(args: argparse.Namespace) -> int:
    """`launcher run SCRIPT`: a recipe made of the script and the layout options, then as `launch`
    (or, with --sbatch, as `sbatch`)."""
    if args.submit and not args.sbatch:
        raise UsageError("--submit goes with --sbatch (submit the printed script)",
                         hint="without --sbatch, `launcher run --cluster <slurm config>` submits through submitit")
    target = Target.load(args.cluster)
    made = script_recipe(args.script, args.module, args.script_args, args.nodes, args.procs_per_node, args.code_dir,
                         args.overrides)
    recipe = target.checked(made, "command line", check_backend=not args.sbatch or args.submit)
    return _sbatch(target, recipe, args) if args.sbatch else _launch(target, recipe, args)


def _launch(target: Target, recipe: RecipeConfig, args: argparse.Namespace) -> int:
    name = args.run_name or check_name("default run name", default_run_name(recipe))
    root = target.runs_root(args.runs_dir)
    run = target.prepare(recipe, root, name, args.resume, run_id=args.run_id)
    print(f"run {name}: {run.dir} ({target.cluster.backend} backend, {recipe.parallel.world_size} ranks)", flush=True)
    code = target.backend.launch(recipe, target.cluster, run)
    if code == 0 and args.wait:
        code = _wait(target.backend, run)
    return _report(run, code)


def _wait(backend: Backend, run: Run) -> int:
    """`--wait`: until the run has stopped for good (requeues included); 0 if it completed."""
    state = backend.wait([run])[run.name]
    print(f"run {run.name} has stopped: {state}", flush=True)
    if state == "completed" and run.result().outcome == "completed":
        return 0
    return run.info().exit_code or 1  # a script's own exit code where one failed


def cmd_sbatch(args: argparse.Namespace) -> int:
    """Validate like `launch`, prepare the run directory, print (and maybe submit) a plain sbatch script."""
    target = Target.load(args.cluster)
    recipe = target.recipe(args.recipe, args.overrides, check_backend=args.submit)  # sbatch on PATH to submit
    return _sbatch(target, recipe, args)


def _sbatch(target: Target, recipe: RecipeConfig, args: argparse.Namespace) -> int:
    python = slurm_section(target.cluster).python or sys.executable
    name = args.run_name or check_name("default run name", default_run_name(recipe))
    root = target.runs_root(args.runs_dir)
    # rendered once before the directory exists, so a refused value leaves nothing behind
    sbatch.render_sbatch(recipe, target.cluster, Run.at(root / name), python)
    run = target.prepare(recipe, root, name, args.resume)
    script = sbatch.render_sbatch(recipe, target.cluster, run, python)
    path = run.dir / sbatch.SCRIPT_NAME
    path.write_text(script)
    sys.stdout.write(script)
    sys.stdout.flush()
    print(f"# run {name}: {run.dir}; script written to {path}", file=sys.stderr, flush=True)
    if args.submit:
        job_id = sbatch.submit(run, path)
        print(f"submitted Slurm job {job_id} for run {name} (logs: launcher logs {name})", file=sys.stderr, flush=True)
    return 0


def cmd_skypilot(args: argparse.Namespace) -> int:
    """Validate like `launch`, then print (or write) a SkyPilot task file; nothing is started here."""
    from launcher.skypilot import write_task

    target = Target.load(args.cluster)
    recipe = target.recipe(args.recipe, args.overrides, check_backend=False)  # SkyPilot starts the nodes
    return write_task(recipe, target.cluster, args.run_name or check_name("default run name",
                                                                         default_run_name(recipe)), args.out)


def cmd_sweep(args: argparse.Namespace) -> int:
    find_config(args.recipe, search_path(RecipeConfig), "recipe")  # an unknown recipe is reported once, not per trial
    _check_search_options(args)
    if args.search == "bayes":
        spec = BayesSpec(args.recipe, tuple(args.overrides), tuple(args.param), args.trials, args.seed, args.prune)
        name = args.name or check_name("default sweep name", default_bayes_name(spec))
        return run_bayes(spec, name, args.cluster, args.runs_dir, args.workers or 1, args.wait)
    if args.random and args.trials is None:
        raise UsageError("--random needs --trials N (how many samples to draw)")
    spec = SweepSpec(args.recipe, tuple(args.overrides), tuple(args.grid), tuple(args.random),
                     args.trials if args.trials is not None else 1, args.seed)
    name = args.name or check_name("default sweep name", default_sweep_name(spec))
    return run_sweep(spec, name, args.cluster, args.runs_dir, args.wait, args.max_parallel)


def cmd_sweep_status(args: argparse.Namespace) -> int:
    root = runs_root(load_cluster(args.cluster), args.runs_dir)
    record = read_record(root, args.sweep)
    out = None
    if args.plot:
        from launcher import plot  # matplotlib loads only when asked

        out = plot.check_out(args.plot)
    metric, mode = args.metric or record["best_metric"], args.mode or record["best_mode"]
    if is_bayes(record):  # the trials are the study's: best, pruned and importances come with the table
        summary = summarize(root, record)
        record = table_record(record, summary)
        print_status(root, record, summary, metric, mode)
    else:
        print_table(root, record, metric, mode)
    if out is not None:
        plot.save(plot.sweep_figure(trial_rows(root, record, metric), metric, mode), out)
        print(f"wrote {out}: {metric} by trial and against each swept parameter")
    return 0


def _check_search_options(args: argparse.Namespace) -> None:
    """Which options go with which search: refused before anything exists (exit 2)."""
    if args.search != "bayes":
        given = [f for f, v in (("--param", args.param), ("--prune", args.prune), ("--workers", args.workers)) if v]
        if given:
            raise UsageError(f"{given[0]} {' '.join(args.param) if given[0] == '--param' else ''}".rstrip()
                             + " goes with --search bayes (grid and random trials are fixed in advance and run to "
                             "their end)", hint=f"add --search bayes, or drop {given[0]}")
        return
    mixed = [f for f, v in (("--grid", args.grid), ("--random", args.random), ("--max-parallel", args.max_parallel))
             if v]
    if mixed:
        raise UsageError(f"--search bayes takes its search space from --param; {mixed[0]} belongs to grid and "
                         "random sweeps", hint="write --param KEY=DIST:ARGS (uniform, loguniform, randint, choice); "
                         "several trials at once: --workers K")
    if args.trials is None:
        raise UsageError("--search bayes needs --trials N (how many trials the study may run)")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers} must be >= 1 (workers running trials at once)")


def _report(run: Run, code: int) -> int:
    result = run.result()
    if result.exit_code is not None:  # `launcher run`: the script's own outcome
        said = {"completed": "the script completed", "failed": f"the script failed with exit code {code}",
                "preempted": f"the script was stopped by {result.signal}"}[result.outcome]
        print(f"run {run.name}: {said}; logs: launcher logs {run.name} [--rank N]", flush=True)
        return code or (1 if result.outcome == "preempted" else 0)
    if result:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if k.startswith("val/"))
        print(f"{result.outcome} at step {result.step}: {metrics}", flush=True)
        if result.outcome == "preempted":
            print(f"stopped by {result.signal} after a checkpoint; the same command resumes it", flush=True)
            return code or 1
    elif code != 0:
        print(f"run failed with exit code {code}; logs: {run.dir / 'logs'}", file=sys.stderr)
    return code


def cmd_export(args: argparse.Namespace) -> int:
    from jobs.export import export_run  # the data plane reads tensors; the CLI only points it at the run

    run = _existing_run(args)
    try:
        where = export_run(run.dir, args.to)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    print(f"wrote {args.to}: model weights from {where}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from launcher import plot  # matplotlib loads only for this command

    out = plot.check_out(args.out)
    root = runs_root(load_cluster(args.cluster), args.runs_dir)
    runs = {}
    for name in args.runs:
        check_name("run", name)
        runs[name] = plot.read_curves(find_run(name, root).dir)
    plot.save(plot.figure(runs, args.metric or None), out)
    print(f"wrote {out}: {', '.join(args.metric or plot.default_metrics(runs.values()))} of {', '.join(runs)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    run = _existing_run(args)
    for key, value in backends.status(run).items():
        print(f"{key}: {value}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    run = _existing_run(args)
    return backends.of_run(run).logs(run, args.rank, args.follow)


def cmd_cancel(args: argparse.Namespace) -> int:
    run = _existing_run(args)
    print(backends.cancel(run))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """A run's failure named with its fix, or (no run) the environment checked: 0 if nothing is wrong, else 1."""
    from launcher.doctor.command import doctor_environment, doctor_run  # torch, boto3, asyncssh: only when asked

    if args.run is None:
        return doctor_environment(load_cluster(args.cluster), args.store)
    return doctor_run(_existing_run(args))


def _run_arguments(p: argparse.ArgumentParser) -> None:
    """What `launch` and `sbatch` share: the recipe, its overrides, the run name and resume policy."""
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--run-name", help="stable name; launching it again resumes it (default: recipe-confighash)")
    p.add_argument("--resume", choices=["auto", "never"], default="auto",
                   help="auto: continue from the newest committed checkpoint (default)")


def _existing_run(args: argparse.Namespace) -> Run:
    return find_run(args.run, runs_root(load_cluster(args.cluster), args.runs_dir))


# Arguments that name a run or a sweep, i.e. a folder or file in the runs directory: checked before any command runs.
NAME_ARGUMENTS = {"run": "run", "run_name": "run name (--run-name)", "sweep": "sweep", "name": "sweep name (--name)"}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (help, unknown commands) and each command's own parser."""
    parser = argparse.ArgumentParser(prog="launcher", description="Launch PyTorch training recipes anywhere.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        p.add_argument("--cluster", default=os.environ.get("LAUNCHER_CLUSTER", "local"),
                       help="cluster config name or path (default local)")
        p.add_argument("--runs-dir", default=os.environ.get("LAUNCHER_RUNS_DIR"),
                       help="where run directories live (default: the cluster config's runs_dir)")
        return p

    p = add("show", cmd_show, "print the resolved recipe and cluster config")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p = add("launch", cmd_launch, "validate, then start a run (or resume it)")
    _run_arguments(p)
    p.add_argument("--wait", action="store_true", help="Slurm: block until the job has finished for good")
    p.add_argument("--run-id", help="continue the run with this id (in its run.json) on a machine without its run dir")
    p = add("run", cmd_run, "run a Python training script on every rank (script arguments after --)")
    p.add_argument("script", nargs="?", help="the script's path (or -m MODULE)")
    p.add_argument("overrides", nargs="*", help="section.key=value of the run's recipe, e.g. checkpoint.uri=s3://b/p")
    p.add_argument("-m", dest="module", help="run a module, as python -m MODULE")
    p.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    p.add_argument("--procs-per-node", type=int, default=1, help="ranks per machine (default 1)")
    p.add_argument("--code-dir", help="folder with your code: working directory and first on the ranks' import "
                                      "path (default: this directory)")
    p.add_argument("--run-name", help="stable name; running it again continues it (default: script-confighash)")
    p.add_argument("--resume", choices=["auto", "never"], default="auto", help=argparse.SUPPRESS)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    p.add_argument("--wait", action="store_true", help="Slurm: block until the job has finished for good")
    p.add_argument("--sbatch", action="store_true", help="Slurm: print a standalone sbatch script instead of "
                                                         "submitting through submitit")
    p.add_argument("--submit", action="store_true", help="with --sbatch: also submit the script")
    p = add("export", cmd_export, "write a run's newest model weights as a plain state dict")
    p.add_argument("run")
    p.add_argument("--to", required=True, help="output file (path or fsspec URI)")
    p = add("plot", cmd_plot, "draw runs' training and validation curves into an image")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--metric", action="append", default=[], help="a metric to draw (repeat; default: train/loss "
                                                                  "and every val/ metric)")
    p.add_argument("--out", required=True, help="image file: .png, .pdf or .svg")
    p = add("status", cmd_status, "show a run's state")
    p.add_argument("run")
    p = add("logs", cmd_logs, "print a rank's log")
    p.add_argument("run")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--follow", "-f", action="store_true")
    p = add("cancel", cmd_cancel, "stop a run (it saves a checkpoint first)")
    p.add_argument("run")
    p = add("doctor", cmd_doctor, "name why a run failed and the fix; without RUN, check the environment")
    p.add_argument("run", nargs="?", metavar="RUN")
    p.add_argument("--store", metavar="URI", help="without RUN: also list this checkpoint folder (s3://BUCKET/PREFIX)")
    _sweep_commands(add)
    p = add("sbatch", cmd_sbatch, "print a standalone sbatch script for a run (and submit it with --submit)")
    _run_arguments(p)
    p.add_argument("--submit", action="store_true", help="also submit the script with sbatch")
    p = add("skypilot", cmd_skypilot, "print a SkyPilot task file for a run (a recovered managed job resumes)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--run-name", help="the run's name on the nodes, before the task id's hash (default: recipe-confighash)")
    p.add_argument("--out", help="write the task file here instead of printing it")
    return parser, sub.choices


def _sweep_commands(add: Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]) -> None:
    p = add("sweep", cmd_sweep, "grid, random or Bayesian hyper-parameter search: one run per trial (a job array on Slurm)")
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
    p.add_argument("--search", choices=["bayes"], help="bayes: Optuna's seeded TPE over --param, the study in a "
                                                       "journal file in the sweep's folder")
    p.add_argument("--param", action="append", default=[], metavar="KEY=DIST:ARGS",
                   help="--search bayes: a parameter and its range, as --random takes them")
    p.add_argument("--prune", action="store_true", help="--search bayes: stop trials whose metric is below the "
                                                        "median of earlier trials at the same step")
    p.add_argument("--workers", type=int, help="--search bayes: workers drawing trials from the study (a Slurm job "
                                               "array of this many; locally processes; default 1)")
    p = add("sweep-status", cmd_sweep_status, "table of a sweep's trials, best first")
    p.add_argument("sweep")
    p.add_argument("--metric", help="rank by this metric (default: the recipe's checkpoint.best_metric or val/acc)")
    p.add_argument("--mode", choices=["max", "min"], help="whether larger or smaller is better "
                                                          "(default: the recipe's checkpoint.best_mode)")
    p.add_argument("--plot", metavar="FILE", help="also draw the metric by trial and against each parameter "
                                                  "(.png, .pdf or .svg)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options and overrides in any order: `launch digits --cluster local trainer.epochs=2`.

    argparse's intermixed parsing refuses a parser with subcommands, so the command's own parser
    parses everything after the command name, intermixed.
    """
    parser, commands = build_parser()
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # -h, no command or an unknown one: argparse's own usage message
    ours, theirs = argv[1:], []
    if argv[0] == "run" and "--" in ours:  # `launcher run train.py -- --lr 0.1`: the script's, untouched
        cut = ours.index("--")
        ours, theirs = ours[:cut], ours[cut + 1:]
    if argv[0] == "run":
        _refuse_script_options(commands["run"], ours)
    args = commands[argv[0]].parse_intermixed_args(ours)
    if argv[0] == "run":
        args.script_args = theirs
        _script_or_module(commands["run"], args)
    return args


def _refuse_script_options(parser: argparse.ArgumentParser, ours: list[str]) -> None:
    """An option `run` does not know is most likely the script's own: say where those go."""
    unknown = [a for a in ours if a.startswith("-") and a.split("=", 1)[0] not in parser._option_string_actions
               and not parser._negative_number_matcher.match(a)]  # `--nodes -1`: a value, refused by its check
    if unknown:
        parser.error(f"unknown option {unknown[0]!r}: the script's own arguments go after --, "
                     f"e.g. launcher run train.py --procs-per-node 2 -- {unknown[0]} ...")


def _script_or_module(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`run SCRIPT [overrides]` or `run -m MODULE [overrides]`: with -m the first positional is an override."""
    if args.module is not None and args.script is not None:
        args.overrides.insert(0, args.script)
        args.script = None
    if args.script is None and args.module is None:
        parser.error("give a script to run (or -m MODULE); its own arguments go after --")
    if args.script is not None and "=" in args.script and not args.script.endswith(".py"):
        parser.error(f"{args.script!r} looks like an override; give the script first: run SCRIPT [key=value ...]")


def check_names(args: argparse.Namespace) -> None:
    """Refuse a run or sweep argument that is not a plain name, before a command reads or writes anything."""
    for attr, kind in NAME_ARGUMENTS.items():
        value = getattr(args, attr, None)
        if value is not None:
            check_name(kind, value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        check_names(args)
        return args.fn(args)
    except UsageError as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return err.exit_code
