"""elasticmoe: serve Mixture-of-Experts LLMs with expert-level elasticity."""

from elasticmoe.engine.request import CompletionOutput, RequestOutput, SamplingParams
from elasticmoe.llm import LLM

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
