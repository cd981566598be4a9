"""The README's quickstart snippet runs as written (docs that match the code)."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md:quickstart", "exec"), {})
    out = buf.getvalue()
    assert "torch.Size([4, 14, 14]) torch.float32" in out


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    text = README.read_text()
    for line in ci.splitlines():
        if "pytest" in line and not line.lstrip().startswith("#"):
            assert line.strip() in text, f".ci/run line not shown in README: {line.strip()}"
