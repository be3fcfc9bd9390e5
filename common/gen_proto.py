"""Generate (or check) the Python modules and gRPC stubs of ``proto/layerkv/v1/*.proto``.

``python -m common.gen_proto`` writes ``common/proto/layerkv/v1/*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` and rewrites their absolute imports (``from layerkv.v1 import ...``) so they resolve
inside the ``common.proto`` package. Run it with an interpreter whose ``grpcio-tools`` is 1.62.x
(see docs/proto.md): that gencode carries no runtime-version check, so it imports with protobuf 4.25
up to the newest runtime. ``python -m common.gen_proto --check`` compares the committed modules'
descriptors with the ``.proto`` sources and exits non-zero when they differ.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.protobuf.descriptor_pb2 import FileDescriptorProto

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
OUT_ROOT = REPO_ROOT / "common" / "proto"
PACKAGE_DIR = Path("layerkv") / "v1"
# The newest grpcio-tools whose gencode has no runtime-version gate (1.63+ emit one).
PINNED_TOOLS = "1.62"

_IMPORT_RE = re.compile(r"^from layerkv\.v1 import ", re.MULTILINE)


def proto_files() -> list[Path]:
    """The .proto sources, relative to ``proto/`` (the import root)."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # dev dependency; only needed to generate

    include = Path(protoc.__file__).resolve().parent / "_proto"  # well-known types (struct.proto)
    argv = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args]
    code = protoc.main(argv)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}: {' '.join(argv)}")


def fix_imports(text: str) -> str:
    """``from layerkv.v1 import x_pb2`` -> ``from common.proto.layerkv.v1 import x_pb2``."""
    return _IMPORT_RE.sub("from common.proto.layerkv.v1 import ", text)


def generate(out_root: Path = OUT_ROOT) -> list[Path]:
    """Generate every module into ``out_root``; return the files written."""
    import grpc_tools

    version = getattr(grpc_tools, "__version__", "")
    if not version:  # grpc_tools has no __version__; ask the distribution metadata
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    if not version.startswith(PINNED_TOOLS + "."):
        print(
            f"warning: grpcio-tools {version} is not {PINNED_TOOLS}.x; its gencode may refuse older "
            "protobuf runtimes (see docs/proto.md)",
            file=sys.stderr,
        )
    out_root.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in proto_files()]
    _protoc([f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *files])
    written: list[Path] = []
    for path in sorted((out_root / PACKAGE_DIR).glob("*.py*")):
        path.write_text(fix_imports(path.read_text()))
        written.append(path)
    for package in (out_root, out_root / "layerkv", out_root / PACKAGE_DIR):
        init = package / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf modules (python -m common.gen_proto)."""\n')
    return written


def _without_json_names(file: FileDescriptorProto) -> FileDescriptorProto:
    """A descriptor-set output carries derived ``json_name``s that gencode omits; drop them."""
    clean = type(file)()
    clean.CopyFrom(file)
    stack = list(clean.message_type)
    while stack:
        message = stack.pop()
        for field in message.field:
            field.ClearField("json_name")
        stack.extend(message.nested_type)
    return clean


def stale_files() -> list[str]:
    """Names of the .proto files whose committed module's descriptor differs from the source."""
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        _protoc([f"--descriptor_set_out={out}", *[str(p) for p in proto_files()]])
        fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    stale: list[str] = []
    for file in fresh.file:
        module_name = "common.proto." + file.name.replace("/", ".").removesuffix(".proto") + "_pb2"
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            stale.append(file.name)
            continue
        committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        if committed != _without_json_names(file):
            stale.append(file.name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the committed modules are current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"generated code is stale for {stale}; run python -m common.gen_proto", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    for path in generate():
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
