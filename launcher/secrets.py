"""Which configuration keys hold secrets (placeholder: the lead replaces this file)."""
from __future__ import annotations

import re


def is_secret_key(name: str) -> bool:
    return bool(re.search(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", name, re.IGNORECASE))
