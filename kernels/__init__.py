"""slothbook.kernels: Triton kernels with autograd Functions and plain-torch references.

Pure Triton + torch: nothing here imports transformers or bitsandbytes. One module per op; the public entry
points are re-exported here. On a machine without CUDA, set TRITON_INTERPRET=1 before importing to run them
through Triton's interpreter (slow; meant for tests).
"""

from ._hub_name import installed_hub_kernels

# Imported as plain `kernels` from a checkout while Hugging Face's `kernels` is installed: that module now stands in
# sys.modules under the name, and the import system returns it instead of this one, so nothing of ours is loaded.
if not (__name__ == "kernels" and installed_hub_kernels(__path__[0]) is not None):
    from .cross_entropy import cross_entropy, cross_entropy_reference
    from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
    from .lora import LoRAProjection, lora_linear, lora_mlp, lora_o, lora_qkv
    from .nf4 import NF4Weight, dequantize, dequantize_nf4, nf4_weight_from_quant_state
    from .rms_norm import RMSNorm, rms_norm, rms_norm_reference
    from .rope import apply_rope, rope_reference
    from .swiglu import geglu, geglu_reference, swiglu, swiglu_reference

    __all__ = [
        "LoRAProjection", "NF4Weight", "RMSNorm", "apply_rope", "cross_entropy", "cross_entropy_reference",
        "dequantize", "dequantize_nf4", "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference", "geglu",
        "geglu_reference", "lora_linear", "lora_mlp", "lora_o", "lora_qkv", "nf4_weight_from_quant_state",
        "rms_norm", "rms_norm_reference", "rope_reference", "swiglu", "swiglu_reference",
    ]
