"""Every graph-editor workflow in workflows/ has an API-format twin that describes the same graph."""

import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
UI_FILES = sorted(WORKFLOWS.glob("*.json"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _executable_nodes(ui: dict) -> dict[str, dict]:
    return {str(node["id"]): node for node in ui["nodes"] if node["type"] not in FRONTEND_ONLY_TYPES and node.get("mode", 0) == 0}


def test_workflows_folder_is_not_empty():
    assert "sdipc_image_variation.json" in [path.name for path in UI_FILES]


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda path: path.stem)
def test_api_twin_exists(ui_path):
    assert (WORKFLOWS / "api" / ui_path.name).is_file()


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda path: path.stem)
def test_twins_have_same_nodes(ui_path):
    ui_nodes = _executable_nodes(_load(ui_path))
    api = _load(WORKFLOWS / "api" / ui_path.name)

    assert set(api) == set(ui_nodes)
    for node_id, node in ui_nodes.items():
        assert api[node_id]["class_type"] == node["type"], f"node {node_id}"


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda path: path.stem)
def test_twins_have_same_links(ui_path):
    ui = _load(ui_path)
    ui_nodes = _executable_nodes(ui)
    api = _load(WORKFLOWS / "api" / ui_path.name)
    ui_links = set()
    for _link_id, source, source_slot, target, target_slot, _type in ui["links"]:
        input_name = ui_nodes[str(target)]["inputs"][target_slot]["name"]
        ui_links.add((str(source), source_slot, str(target), input_name))

    api_links = set()
    for node_id, node in api.items():
        for input_name, value in node["inputs"].items():
            if isinstance(value, list):
                api_links.add((value[0], value[1], node_id, input_name))

    assert api_links == ui_links


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda path: path.stem)
def test_twins_have_same_widget_values(ui_path):
    ui_nodes = _executable_nodes(_load(ui_path))
    api = _load(WORKFLOWS / "api" / ui_path.name)

    for node_id, node in ui_nodes.items():
        api_values = [value for value in api[node_id]["inputs"].values() if not isinstance(value, list)]
        ui_values = list(node.get("widgets_values", []))
        for value in api_values:
            assert value in ui_values, f"node {node_id} ({node['type']}): API value {value!r} not in {ui_values}"
            ui_values.remove(value)
