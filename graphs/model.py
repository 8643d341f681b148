"""The whole model's weights: the union of what the vision and language graphs take."""
from .config import CogVLM2Config
from .language import LanguageModel
from .vision import VisionModel
from .weights import WeightSpec


def weight_specs(cfg: CogVLM2Config, quant: str | None = None, tp: int = 1) -> list[WeightSpec]:
    """Every tensor of a CogVLM2 checkpoint we use, with its full shape and tensor-parallel split;
    with `quant`, the bundle's tensors instead (graphs/quant.py: NAME.qweight, NAME.scale, ...)."""
    tables = [VisionModel(cfg).table, LanguageModel(cfg).table]
    if quant is not None:
        from .quant import quantized_table
        tables = [quantized_table(t, quant, tp)[0] for t in tables]
    return tables[0].specs + tables[1].specs
