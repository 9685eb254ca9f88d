"""The one table model every table of `results/tables/` goes through.

A table file (`<name>.{md,tex,csv}`) is a `TableFile`: the markdown document and the LaTeX
file as blocks (text, or a `Table`), and the CSV's records. A `Table` holds its cells once,
as markdown shows them; LaTeX gets them escaped (`tex_escape`) unless the table brings cells
of its own in raw LaTeX (`$\\pm$`, `\\textbf`).

LaTeX is pandas' (`DataFrame.to_latex`: booktabs rules, cells as given). Markdown rows are
joined here: tabulate, which pandas' `to_markdown` uses too, pads every cell to its column's
width, and readers and tests find a row by its plain `| a | b |` text. CSV is the standard
library's `csv.DictWriter`: pandas would write an integer column with a missing value as
floats (`256.0`).
"""

import csv
from dataclasses import dataclass
from pathlib import Path

DASH = "–"  # a cell without a value


def tex_escape(text: str) -> str:
    """The characters of our labels, captions and verdicts that LaTeX would read as markup."""
    return text.replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")


@dataclass
class Table:
    """Column titles and rows of cell texts, as markdown shows them.

    `align` is the LaTeX column format (`l` for text, `c` for values); `tex_head` and
    `tex_rows`, in raw LaTeX, replace the escaped markdown where LaTeX shows more than the
    escaped text (a title in math mode, bold, a minus sign)."""

    head: list[str]
    rows: list[list[str]]
    align: str = ""
    tex_head: list[str] | None = None
    tex_rows: list[list[str]] | None = None

    def markdown(self) -> str:
        lines = [self.head, ["---"] * len(self.head), *self.rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)

    def latex(self) -> str:
        # pandas is imported here, by the first table written: its import takes about half
        # a second, more than all of the aggregate's other imports, and `--help` needs none.
        import pandas

        head = self.tex_head if self.tex_head is not None else list(map(tex_escape, self.head))
        rows = (
            self.tex_rows
            if self.tex_rows is not None
            else [list(map(tex_escape, row)) for row in self.rows]
        )
        # Numbered columns, the titles given apart: two optimizers may share a title.
        frame = pandas.DataFrame(rows, columns=range(len(head)))
        return frame.to_latex(
            index=False, header=head, escape=False, column_format=self.align
        ).rstrip("\n")


@dataclass
class TableFile:
    """What `<name>.md`, `<name>.tex` and `<name>.csv` hold.

    `markdown`: blocks (text or `Table`) a blank line apart; `latex`: blocks (`%` comment
    lines or `Table`) one line apart; `records`: the CSV's rows, with every value as it is
    (None: an empty field), `fields` its columns (default: the first record's keys)."""

    name: str
    markdown: list
    latex: list
    records: list[dict]
    fields: list[str] | None = None

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        md = [b.markdown() if isinstance(b, Table) else b for b in self.markdown]
        tex = [b.latex() if isinstance(b, Table) else b for b in self.latex]
        (out / f"{self.name}.md").write_text("\n\n".join(md) + "\n")
        (out / f"{self.name}.tex").write_text("\n".join(tex) + "\n")
        write_csv(out / f"{self.name}.csv", self.records, self.fields)


def write_csv(path: Path, records: list[dict], fields: list[str] | None = None) -> None:
    """`records` as CSV under `fields` (default: the first record's keys); a missing key or
    None is an empty field."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = fields or (list(records[0]) if records else [])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(records)
