"""sd2: self-distilled sparse drafters for speculative decoding (Lasby et al., arXiv 2504.08838)."""

__version__ = "0.1.0"
