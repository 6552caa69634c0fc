"""The README's main job: workflows/run_headless.py run as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.comfyui

RUNNER = Path(__file__).resolve().parents[2] / "workflows" / "run_headless.py"


def run_command(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *arguments], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_variation_with_stand_ins_writes_images(comfyui_root, stand_in_model_dir, tmp_path):
    output = tmp_path / "variation.png"
    models = tmp_path / "no_models"
    models.mkdir()

    result = run_command(
        "--comfyui", str(comfyui_root), "--models-dir", str(models), "--cache-dir", str(stand_in_model_dir),
        "--steps", "2", "--size", "64", "--batch-size", "2", "--output", str(output),
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "random-weight stand-ins" in result.stdout
    written = sorted(tmp_path.glob("variation*.png"))
    assert len(written) == 2
    for path in written:
        with Image.open(path) as image:
            assert image.size == (64, 64)


def test_missing_comfyui_is_a_usage_error(tmp_path):
    result = run_command("--comfyui", str(tmp_path / "absent"), cwd=tmp_path)

    assert result.returncode == 2
    assert "--comfyui" in result.stderr + result.stdout
