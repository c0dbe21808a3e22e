"""The book's one helper for writing a class across several cells (hand-written, not exported).

A chapter that builds a long class shows it in pieces, each after the paragraph that explains it,
as Dive into Deep Learning does: the class cell holds its constructor and the small methods, and
a later cell adds a method with

    @add_to_class(SparseAttention)
    def forward(self, q, ...):
        ...

In the notebook the decorator sets the attribute on the class as the cell runs. In the package,
`tools/export.py` moves each such function into the body of its class, in the order of the cells,
and drops the decorator: the module reads as one class and never calls this function.
"""


def add_to_class(cls: type):
    """A decorator that makes the function it decorates (or a property, classmethod or
    staticmethod) an attribute of `cls`, under the function's name; returns it unchanged."""
    def attach(member):
        function = getattr(member, "fget", None) or getattr(member, "__func__", member)
        setattr(cls, function.__name__, member)
        return member
    return attach
