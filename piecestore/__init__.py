"""piecestore: keep pieces (blobs named by string keys) on any object store."""

from __future__ import annotations

__version__ = "0.1.0"
