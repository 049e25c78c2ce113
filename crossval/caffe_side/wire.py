"""The Caffe worker's pipe protocol, both sides of it (numpy only).

Each message is one frame: its pickle's length (8 bytes, little-endian) and the pickle.
Requests are ``(op, kwargs)``, the fields of a request of ``crossval.caffe_side.requests``
(``Request.kwargs``); replies ``("ok", reply)`` with a dataclass of
``crossval.caffe_side.replies``, or ``("error", text)``. run_many's arrays may go through a
memory file instead (``put_arrays``/``get_arrays``), the frames carrying their descriptors.
The isolated children of validate-port and conformance speak the same frames.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import time
from typing import IO, Any

import numpy as np

from .replies import Descriptor

_HEADER = struct.Struct("<Q")


class Expired(Exception):
    """A frame was not sent or received by its deadline."""


def write_frame(stream: IO[bytes], obj: Any) -> None:
    stream.write(_frame(obj))
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def send_frame(fd: int, obj: Any, deadline: float) -> None:
    """Write one frame to a non-blocking pipe `fd` by `deadline` (time.monotonic); raises
    BrokenPipeError when the reader is gone."""
    view = memoryview(_frame(obj))
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Expired
        if not poller.poll(left * 1000):
            continue
        try:
            n = os.write(fd, view[: 1 << 20])
        except BlockingIOError:
            continue
        view = view[n:]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Expired
            if not poller.poll(left * 1000):
                continue
        chunk = os.read(fd, min(size - got, 1 << 24))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(fd: int, deadline: float | None) -> Any:
    """Read one frame from `fd` by `deadline` (None: no limit); EOFError at end of pipe."""
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


def die_with_parent(parent: int) -> None:
    """In a child process: ask the kernel to SIGKILL this process when its parent dies
    (whatever killed it, SIGKILL included), and exit now if the parent `parent` (a pid; 0:
    not checked) died before the request was made."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent and os.getppid() != parent:
        os._exit(1)


def put_arrays(fd: int, arrays: list[np.ndarray], at: int) -> tuple[list[Descriptor], int]:
    """Write `arrays` back to back into the file `fd` from offset `at` (one system call);
    returns their descriptors and the offset after the last."""
    views, descs = [], []
    for a in arrays:
        c = np.asarray(a)
        c = c if c.flags.c_contiguous else c.copy(order="C")
        descs.append((at, c.dtype.str, tuple(c.shape)))
        if c.nbytes:
            views.append(c.data.cast("B"))
        at += c.nbytes
    size = sum(v.nbytes for v in views)
    if views and os.pwritev(fd, views, descs[0][0]) != size:
        raise OSError(f"short write of {size} bytes to the shared memory file")
    return descs, at


def get_arrays(fd: int, descs: list[Descriptor]) -> list[np.ndarray]:
    """The arrays `put_arrays` wrote at `descs` (back to back), as new arrays."""
    out = [np.empty(shape, dtype=np.dtype(dtype)) for _, dtype, shape in descs]
    views = [a.data.cast("B") for a in out if a.nbytes]
    size = sum(v.nbytes for v in views)
    if views and os.preadv(fd, views, descs[0][0]) != size:
        raise OSError(f"short read of {size} bytes from the shared memory file")
    return out


__all__ = [
    "Expired",
    "die_with_parent",
    "get_arrays",
    "put_arrays",
    "read_frame",
    "recv_frame",
    "send_frame",
    "write_frame",
]
