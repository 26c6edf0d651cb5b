"""Test-only data: scikit-learn's digits (as the built-in `digits` data set with the digits recipe's model
shape), whose loading on one rank hangs or raises at given samples, each fault once per run (a counter
file remembers which have fired, so a restarted attempt goes past them). For tests/test_watchdog.py:

    data.target=faulty_data:digits data.kwargs.faults=hang@197,raise@100 data.kwargs.rank=1
    data.kwargs.marker=/tmp/x/fired code_dir=tests

`hang@N`: the Nth sample this process loads sleeps for ever; `raise@N`: it raises. Faults fire in order,
one per attempt at most, counted in the rank's process (a restart starts counting again)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from torch.utils.data import Dataset

from jobs.data import digits as built_in
from jobs.schema.recipe import DataConfig, ModelConfig


def digits(faults: str = "", rank: int = 1, marker: str = "") -> tuple[Dataset, Dataset]:
    train, val = built_in(DataConfig(), ModelConfig(in_channels=1, image_size=8), None)
    planned = [(kind, int(at)) for kind, _, at in (f.partition("@") for f in faults.split(",") if f)]
    return (Faulty(train, planned, rank, Path(marker)) if planned else train), val


class Faulty(Dataset):
    def __init__(self, inner: Dataset, planned: list[tuple[str, int]], rank: int, marker: Path) -> None:
        self.inner, self.planned, self.rank, self.marker, self.loaded = inner, planned, rank, marker, 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int):  # noqa: ANN204 - what the inner data set returns
        self.loaded += 1
        if int(os.environ.get("RANK", "0")) != self.rank:  # only the faulty rank reads its marker
            return self.inner[index]
        fired = int(self.marker.read_text()) if self.marker.exists() else 0
        if fired < len(self.planned) and self.loaded == self.planned[fired][1]:
            self.marker.write_text(str(fired + 1))
            Path(f"{self.marker}.{self.planned[fired][0]}").write_text(str(time.time()))  # when it fired
            if self.planned[fired][0] == "hang":
                while True:  # the hung line the stack dump shows
                    time.sleep(3600)
            raise RuntimeError(f"injected fault at sample {self.loaded}")
        return self.inner[index]
