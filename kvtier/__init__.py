"""kvtier: a tiered KV-cache store for LLM serving.

A daemon per GPU node (``kvtier serve``) keeps KV blocks, addressed by
(namespace, content key), in a pinned shared-memory arena, and serves them to
same-node clients through that arena and to others over the wire.
"""

__version__ = "0.2.0"

