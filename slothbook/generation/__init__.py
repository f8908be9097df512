"""Generation after `for_inference`: decode steps replayed from CUDA graphs over a static KV cache."""

from .generate import graphed_generate, supports
from .route import route_generate, unroute_generate

__all__ = ["graphed_generate", "route_generate", "supports", "unroute_generate"]
