"""vllm-hsr: HSR sparse decode attention (arXiv 2410.10165) as a vLLM attention-backend plugin."""

from vllm_hsr.config import HSRConfig
from vllm_hsr.core import HSRStats, dense_attention
from vllm_hsr.sequence import sparse_attention

__all__ = ["HSRConfig", "HSRStats", "dense_attention", "sparse_attention"]
__version__ = "0.1.0"
