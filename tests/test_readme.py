"""The README's quickstart runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _run_section(title: str) -> None:
    """Every python block of the section, in order, in one namespace (later blocks build
    on the first)."""
    section = README.read_text().split(title, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, f"no python block under {title}"
    namespace = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md:{title}[{i}]", "exec"), namespace)


def test_readme_quickstart_runs():
    _run_section("## Shapley quickstart")


def test_readme_noise_example_runs():
    _run_section("## Noise solver")
