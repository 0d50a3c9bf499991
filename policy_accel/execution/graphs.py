"""Capturing work once and replaying it: CUDA graphs and compiled networks kept across replans.

A replan on a GPU should be a few graph replays. What changes between replans is data (the
observation's conditioning, the noise, the warm guess), so a capture is keyed by what does not:
the network (or the step rule), the shapes and dtypes; the data is copied into the capture's
static input buffers before every replay, never baked into it. :class:`GraphCache` captures any
callable of tensors that way (the network call of a round, a whole sequential loop);
:class:`NetworkRunner` runs a :class:`~policy_accel.execution.bound.ConditionedDenoiser`'s network
through it (``graphs``) or through one ``torch.compile`` per network (``compile``). Window sizes
come in a few buckets (:func:`bucket_size`) so that a replan touches one or two shapes.

Keys hold the ``id`` of the objects they name; a weak reference to each is kept, so a new object
that reuses a dead one's ``id`` gets a capture of its own, never a stale one.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from policy_accel.execution.bound import ConditionedDenoiser

WARM_UP_CALLS = 3  # before a capture: the allocator, cuDNN/cuBLAS autotuning, lazy init
_recording = threading.local()


def bucket_size(positions: int, total: int, ratio: int = 2) -> int:
    """The window size ``positions`` of ``total`` runs at: the smallest of ``total``,
    ``ceil(total / ratio)``, ``ceil(total / ratio**2)``, ... that holds it (``ratio=1``: the
    exact size). A solver's shrinking windows then take a handful of shapes, not one per
    round."""
    if ratio <= 1 or positions >= total:
        return max(positions, 1) if ratio <= 1 else total
    size = total
    while True:
        smaller = math.ceil(size / ratio)
        if smaller < positions or smaller == size:
            return size
        size = smaller


@dataclass
class Capture:
    """One captured callable: its static ``inputs`` (filled by :meth:`replay`), its ``state``
    (buffers the callable reads and updates in place, kept from replay to replay: the caller
    initialises them between solves) and its static ``outputs``."""

    graph: Any  # torch.cuda.CUDAGraph, None when emulated
    fn: Callable[..., Any] | None  # kept only when emulated (run again at every replay)
    inputs: tuple[Tensor, ...]
    state: dict[str, Tensor]
    outputs: tuple[Tensor, ...]
    owners: tuple[weakref.ref, ...]

    def replay(self, inputs: Sequence[Tensor] | None = None) -> tuple[Tensor, ...]:
        """Copy ``inputs`` into the static buffers (None: they hold the last ones) and run the
        capture; returns its outputs (read or copy them before the next replay)."""
        for static, value in zip(self.inputs, inputs or (), strict=inputs is not None):
            static.copy_(value)
        if self.graph is None:
            return _as_tuple(_plainly(self.fn, self.inputs, self.state))
        self.graph.replay()
        return self.outputs


class GraphCache:
    """Callables captured as CUDA graphs once per key and replayed.

    ``cache(key, fn, inputs, owners)`` returns ``fn(*inputs)`` (a tuple of tensors) replayed
    from the graph captured at the first call for ``key``; :meth:`prepare` returns the
    :class:`Capture` itself, for callables with persistent ``state`` (``fn(*inputs, state)``,
    ``state`` made by ``make_state()`` once per capture). ``owners`` are the objects whose ids
    the key holds (checked alive and the same at every call). :attr:`captures` counts the
    graphs captured (tests read it).
    """

    def __init__(self, emulate: bool = False) -> None:
        """``emulate``: no CUDA graph; every replay copies the inputs into the static buffers
        and runs ``fn`` on them (on any device), so tests on a CPU check that everything a
        replay reads flows through those buffers."""
        self._captures: dict[Hashable, Capture] = {}
        self.captures = 0
        self.emulate = emulate

    @staticmethod
    def capturing() -> bool:
        """Whether this thread is warming up or capturing a graph (work inside it runs
        plainly: captures do not nest)."""
        return getattr(_recording, "active", False)

    def __call__(
        self,
        key: Hashable,
        fn: Callable[..., Sequence[Tensor]],
        inputs: Sequence[Tensor],
        owners: Sequence[object] = (),
    ) -> tuple[Tensor, ...]:
        return self.prepare(key, fn, inputs, owners).replay(inputs)

    def prepare(
        self,
        key: Hashable,
        fn: Callable[..., Any],
        inputs: Sequence[Tensor],
        owners: Sequence[object] = (),
        make_state: Callable[[], dict[str, Tensor]] | None = None,
    ) -> Capture:
        """The capture for ``key``, made now from ``inputs`` (values and shapes) if there is
        none. With ``make_state``, ``fn`` is called as ``fn(*inputs, state)``."""
        entry = self._captures.get(key)
        if entry is None or any(
            ref() is not owner for ref, owner in zip(entry.owners, owners, strict=True)
        ):
            self._forget_dead()
            entry = self._capture(fn, inputs, owners, make_state)
            self._captures[key] = entry
        return entry

    def _forget_dead(self) -> None:
        """Drop the captures of networks (or rules) no longer alive: their graphs hold device
        memory, and a server that loads policies again would otherwise keep every one."""
        dead = [k for k, e in self._captures.items() if any(ref() is None for ref in e.owners)]
        for key in dead:
            del self._captures[key]

    def _capture(self, fn, inputs, owners, make_state) -> Capture:
        static = tuple(value.clone() for value in inputs)
        state = make_state() if make_state is not None else None
        call = fn if state is not None else (lambda *values, state: fn(*values))
        refs = tuple(weakref.ref(o) for o in owners)
        state = state if state is not None else {}
        self.captures += 1
        if self.emulate:
            return Capture(None, call, static, state, (), refs)
        device = static[0].device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARM_UP_CALLS):
                _plainly(call, static, state)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = _plainly(call, static, state)
        # the graph needs no Python object of fn's: keeping fn would keep its network alive
        return Capture(graph, None, static, state, _as_tuple(outputs), refs)

    def clear(self) -> None:
        self._captures.clear()


def _as_tuple(outputs) -> tuple[Tensor, ...]:
    return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)


def _plainly(fn, inputs: Sequence[Tensor], state: dict[str, Tensor]):
    """``fn(*inputs, state=state)`` with captures inside it run plainly (as in a capture)."""
    _recording.active = True
    try:
        return fn(*inputs, state=state)
    finally:
        _recording.active = False


class NetworkRunner:
    """Runs a :class:`ConditionedDenoiser`'s network on flat rows ``x [M, *event]``, ``t [M]``
    captured or compiled once per (network, rows, dtypes, context shapes): the conditioning is
    tiled into static buffers at every call, so every replan and every problem of a policy
    replays the same captures.

    Args:
        mode: ``"graphs"`` (CUDA graphs; the network compiled first when ``compile``) or
            ``"compile"`` (``torch.compile(network, dynamic=False)``, one per network, a
            compilation per new shape).
        compile: with ``graphs``, compile the network before capturing it.
        emulate: graphs replayed by calling the network on the static buffers
            (:class:`GraphCache`; tests on a CPU).
    """

    def __init__(self, mode: str, compile: bool = False, emulate: bool = False) -> None:
        if mode not in ("graphs", "compile"):
            raise ValueError(f"mode must be 'graphs' or 'compile'. Got {mode!r}.")
        self.mode, self.compile = mode, compile or mode == "compile"
        self.graphs = GraphCache(emulate)
        self._compiled: dict[int, tuple[weakref.ref, Any]] = {}
        self._shapes: set[Hashable] = set()

    @property
    def captures(self) -> int:
        """Graphs captured (``graphs``) or shapes compiled (``compile``) so far."""
        return self.graphs.captures if self.mode == "graphs" else len(self._shapes)

    def network(self, network: Any) -> Any:
        """The network as this runner calls it (compiled once per network when asked; a compiled
        wrapper holds its network, so compiled networks live as long as the runner)."""
        if not self.compile:
            return network
        entry = self._compiled.get(id(network))
        if entry is None or entry[0]() is not network:
            self._compiled = {k: e for k, e in self._compiled.items() if e[0]() is not None}
            entry = (weakref.ref(network), torch.compile(network, dynamic=False))
            self._compiled[id(network)] = entry
        return entry[1]

    def __call__(self, denoiser: Any, x: Tensor, t: Tensor) -> Tensor:
        """The denoiser's output; a denoiser that is not a :class:`ConditionedDenoiser` (an
        adapter's) is itself the network, its conditioning baked in (captured per denoiser)."""
        if isinstance(denoiser, ConditionedDenoiser):
            network, context = denoiser.network, denoiser.tiled(x.shape[0])
            t = t.to(torch.int64)
        else:
            network, context = denoiser, {}
        key = (
            id(network),
            tuple(x.shape),
            x.dtype,
            x.device,
            tuple((name, tuple(value.shape), value.dtype) for name, value in context.items()),
        )
        model = self.network(network)
        if self.mode == "compile" or GraphCache.capturing():
            self._shapes.add(key)
            return model(x, t, **context)
        names, model_ref = tuple(context), weakref.ref(model)

        def call(x: Tensor, t: Tensor, *values: Tensor) -> Tensor:
            # weakly: a capture must not keep its network alive (see GraphCache._forget_dead)
            return model_ref()(x, t, **dict(zip(names, values, strict=True)))

        (output,) = self.graphs(key, call, (x, t, *context.values()), owners=(network,))
        return output.clone()  # the static output is overwritten by the next replay
