"""The pack installs like any ComfyUI pack, from a registry archive or a ComfyUI-Manager clone, offline.

The registry archive is built by the rule of `comfy node pack` (comfy-cli 1.23, `zip_files`): the
files `git ls-files` lists, minus those matching .comfyignore (gitignore syntax), plus the folders in
[tool.comfy] includes. One difference: untracked files that .gitignore does not exclude are counted as
tracked, so that a file written but not yet added to git is treated as the commit will treat it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from workflows.comfy_server import PACK_FOLDER_NAME, ComfyServer

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW_DIRECTORY = REPO_ROOT / "workflows"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT_NAME = PYPROJECT["project"]["name"]
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio"}
RUNTIME_FILES = (
    "__init__.py",
    "nodes/__init__.py",
    "sdipc_core/__init__.py",
    "web/docs/SDIPCImageToPrompt.md",
    "locales/en/nodeDefs.json",
    "locales/zh/nodeDefs.json",
    "pyproject.toml",
    "requirements.txt",
    "LICENSE",
)
SEMANTIC_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
IMPORT_FAILURE_MARKERS = ("IMPORT FAILED", "Cannot import")


def git_files(*arguments: str) -> set[str]:
    listed = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-files", "-z", *arguments], check=True, capture_output=True
    ).stdout.decode("utf-8")
    return {path for path in listed.split("\0") if path}


def clone_files() -> list[str]:
    """Return the files a clone of the repository contains: tracked ones and new ones git does not ignore."""
    candidates = git_files("--cached") | git_files("--others", "--exclude-standard")
    return sorted(path for path in candidates if (REPO_ROOT / path).is_file())


def registry_archive_files() -> list[str]:
    """Return the files `comfy node pack` would put in the registry archive, by comfy-cli 1.23's rule."""
    files = set(clone_files())
    if (REPO_ROOT / ".comfyignore").is_file():
        files -= git_files("--cached", "--others", "--ignored", "--exclude-from=.comfyignore")

    for include in PYPROJECT.get("tool", {}).get("comfy", {}).get("includes", []):
        included = REPO_ROOT / include.lstrip("/")
        if included.is_file():
            files.add(included.relative_to(REPO_ROOT).as_posix())
        for path in included.rglob("*") if included.is_dir() else ():
            if path.is_file():
                files.add(path.relative_to(REPO_ROOT).as_posix())
    return sorted(files)


def requirement_names() -> list[str]:
    lines = (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [REQUIREMENT_NAME.match(line).group(1).lower() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def pack_import_errors(log: str, pack_directory: Path) -> list[str]:
    """Return log lines that report a failed import of the pack, and tracebacks that run through it."""
    lines = log.splitlines()
    errors = [
        line for line in lines if str(pack_directory) in line and any(marker in line for marker in IMPORT_FAILURE_MARKERS)
    ]
    for start, line in enumerate(lines):
        if not line.startswith("Traceback"):
            continue
        # Python ends a traceback with the exception line; ComfyUI's log puts a blank line after it.
        end = next((index for index in range(start, len(lines)) if not lines[index].strip()), len(lines))
        block = lines[start:end]
        if any(str(pack_directory) in entry for entry in block):
            errors.append("\n".join(block))
    return errors


def start_server(comfyui_root: Path, base: Path) -> ComfyServer:
    for folder in ("input", "output", "user", "models"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    server = ComfyServer(comfyui_root, base)
    server.start()
    return server


@pytest.fixture(scope="module")
def archive_install(comfyui_root, tmp_path_factory) -> Iterator[tuple[ComfyServer, Path, list[str]]]:
    """A ComfyUI server whose only custom node is the registry archive, unpacked as the registry installs it."""
    work = tmp_path_factory.mktemp("registry_archive")
    archive = work / "node.zip"
    files = registry_archive_files()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in files:
            zipped.write(REPO_ROOT / path, path)

    pack_directory = work / "base" / "custom_nodes" / PROJECT_NAME
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(pack_directory)

    server = start_server(comfyui_root, work / "base")
    try:
        yield server, pack_directory, files
    finally:
        server.stop()


@pytest.fixture(scope="module")
def manager_install(comfyui_root, tmp_path_factory) -> Iterator[tuple[ComfyServer, Path, subprocess.CompletedProcess]]:
    """A ComfyUI server with the pack installed as ComfyUI-Manager does: clone, then pip install -r requirements.txt."""
    base = tmp_path_factory.mktemp("manager_install")
    pack_directory = base / "custom_nodes" / PACK_FOLDER_NAME
    for path in clone_files():
        target = pack_directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / path, target)

    # --no-index keeps the test offline: a requirement that is not installed already fails here
    # instead of being downloaded.
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "-r", "requirements.txt"],
        cwd=pack_directory,
        capture_output=True,
        text=True,
    )

    server = start_server(comfyui_root, base)
    try:
        yield server, pack_directory, pip
    finally:
        server.stop()


def test_requirements_have_no_torch_pins():
    assert set(requirement_names()) & TORCH_PACKAGES == set()


