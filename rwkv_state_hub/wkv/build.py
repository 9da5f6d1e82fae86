"""Building native kernels from csrc/ on first use, cached, with a one-line reason when they cannot be.

One rule for the CPU and the CUDA kernels: the build lives in $TORCH_EXTENSIONS_DIR or
<cache_dir>/torch_extensions, in a folder named after a hash of the sources and a tag (torch version, CUDA
version or CPU), so a changed source or torch builds afresh and an unchanged one loads the cached library.
Whatever stops a build is said once on stderr and the caller runs the torch path instead.
    Extension      a torch extension (torch.utils.cpp_extension with ninja): the CUDA kernels
    SharedLibrary  a plain C++ library with a C interface, compiled by the C++ compiler and loaded with ctypes:
                   the CPU kernels (no torch headers, so about a second and 0.1 GB to compile, not 20 s and 1 GB)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ..files import cache_dir

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"


@dataclass
class Extension:
    name: str  # the Python module's name
    what: str  # how messages name it: "CPU WKV kernels"
    sources: tuple[str, ...]  # in SOURCE_DIR
    headers: tuple[str, ...]
    tag: str  # what else the binary depends on (torch version, CUDA version, CPU)
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()
    source_dir: Path = SOURCE_DIR
    # what this process found: the loaded module, or why there is none; when it compiled; what it has said
    module: ModuleType | None = field(default=None, init=False, repr=False)
    reason: str | None = field(default=None, init=False, repr=False)
    compile_seconds: float | None = field(default=None, init=False, repr=False)
    told: set[str] = field(default_factory=set, init=False, repr=False)

    def missing_source(self) -> str | None:
        """A reason naming the first source file that is not installed (a broken install), else None."""
        for name in self.sources + self.headers:
            if not (self.source_dir / name).is_file():
                return f"kernel sources not found ({self.source_dir / name}; reinstall rwkv-state-hub)"
        return None

    def build_dir(self) -> Path:
        """Where the compiled extension is cached: one folder per version of the sources and the tag."""
        h = hashlib.sha256()
        for name in self.sources + self.headers:
            path = self.source_dir / name
            h.update(name.encode() + (path.read_bytes() if path.is_file() else b""))
        base = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cache_dir() / "torch_extensions")
        return base / f"{self.name}-{h.hexdigest()[:12]}-{self.tag}".replace("+", "_")

    def tell(self, reason: str) -> None:
        """Say once, in one line, why the kernels are not used for something."""
        if reason not in self.told:
            self.told.add(reason)
            print(f"rwkv-state-hub: {self.what} not used ({reason}); using the torch path", file=sys.stderr)

    def load(self, unavailable_reason: Callable[[], str | None]) -> ModuleType | None:
        """The compiled extension (built on first use), or None after saying why in one line."""
        if self.module is not None:
            return self.module
        if self.reason is None:
            reason = unavailable_reason()
            if reason is None:
                try:
                    self.module = self.build()
                    return self.module
                except Exception as e:  # a failed compile or link: fall back rather than stop the run
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    reason = f"the build in {self.build_dir()} failed: {type(e).__name__}: {first}"
            self.reason = reason
        self.tell(self.reason)
        return None

    def build(self) -> ModuleType:
        """Compile (or load the cached build of) the extension; raises whatever the compiler or linker does."""
        from torch.utils.cpp_extension import load as load_extension

        folder = self.build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        fresh = not any(folder.glob(f"{self.name}*.so"))
        if fresh:
            print(f"rwkv-state-hub: building the {self.what} in {folder} (first use, under a minute)",
                  file=sys.stderr)
        t0 = time.perf_counter()
        module = load_extension(
            name=self.name,
            sources=[str(self.source_dir / name) for name in self.sources],
            build_directory=str(folder),
            extra_cflags=list(self.cflags),
            extra_ldflags=list(self.ldflags),
            extra_cuda_cflags=list(self.cuda_cflags),
            verbose=False,
        )
        if fresh:
            self.compile_seconds = time.perf_counter() - t0
        return module


@dataclass
class SharedLibrary(Extension):
    def compiler(self) -> str:
        return os.environ.get("CXX", "c++")

    def build(self) -> ctypes.CDLL:
        """Compile (unless cached) and load the library; raises whatever the compiler says."""
        folder = self.build_dir()
        path = folder / f"{self.name}.so"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # compiled aside, then renamed: never half a file
                out = Path(tmp) / path.name
                cmd = [self.compiler(), *self.cflags, "-shared", "-fPIC", "-std=c++17", "-pthread",
                       *(str(self.source_dir / name) for name in self.sources), "-o", str(out), *self.ldflags]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{' '.join(cmd[:2])} ... exited with {done.returncode}\n{done.stderr}")
                os.replace(out, path)
            self.compile_seconds = time.perf_counter() - t0
        return ctypes.CDLL(str(path))

    def unavailable_reason(self) -> str | None:
        """Why it cannot be built here (None when it can): missing sources, or no C++ compiler."""
        missing = self.missing_source()
        if missing:
            return missing
        if shutil.which(self.compiler()) is None:
            return f"no C++ compiler {self.compiler()!r} found (install g++ or set CXX)"
        return None
