"""Sphinx extension: keep the exporter's directives out of the rendered book.

The chapters mark what `tools/export.py` extracts with nbdev-style comment lines at the top of a
code cell (`#| default_exp selection`, `#| export`). They belong in the notebook, not on the page:
this transform drops those leading `#|` lines from every code cell's source as myst-nb renders
it, and drops a cell's input altogether when nothing else is left (a cell of outputs keeps them;
a cell with neither, like each chapter's `#| default_exp` cell, disappears). Authors need do
nothing; the notebooks are unchanged. `_config.yml` loads it through `sphinx.local_extensions`.
"""

from docutils import nodes
from sphinx.transforms import SphinxTransform


def strip_directives(source: str) -> str:
    """`source` without its leading `#|` lines (and the blank lines right after them)."""
    lines = source.splitlines()
    start = 0
    while start < len(lines) and lines[start].lstrip().startswith("#|"):
        start += 1
    if start == 0:
        return source
    while start < len(lines) and not lines[start].strip():
        start += 1
    return "\n".join(lines[start:])


class HideDirectives(SphinxTransform):
    """Drop leading `#|` lines from myst-nb's code cells; drop cells that held nothing else."""

    default_priority = 500

    def apply(self, **kwargs) -> None:
        for cell_input in list(self.document.findall(nodes.container)):
            if cell_input.get("nb_element") != "cell_code_source":
                continue
            for block in list(cell_input.findall(nodes.literal_block)):
                source = block.astext()
                kept = strip_directives(source)
                if kept == source:
                    continue
                if kept.strip():
                    block.rawsource = kept
                    block.children = [nodes.Text(kept)]
                else:
                    block.parent.remove(block)
            if not any(isinstance(n, nodes.literal_block) for n in cell_input.findall()):
                cell = cell_input.parent
                cell.remove(cell_input)
                if cell.get("nb_element") == "cell_code" and not cell.children:
                    cell.parent.remove(cell)


def setup(app):
    app.add_transform(HideDirectives)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
