"""A rank's weights from the bundle's safetensors files: what every backend binds to its graphs."""
import numpy as np
from safetensors import safe_open

from .bundle import Bundle
from .errors import UserError


def load_rank_weights(bundle: Bundle, rank: int) -> dict[str, np.ndarray]:
    """All of a rank's weights as numpy arrays, read tensor by tensor (peak = weights + one tensor)."""
    weights = {}
    for path in bundle.weight_files(rank):
        try:
            with safe_open(str(path), framework="np") as f:
                for name in f.keys():
                    weights[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise UserError(f"weight file {path} cannot be read ({e}): the bundle is damaged; export it again.") from None
    return weights
