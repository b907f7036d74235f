"""The fixed mmap threshold: set in a fresh process, left alone when the operator chose one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CHECK = "from app.malloc import fix_mmap_threshold; print(fix_mmap_threshold())"


def _run(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_threshold_is_fixed_unless_the_environment_sets_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    assert _run(env) == "True"
    assert _run({**env, "MALLOC_MMAP_THRESHOLD_": "262144"}) == "False"
