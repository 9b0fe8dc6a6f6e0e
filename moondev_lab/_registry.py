"""A light, import-free registry of the caches and pools that hold memory.

The memory monitor reads it to report cache sizes and to run pressure
actions; the data pool and the sandbox pool register themselves here.
It holds weak references only, so registering never keeps anything alive.

Protocols (duck-typed):

* a *cache* has ``__len__()`` (entries held) and ``evict_unused() -> int``
  (bytes freed by dropping what no one references);
* a *pool* has ``__len__()`` (live workers/clients) and ``shrink() -> int``
  (how many it stopped).
"""
from __future__ import annotations

import threading
import weakref

_lock = threading.Lock()
_caches: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_pools: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def register_cache(obj: object) -> None:
    with _lock:
        _caches[id(obj)] = obj


def register_pool(obj: object) -> None:
    with _lock:
        _pools[id(obj)] = obj


def caches() -> list:
    with _lock:
        return list(_caches.values())


def pools() -> list:
    with _lock:
        return list(_pools.values())
