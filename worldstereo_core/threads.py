"""CPU threads for the geometry code: torch ops on one intra-op thread, big kernels on a thread pool.

On a machine shared with other work, OpenMP's intra-op worker threads spin while they wait for
each other, so a sequence of small torch ops runs slower with two threads than with one. Geometry
code with many small ops therefore runs them under :func:`single_threaded_ops` and spreads its
large GIL-free kernels (numba, numpy) over a plain thread pool (:func:`thread_map`), whose idle
threads sleep instead of spinning. The pool size is the caller's ``torch.get_num_threads()``.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")


def thread_map(fn: Callable[..., T], items: Iterable, workers: int | None = None) -> list[T]:
    """``[fn(x) for x in items]`` on up to ``workers`` threads (default ``torch.get_num_threads()``)."""
    items = list(items)
    workers = min(max(1, torch.get_num_threads() if workers is None else workers), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[int]:
    """Run torch ops on one intra-op thread inside the block; yields the caller's thread count
    (for :func:`thread_map`) and restores it afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)
