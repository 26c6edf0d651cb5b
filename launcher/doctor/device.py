"""The doctor's device rules: a label outside the classifier's range (CPU IndexError, CUDA device-side assert)
and cuDNN that could not start."""
from __future__ import annotations

import re
from typing import Optional

from launcher.doctor.findings import Finding
from launcher.doctor.ranks import lines_matching, on_rank
from launcher.doctor.records import RunRecords

TARGET_OUT_OF_BOUNDS = re.compile(r"IndexError: Target (-?\d+) is out of bounds")
DEVICE_ASSERT = re.compile(r"device-side assert triggered")
NLL_ASSERT = re.compile(r"Assertion `t >= 0 && t < n_classes` failed")


def label_out_of_range(records: RunRecords) -> list[Finding]:
    cpu, cuda, nll = (lines_matching(records, p) for p in (TARGET_OUT_OF_BOUNDS, DEVICE_ASSERT, NLL_ASSERT))
    if not (cpu or cuda):
        return []
    classes = _classes(records)
    if cpu:
        target = int(TARGET_OUT_OF_BOUNDS.search(cpu[0].text).group(1))  # type: ignore[union-attr]
        what = f"a label outside the classifier's range{on_rank(cpu[0])}: target {target} with {classes}"
        return [Finding(what, _label_fix(records, target), (cpu[0],))]
    what = f"CUDA device-side assert{on_rank(cuda[0])}"
    what += f": the loss saw a label outside 0..num_classes-1 ({classes})" if nll else \
        f", usually a label outside the classifier's range ({classes})"
    fix = _label_fix(records, None) + ("" if nll else "; to see the failing operation, run once with "
                                       "CUDA_LAUNCH_BLOCKING=1 or on the CPU, where the error names it")
    return [Finding(what, fix, (cuda[0], *nll[:1]))]


def _classes(records: RunRecords) -> str:
    n = records.setting("model", "num_classes")
    if records.setting("model", "target"):
        return "your model's number of outputs"
    return f"model.num_classes={n}, so labels must be 0..{n - 1}" if isinstance(n, int) else "model.num_classes"


def _label_fix(records: RunRecords, target: Optional[int]) -> str:
    need = f" (at least {target + 1})" if target is not None and target >= 0 else ""
    if records.setting("model", "target"):
        return f"make your model's output size match the number of classes in the data{need}, or fix the labels"
    return (f"set model.num_classes to the number of classes in the data{need}, or fix the data's labels "
            "(they must be 0..num_classes-1; a negative label is never valid)")


CUDNN_NOT_INIT = re.compile(r"CUDNN_STATUS_NOT_INIT(?:IALIZED)?")


def cudnn_not_initialized(records: RunRecords) -> list[Finding]:
    hits = lines_matching(records, CUDNN_NOT_INIT)
    if not hits:
        return []
    return [Finding(f"cuDNN could not start{on_rank(hits[0])} (CUDNN_STATUS_NOT_INITIALIZED)",
                    "most often the GPU had no memory left for cuDNN's workspace (another process on the GPU: "
                    "nvidia-smi; or a micro batch at the edge of memory: trainer.micro_batch=auto), else a torch "
                    "build whose CUDA/cuDNN does not match the driver or a cuDNN from LD_LIBRARY_PATH shadowing "
                    "torch's own: check python -c 'import torch; print(torch.version.cuda, "
                    "torch.backends.cudnn.version())' against nvidia-smi's CUDA version", (hits[0],))]
