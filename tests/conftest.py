"""Fixtures of the ComfyUI tier, which runs the pack in a real ComfyUI install.

ComfyUI is found through COMFYUI_ROOT (default /opt/ComfyUI), and without it the tier is skipped. The
random-weight stand-in models are cached in SDIPC_TEST_CACHE (default ~/.cache/sdipc/stand_in_models,
the folder that workflows/run_headless.py uses too).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Appended, not prepended: the repository's `nodes` package must not hide ComfyUI's `nodes` module.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from workflows.comfy_server import ComfyServer, ComfyUINotFoundError, find_comfyui, prepare_base_directory  # noqa: E402
from workflows.stand_in_models import ensure_stand_in_models  # noqa: E402

DEFAULT_COMFYUI_ROOT = "/opt/ComfyUI"
DEFAULT_TEST_CACHE = Path("~/.cache/sdipc/stand_in_models")
PHOTO_DIRECTORY = REPO_ROOT.parent / "shared" / "data" / "dreambooth"

# Outcome of the ComfyUI tier, reported by pytest_terminal_summary.
_tier_outcomes: dict[str, str] = {}
_tier_skip_reasons: set[str] = set()
_tier_timings: dict[str, float] = {}
_tier_comfyui_root: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "comfyui: needs a ComfyUI install (COMFYUI_ROOT, default /opt/ComfyUI)")


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        if item.get_closest_marker("comfyui"):
            _tier_outcomes[item.nodeid] = "not run"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _tier_outcomes or _tier_outcomes[report.nodeid] == "failed":
        return
    if report.failed:
        _tier_outcomes[report.nodeid] = "failed"
    elif report.skipped and hasattr(report, "wasxfail"):
        _tier_outcomes[report.nodeid] = "xfailed"
    elif report.skipped:
        _tier_outcomes[report.nodeid] = "skipped"
        if isinstance(report.longrepr, tuple):
            _tier_skip_reasons.add(report.longrepr[2].removeprefix("Skipped: "))
    elif report.when == "call":
        _tier_outcomes[report.nodeid] = "passed"


def _comfyui_version(root: Path) -> str:
    version_file = root / "comfyui_version.py"
    match = re.search(r'__version__\s*=\s*"([^"]+)"', version_file.read_text()) if version_file.exists() else None
    return match.group(1) if match else "unknown version"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """Print whether the ComfyUI tier ran, against which install, or why it was skipped."""
    outcomes = list(_tier_outcomes.values())
    counts = {outcome: outcomes.count(outcome) for outcome in ("passed", "failed", "skipped", "xfailed")}
    terminalreporter.section("ComfyUI tier")
    if not _tier_outcomes and terminalreporter.stats.get("error"):
        terminalreporter.write_line("ComfyUI tier: not run, because errors stopped the session (see above).")
    elif not _tier_outcomes:
        terminalreporter.write_line("ComfyUI tier: not run, because no test marked comfyui was selected.")
    elif counts["passed"] + counts["failed"] + counts["skipped"] + counts["xfailed"] == 0:
        terminalreporter.write_line(
            f"ComfyUI tier: not run, because the session stopped before any of its {len(_tier_outcomes)} tests started."
        )
    elif counts["passed"] + counts["failed"] + counts["xfailed"] == 0:
        reasons = "; ".join(sorted(_tier_skip_reasons))
        terminalreporter.write_line(f"ComfyUI tier: SKIPPED ({counts['skipped']} tests): {reasons}")
    else:
        root = _tier_comfyui_root[0] if _tier_comfyui_root else None
        install = f"ComfyUI {_comfyui_version(root)} at {root}" if root else "ComfyUI"
        terminalreporter.write_line(
            f"ComfyUI tier: ran against {install}: {counts['passed']} passed, "
            f"{counts['failed']} failed, {counts['skipped']} skipped, {counts['xfailed']} xfailed."
        )
    for name, seconds in _tier_timings.items():
        terminalreporter.write_line(f"  {name}: {seconds:.1f} s")


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    """Return the ComfyUI install from COMFYUI_ROOT (default /opt/ComfyUI), or skip the test if absent."""
    configured = os.environ.get("COMFYUI_ROOT", DEFAULT_COMFYUI_ROOT)
    try:
        root = find_comfyui(configured)
    except ComfyUINotFoundError as error:
        pytest.skip(f"{error}. Set COMFYUI_ROOT to a ComfyUI install to run the ComfyUI tier")
    if not _tier_comfyui_root:
        _tier_comfyui_root.append(root)
    return root


@pytest.fixture(scope="session")
def stand_in_model_dir() -> Path:
    """Return the folder with both random-weight stand-ins, writing them on first use."""
    directory = Path(os.environ.get("SDIPC_TEST_CACHE", DEFAULT_TEST_CACHE)).expanduser()
    started = time.perf_counter()
    ensure_stand_in_models(directory)
    _tier_timings["stand-in models ready (written or reused)"] = time.perf_counter() - started
    return directory


@pytest.fixture(scope="session")
def comfyui_in_process(comfyui_root: Path) -> Path:
    """Make ComfyUI importable in this process, on the CPU, and return its root.

    ComfyUI's folder is put first on sys.path, and ``comfy.cli_args.args.cpu`` is set before
    ``comfy.model_management`` is imported. ``comfy.options.args_parsing`` stays False, so ComfyUI
    does not parse pytest's command line.
    """
    if str(comfyui_root) not in sys.path:
        sys.path.insert(0, str(comfyui_root))
    loaded_nodes = sys.modules.get("nodes")
    if loaded_nodes is not None and not str(getattr(loaded_nodes, "__file__", "")).startswith(str(comfyui_root)):
        pytest.fail(
            f"a module named nodes from {loaded_nodes.__file__} is already imported and hides ComfyUI's nodes.py"
        )

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return comfyui_root


@pytest.fixture(scope="session")
def comfy_server(
    comfyui_root: Path,
    stand_in_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ComfyServer]:
    """Yield one ComfyUI server for the session, with the pack and the stand-in models installed.

    The models are listed as v1-5-pruned-emaonly.safetensors (checkpoints) and
    clip-vit-large-patch14.safetensors (clip_vision). The example photos (and photo folders) of workflows/input and one
    DreamBooth photo, when present, are in ``input/``; tests may copy more images into
    ``comfy_server.input_directory``.
    """
    stand_ins = ensure_stand_in_models(stand_in_model_dir)
    examples = sorted(path for path in (REPO_ROOT / "workflows" / "input").iterdir() if path.is_dir() or path.suffix == ".jpg")
    photos = examples + sorted(PHOTO_DIRECTORY.glob("*/00.jpg"))[:1]
    base = prepare_base_directory(
        tmp_path_factory.mktemp("comfyui_base"),
        models=stand_ins.model_folders(),
        input_images=photos,
    )

    server = ComfyServer(comfyui_root, base)
    started = time.perf_counter()
    with server:
        _tier_timings["ComfyUI server start"] = time.perf_counter() - started
        yield server
