"""The README's load snippet ("The pruned folder"), run verbatim in a fresh interpreter on code-free
pruned folders of every family: `import diffprune` alone must let plain diffusers resolve the
`diffprune.io` library that model_index.json names (issue 23, item 1), and must not import torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_portable import _pruned_pipeline

from diffprune.io import save_pipeline

README = Path(__file__).resolve().parents[1] / "README.md"
KINDS = ("ddpm", "sd", "dit", "sdxl", "sd3")


def readme_load_snippet() -> str:
    """The README's Python block that loads "runs/pruned" through plain diffusers."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    found = [b for b in blocks if 'DiffusionPipeline.from_pretrained("runs/pruned")' in b and "import diffprune" in b]
    assert len(found) == 1, "README must show the load one-liner exactly once"
    return found[0]


@pytest.fixture(scope="module")
def pruned_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme_load")
    out = {}
    for kind in KINDS:
        pipe, component = _pruned_pipeline(kind)
        folder = root / kind
        folder.mkdir()
        save_pipeline(pipe, folder)
        out[kind] = (folder, component, type(getattr(pipe, component)).__name__)
    return out


def test_import_diffprune_alone_does_not_import_torch():
    code = "import sys, diffprune; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", KINDS)
def test_readme_snippet_loads_every_family_in_a_fresh_interpreter(kind, pruned_folders):
    folder, component, class_name = pruned_folders[kind]
    code = readme_load_snippet().replace('"runs/pruned"', json.dumps(str(folder)))
    code += f"\nprint('CLASS', type(pipe.{component}).__name__)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"CLASS {class_name}" in proc.stdout


def test_the_lazy_library_loads_on_first_name_only():
    """Dunder look-ups (tools that scan sys.modules) must not run io's code; a real name does."""
    code = ("import sys, diffprune; m = sys.modules['diffprune.io']; hasattr(m, '__wrapped__'); "
            "getattr(m, '__file__'); print('torch' in sys.modules); m.PrunedUNet2DModel; print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
