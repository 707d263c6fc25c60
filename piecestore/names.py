"""The names of the data objects a store writes, and nothing else.

GC deletes unreferenced objects and fsck reports them, so both must recognise exactly the
names this store generates: a table is ``tables/<32 hex>.tbl`` and a large piece
``blobs/<32 hex>``, one level deep. Another store whose root lies inside this one's (say
``file:///x/nest/blobs`` beside ``file:///x/nest``) keeps its objects under names such as
``blobs/manifest.json`` or ``blobs/tables/<...>.tbl``, which never match: a sweep never reaches
into a nested store's namespace.
"""

from __future__ import annotations

import re
import uuid

from piecestore.manifest import BLOBS_PREFIX, TABLES_PREFIX

_TABLE_OBJECT = re.compile(re.escape(TABLES_PREFIX) + r"[0-9a-f]{32}\.tbl\Z")
_BLOB_OBJECT = re.compile(re.escape(BLOBS_PREFIX) + r"[0-9a-f]{32}\Z")

#: The prefixes under which a store's data objects live (listed by GC and fsck).
DATA_PREFIXES = (TABLES_PREFIX, BLOBS_PREFIX)


def new_blob_name() -> str:
    """A fresh, never reused object name for one large piece."""
    return f"{BLOBS_PREFIX}{uuid.uuid4().hex}"


def is_data_object(name: str) -> bool:
    """Whether ``name`` is a table or large-piece object of the kind this store writes."""
    return bool(_TABLE_OBJECT.match(name) or _BLOB_OBJECT.match(name))
