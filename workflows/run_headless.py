"""Run a shipped SD-IPC workflow through ComfyUI without its browser interface.

Example::

    python workflows/run_headless.py --image photo.jpg --steps 20 --seed 1

The workflow is an API-format file from ``workflows/api``. Model files are taken from
``--models-dir`` or from the ComfyUI install's ``models`` folders by the file names the workflow
references. Missing SD1.5 and CLIP files are replaced by random-weight stand-ins, and then the
output image is noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make the `workflows` package importable. Appended, so that the repository's
    # `nodes` package cannot hide a module of the same name.
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from workflows import stand_in_models
from workflows.comfy_server import ComfyServer, ComfyUIError, ComfyUINotFoundError, PromptRejectedError
from workflows.comfy_server import find_comfyui, prepare_base_directory

logger = logging.getLogger(__name__)

WORKFLOW_DIRECTORY = Path(__file__).resolve().parent / "api"
WORKFLOW_INPUT_DIRECTORY = Path(__file__).resolve().parent / "input"
DEFAULT_WORKFLOW = "sdipc_image_variation"
DEFAULT_COMFYUI = "/opt/ComfyUI"
DEFAULT_PHOTO_DIRECTORY = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"
DEFAULT_CACHE_DIRECTORY = Path("~/.cache/sdipc/stand_in_models")
DEFAULT_TIMEOUT_S = 3600.0

STAND_IN_SIZE = 256
STAND_IN_STEPS = 4
STAND_IN_BATCH_SIZE = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")

# ComfyUI model folder listed by each core loader input.
LOADER_FOLDERS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
}
SEARCH_FOLDERS = ("checkpoints", "clip_vision", "text_encoders", "clip", "vae", "loras")
STAND_IN_FOLDERS = {
    stand_in_models.CHECKPOINT_FILE_NAME: "checkpoints",
    stand_in_models.CLIP_FILE_NAME: "clip_vision",
}
STAND_IN_WRITERS = {
    stand_in_models.CHECKPOINT_FILE_NAME: stand_in_models.write_sd15_checkpoint,
    stand_in_models.CLIP_FILE_NAME: stand_in_models.write_openai_clip_vit_l14,
}

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """An input of the command is missing or invalid."""


def _multiple_of_eight(value: str) -> int:
    size = int(value)
    if size < 64 or size % 8:
        raise argparse.ArgumentTypeError(f"invalid size {size}: expected a multiple of 8, at least 64")
    return size


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--comfyui",
        default=os.environ.get("COMFYUI_ROOT", DEFAULT_COMFYUI),
        help="ComfyUI install folder (default: $COMFYUI_ROOT, else %(default)s)",
    )
    parser.add_argument(
        "--workflow",
        default=DEFAULT_WORKFLOW,
        help="name of an API-format workflow in workflows/api, or a path to a .json file (default: %(default)s)",
    )
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        help="input image for the workflow's LoadImage nodes, in node order; repeat it for workflows with "
        "several (default: the images the workflow names, from workflows/input)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        help="folder with model files, flat or in ComfyUI subfolders (checkpoints/, clip_vision/, ...)",
    )
    parser.add_argument("--output", type=Path, help="output PNG path (default: ./output/<workflow>.png)")
    parser.add_argument("--steps", type=int, help="sampling steps of every KSampler")
    parser.add_argument("--size", type=_multiple_of_eight, help="width and height in pixels of every EmptyLatentImage")
    parser.add_argument("--batch-size", type=int, help="batch size of every EmptyLatentImage (images per run)")
    parser.add_argument("--seed", type=int, help="noise seed of every KSampler")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIRECTORY,
        help="folder for the random-weight stand-in models (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for the workflow (default: %(default)s)",
    )
    return parser.parse_args(argv)


def load_workflow(name: str) -> tuple[str, dict[str, Any]]:
    """Return the workflow's name and API-format graph, read from workflows/api or a .json path."""
    path = Path(name) if name.endswith(".json") else WORKFLOW_DIRECTORY / f"{name}.json"
    if not path.is_file():
        available = sorted(candidate.stem for candidate in WORKFLOW_DIRECTORY.glob("*.json"))
        listing = ", ".join(available) or "none"
        raise UsageError(f"workflow not found: {path} (available in {WORKFLOW_DIRECTORY}: {listing})")
    with open(path, encoding="utf-8") as handle:
        return path.stem, json.load(handle)


def fallback_photo() -> Path | None:
    """Return a DreamBooth photo from the shared data folder, or None where there is none."""
    photos = sorted(DEFAULT_PHOTO_DIRECTORY.glob("*/*.jpg"))
    return photos[0] if photos else None


