"""params.yaml -> validated sections. Unknown keys are errors: a typo must never be a silent default.

The file is checked against pipeline.params_schema and returned as written (no defaults filled
in), so DVC and the stages see exactly the params in the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import FerError
from pipeline.params_schema import problems


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FerError(f"{path} not found (run from the repository root)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise FerError(f"{path} is not valid YAML: {_yaml_error(e)}") from None
    params = {} if params is None else params
    found = problems(params)
    if found:
        message = f"{path}: {'; '.join(found)}"
        raise FerError(message.replace("\r", " ").replace("\n", " "))  # one line, always
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in params:
        raise FerError(f"params.yaml has no '{name}' section")
    return dict(params[name])


def _yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return " ".join((where + text).split())
