"""`launcher`'s arguments: each command's parser, and the parsing of a command line (options and overrides
in any order; `run`'s script arguments after `--`). What each command does is in `launcher.cli`, which
hands its commands to `parse_args`; nothing here runs a command.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Mapping

from jobs.schema.names import check_name
from jobs.schema.study import JUDGED_FROM_REPORT, REDUCTION_FACTOR

Command = Callable[[argparse.Namespace], int]


def _run_arguments(p: argparse.ArgumentParser) -> None:
    """What `launch` and `sbatch` share: the recipe, its overrides, the run name and resume policy."""
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--run-name", help="stable name; launching it again resumes it (default: recipe-confighash)")
    p.add_argument("--resume", choices=["auto", "never"], default="auto",
                   help="auto: continue from the newest committed checkpoint (default); never: refuse a run "
                        "that has one")


# A local launch returns when its ranks have ended; Slurm returns once the job is queued, VMs once the run's
# supervisor runs on node 0 (Backend.launch): --wait then follows it through `Backend.wait`.
WAIT_HELP = ("Slurm and VMs: block until the run has stopped for good, requeues and relaunches included "
             "(a local launch always does)")

# The pruner's rule, in the numbers jobs.schema.study gives it (the one place they are set).
_FACTOR, _FROM = REDUCTION_FACTOR, {1: "1st", 2: "2nd", 3: "3rd"}.get(JUDGED_FROM_REPORT, f"{JUDGED_FROM_REPORT}th")
PRUNE_HELP = (f"--search bayes: stop unpromising trials early by asynchronous successive halving (ASHA): at rungs "
              f"1, {_FACTOR}, {_FACTOR ** 2}, ... times the step of its {_FROM} evaluation, a trial goes on only "
              f"while in the top 1/{_FACTOR} of the trials that reached the rung")

# Arguments that name a run or a sweep, i.e. a folder or file in the runs directory: checked before any command runs.
NAME_ARGUMENTS = {"run": "run", "run_name": "run name (--run-name)", "sweep": "sweep", "name": "sweep name (--name)"}


def build_parser(commands: Mapping[str, Command]) -> tuple[argparse.ArgumentParser,
                                                         dict[str, argparse.ArgumentParser]]:
    """The top-level parser (help, unknown commands) and each command's own parser; `commands` maps each
    command's name to the function that runs it (launcher.cli.COMMANDS), set as `fn` on its arguments."""
    parser = argparse.ArgumentParser(prog="launcher", description="Launch PyTorch training recipes anywhere.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=commands[name])
        p.add_argument("--cluster", default=os.environ.get("LAUNCHER_CLUSTER", "local"),
                       help="cluster config name or path (default local)")
        p.add_argument("--runs-dir", default=os.environ.get("LAUNCHER_RUNS_DIR"),
                       help="where run directories live (default: the cluster config's runs_dir)")
        return p

    p = add("show", "print the resolved recipe and cluster config")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p = add("launch", "validate, then start a run (or resume it)")
    _run_arguments(p)
    p.add_argument("--wait", action="store_true", help=WAIT_HELP)
    p.add_argument("--run-id", help="continue the run with this id (in its run.json) on a machine without its run dir")
    p = add("run", "run a Python training script on every rank (script arguments after --)")
    p.add_argument("script", nargs="?", help="the script's path (or -m MODULE)")
    p.add_argument("overrides", nargs="*", help="section.key=value of the run's recipe, e.g. checkpoint.uri=s3://b/p")
    p.add_argument("-m", dest="module", help="run a module, as python -m MODULE")
    p.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    p.add_argument("--procs-per-node", type=int, default=1, help="ranks per machine (default 1)")
    p.add_argument("--code-dir", help="folder with your code: working directory and first on the ranks' import "
                                      "path (default: this directory)")
    p.add_argument("--run-name", help="stable name; running it again continues it (default: script-confighash)")
    p.add_argument("--resume-args", metavar="'ARGS'", help="arguments added to the script's own whenever the run "
                   "starts again after it made progress (a requeue, restart or relaunch), e.g. "
                   "--resume-args '--init_from=resume'; {run_dir} and {checkpoint_dir} are filled in")
    p.add_argument("--workdir", choices=["run", "code"], help="the script's working directory: run (default: a "
                   "folder of the run's own, new files land there, the code folder's are seen through links) or code")
    p.add_argument("--resume", choices=["auto", "never"], default="auto", help=argparse.SUPPRESS)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    p.add_argument("--wait", action="store_true", help=WAIT_HELP)
    p.add_argument("--sbatch", action="store_true", help="Slurm: print a standalone sbatch script instead of "
                                                         "submitting through submitit")
    p.add_argument("--submit", action="store_true", help="with --sbatch: also submit the script")
    p = add("export", "write a run's newest model weights as a plain state dict")
    p.add_argument("run")
    p.add_argument("--to", required=True, help="output file (path or fsspec URI)")
    p = add("plot", "draw runs' training and validation curves into an image")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--metric", action="append", default=[], help="a metric to draw (repeat; default: train/loss "
                                                                  "and every val/ metric)")
    p.add_argument("--out", required=True, help="image file: .png, .pdf or .svg")
    p = add("status", "show a run's state")
    p.add_argument("run")
    p = add("logs", "print a rank's log")
    p.add_argument("run")
    p.add_argument("--rank", type=int, default=0, help="whose log (default 0)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing what the rank adds while the run lives")
    p = add("cancel", "stop a run (a recipe's ranks save a checkpoint first; a script gets SIGTERM)")
    p.add_argument("run")
    p = add("stacks", "print every rank's Python stack now, ranks with identical stacks together (a live run)")
    p.add_argument("run")
    p = add("doctor", "name why a run failed and the fix; without RUN, check the environment")
    p.add_argument("run", nargs="?", metavar="RUN")
    p.add_argument("--store", metavar="URI", help="without RUN: also list this checkpoint folder (s3://BUCKET/PREFIX)")
    _sweep_commands(add)
    p = add("sbatch", "print a standalone sbatch script for a run (and submit it with --submit)")
    _run_arguments(p)
    p.add_argument("--submit", action="store_true", help="also submit the script with sbatch")
    p = add("skypilot", "print a SkyPilot task file for a run (a recovered managed job resumes)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--run-name", help="the run's name on the nodes, before the task id's hash (default: recipe-confighash)")
    p.add_argument("--out", help="write the task file here instead of printing it")
    return parser, sub.choices


def _sweep_commands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = add("sweep", "grid, random or Bayesian hyper-parameter search: one run per trial (a job array on Slurm)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, shared by every trial")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="try each value (repeat for a cartesian product)")
    p.add_argument("--random", action="append", default=[], metavar="KEY=DIST:ARGS",
                   help="sample: uniform:LOW:HIGH, loguniform:LOW:HIGH, randint:LOW:HIGH or choice:A,B,...")
    p.add_argument("--trials", type=int, help="random samples (per grid point when combined with --grid); "
                                              "--search bayes: how many trials the study runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random samples, or of the Bayesian "
                                                         "sampler (default 0)")
    p.add_argument("--name", help="sweep name (default: <recipe>-sweep-<hash of the sweep spec>; "
                                    "--search bayes: <recipe>-bayes-<hash>)")
    p.add_argument("--wait", action="store_true", help="Slurm: block until every trial has finished for good "
                                                         "(a local sweep always does)")
    p.add_argument("--max-parallel", type=int, help="Slurm: run at most this many trials at once")
    p.add_argument("--search", choices=["bayes"], help="bayes: Optuna's seeded TPE over --param, the study in a "
                                                       "journal file in the sweep's folder")
    p.add_argument("--param", action="append", default=[], metavar="KEY=DIST:ARGS",
                   help="--search bayes: a parameter and its range, as --random takes them")
    p.add_argument("--prune", action="store_true", help=PRUNE_HELP)
    p.add_argument("--workers", type=int, help="--search bayes: workers drawing trials from the study (a Slurm job "
                                               "array of this many; locally processes; default 1)")
    p = add("sweep-status", "table of a sweep's trials, best first")
    p.add_argument("sweep")
    p.add_argument("--metric", help="rank by this metric (default: the recipe's checkpoint.best_metric, or val/acc)")
    p.add_argument("--mode", choices=["max", "min"], help="whether larger or smaller is better "
                                                          "(default: the recipe's checkpoint.best_mode)")
    p.add_argument("--plot", metavar="FILE", help="also draw the metric by trial and against each parameter "
                                                  "(.png, .pdf or .svg)")


