"""What importing a module loads, measured in a fresh interpreter (a test session has imported
everything already): for the tests that keep the serving path free of training code."""

from __future__ import annotations

import json
import subprocess
import sys


def modules_loaded_by(module: str) -> set[str]:
    """Names in ``sys.modules`` after ``import <module>`` in a new Python process."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))