def nodes_of_type(workflow: Mapping[str, Any], *class_types: str) -> list[dict[str, Any]]:
    """Return the nodes whose class_type is one of ``class_types``."""
    return [node for node in workflow.values() if node.get("class_type") in class_types]


def referenced_models(workflow: Mapping[str, Any]) -> dict[str, set[str]]:
    """Return each model file name the workflow references, with the ComfyUI folders it must be in.

    The folder set is empty when the node is not a known core loader.
    """
    references: dict[str, set[str]] = {}
    for node in workflow.values():
        for input_name, value in node.get("inputs", {}).items():
            if not (isinstance(value, str) and value.lower().endswith(MODEL_SUFFIXES)):
                continue
            folders = references.setdefault(value, set())
            folder = LOADER_FOLDERS.get((node.get("class_type"), input_name))
            if folder:
                folders.add(folder)
    return references


def find_model(name: str, search_roots: Sequence[Path]) -> tuple[Path, str | None] | None:
    """Return a model file and the ComfyUI folder it was found in, or None.

    Each root is searched in its ComfyUI subfolders first, then flat (then the folder is None).
    """
    for root in search_roots:
        for folder in SEARCH_FOLDERS:
            if (root / folder / name).is_file():
                return root / folder / name, folder
        if (root / name).is_file():
            return root / name, None
    return None


def resolve_models(
    references: Mapping[str, set[str]],
    search_roots: Sequence[Path],
    cache_directory: Path,
) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """Return ``{folder: {name: file}}`` for every referenced model, and the names given stand-ins.

    Raise UsageError for a model that is neither found nor has a stand-in, or whose folder is
    unknown.
    """
    found = {name: find_model(name, search_roots) for name in sorted(references)}
    missing = [name for name, location in found.items() if location is None and name not in STAND_IN_FOLDERS]
    if missing:
        searched = ", ".join(str(root) for root in search_roots)
        raise UsageError(f"model file {', '.join(missing)} not found in {searched}. Download it or pass --models-dir")

    stand_in_names = [name for name, location in found.items() if location is None]
    for name in stand_in_names:
        write_stand_in = STAND_IN_WRITERS[name]
        found[name] = (write_stand_in(cache_directory.expanduser() / name), STAND_IN_FOLDERS[name])

    model_folders: dict[str, dict[str, Path]] = {}
    for name, folders in references.items():
        source, found_folder = found[name]
        targets = set(folders)
        if found_folder is not None:
            targets.add(found_folder)
        if not targets:
            raise UsageError(
                f"cannot tell which ComfyUI model folder {source} belongs to. "
                "Move it to a subfolder such as checkpoints/"
            )
        for folder in targets:
            model_folders.setdefault(folder, {})[name] = source
    return model_folders, stand_in_names


