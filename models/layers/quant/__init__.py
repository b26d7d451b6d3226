"""Int8 quantized linear layers (W8A16, W8A8): formats, detection, kernels.

scheme (what a layer asks for) · detect (config.json / description files / --quantize ->
QuantConfig) · loaders (checkpoint tensors -> Int8Linear, TP slices) · tensors (Int8Linear) ·
int8 (shared arithmetic) · methods (the linear-method seam) · ops_cpu / ops_reference (kernels:
CPU int8, float64 oracle; the NPU's are ``device_kernels/npu_quant.py``).
"""

from .detect import SUPPORTED, check_flag, detect
from .scheme import LinearScheme, QuantConfig

__all__ = ["SUPPORTED", "LinearScheme", "QuantConfig", "check_flag", "detect"]
