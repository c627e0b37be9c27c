"""Export, optional: build llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench) on
request: `make llama-cpp` or `tunelab export --build-quantizer`. Never part of the default setup.

The sources are the llama.cpp copy inside the llama-cpp-python sdist on PyPI (vendor/llama.cpp), the same package
the GGUF converter comes from (gguf.py), so converter, quantizer and the opt-in Python runtime are one version.
Everything lives in tunelab's cache:

    ~/.cache/tunelab/llama.cpp/sdist/llama_cpp_python-<version>.tar.gz   downloaded once with pip
    ~/.cache/tunelab/llama.cpp/source-<version>/                         the extracted sdist
    ~/.cache/tunelab/llama.cpp/build/bin/                                 the tools and shared libraries
    ~/.cache/tunelab/llama.cpp/python/                                    llama_cpp (the binding) + its libs, for tests

CPU only, Release, this machine's instruction sets (-march=native, AMX left out: see cpu_options), shared libraries so the
Python binding of the same sdist can load them without a second compile.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.export.gguf import LLAMA_CPP_PYTHON_VERSION
from tunelab.files import staged_folder
from tunelab.hardware import cpu_info, parse_cpuinfo
from tunelab.models.resolve import cache_root

log = logging.getLogger(__name__)

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
BUILD_COMMAND = "`make llama-cpp` or `tunelab export --build-quantizer`"
CMAKE_OPTIONS = (  # CPU only; no server, web UI, tests or examples; no OpenSSL (nothing is downloaded)
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TOOLS=ON",
)
Progress = Callable[[str], None]
# x86 CPU flags (/proc/cpuinfo) -> ggml's options for a non-native build: every instruction set of this CPU but AMX
X86_FLAGS = {"sse4_2": "GGML_SSE42", "avx": "GGML_AVX", "avx2": "GGML_AVX2", "bmi2": "GGML_BMI2", "fma": "GGML_FMA",
             "f16c": "GGML_F16C", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512",
             "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}


class BuildError(TunelabError):
    pass


class ToolMissingError(TunelabError):
    pass


def llama_cpp_cache(cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "llama.cpp"


def build_bin(cache_dir: str | None = None) -> Path:
    return llama_cpp_cache(cache_dir) / "build" / "bin"


def find_tool(name: str, cache_dir: str | None = None, purpose: str = "") -> Path:
    """llama.cpp tool `name`: on PATH, or where `build_llama_cpp` put it; else an error naming the build command."""
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    cached = build_bin(cache_dir) / name
    if cached.is_file():
        return cached
    raise ToolMissingError(
        f"{purpose or name} needs llama.cpp's {name}, which is not on PATH nor in {cached}. Build it once with "
        f"{BUILD_COMMAND} (compiles llama.cpp from the llama-cpp-python sdist, CPU only, a few minutes on 2 cores), "
        f"or install llama.cpp and put {name} on PATH"
    )


# ------------------------------------------------------------------------------------------------ build tools
def compilers() -> dict[str, str]:
    """The C and C++ compilers cmake will use ($CC/$CXX, else cc/gcc/clang and c++/g++/clang++)."""
    found = {}
    for lang, env, names, package in (("C", "CC", ("cc", "gcc", "clang"), "gcc"),
                                      ("C++", "CXX", ("c++", "g++", "clang++"), "g++")):
        candidates = [os.environ[env]] if os.environ.get(env) else list(names)
        path = next((shutil.which(c) for c in candidates if shutil.which(c)), None)
        if path is None:
            raise BuildError(
                f"building llama.cpp needs a {lang} compiler and none of {', '.join(candidates)} was found; on "
                f"Debian/Ubuntu: `sudo apt-get install {package}` (or build-essential), then run {BUILD_COMMAND} again"
            )
        found[lang] = path
    return found


def find_cmake(cache_dir: str | None = None, install: bool = True) -> Path:
    """cmake: on PATH, next to this Python (pip's cmake package), or pip's cmake installed into the cache now."""
    for candidate in (shutil.which("cmake"), Path(sys.executable).parent / "cmake"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    target = llama_cpp_cache(cache_dir) / "cmake-pip"
    installed = sorted(target.glob("cmake/data/bin/cmake"))
    if installed:
        return installed[0]
    if not install:
        raise BuildError("cmake was not found: `sudo apt-get install cmake` or `pip install cmake`")
    log.warning("no cmake found: installing PyPI's cmake package into %s (once)", target)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--target", str(target), "cmake"], check=False, capture_output=True, text=True)
    installed = sorted(target.glob("cmake/data/bin/cmake"))
    if proc.returncode != 0 or not installed:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise BuildError(f"cmake was not found and `pip install cmake` failed:\n{tail}\n"
                         "Install it with `sudo apt-get install cmake` (Debian/Ubuntu) and run the build again")
    return installed[0]


def generator() -> list[str]:
    """Ninja when present (one progress line per step), else cmake's default Makefiles (needs make)."""
    if shutil.which("ninja"):
        return ["-G", "Ninja"]
    if shutil.which("make"):
        return []
    raise BuildError("building llama.cpp needs make or ninja: `sudo apt-get install make` (or `pip install ninja`)")


def cpu_options(cpuinfo: str | None = None) -> list[str]:
    """-march=native, except on CPUs advertising AMX: there every other instruction set of the CPU is named and AMX
    is left out. ggml's AMX kernels (quantized matmuls) died with a general protection fault on `ldtilecfg` on
    this project's Xeon (in a container; the kernel granted the AMX permission), taking every q4/q5/q8 GGUF down."""
    flags = cpu_info().flags if cpuinfo is None else parse_cpuinfo(cpuinfo).flags
    if "amx_tile" not in flags:
        return ["-DGGML_NATIVE=ON"]
    chosen = [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in X86_FLAGS.items()]
    return ["-DGGML_NATIVE=OFF", *chosen, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


# ------------------------------------------------------------------------------------------------ sources
def fetch_sdist(cache_dir: str | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The llama-cpp-python sdist (77 MB), downloaded once with pip into the cache."""
    folder = llama_cpp_cache(cache_dir) / "sdist"
    archive = folder / f"llama_cpp_python-{version}.tar.gz"
    if archive.is_file():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    log.warning("downloading llama-cpp-python==%s's sources from PyPI (77 MB, once)", version)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                               "--quiet", f"llama-cpp-python=={version}", "-d", tmp],
                              check=False, capture_output=True, text=True)
        found = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not found:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise BuildError(f"could not download llama-cpp-python=={version} from PyPI (the llama.cpp sources):\n"
                             f"{tail}\nRun {BUILD_COMMAND} where PyPI is reachable")
        os.replace(found[0], archive)
    return archive


def source_dir(cache_dir: str | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The extracted sdist (with vendor/llama.cpp and the llama_cpp binding), extracted once."""
    home = llama_cpp_cache(cache_dir) / f"source-{version}"
    if (home / ".complete").is_file():
        return home
    archive = fetch_sdist(cache_dir, version)
    staging = Path(tempfile.mkdtemp(dir=home.parent, prefix=".extract-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter="data")  # the data filter refuses ../ paths and links out of staging
        inner = next(staging.iterdir())
        if not (inner / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            raise BuildError(f"{archive} has no vendor/llama.cpp/CMakeLists.txt: not a llama-cpp-python sdist?")
        if home.exists():
            shutil.rmtree(home)
        os.replace(inner, home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (home / ".complete").write_text(version, encoding="utf-8")
    return home


# ------------------------------------------------------------------------------------------------ the build
def build_llama_cpp(cache_dir: str | None = None, jobs: int = 2, tools: tuple[str, ...] = TOOLS,
                    version: str = LLAMA_CPP_PYTHON_VERSION, progress: Progress = print) -> Path:
    """Compile `tools` (and libllama/libggml) into the cache; return the bin folder. Already built: returns at once."""
    bin_dir = build_bin(cache_dir)
    marker = bin_dir.parent / ".complete"
    if marker.is_file() and marker.read_text(encoding="utf-8") == _stamp(version, tools) and all(
            (bin_dir / t).is_file() for t in tools):
        return bin_dir
    cc = compilers()
    cmake = find_cmake(cache_dir)
    sources = source_dir(cache_dir, version) / "vendor" / "llama.cpp"
    build = bin_dir.parent
    log_file = build / "build.log"
    build.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    progress(f"building llama.cpp ({version}'s vendor copy) with {cmake}, {cc['C++']}, -j{jobs}: {', '.join(tools)}; "
             f"log in {log_file}")
    configure = [str(cmake), "-S", str(sources), "-B", str(build), *generator(), *CMAKE_OPTIONS, *cpu_options(),
                 f"-DCMAKE_C_COMPILER={cc['C']}", f"-DCMAKE_CXX_COMPILER={cc['C++']}"]
    compile_ = [str(cmake), "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *tools]
    with open(log_file, "w", encoding="utf-8") as log_out:
        for step, cmd in (("configure", configure), ("compile", compile_)):
            _run_logged(cmd, step, log_out, log_file, progress)
    missing = [t for t in tools if not (bin_dir / t).is_file()]
    if missing:
        raise BuildError(f"the llama.cpp build finished without {', '.join(missing)} in {bin_dir}; see {log_file}")
    marker.write_text(_stamp(version, tools), encoding="utf-8")
    progress(f"llama.cpp tools ready in {bin_dir}")
    return bin_dir


def _stamp(version: str, tools: tuple[str, ...]) -> str:
    return f"{version} {' '.join(sorted(tools))} {' '.join(cpu_options())}"


def _run_logged(cmd: list[str], step: str, log_out, log_file: Path, progress: Progress) -> None:
    """Run `cmd`, write its output to the log, show ninja/make progress lines, fail with the last lines."""
    log_out.write(f"$ {' '.join(cmd)}\n")
    tail: deque[str] = deque(maxlen=25)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        log_out.write(line)
        tail.append(line.rstrip())
        if step == "compile" and (line.startswith("[") or "error" in line.lower()):
            progress(line.rstrip())
    if proc.wait() != 0:
        raise BuildError(f"llama.cpp {step} failed (exit {proc.returncode}); last lines of {log_file}:\n"
                         + "\n".join(tail))


# ------------------------------------------------------------------------------------------------ Python binding
def python_runtime(cache_dir: str | None = None) -> Path:
    return llama_cpp_cache(cache_dir) / "python"


def build_python_runtime(cache_dir: str | None = None, version: str = LLAMA_CPP_PYTHON_VERSION,
                         progress: Progress = print) -> Path:
    """A folder to put on sys.path holding `llama_cpp` (the sdist's pure-Python ctypes binding) with the shared
    libraries of `build_llama_cpp` as llama_cpp/lib/ (where a wheel puts them; a link to the build) and its one pure-Python
    dependency missing here (diskcache). Same sources as the tools, so no second compile of llama.cpp."""
    bin_dir = build_llama_cpp(cache_dir, version=version, progress=progress)
    target = python_runtime(cache_dir)
    marker = target / ".complete"
    if marker.is_file() and marker.read_text(encoding="utf-8") == version:
        return target
    with staged_folder(target) as staging:
        shutil.copytree(source_dir(cache_dir, version) / "llama_cpp", staging / "llama_cpp")
        if not (bin_dir / "libllama.so").is_file():
            raise BuildError(f"{bin_dir} has no libllama.so (built without BUILD_SHARED_LIBS?)")
        lib = staging / "llama_cpp" / "lib"
        shutil.rmtree(lib, ignore_errors=True)
        lib.symlink_to(bin_dir, target_is_directory=True)  # one copy of each library: the tools' own
        _pip_install(["diskcache>=5.6.1"], staging, progress)
    marker.write_text(version, encoding="utf-8")
    progress(f"llama-cpp-python {version} runtime ready in {target}")
    return target


def _pip_install(requirements: list[str], target: Path, progress: Progress) -> None:
    try:
        import diskcache  # noqa: F401
        return
    except ImportError:
        pass
    progress(f"pip install --target {target} {' '.join(requirements)}")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--no-deps", "--target", str(target), *requirements], check=False, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise BuildError(f"pip install {' '.join(requirements)} failed:\n{proc.stderr.strip()[-800:]}")
