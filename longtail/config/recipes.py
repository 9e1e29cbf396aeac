"""Recipes: the YAML configs under configs/ in a checkout, shipped in the wheel as `longtail/recipes`.

A recipe is named by its path below that folder without `.yaml` (`cifar10_lt/ldam_drw`); a file that
exists always wins over a name. A recipe may start from another with `base:` (a path relative to its own
file, or a recipe name): its sections are the base's with its own keys laid over them.

Layer: foundation. Imports only `errors`.
"""
from __future__ import annotations

import difflib
import fnmatch
from pathlib import Path

import yaml

from longtail.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1]


def recipes_dir() -> Path:
    """The shipped copy in an installed wheel, else configs/ of the checkout the package runs from."""
    shipped = PACKAGE / "recipes"
    return shipped if shipped.is_dir() else PACKAGE.parent / "configs"


class UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that refuses a key given twice in one mapping: the YAML spec forbids it, and PyYAML would keep
    the last value without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict = {}
        for key_node, _ in node.value:
            # A merge key (<<) may stand beside keys that override what it merges; those are not duplicates.
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in lines:
                    raise yaml.constructor.ConstructorError(problem=f"key {key!r} is given twice in one mapping, on "
                                                                    f"lines {lines[key]} and {line}; keep one")
                lines[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not a UTF-8 text (YAML) file: line {line} holds a byte that is not "
                          "UTF-8; save the file as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return raw


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (its own text spans several, with a caret)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(exc, "context", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return (f"{context}: " if context else "") + " ".join(problem.split()) + where


def find_recipe(name: str | Path) -> Path:
    """`name` when it is a file; else the shipped recipe of that name, from any directory."""
    path = Path(name)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; expected a YAML file or a shipped recipe's name")
    found = path if path.is_file() else shipped_recipe(path)
    if found is None:
        raise ConfigError(f"config file {path} does not exist, and no shipped recipe is named {str(name)!r}; "
                          f"{recipe_hint(path)}")
    return found


def shipped_recipe(name: str | Path) -> Path | None:
    """The shipped recipe of that name (`cifar10_lt/ce`, `cifar10_lt/ce.yaml`, or `configs/cifar10_lt/ce.yaml` as
    the README writes it), else None."""
    path = Path(name)
    rest = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) and len(path.parts) > 1 else path
    root = recipes_dir()
    candidates = () if rest.is_absolute() else (root / rest, root / rest.with_name(rest.name + ".yaml"))
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def recipe_hint(name: Path) -> str:
    """Where to find the recipe a mistyped name meant: the closest shipped name, and `longtail configs`."""
    typed = name.as_posix().removeprefix("configs/").removesuffix(".yaml")

    def similarity(known: str) -> float:
        return difflib.SequenceMatcher(None, typed, known).ratio()

    # Of names about as close, one whose file name holds the typed one's: cifar100_lt/ldam -> ldam_drw, not la.
    def score(known: str) -> float:
        return similarity(known) + 0.2 * (name.stem in known.rpartition("/")[2])

    best = max(recipe_names(), key=score)
    return (f"did you mean {best}? " if similarity(best) >= 0.6 else "") + "`longtail configs` lists the recipes"


def read_recipe(path: str | Path, inside: tuple[Path, ...] = ()) -> dict:
    """A recipe file with its `base:` chain laid under it, one mapping of sections."""
    path = Path(path)
    raw = read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected a recipe name or a path to a YAML file, got {base!r}")
    beside = path.parent / base
    base_path = next((p for p in (beside, beside.with_name(beside.name + ".yaml")) if p.is_file()), None)
    base_path = base_path or shipped_recipe(base)
    if base_path is None:
        raise ConfigError(f"{path}: base: {base} does not exist as {beside.resolve()} (a base path is relative to the "
                          f"folder of the file that names it), and no shipped recipe is named {base!r}; "
                          f"{recipe_hint(Path(base))}")
    if base_path.resolve() in (*inside, path.resolve()):
        raise ConfigError(f"{path}: base: {base} leads back to {path}; a recipe cannot inherit from itself")
    merged = read_recipe(base_path, (*inside, path.resolve()))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def describe(path: Path, limit: int = 100) -> str:
    """What a recipe trains: the first sentence of its opening comment (which may run over several lines)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = next((i + 1 for i, c in enumerate(text) if c == "." and text[i + 1:i + 2] in ("", " ")), len(text))
    sentence = text[:end]
    return sentence if len(sentence) <= limit else sentence[:limit - 3].rstrip() + "..."


def recipe_names() -> list[str]:
    """The shipped recipes' names (`cifar10_lt/ce`, ...); the paper tables are `longtail reproduce --list`'s."""
    root = recipes_dir()
    return [path.relative_to(root).with_suffix("").as_posix() for path in sorted(root.glob("*/*.yaml"))
            if path.parent.name != "tables"]


def list_recipes(pattern: str | None = None) -> list[tuple[str, str]]:
    """(name, description) of the shipped recipes whose name matches `pattern` (a glob, or a plain word
    matched anywhere in the name)."""
    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return [(name, describe(recipes_dir() / f"{name}.yaml")) for name in recipe_names()
            if not pattern or fnmatch.fnmatch(name, pattern)]
