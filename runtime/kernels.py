"""Our quantized matmul kernels (kernels/, built by `./build.sh setup`): where the library is and whether
it can run here.

The library registers the onnxruntime custom operators MatMulW4A8, MatMulW8A8, Attention and DecodeAttention (domain
com.cogvlm2), which a bundle's `<graph>.kernels.onnx` files use (export/trace.py). The instruction set is
chosen at run time (amx, avx512vnni, avx512, avxvnni, avx2), or forced with COGVLM2_KERNELS_ISA. Without the library
(no compiler or headers at set-up), or on a CPU without AVX2, the runtime runs the bundles' plain
.onnx graphs with onnxruntime's own kernels, and says so once.
"""
import ctypes
import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
LIBRARY_ENV = "COGVLM2_KERNELS_LIB"   # the library's path, when it is not where build.sh puts it
ISA_ENV = "COGVLM2_KERNELS_ISA"
BUILT = Path(__file__).resolve().parents[1] / "kernels" / "build" / "libcogvlm2_kernels.so"


def library_path() -> Path:
    return Path(os.environ.get(LIBRARY_ENV) or BUILT)


def isa(path: Path | None = None) -> tuple[str, str]:
    """(the instruction set the kernels of the library at `path` (default `library_path()`) use now, "") or
    ("", why they cannot run here)."""
    path = path or library_path()
    if not path.is_file():
        return "", f"{path} is not built (`./build.sh setup` builds it with g++ and onnxruntime's headers)"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return "", f"{path} does not load ({e})"
    lib.cogvlm2_kernels_isa.restype = ctypes.c_char_p
    why = ctypes.create_string_buffer(256)
    name = lib.cogvlm2_kernels_isa(why, len(why)).decode()
    return name, why.value.decode()


def supported() -> list[str]:
    """The instruction sets this CPU runs the kernels with, preferred first (none without the library)."""
    path = library_path()
    try:
        lib = ctypes.CDLL(str(path)) if path.is_file() else None
    except OSError:
        lib = None
    if lib is None:
        return []
    lib.cogvlm2_kernels_supported.restype = ctypes.c_char_p
    return [s for s in lib.cogvlm2_kernels_supported().decode().split(",") if s]


@functools.cache
def usable(path: str, isa_setting: str | None) -> str | None:
    """`path` when the library's kernels can run here (for SessionOptions.register_custom_ops_library), else
    None, having said why and that onnxruntime's own kernels run instead: once per library and value of
    COGVLM2_KERNELS_ISA (isa_setting)."""
    name, why = isa(Path(path))
    if name:
        log.info(f"quantized matmuls: our kernels ({name}, {path})")
        return path
    log.warning(f"quantized matmuls: onnxruntime's own kernels ({why}).")
    return None


def library() -> str | None:
    """`usable` for the library and COGVLM2_KERNELS_ISA of now."""
    return usable(str(library_path()), os.environ.get(ISA_ENV))
