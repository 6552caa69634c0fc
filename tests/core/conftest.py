"""Core tier: plain torch and transformers, no ComfyUI."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]

# Appended, not prepended: the repository's `nodes` package must not hide ComfyUI's `nodes` module
# in the ComfyUI tier, which puts ComfyUI first on the path.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
