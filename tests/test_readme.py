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


def test_readme_defenses_example_runs():
    """It ran but showed nothing: its base model left every row above tau (norm_mean 0)."""
    _run_section("## Defenses")


def test_readme_defenses_table_lists_every_default():
    """The Defenses table's last column is oni.DEFAULTS, key for key and value for value."""
    import ast

    import oni

    section = README.read_text().split("## Defenses", 1)[1].split("\n## ", 1)[0]
    rows = [(name, column) for name, column in
            re.findall(r"^\| `(\w+)` \|.*\| ([^|]*) \|$", section, re.M) if name != "name"]
    assert {name for name, _ in rows} == set(oni.DEFAULTS)
    for name, column in rows:
        listed = {key: ast.literal_eval(value)
                  for key, value in re.findall(r"`(\w+)=([^`]+)`", column)}
        assert listed == oni.DEFAULTS[name], name