def parse_args(argv: list[str], commands: Mapping[str, Command]) -> argparse.Namespace:
    """Options and overrides in any order: `launch digits --cluster local trainer.epochs=2`.

    argparse's intermixed parsing refuses a parser with subcommands, so the command's own parser
    parses everything after the command name, intermixed.
    """
    parser, parsers = build_parser(commands)
    if not argv or argv[0] not in parsers:
        return parser.parse_args(argv)  # -h, no command or an unknown one: argparse's own usage message
    ours, theirs = argv[1:], []
    if argv[0] == "run" and "--" in ours:  # `launcher run train.py -- --lr 0.1`: the script's, untouched
        cut = ours.index("--")
        ours, theirs = ours[:cut], ours[cut + 1:]
    if argv[0] == "run":
        ours = _glue_resume_args(ours)
        _refuse_script_options(parsers["run"], ours)
    args = parsers[argv[0]].parse_intermixed_args(ours)
    if argv[0] == "run":
        args.script_args = theirs
        _script_or_module(parsers["run"], args)
    return args


def _glue_resume_args(ours: list[str]) -> list[str]:
    """`--resume-args --init_from=resume` as `--resume-args=--init_from=resume`: argparse takes a value that
    starts with a dash for an option, and resume arguments always do."""
    out, it = [], iter(ours)
    for arg in it:
        out.append(f"{arg}={next(it, '')}" if arg == "--resume-args" else arg)
    return out


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
