"""`launcher` command line: a thin layer over config loading, run directories and backends."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Callable

from launcher import backends, sbatch
from schema import RecipeConfig, load_cluster, load_recipe, to_yaml
from schema.errors import UsageError
from schema.names import check_name
from launcher.ownership import check_checkpoint_folder
from launcher.runs import Run, default_run_name, find_run, prepare_run, run_at, runs_root
from schema.secrets import redact_text
from launcher.sweep import add_sweep_commands


def cmd_show(args: argparse.Namespace) -> int:
    recipe = _load_recipe(args)
    cluster = load_cluster(args.cluster)
    cluster.check_recipe(recipe, f"cluster config {args.cluster}")
    print(f"# recipe {recipe.name}: world size {recipe.parallel.world_size}, "
          f"gradient accumulation {recipe.grad_accum}, default run name {default_run_name(recipe)}")
    print(to_yaml(recipe, redacted=True), end="")
    print(f"# cluster {cluster.name}")
    print(to_yaml(cluster, redacted=True), end="")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    recipe = _load_recipe(args)
    cluster = load_cluster(args.cluster)
    cluster.check_recipe(recipe, f"cluster config {args.cluster}")
    backend = backends.get(cluster)
    backend.check(recipe, cluster)  # everything is validated before a directory is made or a job started
    name = args.run_name or check_name("default run name", default_run_name(recipe))
    root = runs_root(cluster, args.runs_dir)
    backends.refuse_if_running(run_at(root, name))  # before its directory is touched
    check_checkpoint_folder(recipe, cluster, run_at(root, name), args.run_id)  # before anything is written
    run = prepare_run(recipe, cluster, name, root, args.resume, run_id=args.run_id)
    print(f"run {name}: {run.dir} ({cluster.backend} backend, {recipe.parallel.world_size} ranks)", flush=True)
    code = backend.launch(recipe, cluster, run, wait=args.wait)
    return _report(run, code)


def _load_recipe(args: argparse.Namespace) -> RecipeConfig:
    """The recipe with its overrides; its name must be a valid name, since run names derive from it."""
    recipe = load_recipe(args.recipe, args.overrides)
    check_name("recipe name", recipe.name)
    return recipe


def _report(run: Run, code: int) -> int:
    result = run.result()
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


def cmd_status(args: argparse.Namespace) -> int:
    run = _existing_run(args)
    for key, value in backends.status(run).items():
        print(f"{key}: {value}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    run = _existing_run(args)
    path = run.dir / "logs" / f"rank{args.rank}.log"
    if not path.exists():
        raise UsageError(f"{path}: no log for rank {args.rank} (yet)")
    # a log is what a process wrote, not necessarily UTF-8: show undecodable bytes as U+FFFD, never fail
    with open(path, encoding="utf-8", errors="replace") as f:
        sys.stdout.write(f.read())
        while args.follow and backends.status(run).get("state") in ("running", "pending", "requeued"):
            line = f.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.5)
        sys.stdout.write(f.read())
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    run = _existing_run(args)
    print(backends.cancel(run))
    return 0


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
    p = add("export", cmd_export, "write a run's newest model weights as a plain state dict")
    p.add_argument("run")
    p.add_argument("--to", required=True, help="output file (path or fsspec URI)")
    p = add("status", cmd_status, "show a run's state")
    p.add_argument("run")
    p = add("logs", cmd_logs, "print a rank's log")
    p.add_argument("run")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--follow", "-f", action="store_true")
    p = add("cancel", cmd_cancel, "stop a run (it saves a checkpoint first)")
    p.add_argument("run")
    add_sweep_commands(sub, add)
    p = add("sbatch", sbatch.cmd_sbatch, "print a standalone sbatch script for a run (and submit it with --submit)")
    _run_arguments(p)
    p.add_argument("--submit", action="store_true", help="also submit the script with sbatch")
    return parser, sub.choices


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options and overrides in any order: `launch digits --cluster local trainer.epochs=2`.

    argparse's intermixed parsing refuses a parser with subcommands, so the command's own parser
    parses everything after the command name, intermixed.
    """
    parser, commands = build_parser()
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # -h, no command or an unknown one: argparse's own usage message
    return commands[argv[0]].parse_intermixed_args(argv[1:])


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


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
