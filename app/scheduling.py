"""A short scheduler time slice for the event loop's thread (Linux 6.12 and later).

Linux's fair scheduler (EEVDF, since 6.6) runs each thread for a time slice, then gives the
core to the runnable thread with the earliest virtual deadline: the deadline of a thread that
wakes is its slice ahead. Since Linux 6.12 a thread may ask for its own slice, with
``sched_setattr``'s ``sched_runtime`` (0.1 to 100 ms; the default is about 0.7 ms times
1 + log2 of the cores, up to 8: 1.4 ms on 2 cores), and a thread with a shorter slice takes
the core from one with a longer slice as it wakes. The event loop sleeps between bursts of
short callbacks; beside model processes and other programs that run whole slices, a short
slice lets it run soon after its timer or socket wakes it, rather than after the running
thread's slice. Its share of the CPU does not change (that is what niceness sets): it runs
in shorter pieces, and is preempted sooner by other threads that wake.

No privilege is needed. Older kernels take the call and ignore the field; where the call
does not exist (another system, an unknown architecture, a seccomp profile that refuses it)
nothing is done and the caller is told.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import struct
import sys

log = logging.getLogger(__name__)

SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
"""``sched_setattr`` and ``sched_getattr`` by machine (Linux's system call table)."""

_ATTR = struct.Struct("=IIQiIQQQ")
"""``struct sched_attr`` as first published (48 bytes): size, policy, flags, nice, priority,
runtime, deadline, period."""
_SCHED_OTHER = 0
_RESET_ON_FORK = 0x01
"""Threads and processes the caller starts later get the kernel's default slice."""
MIN_SLICE_US = 100
MAX_SLICE_US = 100_000


def _calls() -> tuple[ctypes.CDLL, int, int] | None:
    numbers = SYSCALLS.get(platform.machine())
    if not sys.platform.startswith("linux") or numbers is None:
        return None
    return ctypes.CDLL(None, use_errno=True), *numbers


def _get_attr(libc: ctypes.CDLL, getattr_nr: int) -> tuple[int, ...] | None:
    buf = ctypes.create_string_buffer(_ATTR.size)
    if libc.syscall(getattr_nr, 0, buf, _ATTR.size, 0) != 0:
        return None
    return _ATTR.unpack(buf.raw)


def thread_slice_us() -> int | None:
    """The calling thread's time slice as the kernel reports it, in µs; None where it does
    not report one (before Linux 6.12, not Linux, or a policy other than the default)."""
    calls = _calls()
    attr = None if calls is None else _get_attr(calls[0], calls[2])
    if attr is None or attr[1] != _SCHED_OTHER or not attr[5]:
        return None
    return int(attr[5] // 1000)


def request_thread_slice(slice_us: int) -> int | None:
    """Ask for a time slice of ``slice_us`` µs for the calling thread (0: the kernel's
    default again); threads it starts later get the default. Its niceness is kept, and a
    thread under another policy than the default (``chrt``) is left as it is.

    Returns:
        The slice the kernel reports afterwards (µs), or None where the call is not
        available or was refused, or the kernel keeps no slice per thread.
    """
    if slice_us and not MIN_SLICE_US <= slice_us <= MAX_SLICE_US:
        raise ValueError(f"a slice of {slice_us} µs; the kernel takes 0 or 100 to 100,000")
    calls = _calls()
    if calls is None:
        return None
    libc, setattr_nr, getattr_nr = calls
    current = _get_attr(libc, getattr_nr)
    if current is None or current[1] != _SCHED_OTHER:
        return None
    nice = current[3]
    attr = _ATTR.pack(_ATTR.size, _SCHED_OTHER, _RESET_ON_FORK, nice, 0, slice_us * 1000, 0, 0)
    if libc.syscall(setattr_nr, 0, ctypes.create_string_buffer(attr, _ATTR.size), 0) != 0:
        return None
    return thread_slice_us()


def shorten_loop_slice(slice_us: int) -> int | None:
    """From the event loop's thread: ask for ``slice_us`` (nothing for 0) and log the outcome
    once; returns the slice in force, as :func:`request_thread_slice`."""
    if not slice_us:
        return None
    got = request_thread_slice(slice_us)
    if got is None:
        log.info(
            "the event loop keeps the kernel's time slice: this system takes no slice per "
            "thread (loop_slice_us needs Linux 6.12 or later)"
        )
    else:
        log.info("event loop thread: a time slice of %d µs (loop_slice_us)", got)
    return got
