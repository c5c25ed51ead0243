"""The layers are a contract a machine checks (pyproject.toml, ``[tool.importlinter]``; ``make test``
runs ``lint-imports``): it holds for the tree, and it would catch an arrow pointing the wrong way."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


def lint(config: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS is not None, "import-linter is installed with the test extras"
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(config), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_tree_keeps_every_layer_contract() -> None:
    checked = lint(ROOT / "pyproject.toml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "0 broken" in checked.stdout


def test_an_import_against_a_layer_breaks_the_check(tmp_path: Path) -> None:
    # runners import controlplane.client (allowed by the real contract): forbidding it must fail, naming it.
    config = tmp_path / "contract.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["runners", "controlplane"]\n\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "runners import nothing of controlplane"\ntype = "forbidden"\n'
        'source_modules = ["runners"]\nforbidden_modules = ["controlplane"]\n'
    )
    checked = lint(config)
    assert checked.returncode == 1, checked.stdout
    assert "runners.client -> controlplane.client" in checked.stdout
