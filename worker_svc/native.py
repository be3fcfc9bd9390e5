"""Small C kernels for the CPU: compiled with the system C compiler on first use, cached, loaded.

A kernel module hands its C source to ``build``: the source is compiled (``cc -O3 -march=native``,
a few seconds) into a shared library kept in the user's cache folder (one per source, compiler and
CPU) and loaded with ctypes; torch tensors are passed as pointers and strides. Where no compiler is
found or the build fails, ``build`` returns None and the caller keeps its torch path (logged once).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# C shared by the vector kernels (put in front of their source): the machine's native vector of
# floats and ints, and Cephes' exp polynomial, so that each kernel writes only its own reduction.
SIMD_PRELUDE = r"""
#include <stdint.h>

/* W floats: the machine's native vector (AVX-512: 16, else 8); aligned(4): loads may be unaligned.
   Wider generic vectors than the hardware's made GCC spill through the stack on AVX2 (4x slower). */
#ifdef __AVX512F__
#define W 16
#else
#define W 8
#endif
typedef float vw __attribute__((vector_size(W * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(W * 4), aligned(4)));

/* Cephes' degree-6 polynomial of exp(r) for the small r a range reduction leaves (about 1 ulp), on
   a float or a vector T: arithmetic only, so that the loops around it vectorise (libm's expf is
   one scalar call each). */
#define EXP_POLY(T, r) ({ const T r_ = (r); T p_ = (T){0} + 1.9875691500e-4f; \
    p_ = p_ * r_ + 1.3981999507e-3f; p_ = p_ * r_ + 8.3334519073e-3f; \
    p_ = p_ * r_ + 4.1665795894e-2f; p_ = p_ * r_ + 1.6666665459e-1f; \
    p_ = p_ * r_ + 5.0000001201e-1f; p_ * r_ * r_ + r_ + 1.0f; })

/* exp(x) for x the caller clamped to [-87.33654, 88.7] (exp(-87.33654) is the smallest normal
   float, exp(88.7) the largest finite one): Cody-Waite reduction by ln 2, EXP_POLY, and the power
   of two put in the exponent bits. The vector form rounds to nearest by adding and taking away
   1.5 * 2^23 (rintf's result in the default rounding mode; GCC vectorised the scalar form's loop
   badly). */
static inline float exp_in_range(float x) {
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    const float p = EXP_POLY(float, r);
    union { int32_t i; float f; } scale = { .i = ((int32_t)n + 127) << 23 };
    return p * scale.f;
}

static inline vw vexp_in_range(vw x) {
    const vw n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const vw r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    const vw p = EXP_POLY(vw, r);
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vw)e;
}
"""

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")


def cache_dir(name: str) -> str:
    """Where the libraries of kernel ``name`` are kept between processes (the user's cache folder)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "layerkv", name.replace("_", "-"))


def _build_key(source: str, cc: str) -> str:
    """The source, flags, compiler and CPU (-march=native code runs only where it was built: a
    cache folder shared by machines with other CPUs gets another library)."""
    h = hashlib.sha256()
    for part in (source, " ".join(FLAGS), cc, platform.machine()):
        h.update(part.encode())
    try:
        h.update(subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout)
        with open("/proc/cpuinfo", "rb") as f:  # Linux: the CPU's model and instruction flags
            h.update(b"".join(line for line in f if line.startswith((b"flags", b"model name")))[:4096])
    except (OSError, subprocess.SubprocessError):
        pass
    return h.hexdigest()[:24]


def _compile(name: str, source: str, cc: str, folder: str) -> str:
    """Compile into ``folder``; the library's path."""
    src, lib = os.path.join(folder, f"{name}.c"), os.path.join(folder, f"{name}.so")
    with open(src, "w") as f:
        f.write(source)
    subprocess.run([cc, *FLAGS, src, "-o", lib, "-lm"], check=True, capture_output=True, timeout=120)
    return lib


def build(name: str, source: str, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """The library of ``source`` from the cache folder, compiled there first when missing (a few
    seconds once per machine; written under a temporary name and renamed, so concurrent processes
    never load a half-written file); ``declare`` sets its functions' argument types. An unwritable
    cache: built in a temporary folder. None where it cannot be built."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found: %s keeps the torch path", name)
        return None
    try:
        cached = os.path.join(cache_dir(name), f"{name}-{_build_key(source, cc)}.so")
        if not os.path.isfile(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            folder = tempfile.mkdtemp(prefix="build-", dir=os.path.dirname(cached))
            try:
                os.replace(_compile(name, source, cc, folder), cached)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        handle = ctypes.CDLL(cached)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("no cached %s library (%s): building it in a temporary folder", name, exc)
        folder = tempfile.mkdtemp(prefix=f"layerkv-{name}-")
        try:
            handle = ctypes.CDLL(_compile(name, source, cc, folder))
        except (OSError, subprocess.SubprocessError) as exc2:
            log.warning("building the %s kernel failed (%s): it keeps the torch path", name, exc2)
            return None
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the loaded library stays mapped
    declare(handle)
    return handle


class Kernel:
    """One kernel's library, built on the first ``load`` of the process (thread-safe) and kept."""

    def __init__(self, name: str, source: str, declare: Callable[[ctypes.CDLL], None]) -> None:
        self.name, self.source, self.declare = name, source, declare
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def build(self) -> ctypes.CDLL | None:
        """The library from the cache folder, compiled there first when missing (see ``build``)."""
        return build(self.name, self.source, self.declare)

    def load(self) -> ctypes.CDLL | None:
        """The library (built on the first call), or None where it cannot be built."""
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._lib = self.build()
                    self._tried = True
        return self._lib
