"""One benchmark's section of BENCHMARKS.md, replaced in place (`--write` of the bench scripts).

    from markdown_section import replace_section      # bench/ is on sys.path for `python bench/x.py`
    replace_section(Path("BENCHMARKS.md"), "## Low-bit", report)

The section runs from the line starting with `heading` to the next `## ` heading or the end of
the file; without one, the report is appended. The file is written atomically.
"""

from __future__ import annotations

import re
from pathlib import Path


def replace_section(path: Path, heading: str, report: str) -> None:
    from kdq.io import write_text

    text = path.read_text() if path.exists() else "# Benchmarks\n"
    match = re.search(rf"^{re.escape(heading)}.*?(?=^## |\Z)", text, flags=re.S | re.M)
    text = text[: match.start()] + report + "\n" + text[match.end():] if match else text.rstrip() + "\n\n" + report + "\n"
    write_text(path, text)
