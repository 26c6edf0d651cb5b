"""`launcher doctor [RUN]`: print the findings about a run, or the checks of the environment; the exit code."""
from __future__ import annotations

import sys
from typing import Optional

from launcher.doctor.diagnose import diagnose
from launcher.doctor.environment import check_environment
from launcher.doctor.findings import exit_code, render_checks, render_findings
from launcher.doctor.records import read_run
from jobs.schema import ClusterConfig
from jobs.schema.run_dir import Run
from jobs.schema.secrets import redact_text


def doctor_run(run: Run) -> int:
    findings = diagnose(read_run(run))
    sys.stdout.write(redact_text(render_findings(run.name, findings)))  # a log line may quote a secret URL
    return exit_code(findings)


def doctor_environment(cluster: ClusterConfig, store: Optional[str]) -> int:
    checks = check_environment(cluster, store)
    sys.stdout.write(render_checks(checks))
    return exit_code(checks)
