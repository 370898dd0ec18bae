"""domainprune: turn a general-purpose LLM into a smaller, faster specialist for one domain."""

__version__ = "0.1.0"

from .export import load_pretrained  # noqa: E402
from .pipeline import PruneResult, Recipe  # noqa: E402
from .plan import Plan  # noqa: E402
from .run import prune  # noqa: E402

__all__ = ["Plan", "PruneResult", "Recipe", "load_pretrained", "prune"]
