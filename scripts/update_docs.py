"""Rewrites the ``--help`` block of docs/command-line.md from the train command itself.

    python scripts/update_docs.py

``tests/test_docs.py`` fails when the block and ``python -m jaxmnist.train --help`` differ.
"""

from __future__ import annotations

import io
import os
import re
from contextlib import redirect_stdout
from pathlib import Path

PAGE = Path(__file__).parent.parent / "docs" / "command-line.md"
WIDTH = "100"  # argparse wraps to $COLUMNS; the docs are written at this width


def help_text() -> str:
    from jaxmnist.commands.train import build_parser

    os.environ["COLUMNS"] = WIDTH
    output = io.StringIO()
    with redirect_stdout(output):
        build_parser().print_help()
    return output.getvalue()


def main() -> None:
    page = PAGE.read_text()
    updated = re.sub(
        r"(<!-- train --help -->\n```text\n).*?(```)",
        lambda m: m.group(1) + help_text() + m.group(2),
        page,
        flags=re.DOTALL,
    )
    PAGE.write_text(updated)
    print(f"{PAGE.name}: {'updated' if updated != page else 'already up to date'}")


if __name__ == "__main__":
    main()
