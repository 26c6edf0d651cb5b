"""`launcher` command line: a thin layer over config loading, run directories and backends. This module
holds what each command does (`COMMANDS`) and `main`; `launcher.cli_args` builds the parsers.

Every command that starts runs begins with the same checks (`launcher.preflight.Target`); the
backend comes from the cluster config (`launcher.backends.get`), and commands use only its interface.
"""
from __future__ import annotations

import argparse
import signal
import sys

import yaml

from launcher import backends, cli_args, sbatch
from launcher.backends.base import Backend
from launcher.backends.slurm_options import slurm_section
from launcher.cli_args import Command
from launcher.preflight import Target
from jobs.schema.run_dir import ENDED_BY_STOP, Run
from launcher.runs import default_run_name, find_run, runs_root
from launcher.sweeps.bayes import BayesSpec, default_name as default_bayes_name, is_bayes, print_status, run_bayes, \
    summarize, table_record
from launcher.sweeps.record import read_record
from launcher.sweeps.space import SweepSpec, default_sweep_name
from launcher.sweeps.table import print_table, trial_rows
from launcher.sweeps.trials import run_sweep
from launcher.scripts import restart_hint, script_recipe
from jobs.schema import RecipeConfig, find_config, load_cluster, recipe_document, search_path, to_yaml
from jobs.schema.errors import UsageError
from jobs.schema.names import check_name
from jobs.schema.secrets import redact, redact_text, write_private


def cmd_show(args: argparse.Namespace) -> int:
    target = Target.load(args.cluster)
    recipe = target.recipe(args.recipe, args.overrides, check_backend=False, launching=False)
    runs = f"script {recipe.script.shown}" if recipe.script else f"gradient accumulation {recipe.grad_accum or 'auto'}"
    print(f"# recipe {recipe.name}: world size {recipe.parallel.world_size}, {runs}, "
          f"default run name {default_run_name(recipe)}")
    shown = redact(recipe_document(recipe))  # a script recipe: only what it uses, as its run's config.yaml
    print(yaml.safe_dump(shown, sort_keys=False), end="")
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
                         args.overrides, args.resume_args, args.workdir)
    recipe = target.checked(made, "command line", check_backend=not args.sbatch or args.submit)
    return _sbatch(target, recipe, args) if args.sbatch else _launch(target, recipe, args)


def _launch(target: Target, recipe: RecipeConfig, args: argparse.Namespace) -> int:
    name = args.run_name or check_name("default run name", default_run_name(recipe))
    root = target.runs_root(args.runs_dir)
    run = target.prepare(recipe, root, name, args.resume, run_id=args.run_id)
    print(f"run {name}: {run.dir} ({target.cluster.backend} backend, {recipe.parallel.world_size} ranks)", flush=True)
    _restart_hint(recipe, target)
    code = target.backend.launch(recipe, target.cluster, run)
    if code == 0 and args.wait:
        code = _wait(target.backend, run)
    return _report(run, code)


def _restart_hint(recipe: RecipeConfig, target: Target) -> None:
    hint = restart_hint(recipe, target.cluster.backend, target.backend.RESTARTS_RUNS)
    if hint:  # on stderr: `launcher run --sbatch` prints the job script on stdout
        print(hint, file=sys.stderr, flush=True)


def _wait(backend: Backend, run: Run) -> int:
    """`--wait`: until the run has stopped for good (requeues included); 0 if it completed."""
    state = backend.wait([run])[run.name]
    if state == "unknown":  # the wait gave up on a backend that could not be asked (it said why)
        print(f"run {run.name}: state unknown (launcher status {run.name} asks again)", flush=True)
        return 1
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
    _restart_hint(recipe, target)
    script = sbatch.render_sbatch(recipe, target.cluster, run, python)
    path = run.dir / sbatch.SCRIPT_NAME
    write_private(path, script)  # slurm.setup lines are the user's shell: they may hold a credential
    sys.stdout.write(redact_text(script))  # as the file, but a URL credential in a setup line masked
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
    if args.seed < 0:  # numpy's SeedSequence, behind every trial's sampler, takes none (found in the worker)
        raise UsageError(f"--seed {args.seed} must be >= 0 (it seeds the Bayesian sampler)", hint="e.g. --seed 0")


