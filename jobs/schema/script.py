"""The `script:` section of a recipe: a user's own training script, run on every rank by `launcher run`
instead of the built-in trainer, and what it is given when the run starts again."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from jobs.schema.checks import non_empty
from jobs.schema.errors import ConfigError, short
from jobs.schema.secrets import redact_args

_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# Replaced in every script argument (and resume argument) on the ranks by the run's folders; nothing
# else in an argument is touched, so braces a script needs for itself (JSON, format strings) pass as they are.
PLACEHOLDERS = ("{run_dir}", "{checkpoint_dir}")


@dataclass(frozen=True)
class ScriptConfig:
    """A training script run on every rank instead of the built-in trainer (`launcher run`)."""

    path: Optional[str] = None  # a Python file, run as `python PATH ARGS` (relative: to code_dir)
    module: Optional[str] = None  # or a module, run as `python -m MODULE ARGS`
    args: tuple[str, ...] = ()  # the script's own arguments, passed through untouched
    # appended to `args` whenever the run starts again after it made progress (a requeue, a restart,
    # a relaunch of the same run), never on its first start: e.g. nanoGPT's `--init_from=resume`
    resume_args: tuple[str, ...] = ()
    # the script's working directory: `run`, a folder of the run's own (relative paths it writes land
    # in the run, reads still find the code folder's files), or `code`, the code folder itself
    workdir: Literal["run", "code"] = "run"

    @property
    def shown(self) -> str:
        """How people see it: `train.py --lr 0.1` or `-m pkg.train --lr 0.1` (credentials masked)."""
        head = [self.path] if self.path else ["-m", self.module or ""]
        return " ".join([*head, *redact_args(self.args)])

    def check(self, src: str) -> None:
        if (self.path is None) == (self.module is None):
            raise ConfigError(src, "script", "needs exactly one of script.path and script.module",
                              "e.g. script.path=train.py, or script.module=mypkg.train")
        non_empty(src, "script.path", self.path)
        # the command line may hold bytes that are not UTF-8 (Python keeps them as surrogates): the run's
        # config.yaml, its logs and the ranks' command line could not carry them unchanged
        texts = {"script.path": self.path or "", **{f"script.args[{i}]": a for i, a in enumerate(self.args)},
                 **{f"script.resume_args[{i}]": a for i, a in enumerate(self.resume_args)}}
        for key, text in texts.items():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(src, key, f"{short(text)} is not valid UTF-8 text",
                                  "give it in UTF-8 (rename the file, or change the terminal's encoding)") from None
        if self.module is not None and not _MODULE.match(self.module):
            raise ConfigError(src, "script.module", f"{short(self.module)} is not a module name",
                              "write a dotted module name, e.g. mypkg.train")


def fill(arg: str, folders: dict[str, str]) -> str:
    """`arg` with `{run_dir}` and `{checkpoint_dir}` replaced by the run's folders (`folders` by placeholder)."""
    for placeholder in PLACEHOLDERS:
        arg = arg.replace(placeholder, folders[placeholder])
    return arg