def apply_overrides(
    workflow: Mapping[str, Any],
    *,
    image_names: Mapping[str, str] | None,
    steps: int | None,
    size: int | None,
    seed: int | None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Return a copy of the workflow with the input images (by node id), steps, size, seed and batch size replaced."""
    workflow = copy.deepcopy(dict(workflow))
    samplers = nodes_of_type(workflow, "KSampler", "KSamplerAdvanced")
    latents = nodes_of_type(workflow, "EmptyLatentImage")
    if (steps is not None or seed is not None) and not samplers:
        raise UsageError("--steps and --seed need a KSampler node, and the workflow has none")
    if (size is not None or batch_size is not None) and not latents:
        raise UsageError("--size and --batch-size need an EmptyLatentImage node, and the workflow has none")

    for node_id, name in (image_names or {}).items():
        workflow[node_id]["inputs"]["image"] = name
    for node in samplers:
        if steps is not None:
            node["inputs"]["steps"] = steps
        if seed is not None:
            seed_input = "noise_seed" if node["class_type"] == "KSamplerAdvanced" else "seed"
            node["inputs"][seed_input] = seed
    for node in latents:
        if size is not None:
            node["inputs"]["width"] = size
            node["inputs"]["height"] = size
        if batch_size is not None:
            node["inputs"]["batch_size"] = batch_size
    return workflow


def png_size(path: Path) -> tuple[int, int]:
    """Return (width, height) read from a PNG file's IHDR chunk."""
    with open(path, "rb") as handle:
        header = handle.read(24)
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", header[16:24])


def save_outputs(images: Sequence[Path], output: Path) -> list[Path]:
    """Copy the images to ``output``, the second and later ones as ``<stem>_<n><suffix>``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(images, start=1):
        target = output if index == 1 else output.with_name(f"{output.stem}_{index}{output.suffix}")
        shutil.copyfile(image, target)
        written.append(target)
    return written


def _resolve_images(images: Sequence[Path] | None, workflow: Mapping[str, Any]) -> dict[str, Path]:
    """Return the image file each LoadImage node reads, keyed by node id.

    Images given on the command line replace the LoadImage nodes' images in node order. The other
    nodes keep the image they name, from workflows/input, or get a DreamBooth photo where that
    folder does not have it.
    """
    load_nodes = sorted(
        (node_id for node_id, node in workflow.items() if node.get("class_type") == "LoadImage"),
        key=lambda node_id: (len(node_id), node_id),
    )
    given = list(images or [])
    if len(given) > len(load_nodes):
        logger.warning("The workflow has %d LoadImage nodes, so %d of the --image files are not used", len(load_nodes), len(given) - len(load_nodes))

    chosen: dict[str, Path] = {}
    for index, node_id in enumerate(load_nodes):
        if index < len(given):
            image = given[index]
        else:
            named = WORKFLOW_INPUT_DIRECTORY / str(workflow[node_id]["inputs"].get("image", ""))
            image = named if named.is_file() else fallback_photo()
        if image is None:
            raise UsageError(f"LoadImage node {node_id} needs an input image: pass --image PATH")
        if not image.is_file():
            raise UsageError(f"input image {image} not found")
        chosen[node_id] = image
    return chosen


def run(arguments: argparse.Namespace) -> list[Path]:
    """Run the workflow once and return the written output images."""
    try:
        comfyui_root = find_comfyui(arguments.comfyui)
    except ComfyUINotFoundError as error:
        raise UsageError(f"{error}. Pass --comfyui PATH or set COMFYUI_ROOT") from None

    workflow_name, workflow = load_workflow(arguments.workflow)
    images = _resolve_images(arguments.image, workflow)
    if arguments.models_dir is not None and not arguments.models_dir.is_dir():
        raise UsageError(f"--models-dir {arguments.models_dir} not found")
    search_roots = [root for root in (arguments.models_dir, comfyui_root / "models") if root is not None]
    model_folders, stand_in_names = resolve_models(referenced_models(workflow), search_roots, arguments.cache_dir)
    steps, size, batch_size = arguments.steps, arguments.size, arguments.batch_size
    if stand_in_names:
        print(
            f"Note: {', '.join(stand_in_names)} not found, so random-weight stand-ins from "
            f"{arguments.cache_dir.expanduser()} are used in their place. "
            "The output comes from random weights and will look like noise."
        )
        # The stand-in U-Net has a single full-resolution level, so the workflow's own 512 px and 25
        # steps take about 15 minutes on two CPU cores for output that is noise either way.
        steps = STAND_IN_STEPS if steps is None else steps
        size = STAND_IN_SIZE if size is None else size
        batch_size = STAND_IN_BATCH_SIZE if batch_size is None else batch_size
        print(
            f"With stand-ins the run uses {size} px, {steps} steps and batch size {batch_size} unless "
            "--size, --steps or --batch-size say otherwise."
        )

    workflow = apply_overrides(
        workflow,
        image_names={node_id: image.name for node_id, image in images.items()},
        steps=steps,
        size=size,
        batch_size=batch_size,
        seed=arguments.seed,
    )
    output = arguments.output or Path("output") / f"{workflow_name}.png"

    with tempfile.TemporaryDirectory(prefix="sdipc-comfyui-") as work_directory:
        # The example inputs (photos, and folders of photos for the training nodes) go in first, so that
        # an image given on the command line with the same name replaces its example.
        examples = sorted(WORKFLOW_INPUT_DIRECTORY.iterdir()) if WORKFLOW_INPUT_DIRECTORY.is_dir() else []
        inputs = [path for path in examples if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES]
        base = prepare_base_directory(work_directory, models=model_folders, input_images=inputs + list(images.values()))
        server = ComfyServer(comfyui_root, base)
        try:
            with server:
                images = server.run(workflow, timeout=arguments.timeout)
        except (ComfyUIError, TimeoutError):
            if server.log_path.exists():
                log_copy = output.with_name(f"{output.stem}.comfyui.log")
                log_copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(server.log_path, log_copy)
                logger.error("The ComfyUI log is saved at %s", log_copy)
            raise
        if not images:
            raise ComfyUIError(f"workflow {workflow_name} finished without saving an image (no SaveImage node?)")
        return save_outputs(images, output)


def _one_line(error: BaseException) -> str:
    lines = str(error).splitlines() or [type(error).__name__]
    if isinstance(error, PromptRejectedError):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return lines[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command and return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arguments = parse_args(argv)
    try:
        written = run(arguments)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ComfyUIError, TimeoutError, FileExistsError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_FAILED

    for path in written:
        width, height = png_size(path)
        print(f"Wrote {path} ({width}x{height} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
