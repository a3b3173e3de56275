"""The datasets' local disk cache of whole blobs (``cache_dir=``)."""

from azstoragetorch._cache._blob_cache import BlobCache as BlobCache
from azstoragetorch._cache._blob_cache import flush as flush
from azstoragetorch._cache._blob_cache import make_cache as make_cache
