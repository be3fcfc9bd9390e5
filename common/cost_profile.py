"""A worker's profile: the cost model it advertises, how and when it was obtained, and its saved form.

A worker measures its ``CostModel`` at start-up (``--profile startup``), loads a saved one
(``--profile file``: a small JSON written by an earlier run, measured and written when missing) or
advertises the defaults (``--profile off``). The JSON names what it was measured for (model,
device, dtype, KV geometry), so a file is never applied to another engine. No torch here: the
scheduler and the bench read profiles too.
"""

from __future__ import annotations

import enum
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument
from common.types import CostModel

PROFILE_MODES = ("off", "startup", "file")
FORMAT_VERSION = 1
_SETTING_FIELDS = frozenset({"host_in_place"})  # CostModel fields the engine sets, never measured


class ProfileSource(str, enum.Enum):
    """Where an advertised cost model came from."""

    DEFAULT = "default"  # nothing measured: the CostModel defaults (--profile off)
    MEASURED = "measured"  # profiled by this process (start-up or an admin request)
    FILE = "file"  # loaded from --profile-file (measured by an earlier run)


@dataclass(frozen=True)
class ProfileInfo:
    """How the advertised cost model was obtained (Describe's ``profile``)."""

    source: ProfileSource = ProfileSource.DEFAULT
    duration_s: float = 0.0  # wall time of the measurement (0 for DEFAULT)
    measured_unix_s: float = 0.0  # when it was measured (0 for DEFAULT)


@dataclass(frozen=True)
class ProfileKey:
    """What a profile was measured for: a saved profile applies only to an engine with the same key."""

    model: str
    device: str  # device type: "cpu" or "cuda" (and the GPU's name on CUDA)
    dtype: str
    num_layers: int
    block_size: int


@dataclass(frozen=True)
class CostProfile:
    """A cost model with its provenance; ``save``/``load`` give its JSON form."""

    cost_model: CostModel = field(default_factory=CostModel)
    info: ProfileInfo = field(default_factory=ProfileInfo)
    key: ProfileKey | None = None  # None: not tied to an engine (the defaults)

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_VERSION,
            "key": asdict(self.key) if self.key is not None else None,
            "measured_unix_s": self.info.measured_unix_s,
            "duration_s": self.info.duration_s,
            # measured figures only: whether host layers are read in place is the engine's setting
            "cost_model": {k: v for k, v in asdict(self.cost_model).items() if k not in _SETTING_FIELDS},
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        """Write atomically (a worker killed mid-write leaves the old file or none, never half)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(self.to_json())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_json(cls, text: str, where: str = "profile") -> CostProfile:
        """Parse a saved profile; ``InvalidArgument`` naming ``where`` and the problem."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{where} is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise InvalidArgument(
                f"{where} is not a cost profile of format {FORMAT_VERSION} (format {got!r})")
        return cls(
            cost_model=_cost_model(doc.get("cost_model"), where),
            info=ProfileInfo(ProfileSource.FILE, _number(doc, "duration_s", where),
                             _number(doc, "measured_unix_s", where)),
            key=_key(doc.get("key"), where),
        )

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise InvalidArgument(f"cannot read profile file {str(path)!r}: {exc.strerror}") from exc
        return cls.from_json(text, f"profile file {str(path)!r}")


def _number(doc: dict[str, Any], name: str, where: str) -> float:
    value = doc.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _cost_model(value: Any, where: str) -> CostModel:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: cost_model must be an object, got {value!r}")
    names = {f.name for f in fields(CostModel)} - _SETTING_FIELDS
    unknown = sorted(set(value) - names)
    if unknown:
        raise InvalidArgument(f"{where}: unknown cost_model fields {unknown}")
    numbers: dict[str, Any] = {name: _number(value, name, f"{where} cost_model") for name in value}
    for name in ("d2h_bytes_per_s", "h2d_bytes_per_s", "correction"):
        if name in numbers and numbers[name] <= 0.0:
            raise InvalidArgument(f"{where}: cost_model.{name} must be > 0, got {numbers[name]}")
    return CostModel(**numbers)


def _key(value: Any, where: str) -> ProfileKey | None:
    if value is None:
        return None
    try:
        key = ProfileKey(**value)
    except TypeError as exc:
        names = [f.name for f in fields(ProfileKey)]
        raise InvalidArgument(f"{where}: key must name {names}, got {value!r}") from exc
    return key


def describe_cost(cost: CostModel) -> str:
    """One line for logs and the CLI: the batch-1 decode step, a 512-token prefill and the links."""
    return (f"decode step (batch 1) {cost.decode_step_s(1, 0) * 1e3:.2f} ms, prefill of 512 tokens "
            f"{cost.prefill_s(512) * 1e3:.1f} ms, d2h {cost.d2h_bytes_per_s / 1e9:.2f} GB/s, "
            f"h2d {cost.h2d_bytes_per_s / 1e9:.2f} GB/s")
