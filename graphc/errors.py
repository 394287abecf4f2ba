"""Errors a user sees.  Every message names where (file:line), what (layer and type)
and what to change.  The CLI prints ``str(err)`` and exits with status 1."""
from __future__ import annotations


class GraphcError(Exception):
    """An error in the user's input.

    ``where``: "file:line" (or just "file"); ``layer``: layer name; ``layer_type``;
    ``hint``: what to change.
    """

    def __init__(self, message: str, *, where: str | None = None, layer: str | None = None,
                 layer_type: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.layer = layer
        self.layer_type = layer_type
        self.hint = hint

    def __str__(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: ")
        if self.layer is not None:
            t = f" ({self.layer_type})" if self.layer_type else ""
            parts.append(f"layer '{self.layer}'{t}: ")
        parts.append(self.message)
        if self.hint:
            parts.append(f"\n  hint: {self.hint}")
        return "".join(parts)

    def located(self, *, where=None, layer=None, layer_type=None) -> "GraphcError":
        """Fill in location fields that are still unknown (returns self)."""
        if self.where is None:
            self.where = where
        if self.layer is None:
            self.layer = layer
        if self.layer_type is None:
            self.layer_type = layer_type
        return self


class OpError(GraphcError):
    """Raised by an op (attribute parsing, shape inference) without knowing its location;
    the lowering adds the file, line and layer."""


class FileFormatError(GraphcError):
    """A file is malformed, truncated, or of the wrong kind."""
