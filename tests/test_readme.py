"""The README's quickstart runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _run_section(title: str) -> None:
    section = README.read_text().split(title, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, f"README.md:{title}", "exec"), {})


def test_readme_quickstart_runs():
    _run_section("## Shapley quickstart")


def test_readme_noise_example_runs():
    _run_section("## Noise solver")