def test_pyproject_dependencies_match_requirements():
    dependencies = [REQUIREMENT_NAME.match(entry).group(1).lower() for entry in PYPROJECT["project"]["dependencies"]]

    assert sorted(dependencies) == sorted(requirement_names())


def test_pyproject_project_table_fits_registry():
    project = PYPROJECT["project"]

    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,99}", project["name"])
    assert SEMANTIC_VERSION.match(project["version"]), project["version"]
    assert (REPO_ROOT / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert any(classifier.startswith("Operating System :: ") for classifier in project["classifiers"])


def test_pyproject_comfy_table_fits_registry():
    comfy = PYPROJECT["tool"]["comfy"]

    assert comfy["PublisherId"].strip()
    assert comfy["DisplayName"].strip()
    assert comfy["Icon"].startswith("https://")
    icon_in_repository = comfy["Icon"].split("/main/", 1)[1]
    assert (REPO_ROOT / icon_in_repository).is_file(), f"{icon_in_repository} is not in the repository"


def test_archive_leaves_out_tests_and_ci():
    files = registry_archive_files()

    assert [path for path in files if path.startswith(("tests/", ".ci/", "workflows/images/"))] == []


def test_archive_contains_runtime_files():
    files = set(registry_archive_files())

    for path in RUNTIME_FILES:
        assert path in files, f"{path} would be missing from the registry archive"


@pytest.mark.comfyui
def test_archive_install_lists_every_node(archive_install, pack):
    server, _pack_directory, _files = archive_install
    object_info = server.object_info()

    for name in pack.NODE_CLASS_MAPPINGS:
        assert name in object_info, f"{name} is missing from /object_info"
        assert object_info[name]["python_module"] == f"custom_nodes.{PROJECT_NAME}"


@pytest.mark.comfyui
def test_archive_install_imports_cleanly(archive_install):
    server, pack_directory, _files = archive_install

    assert pack_import_errors(server.read_log(), pack_directory) == []


@pytest.mark.comfyui
def test_archive_install_serves_help_and_locales(archive_install, pack):
    server, _pack_directory, _files = archive_install
    status, help_page = server.get_text(f"/extensions/{PROJECT_NAME}/docs/SDIPCImageToPrompt.md")
    i18n_status, i18n = server.get_text("/i18n")

    assert status == 200
    assert help_page.startswith("# SD-IPC Image to Prompt")
    assert i18n_status == 200
    for locale in ("en", "zh"):
        assert set(pack.NODE_CLASS_MAPPINGS) <= set(json.loads(i18n)[locale]["nodeDefs"]), locale


@pytest.mark.comfyui
def test_archive_install_offers_workflow_templates(archive_install):
    # ComfyUI lists a pack's workflows/*.json in the editor's template browser, under the pack folder name.
    server, _pack_directory, _files = archive_install
    status, body = server.get_text("/workflow_templates")

    assert status == 200
    assert sorted(json.loads(body).get(PROJECT_NAME, [])) == sorted(path.stem for path in WORKFLOW_DIRECTORY.glob("*.json"))


@pytest.mark.comfyui
def test_manager_install_runs_pip_cleanly(manager_install):
    _server, _pack_directory, pip = manager_install

    assert pip.returncode == 0, pip.stdout + pip.stderr


@pytest.mark.comfyui
def test_manager_install_lists_every_node(manager_install, pack):
    server, _pack_directory, _pip = manager_install
    object_info = server.object_info()

    for name in pack.NODE_CLASS_MAPPINGS:
        assert name in object_info, f"{name} is missing from /object_info"


@pytest.mark.comfyui
def test_manager_install_imports_cleanly(manager_install):
    server, pack_directory, _pip = manager_install

    assert pack_import_errors(server.read_log(), pack_directory) == []


@pytest.mark.comfyui
@pytest.mark.parametrize("ui_path", sorted(WORKFLOW_DIRECTORY.glob("*.json")), ids=lambda path: path.stem)
def test_shipped_workflow_matches_node_definitions(comfy_server, ui_path):
    # Workflows saved by earlier versions store node types and input names, and the graph editor maps
    # widget values by position. Renaming a node type or an input, or adding a required input, breaks
    # them unless a migration comes with the change.
    object_info = comfy_server.object_info()
    ui = json.loads(ui_path.read_text(encoding="utf-8"))
    api = json.loads((WORKFLOW_DIRECTORY / "api" / ui_path.name).read_text(encoding="utf-8"))

    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY_TYPES:
            continue
        assert node["type"] in object_info, f"node type {node['type']} no longer exists"
        declared = object_info[node["type"]]["input"]
        declared_names = set(declared.get("required", {})) | set(declared.get("optional", {}))
        for socket in node.get("inputs", []):
            assert socket["name"] in declared_names, f"{node['type']} has no input {socket['name']!r} any more"

    for node_id, node in api.items():
        declared = object_info[node["class_type"]]["input"]
        declared_names = set(declared.get("required", {})) | set(declared.get("optional", {}))
        assert set(node["inputs"]) <= declared_names, f"node {node_id} ({node['class_type']})"
        assert set(declared.get("required", {})) <= set(node["inputs"]), f"node {node_id} ({node['class_type']}) lacks a required input"
