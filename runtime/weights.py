"""A rank's weights from the bundle's safetensors files: what every backend binds to its graphs.

The files are memory-mapped, not read: each tensor is a numpy view of its bytes in the page cache
(the safetensors layout is a JSON header, then every tensor's raw little-endian bytes, so no
decoding is needed). Loading costs no time and no memory up front; a page is read when a graph
first touches it, pages of weights a workload never uses (the vision tower of a text-only server)
are never read, and under memory pressure the kernel drops clean pages and reads them again
instead of failing. The mapping is copy-on-write, so the arrays are writable (MindSpore and
onnxruntime take writable buffers) while the bundle on disk is never changed.
"""
import mmap
import struct

import ml_dtypes
import numpy as np

from .bundle import Bundle, safetensors_header
from .errors import UserError

# safetensors dtype names -> numpy (the format's specification; BF16 through ml_dtypes)
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def map_safetensors(path) -> dict[str, np.ndarray]:
    """{name: array} viewing the tensors of one safetensors file through a copy-on-write mapping.
    A tensor whose offset is not a multiple of its item size is copied (numpy and the kernels want
    aligned data). Raises UserError for a file that is not safetensors or is cut short."""
    try:
        header = safetensors_header(path)
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
        arrays = {}
        for name, h in header.items():
            start, end = h["data_offsets"]
            dtype = np.dtype(DTYPES[h["dtype"]])
            if end > size or end - start != dtype.itemsize * int(np.prod(h["shape"], dtype=np.int64)):
                raise ValueError(f"tensor {name} lies outside the file or has the wrong byte count")
            a = np.frombuffer(buf, dtype, (end - start) // dtype.itemsize, start).reshape(h["shape"])
            arrays[name] = a if start % dtype.itemsize == 0 else a.copy()
        return arrays
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise UserError(f"weight file {path} cannot be read ({e}): the bundle is damaged; export it again.") from None


def load_rank_weights(bundle: Bundle, rank: int) -> dict[str, np.ndarray]:
    """All of a rank's weights as numpy arrays mapped from its safetensors files (module docstring)."""
    weights = {}
    for path in bundle.weight_files(rank):
        weights.update(map_safetensors(path))
    return weights
