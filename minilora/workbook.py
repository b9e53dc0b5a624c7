"""Keeping the notebooks honest: re-execute them in place, and make a student edition without solutions.

Exercise solutions live in code cells tagged ``solution``. The student edition replaces each such cell with a
placeholder and clears every output, so the check cell that follows an exercise fails until it is solved.
"""

import copy
import json
import os
from pathlib import Path

SOLUTION_TAG = "solution"
PLACEHOLDER = "# Your solution here: the next cell checks it.\n"


def execute_in_place(path, timeout=900):
    """Run every cell of one notebook top to bottom and store the outputs in the file."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    client.execute()
    nbformat.write(nb, path)


def is_solution(cell):
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def student_edition(notebook):
    """Return a copy of a notebook (parsed JSON) with solutions replaced and all outputs cleared."""
    nb = copy.deepcopy(notebook)
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        if is_solution(cell):
            cell["source"] = PLACEHOLDER
        cell["outputs"], cell["execution_count"] = [], None
    return nb


def write_student_editions(notebook_dir, out_dir):
    """Write the student edition of every notebook in notebook_dir into out_dir; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(Path(notebook_dir).glob("*.ipynb")):
        target = out_dir / path.name
        target.write_text(json.dumps(student_edition(json.loads(path.read_text())), indent=1) + "\n")
        written.append(target)
    return written
