"""Run API-format workflows through a real ComfyUI server started as a subprocess.

ComfyUI is never imported into the calling process. A private base directory (ComfyUI's
``--base-directory``) contains this pack under ``custom_nodes/ComfyUI-SD-IPC``, the model files and
the input images, so the user's own ComfyUI folders are only read. All HTTP goes to 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

PACK_FOLDER_NAME = "ComfyUI-SD-IPC"
PACK_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.25
REQUEST_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 40

# Environment for the server: no telemetry, no hub downloads, unbuffered log lines.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}


class ComfyUIError(RuntimeError):
    """A failure reported by, or while talking to, the ComfyUI server."""


class ComfyUINotFoundError(ComfyUIError):
    """The given folder is not a ComfyUI install."""


class ServerStartError(ComfyUIError):
    """The server process exited or did not respond before the startup timeout."""


class PromptRejectedError(ComfyUIError):
    """ComfyUI rejected a workflow at validation. ``response`` is its JSON reply."""

    def __init__(self, message: str, response: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.response = response


class PromptExecutionError(ComfyUIError):
    """A node raised while the workflow ran. ``details`` is ComfyUI's execution_error message."""

    def __init__(self, message: str, details: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.details = details
        self.node_id = details.get("node_id")
        self.node_type = details.get("node_type")
        self.exception_message = details.get("exception_message")


def find_comfyui(path: str | os.PathLike[str]) -> Path:
    """Return the resolved ComfyUI root, or raise ComfyUINotFoundError naming what is missing."""
    root = Path(path).expanduser().resolve()
    for required in ("main.py", "comfy", "nodes.py"):
        if not (root / required).exists():
            raise ComfyUINotFoundError(f"ComfyUI not found at {root}: {required} is missing")
    return root


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copy2(source, target)


def prepare_base_directory(
    base_directory: str | os.PathLike[str],
    *,
    models: Mapping[str, Mapping[str, str | os.PathLike[str]]] | None = None,
    input_images: Iterable[str | os.PathLike[str]] = (),
    pack_root: str | os.PathLike[str] = PACK_ROOT,
) -> Path:
    """Lay out a ComfyUI base directory with the pack, model files and input images, and return it.

    ``models`` maps a ComfyUI model folder (``checkpoints``, ``clip_vision``, ...) to
    ``{file name as ComfyUI lists it: source file}``. Model files are symlinked where the file
    system allows it and copied otherwise. Input images, and folders of them, are copied into
    ``input/`` under their own names.
    """
    base = Path(base_directory).resolve()
    for folder in ("custom_nodes", "input", "output", "user", "models"):
        (base / folder).mkdir(parents=True, exist_ok=True)

    pack_link = base / "custom_nodes" / PACK_FOLDER_NAME
    if pack_link.is_symlink() and pack_link.resolve() != Path(pack_root).resolve():
        pack_link.unlink()
    if not pack_link.is_symlink():
        pack_link.symlink_to(Path(pack_root).resolve(), target_is_directory=True)

    for folder, files in (models or {}).items():
        for name, source in files.items():
            source = Path(source)
            if not source.is_file():
                raise FileNotFoundError(f"model file {source} for models/{folder}/{name} not found")
            _link_or_copy(source, base / "models" / folder / name)

    for image in input_images:
        image = Path(image)
        if image.is_dir():
            shutil.copytree(image, base / "input" / image.name, dirs_exist_ok=True)
        else:
            shutil.copy2(image, base / "input" / image.name)
    return base


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _format_validation_error(response: Mapping[str, Any]) -> str:
    """Return ComfyUI's validation messages, top-level error first, then one line per node."""
    lines = []
    error = response.get("error")
    if isinstance(error, Mapping):
        lines.append(": ".join(part for part in (error.get("message"), error.get("details")) if part))
    elif error:
        lines.append(str(error))
    for node_id, node_error in (response.get("node_errors") or {}).items():
        for reason in node_error.get("errors", []):
            lines.append(
                f"node {node_id} ({node_error.get('class_type')}): {reason.get('message')}: {reason.get('details')}"
            )
    return "\n".join(lines) or json.dumps(response)


class ComfyServer:
    """A ComfyUI server subprocess on 127.0.0.1, used as a context manager.

    Example::

        base = prepare_base_directory(tmp, models=..., input_images=[photo])
        with ComfyServer(find_comfyui("/opt/ComfyUI"), base) as server:
            images = server.run(api_workflow, timeout=600)
    """

    def __init__(
        self,
        comfyui_root: str | os.PathLike[str],
        base_directory: str | os.PathLike[str],
        *,
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
        extra_args: Iterable[str] = (),
        startup_timeout: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.comfyui_root = find_comfyui(comfyui_root)
        self.base_directory = Path(base_directory).resolve()
        self.port = port or _free_port()
        self.log_path = Path(log_path) if log_path else self.base_directory / "comfyui.log"
        self.python = python
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.url = f"http://{HOST}:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        # An empty ProxyHandler keeps http_proxy settings from routing local requests elsewhere.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def output_directory(self) -> Path:
        return self.base_directory / "output"

    @property
    def input_directory(self) -> Path:
        return self.base_directory / "input"

    def command(self) -> list[str]:
        """Return the command line that starts the server."""
        return [
            self.python,
            "main.py",
            "--cpu",
            "--listen", HOST,
            "--port", str(self.port),
            "--base-directory", str(self.base_directory),
            "--disable-auto-launch",
            "--database-url", "sqlite:///:memory:",
            "--disable-api-nodes",
            "--log-stdout",
            *self.extra_args,
        ]

    def start(self) -> None:
        """Start the server and wait until it responds to /system_stats."""
        if self._process is not None:
            raise ComfyUIError("the server is already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, **OFFLINE_ENVIRONMENT}
        started = time.perf_counter()
        with open(self.log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                self.command(),
                cwd=self.comfyui_root,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        logger.info(
            "Starting ComfyUI at %s on %s (pid %d, log %s)",
            self.comfyui_root,
            self.url,
            self._process.pid,
            self.log_path,
        )

        deadline = started + self.startup_timeout
        while time.perf_counter() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise ServerStartError(f"ComfyUI exited with code {code} while starting.\n{self.log_tail()}")
            try:
                self._request("GET", "/system_stats", timeout=2.0)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(POLL_INTERVAL_S)
                continue
            logger.info("ComfyUI responded after %.1f s", time.perf_counter() - started)
            return

        self.stop()
        raise ServerStartError(f"ComfyUI did not respond within {self.startup_timeout:.0f} s.\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server: terminate, then kill if it has not exited after ``timeout`` seconds."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("ComfyUI (pid %d) did not exit %.0f s after SIGTERM, so it is killed", process.pid, timeout)
            process.kill()
            process.wait()
        logger.info("Stopped ComfyUI (pid %d)", process.pid)

    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def is_running(self) -> bool:
        """Return whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def read_log(self) -> str:
        """Return the server's whole log so far (stdout and stderr)."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the server log."""
        return "\n".join(self.read_log().splitlines()[-lines:])

    def _request(self, method: str, path: str, body: Any = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with self._opener.open(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def get_text(self, path: str, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, str]:
        """Return the HTTP status and text body of a GET request, without raising on error statuses."""
        try:
            with self._opener.open(self.url + path, timeout=timeout) as response:
                return response.status, response.read().decode("utf-8")
        except urllib.error.HTTPError as error:
            return error.code, ""

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """Return ComfyUI's /object_info: node definitions by class name, or one class's."""
        path = "/object_info" if node_class is None else f"/object_info/{urllib.parse.quote(node_class)}"
        return self._request("GET", path)

    def queue(self, workflow: Mapping[str, Any]) -> str:
        """Queue an API-format workflow and return its prompt id.

        Raise PromptRejectedError with ComfyUI's validation messages if it rejects the workflow.
        """
        try:
            reply = self._request("POST", "/prompt", {"prompt": workflow})
        except urllib.error.HTTPError as error:
            body = error.read().decode("utf-8", errors="replace")
            try:
                response = json.loads(body)
            except json.JSONDecodeError:
                raise ComfyUIError(f"POST /prompt failed with HTTP {error.code}: {body}") from None
            raise PromptRejectedError(
                f"ComfyUI rejected the workflow:\n{_format_validation_error(response)}", response
            ) from None

        if reply.get("node_errors"):
            logger.warning(
                "ComfyUI queued prompt %s but will skip outputs with invalid inputs:\n%s",
                reply["prompt_id"],
                _format_validation_error(reply),
            )
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float) -> list[Path]:
        """Wait until a queued prompt finishes, and return the paths of its saved output images.

        Only images of type "output" (SaveImage) are returned; previews in temp/ are not. Raise
        PromptExecutionError with ComfyUI's node type and exception message if a node failed,
        and TimeoutError if the prompt is not done after ``timeout`` seconds.
        """
        deadline = time.perf_counter() + timeout
        while True:
            # ComfyUI adds a history entry only when the prompt has finished, with or without error.
            try:
                entry = self._request("GET", f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
            except (urllib.error.URLError, ConnectionError) as error:
                if not self.is_running():
                    message = f"ComfyUI exited while running prompt {prompt_id}.\n{self.log_tail()}"
                    raise ComfyUIError(message) from error
                raise
            if entry is not None:
                if (entry.get("status") or {}).get("status_str") == "success":
                    return self._output_images(entry)
                raise self._execution_error(prompt_id, entry)

            if not self.is_running():
                raise ComfyUIError(f"ComfyUI exited while running prompt {prompt_id}.\n{self.log_tail()}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL_S)

    def run(self, workflow: Mapping[str, Any], timeout: float) -> list[Path]:
        """Queue a workflow, wait for it, and return the paths of its saved output images."""
        return self.wait(self.queue(workflow), timeout)

    def _output_images(self, entry: Mapping[str, Any]) -> list[Path]:
        paths = []
        for node_output in entry.get("outputs", {}).values():
            for image in node_output.get("images", []):
                if image.get("type") == "output":
                    paths.append(self.output_directory / image.get("subfolder", "") / image["filename"])
        return paths

    def _execution_error(self, prompt_id: str, entry: Mapping[str, Any]) -> ComfyUIError:
        for event, details in (entry.get("status") or {}).get("messages", []):
            if event == "execution_error":
                message = (
                    f"node {details.get('node_id')} ({details.get('node_type')}) failed: "
                    f"{details.get('exception_type')}: {details.get('exception_message')}"
                )
                return PromptExecutionError(message, details)
            if event == "execution_interrupted":
                return ComfyUIError(f"prompt {prompt_id} was interrupted at node {details.get('node_id')}")
        return ComfyUIError(f"prompt {prompt_id} failed without an execution_error message.\n{self.log_tail()}")
