"""The documentation cannot rot: its Python examples run, and its references list every option and key.

The ```python blocks of docs/api.md and docs/extending.md run in order, in one namespace per page,
in a fresh working directory with `configs/` linked in and tiny fake CIFAR-10 and Fashion-MNIST under
$LONGTAIL_DATA. A block whose first line is `# not run` is skipped; one whose first line is
`# file: NAME.py` is written to NAME.py in that directory (importable) instead of being executed.
"""
import functools
import math
import re
import sys
from pathlib import Path

import pytest
import yaml

from fake_data import write_cifar10, write_fashion_mnist
from longtail import methods, models
from longtail.cli import build_parser, main
from longtail.config import Config

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
FILE_MARK = re.compile(r"#\s*file:\s*(\S+)")


def python_blocks(page: str) -> list[str]:
    return [b for b in PYTHON_BLOCK.findall((DOCS / page).read_text()) if not b.startswith("# not run")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs-data")
    # Fashion-MNIST-LT at imbalance 100 then has 1 / 3 / 6 Many / Medium / Few classes (the examples print
    # all three); CIFAR-10's 100 per class leave 1 image for the smallest class and 20 for a val split.
    write_fashion_mnist(root, train_per_class=1100, test_per_class=4)
    write_cifar10(root, train_per_class=100, test_per_class=4)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch, data_root):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.setenv("LONGTAIL_DATA", str(data_root))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved_models, saved_methods, saved_modules = dict(models.MODELS), dict(methods.METHODS), set(sys.modules)
    yield tmp_path
    # Undo what the examples registered and imported, so another page or test starts clean.
    models.MODELS.clear()
    models.MODELS.update(saved_models)
    methods.METHODS.clear()
    methods.METHODS.update(saved_methods)
    for name in set(sys.modules) - saved_modules:
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


def run_page(page: str, workdir: Path) -> dict:
    namespace: dict = {"__name__": f"docs_{Path(page).stem}"}
    blocks = python_blocks(page)
    assert blocks, f"{page} has no runnable python blocks"
    for number, block in enumerate(blocks, start=1):
        mark = FILE_MARK.match(block.splitlines()[0])
        if mark:
            (workdir / mark.group(1)).write_text(block)
            continue
        try:
            exec(compile(block, f"{page} block {number}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page}, python block {number} failed:\n{block}") from exc
    return namespace


def test_api_examples_run(workdir):
    ns = run_page("api.md", workdir)
    # the plain PyTorch loop: three epochs through the sampler, the last one re-weighted by LDAM-DRW
    assert ns["sampler"].epoch == 2 and ns["criterion"].weight is not None
    assert len(ns["epoch_losses"]) > 0 and all(math.isfinite(v) for v in ns["epoch_losses"])
    assert ns["results"]["checkpoint"] == "final"
    assert (workdir / "runs" / "api_fm_ce" / "model.pt").exists()
    assert (workdir / "runs" / "api_fm_ce" / "eval-test.json").exists()


def test_extending_examples_run(workdir):
    run_page("extending.md", workdir)
    for run in ("label_smoothing", "maxnorm_erm", "mixup", "linear_probe"):
        assert (workdir / "runs" / run / "results.json").exists(), run


def test_cli_doc_names_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for command, subparser in sub.choices.items():
        assert f"## `longtail {command}`" in text, command
        for action in subparser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert flag in text, f"longtail {command} {flag}"


README_ROW = re.compile(r"^\| `longtail (\w+)(.*?)` \|", re.M)


def test_every_command_line_of_the_readme_table_is_one_the_cli_takes(capsys):
    """Each row's command, run with --help in-process, exists and offers every flag the row names; and every
    command is in the table."""
    rows = README_ROW.findall((REPO / "README.md").read_text())
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert {command for command, _ in rows} == set(sub.choices)
    for command, rest in rows:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0, command
        shown = capsys.readouterr().out
        for flag in re.findall(r"--[a-z][a-z-]*", rest):
            assert re.search(rf"{flag}(?![\w-])", shown), f"README: longtail {command} {flag} is no option of it"


def _documented_defaults(text: str) -> dict[str, dict[str, str]]:
    """{section: {key: default as written}} from the `## \\`section\\`` tables of config.md."""
    found: dict[str, dict[str, str]] = {}
    for section, body in re.findall(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", body, re.M)
        found[section] = dict(rows)
    return found


def test_config_doc_gives_every_key_with_its_default():
    documented = _documented_defaults((DOCS / "config.md").read_text())
    defaults = Config().to_dict()
    assert set(documented) == set(defaults)
    for section, values in defaults.items():
        assert set(documented[section]) == set(values), section
        for key, value in values.items():
            assert yaml.safe_load(documented[section][key]) == value, f"{section}.{key}"


def test_user_docs_cite_papers_and_docs_not_internal_notes():
    """Users have neither the project's SPEC nor ../shared: the docs cite the paper or the project's docs."""
    for path in [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]:
        text = path.read_text()
        assert not re.search(r"\bSPEC\b|\.\./shared", text), path


FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)#\s]*\.md|)#([^)\s]+)\)")


@functools.cache
def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to hyphens, repeats -1, -2)."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.*)$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_every_link_to_a_heading_finds_it():
    pages = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
    broken = []
    for page in pages:
        for target, anchor in LINK.findall(FENCE.sub("", page.read_text())):
            path = (page.parent / target).resolve() if target else page
            if path.is_file() and anchor not in heading_anchors(path):
                broken.append(f"{page.relative_to(REPO)}: {target}#{anchor}")
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)
