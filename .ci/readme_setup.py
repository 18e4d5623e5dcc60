"""Print the README's set-up commands, one a line, exactly as the README writes them.

CI runs what a newcomer copies: the first two ```bash blocks under the README's "## Set-up"
heading (before the next "## " heading), each a single command line. Anything else is an
error (exit 1, saying what was found), so the README and CI cannot drift apart silently.
"""

import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def setup_commands(text: str) -> list[str]:
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("## Set-up")]
    if not starts:
        raise ValueError('README.md has no "## Set-up" heading')
    blocks: list[list[str]] = []
    block: list[str] | None = None
    for line in lines[starts[0] + 1:]:
        if block is None and line.startswith("## "):
            break
        if block is None and line.strip() == "```bash":
            block = []
        elif block is not None and line.strip() == "```":
            blocks.append(block)
            block = None
        elif block is not None:
            block.append(line)
    commands = [[line for line in b if line.strip()] for b in blocks[:2]]
    if len(commands) != 2 or any(len(c) != 1 for c in commands):
        raise ValueError(f'README.md\'s "## Set-up" section should hold two ```bash blocks of one command '
                         f"each; found {len(blocks)} block(s): {blocks!r}")
    return [c[0].strip() for c in commands]


if __name__ == "__main__":
    try:
        print("\n".join(setup_commands(README.read_text(encoding="utf-8"))))
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
