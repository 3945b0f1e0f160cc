"""SeqFT: sequential full fine-tuning, the lower reference of every paper (PIECE eq. 11).

Every parameter trains on each task in turn with the plain task loss; nothing protects earlier tasks.
"""

from clbench.methods.base import Method, register


@register("seqft")
class SeqFT(Method):
    """All hooks are the base class's no-ops."""
