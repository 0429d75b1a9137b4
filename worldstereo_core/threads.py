"""CPU threads for the geometry code: big GIL-free kernels on a thread pool, small torch ops on one thread.

On a machine shared with other work, OpenMP's intra-op worker threads spin while they wait for
each other, so a sequence of small torch ops runs slower with two threads than with one; statically
split work also waits for its slowest thread. :func:`thread_map` runs many independent GIL-free
kernel calls (numba, numpy) on a plain thread pool whose idle threads sleep and pick up the next
call (the renderer); :func:`single_threaded_ops` runs a block of small torch ops on one intra-op
thread (the cache merge, whose work is dominated by such ops).
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
def single_threaded_ops() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block; the caller's setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
