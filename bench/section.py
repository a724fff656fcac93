"""One section of docs/benchmarks.md, owned by one benchmark script and replaced in place
between `<!-- NAME:begin -->` and `<!-- NAME:end -->` so the scripts can run in any order."""

import os


def write_section(out, name, title, intro, rows):
    """Replace (or append) section `name` of the report at `out` with a table of 5-column rows."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    lines = [begin, title, "", intro, "", "| measure | cairn | other | ratio | note |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    lines += [end]
    section = "\n".join(lines) + "\n"
    text = open(out).read() if os.path.exists(out) else "# Benchmarks\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    open(out, "w").write(text)
    return section
