"""Student editions and the notebook contract of DESIGN.md, checked on the committed notebooks."""

import json

import pytest

from minilora import workbook

NOTEBOOKS = sorted((workbook.Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def load(path):
    return json.loads(path.read_text())


def source(cell):
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_contract(path):
    nb = load(path)
    cells = nb["cells"]
    intro = source(cells[0])
    assert cells[0]["cell_type"] == "markdown" and intro.startswith("# "), "first cell: a title"
    for must in ("you will learn", "Prerequisites", "run time", "Graduates to"):
        assert must.lower() in intro.lower(), f"the introduction must say '{must}'"
    code = [c for c in cells if c["cell_type"] == "code" and source(c).strip()]
    assert source(code[0]).startswith("# NBVAL_IGNORE_OUTPUT"), "the first code cell is the environment cell"
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), "run top to bottom once"
    text = "\n".join(source(c) for c in cells)
    assert "Check yourself" in text and "Exercise" in text and "Summary" in text
    assert any(workbook.is_solution(c) for c in cells), "exercises keep their solutions in tagged cells"
    for cell in code:
        for output in cell["outputs"]:
            assert output["output_type"] != "error", "no stored errors"
            assert "image/svg+xml" not in output.get("data", {}), "no stored SVG"
            assert "it/s]" not in "".join(output.get("text", "")), "no progress bars in stored outputs"
            assert not any(kind.startswith("application/vnd.jupyter.widget") for kind in output.get("data", {})), \
                "no stored widgets (a progress bar renders as one in JupyterLab)"
            assert output.get("name") != "stderr", "no warnings in stored outputs: they look like a broken setup"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_student_edition_hides_solutions_and_outputs(path):
    original = load(path)
    student = workbook.student_edition(original)
    assert len(student["cells"]) == len(original["cells"])
    for before, after in zip(original["cells"], student["cells"], strict=True):
        if after["cell_type"] != "code":
            assert after == before
            continue
        assert after["outputs"] == [] and after["execution_count"] is None
        expected = workbook.PLACEHOLDER if workbook.is_solution(before) else before["source"]
        assert after["source"] == expected
    assert load(path) == original, "the committed notebook is not touched"
    import nbformat

    nbformat.validate(nbformat.from_dict(student))  # a valid notebook: JupyterLab opens it without complaint


def test_unfooled_checks_reports_each_answer_a_check_accepts(tmp_path):
    """One kernel, three exercises: a sound check, one that a wrong answer fools, one that the placeholder fools."""
    import nbformat

    def solution(source):
        return nbformat.v4.new_code_cell(source, metadata={"tags": [workbook.SOLUTION_TAG]})

    cells = [nbformat.v4.new_code_cell("x = 3"),
             solution("answer_1 = x * 2"), nbformat.v4.new_code_cell("assert answer_1 == 6"),
             solution("answer_2 = x ** 2"), nbformat.v4.new_code_cell("assert answer_2 > 5"),  # fooled by x * 2
             solution("answer_3 = 4"), nbformat.v4.new_code_cell("assert globals().get('answer_3', 4) == 4")]
    wrong = {"ex1": ["answer_1 = x + 2"], "ex2": ["answer_2 = x * 2", "answer_2 = 1 / 0"]}
    path = tmp_path / "exercises.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    problems = workbook.unfooled_checks(path, wrong)
    assert len(problems) == 3, problems
    assert problems[0].startswith("cell 3: the check accepts wrong answer 1: 'answer_2 = x * 2'")
    assert problems[1].startswith("cell 3: wrong answer 2 raises by itself")
    assert problems[2].startswith("cell 5: the check accepts the placeholder")
