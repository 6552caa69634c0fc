"""Every node documents itself in the editor: tooltips, descriptions, help pages and translations.

The node classes are imported in process through ComfyUI's own loader (fixture `pack`). The server
tests check that ComfyUI 0.3.64 serves the help pages and the locale files where its frontend looks.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path

import pytest

from workflows.comfy_server import PACK_FOLDER_NAME

pytestmark = pytest.mark.comfyui

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS_DIRECTORY = REPO_ROOT / "web" / "docs"
LOCALES_DIRECTORY = REPO_ROOT / "locales"
LOCALES = ("en", "zh")
ALLOWED_CATEGORY_ROOTS = ("conditioning/SD-IPC", "loaders", "training")
SEARCH_TERMS = ("image to prompt", "variation", "sd-ipc")
LATIN_TERMS = ("SD-IPC", "CLIP", "LoRA")
CJK_CHARACTER = re.compile(r"[\u4e00-\u9fff]")


def node_classes(pack) -> dict[str, type]:
    return dict(pack.NODE_CLASS_MAPPINGS)


def declared_inputs(node_class: type) -> dict[str, tuple]:
    """Return the required and optional inputs of a node class, the ones the editor shows."""
    inputs = node_class.INPUT_TYPES()
    return {**inputs.get("required", {}), **inputs.get("optional", {})}


def output_names(node_class: type) -> tuple[str, ...]:
    return tuple(getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES)


def load_locale(locale: str) -> dict:
    return json.loads((LOCALES_DIRECTORY / locale / "nodeDefs.json").read_text(encoding="utf-8"))


def english_locale(pack) -> dict:
    """Return the English nodeDefs entries of every node, taken from the node definitions themselves."""
    locale = {}
    for name, node_class in node_classes(pack).items():
        entry = {
            "display_name": pack.NODE_DISPLAY_NAME_MAPPINGS[name],
            "description": node_class.DESCRIPTION,
            "inputs": {
                input_name: {"name": input_name, "tooltip": declaration[1]["tooltip"]}
                for input_name, declaration in declared_inputs(node_class).items()
            },
        }
        if node_class.RETURN_TYPES:
            entry["outputs"] = {
                str(index): {"name": output_name, "tooltip": tooltip}
                for index, (output_name, tooltip) in enumerate(zip(output_names(node_class), node_class.OUTPUT_TOOLTIPS))
            }
        locale[name] = entry
    return locale


def help_page_url(python_module: str, node_name: str) -> str:
    """Return the URL of a custom node's English help page, as the editor (frontend 1.27) builds it.

    The editor first requests <node_name>/<locale>.md beside it and falls back to this page.
    """
    pack_folder = python_module.split(".")[1].split("@")[0]
    return f"/extensions/{urllib.parse.quote(pack_folder)}/docs/{node_name}.md"


def test_pack_has_nodes(pack):
    assert "SDIPCImageToPrompt" in node_classes(pack)


def test_inputs_have_tooltips(pack):
    for name, node_class in node_classes(pack).items():
        for input_name, declaration in declared_inputs(node_class).items():
            options = declaration[1] if len(declaration) > 1 else {}
            assert options.get("tooltip", "").strip(), f"{name}.{input_name} has no tooltip"


def test_output_tooltips_match_outputs(pack):
    for name, node_class in node_classes(pack).items():
        tooltips = tuple(getattr(node_class, "OUTPUT_TOOLTIPS", ()))
        assert len(tooltips) == len(node_class.RETURN_TYPES), f"{name}: {len(tooltips)} tooltips for {len(node_class.RETURN_TYPES)} outputs"
        for index, tooltip in enumerate(tooltips):
            assert tooltip.strip(), f"{name} output {index} has an empty tooltip"


def test_nodes_have_description(pack):
    for name, node_class in node_classes(pack).items():
        assert getattr(node_class, "DESCRIPTION", "").strip(), f"{name} has no DESCRIPTION"


def test_nodes_have_expected_category(pack):
    for name, node_class in node_classes(pack).items():
        category = node_class.CATEGORY
        assert any(category == root or category.startswith(root + "/") for root in ALLOWED_CATEGORY_ROOTS), f"{name}: {category}"


def test_display_names_name_the_pack(pack):
    for name in node_classes(pack):
        assert "SD-IPC" in pack.NODE_DISPLAY_NAME_MAPPINGS[name], f"{name}: {pack.NODE_DISPLAY_NAME_MAPPINGS[name]!r}"


@pytest.mark.parametrize("term", SEARCH_TERMS)
def test_search_term_matches_display_name(pack, term):
    # The editor's node search (frontend 1.27) matches the class name and the display name only.
    display_names = [display_name.lower() for display_name in pack.NODE_DISPLAY_NAME_MAPPINGS.values()]

    assert any(term in display_name for display_name in display_names), display_names


def test_web_directory_is_web_folder(pack):
    assert (Path(pack.__file__).parent / pack.WEB_DIRECTORY).resolve() == (REPO_ROOT / "web").resolve()


def test_every_node_has_help_page(pack):
    for name in node_classes(pack):
        page = DOCS_DIRECTORY / f"{name}.md"
        assert page.is_file(), f"{page} is missing"
        assert page.read_text(encoding="utf-8").startswith(f"# {pack.NODE_DISPLAY_NAME_MAPPINGS[name]}\n")


def test_every_node_has_chinese_help_page(pack):
    translations = load_locale("zh")

    for name in node_classes(pack):
        page = DOCS_DIRECTORY / name / "zh.md"
        assert page.is_file(), f"{page} is missing"
        assert page.read_text(encoding="utf-8").startswith(f"# {translations[name]['display_name']}\n")


def test_help_pages_have_no_stale_nodes(pack):
    pages = {path.stem for path in DOCS_DIRECTORY.glob("*.md")} | {path.name for path in DOCS_DIRECTORY.iterdir() if path.is_dir()}

    assert pages - set(node_classes(pack)) == set()


@pytest.mark.parametrize("page_name", ["{name}.md", "{name}/zh.md"])
def test_help_pages_list_inputs_and_outputs(pack, page_name):
    for name, node_class in node_classes(pack).items():
        page = (DOCS_DIRECTORY / page_name.format(name=name)).read_text(encoding="utf-8")
        for input_name in declared_inputs(node_class):
            assert f"| `{input_name}`" in page, f"{page_name.format(name=name)} does not list input {input_name}"
        for output_name in output_names(node_class) if node_class.RETURN_TYPES else ():
            assert f"| `{output_name}`" in page, f"{page_name.format(name=name)} does not list output {output_name}"


@pytest.mark.parametrize(("page_name", "heading"), [("{name}.md", "## Example"), ("{name}/zh.md", "## 示例")])
def test_help_pages_have_example(pack, page_name, heading):
    for name in node_classes(pack):
        page = (DOCS_DIRECTORY / page_name.format(name=name)).read_text(encoding="utf-8")
        example = page.split(f"\n{heading}\n", 1)

        assert len(example) == 2, f"{page_name.format(name=name)} has no {heading} section"
        assert example[1].strip(), f"{page_name.format(name=name)} has an empty {heading} section"


@pytest.mark.parametrize("locale", LOCALES)
def test_locale_covers_every_node(pack, locale):
    translations = load_locale(locale)

    for name, node_class in node_classes(pack).items():
        entry = translations.get(name)
        assert entry is not None, f"{locale}: {name} is missing"
        assert entry.get("display_name", "").strip(), f"{locale}: {name} has no display_name"
        assert entry.get("description", "").strip(), f"{locale}: {name} has no description"
        for input_name in declared_inputs(node_class):
            item = entry.get("inputs", {}).get(input_name, {})
            assert item.get("name", "").strip(), f"{locale}: {name}.{input_name} has no name"
            assert item.get("tooltip", "").strip(), f"{locale}: {name}.{input_name} has no tooltip"
        for index in range(len(node_class.RETURN_TYPES)):
            item = entry.get("outputs", {}).get(str(index), {})
            assert item.get("name", "").strip(), f"{locale}: {name} output {index} has no name"
            assert item.get("tooltip", "").strip(), f"{locale}: {name} output {index} has no tooltip"


@pytest.mark.parametrize("locale", LOCALES)
def test_locale_has_no_stale_entries(pack, locale):
    translations = load_locale(locale)
    classes = node_classes(pack)

    assert set(translations) - set(classes) == set()
    for name, entry in translations.items():
        assert set(entry.get("inputs", {})) - set(declared_inputs(classes[name])) == set(), f"{locale}: {name}"
        assert set(entry.get("outputs", {})) - {str(index) for index in range(len(classes[name].RETURN_TYPES))} == set()


def test_english_locale_matches_node_definitions(pack):
    expected = english_locale(pack)
    english_file = LOCALES_DIRECTORY / "en" / "nodeDefs.json"
    if os.environ.get("SDIPC_WRITE_LOCALE", "") not in ("", "0"):
        english_file.write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    translations = load_locale("en")

    for name, entry in expected.items():
        assert translations.get(name) == entry, (
            f"locales/en/nodeDefs.json differs from the definition of {name}. Run this test with SDIPC_WRITE_LOCALE=1 "
            "to rewrite the file from the node definitions, then update locales/zh/nodeDefs.json to match."
        )


def test_chinese_locale_is_translated(pack):
    translations = load_locale("zh")
    english = load_locale("en")

    for name in node_classes(pack):
        entry = translations[name]
        texts = [entry["display_name"], entry["description"]]
        texts += [item["tooltip"] for item in entry.get("inputs", {}).values()]
        texts += [item["tooltip"] for item in entry.get("outputs", {}).values()]
        for text in texts:
            assert CJK_CHARACTER.search(text), f"zh: {name} has an untranslated text: {text!r}"
        for term in LATIN_TERMS:
            if term in english[name]["display_name"]:
                assert term in entry["display_name"], f"zh: {name} display name drops {term}"


def test_object_info_names_pack_module(comfy_server, pack):
    object_info = comfy_server.object_info()

    for name in node_classes(pack):
        assert object_info[name]["python_module"] == f"custom_nodes.{PACK_FOLDER_NAME}", name


def test_server_serves_help_pages(comfy_server, pack):
    object_info = comfy_server.object_info()

    for name in node_classes(pack):
        url = help_page_url(object_info[name]["python_module"], name)
        status, body = comfy_server.get_text(url)
        assert status == 200, f"{name}: HTTP {status}"
        assert body == (DOCS_DIRECTORY / f"{name}.md").read_text(encoding="utf-8")

        chinese_status, chinese_body = comfy_server.get_text(url.removesuffix(".md") + "/zh.md")
        assert chinese_status == 200, f"{name}: HTTP {chinese_status} for the Chinese page"
        assert chinese_body == (DOCS_DIRECTORY / name / "zh.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("locale", LOCALES)
def test_i18n_endpoint_serves_locale(comfy_server, pack, locale):
    status, body = comfy_server.get_text("/i18n")
    served = json.loads(body)[locale]["nodeDefs"]
    expected = load_locale(locale)

    assert status == 200
    for name in node_classes(pack):
        assert served[name] == expected[name], f"{locale}: {name}"