def _report(run: Run, code: int) -> int:
    """One line on how the run ended, and its exit code: both from its records, which the backend has
    settled (result.json and run.json say the same)."""
    result = run.result()
    code = run.info().exit_code or code
    if result.exit_code is not None:  # `launcher run`: the script's own outcome
        killed = f" (killed by {signal.Signals(code - 128).name})" if code - 128 in set(signal.Signals) else ""
        said = {"completed": "the script completed", "failed": f"the script failed with exit code {code}{killed}",
                "preempted": f"the script was stopped by {result.signal}",
                "cancelled": f"the script was cancelled ({result.signal})"}[result.outcome]
        print(f"run {run.name}: {said}; logs: launcher logs {run.name} [--rank N]", flush=True)
        return code or (1 if result.outcome != "completed" else 0)
    if result:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if k.startswith("val/"))
        print(f"{result.outcome} at step {result.step}: {metrics}", flush=True)
        if result.outcome in ENDED_BY_STOP:
            print(f"stopped by {result.signal} after a checkpoint; the same command resumes it", flush=True)
            return code or 1
        if result.outcome == "failed":
            print(f"run failed with exit code {code or 1}; logs: {run.dir / 'logs'}", file=sys.stderr)
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


def cmd_stacks(args: argparse.Namespace) -> int:
    """Every rank's Python stack now, grouped by identical stacks; each rank's dump under logs/stacks/<time>/."""
    from jobs.stacks import dump_folder, group

    run = _existing_run(args)
    state = backends.status(run)["state"]
    if state != "running":  # queued, starting, requeued or ended: no rank to read
        raise UsageError(f"run {run.name} is not running ({state}): stacks are read from running ranks; "
                         f"`launcher doctor {run.name}` explains a run that has ended")
    dest = dump_folder(run.dir)
    texts = backends.of_run(run).stacks(run, dest)
    if not texts:
        raise UsageError(f"run {run.name}: no rank has recorded its process yet (they record it as they start): "
                         "try again in a few seconds")
    for rank in range(run.recipe().parallel.world_size):  # a rank that died while the others hang: said
        texts.setdefault(rank, "no stack: no live process of this rank on any node\n")
    dest.mkdir(parents=True, exist_ok=True)
    for rank, text in texts.items():  # the nodes wrote theirs there too; VMs' folders are on their hosts
        (dest / f"rank{rank}.txt").write_text(text)
    print(group(texts), end="")
    print(f"(each rank's dump: {dest})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """A run's failure named with its fix, or (no run) the environment checked: 0 if nothing is wrong, else 1."""
    from launcher.doctor.command import doctor_environment, doctor_run  # torch, boto3, asyncssh: only when asked

    if args.run is None:
        return doctor_environment(load_cluster(args.cluster), args.store)
    return doctor_run(_existing_run(args))


def _existing_run(args: argparse.Namespace) -> Run:
    return find_run(args.run, runs_root(load_cluster(args.cluster), args.runs_dir))


# Each command's function, by its name on the command line (launcher.cli_args builds their parsers).
COMMANDS: dict[str, Command] = {
    "show": cmd_show, "launch": cmd_launch, "run": cmd_run, "export": cmd_export, "plot": cmd_plot,
    "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel, "stacks": cmd_stacks, "doctor": cmd_doctor,
    "sweep": cmd_sweep, "sweep-status": cmd_sweep_status, "sbatch": cmd_sbatch, "skypilot": cmd_skypilot,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options and overrides in any order: `launch digits --cluster local trainer.epochs=2` (cli_args)."""
    return cli_args.parse_args(argv, COMMANDS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        cli_args.check_names(args)
        return args.fn(args)
    except UsageError as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return err.exit_code
