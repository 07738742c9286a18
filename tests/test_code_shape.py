"""The code stays readable: no function outside tests/ longer than a screen (60 lines, def line to last line)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = ["modeling_nanovlm", "processing", "nanovlm_eval", "examples", "benchmarks", ".ci"]
MAX_FUNCTION_LINES = 60


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_outside_tests_is_longer_than_60_lines():
    sources = sorted(path for folder in CODE for path in (ROOT / folder).rglob("*.py"))
    assert ROOT / "modeling_nanovlm" / "modeling_nanovlm.py" in sources
    too_long = [entry for path in sources for entry in long_functions(path)]
    assert not too_long, "split these into named steps:\n" + "\n".join(too_long)


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "probe.py"
    path.write_text(f"def short():\n    pass\n\n\ndef probe():\n{body}\n")
    assert long_functions(path) == [f"probe.py:5 probe ({MAX_FUNCTION_LINES + 1} lines)"]
