"""Raw text -> tokenized mosaicml-streaming (MDS) shards: `megamom prep` (see docs/data.md)."""
from .errors import BadInput, PrepError, StrictStop
from .prep import MANIFEST, prepare, read_manifest
from .worker import PrepSettings

__all__ = ["BadInput", "PrepError", "StrictStop", "MANIFEST", "prepare", "read_manifest", "PrepSettings"]
