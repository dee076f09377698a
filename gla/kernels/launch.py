"""Host-side launch plumbing shared by the kernels: integer helpers, the eager fast-path test and
the cached launcher every ``@triton.jit`` entry point is wrapped in.

Kept in plain Python because the host cost of a launch is what bounds short sequences:
``triton.cdiv`` / ``triton.next_power_of_2`` are ``constexpr_function`` objects in recent Triton
whose host-side call unwraps every argument (µs per call, several per launch), and a call through
a ``torch.library`` custom op costs tens of µs of dispatch in eager mode.
"""
from __future__ import annotations

import contextlib
import os
import types

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_ok(*tensors) -> bool:
    """May this call skip its torch.library op and launch the kernels directly?

    Only for a plain eager call on real tensors: not traced or compiled, no dispatch mode (fake,
    proxy, functionalization, cross-ref ...), no functorch transform, no tensor subclass. The ops
    stay what torch.compile, AOT autograd and dispatch modes see. ``GLA_EAGER_OP=1`` always takes
    the op (to compare the two paths)."""
    if os.environ.get("GLA_EAGER_OP") == "1" or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


# ----------------------------------------------------------------------------------------------
# Cached launches
# ----------------------------------------------------------------------------------------------
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
# GLA_LAUNCH_CACHE=0: every launch through Triton's own path (to compare, or to rule us out).
CACHED = os.environ.get("GLA_LAUNCH_CACHE", "1") != "0"


@contextlib.contextmanager
def triton_launches():
    """Inside the block every launch goes through Triton's own ``JITFunction.run`` (to compare
    with the cached path, or to rule it out); the setting before the block is restored."""
    global CACHED
    before, CACHED = CACHED, False
    try:
        yield
    finally:
        CACHED = before


def _arg_key(a):
    """What Triton specializes a runtime argument on, as a cheap hashable value.

    Triton (``native_specialize_impl``) types an int as i32 or i64 by range and marks it equal to
    1 (a constant) or divisible by 16; a tensor by dtype and whether its address is 16-byte
    aligned; floats and bools by type only. The key may be finer than Triton's, never coarser."""
    t = type(a)
    if t is int:
        if a == 1:
            return 1
        return (a & 15 == 0, _I32_MIN <= a <= _I32_MAX)
    if t is float or t is bool or a is None:
        return t
    return (a.dtype, a.data_ptr() & 15 == 0)


_SCALARS = frozenset((int, float, bool))
_EXACT_ENTRIES = 4096  # per kernel; beyond this the exact-value cache starts over


class Launcher:
    """``kernel[grid](*args, **constexprs)`` for a ``@triton.jit`` kernel, minus most host work.

    ``JITFunction.run`` re-derives the specialization of every argument, rebuilds the cache key
    (``str`` of the options) and looks the kernel up at each launch: tens of µs for kernels with
    ~40 arguments, paid on every call at short sequences. Here the first launch of each Triton
    specialization goes through Triton as usual and keeps the ``CompiledKernel`` it returns;
    later ones call its launcher directly. Two caches, both keyed with the device and the
    keywords (constexprs and options):

    * exact: the pointer arguments by (dtype, 16-byte alignment) and every scalar argument by
      value (C-speed hashing of one tuple; a model calls at a few shapes);
    * fine: every argument by what Triton specializes it on (:func:`_arg_key`), consulted on an
      exact miss (a new sequence length...), so a new shape costs one Python pass, not Triton's.

    Falls back to Triton's path under the interpreter, while a launch hook is installed
    (profilers), when an argument is neither a number nor a tensor, and always with
    ``GLA_LAUNCH_CACHE=0`` (module attribute ``CACHED``; :func:`triton_launches` for a block).

    Runtime arguments are positional, pointers (tensors or None) first, then scalars;
    constexprs and options (``num_warps``...) are keywords. The kernel runs on the first tensor's
    device (Triton alone would use the current one). Triton's checks skipped on the cached path:
    changed global values seen by the kernel, and knobs changed after the first launch (debug
    mode...).
    """

    def __init__(self, fn):
        self.fn = fn
        self.interpreted = type(fn).__name__ == "InterpretedFunction"
        self._exact: dict = {}
        self._fine: dict = {}
        self._n_ptrs: int | None = None  # leading pointer arguments, learned at the first launch
        self._knobs = None if self.interpreted else _triton_runtime_knobs()

    def _hooked(self) -> bool:
        return hooks_installed(self._knobs)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        hit = self._launch(grid, args, kwargs)
        return hit[0] if hit is not None else None

    def bind(self, grid, kwargs) -> "BoundLaunch":
        """The launches at ``grid`` with these keywords of a caller whose every call passes
        arguments equal to its first's in all the exact key reads (pointer dtypes and
        alignment, scalar values): a call plan, keyed on them. See :class:`BoundLaunch`."""
        return BoundLaunch(self, tuple(grid) + (1,) * (3 - len(grid)), kwargs)

    def _launch(self, grid, args, kwargs):
        """Launch; returns the exact cache's entry for these arguments, ``(kernel, constexprs,
        device)``, or None where there is none (Triton's path, an uncacheable call)."""
        if not CACHED or self.interpreted or callable(grid) or self._hooked():
            self.fn[grid](*args, **kwargs)
            return None
        n = self._n_ptrs
        if n is None:
            n = self._n_ptrs = next((i for i, a in enumerate(args)
                                     if a is not None and not isinstance(a, torch.Tensor)),
                                    len(args))
        try:
            ptrs = tuple([None if a is None else (a.dtype, not a.data_ptr() & 15)
                          for a in args[:n]])
        except AttributeError:  # a scalar where a pointer was: Triton's path
            self.fn[grid](*args, **kwargs)
            return None
        device = _cuda_index(args[0])
        if device is None:  # not a CUDA tensor: Triton's path (and its error)
            self.fn[grid](*args, **kwargs)
            return None
        if device != _current_device():
            with torch.cuda.device(device):
                return self._launch(grid, args, kwargs)
        scalars = args[n:]
        # types too: 1, 1.0 and True are equal as keys but not to Triton
        options = (tuple(kwargs.items()), tuple(map(type, kwargs.values())))
        key = (device, options, ptrs, scalars, tuple(map(type, scalars)))
        try:
            hit = self._exact.get(key)
        except TypeError:  # an unhashable keyword value (a list...): nothing to cache on
            self.fn[grid](*args, **kwargs)
            return None
        except RuntimeError:  # a tensor among the scalars met an equal hash: the fine key
            hit, key = None, None
        if hit is None:
            hit = self._lookup(grid, args, kwargs, device, options, key, scalars)
            if hit is None:  # launched through Triton (and cached where it could be)
                entry = self._exact.get(key) if key is not None else None
                return (*entry, device) if entry is not None else None
        kernel, consts = hit
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        kernel.run(grid[0], g1, g2, _current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *consts)
        return kernel, consts, device

    def _lookup(self, grid, args, kwargs, device, options, key, scalars):
        """The fine-cache entry for these arguments (filling the exact cache), or None after
        launching through Triton (which compiles or finds the kernel) and caching what it
        returned."""
        try:
            fine = (device, options, tuple([_arg_key(a) for a in args]))
        except AttributeError:
            self.fn[grid](*args, **kwargs)
            return None
        hit = self._fine.get(fine)
        launched = hit is None
        if launched:
            kernel = self.fn[grid](*args, **kwargs)
            # the compiled launcher takes every parameter in signature order, constexprs included
            params = self.fn.params[len(args):]
            consts = tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params)
            hit = self._fine[fine] = (kernel, consts)
        if key is not None and _SCALARS.issuperset(map(type, scalars)):
            if len(self._exact) >= _EXACT_ENTRIES:
                self._exact.clear()
            self._exact[key] = hit
        return None if launched else hit


class BoundLaunch:
    """One kernel's launches for a call plan (``Launcher.bind``): the plan's key holds whatever
    the exact cache would key on, so after the first launch, which goes through
    ``Launcher.launch``, each call runs the compiled kernel straight away (its arguments in
    order: ~40 per attention kernel, whose key alone cost ~30 µs of a slow host's time per
    launch), through its C launch where Triton's launcher is laid out as this file knows
    (:func:`c_launch`). Triton's path still runs where ``Launcher.launch`` would take it (hooks,
    the interpreter, ``CACHED`` off, another current device)."""

    __slots__ = ("launcher", "grid", "kwargs", "hit", "direct")

    def __init__(self, launcher: Launcher, grid: tuple, kwargs: dict):
        self.launcher, self.grid, self.kwargs = launcher, grid, kwargs
        self.hit = self.direct = None

    def __call__(self, *args) -> None:
        hit = self.hit
        if hit is None or not CACHED or hit[2] != _current_device() or self.launcher._hooked():
            self.hit = hit = self.launcher._launch(self.grid, args, self.kwargs)
            self.direct = c_launch(hit[0]) if hit is not None else None
            return
        kernel, consts, device = hit
        g = self.grid
        direct = self.direct
        if direct is not None:
            direct[0](g[0], g[1], g[2], _current_stream(device), *direct[1], *args, *consts)
            return
        kernel.run(g[0], g[1], g[2], _current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *consts)


# Triton 3.6's CudaLauncher: its C ``launch`` takes grid, stream, function, cooperative, pdl,
# global and profile scratch, packed metadata, launch metadata and the two hooks, then the
# kernel's parameters.
_C_LEADING_ARGS = 13


def launch_leading_args(kernel, driver=None) -> tuple | None:
    """What a compiled kernel's C launch takes after grid and stream, where its launcher
    (``kernel.run``, Triton's ``CudaLauncher``) is laid out as in Triton 3.6 and allocates no
    global or profile scratch per launch (none of ours do); else None."""
    try:
        if driver is None:
            from triton.backends.nvidia import driver
        run = kernel.run
        if getattr(driver, "_BASE_ARGS_FORMAT_LEN", None) != _C_LEADING_ARGS \
                or run.global_scratch_size or run.profile_scratch_size:
            return None
        return (kernel.function, bool(run.launch_cooperative_grid), bool(run.launch_pdl),
                None, None, kernel.packed_metadata, None, None, None)
    except (AttributeError, ImportError):
        return None


def c_launch(kernel, driver=None) -> tuple | None:
    """``(launch, leading)``: the compiled kernel's C launch, which ``kernel.run`` calls after
    ~10 lines of Python per launch, and its leading arguments (:func:`launch_leading_args`);
    None where the kernel has tensor descriptors (``launch`` is then a Python function that
    encodes them) or another layout."""
    leading = launch_leading_args(kernel, driver)
    fn = getattr(getattr(kernel, "run", None), "launch", None)
    if leading is None or not callable(fn) or isinstance(fn, types.FunctionType):
        return None
    return fn, leading


def _cuda_index(t):
    return t.device.index if t is not None and t.is_cuda else None


def _current_device() -> int:
    return torch._C._cuda_getDevice()


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _hook_set(hook) -> bool:
    """A launch hook is installed: a callable, or a non-empty ``triton.knobs.HookChain`` (Triton
    3.6+ keeps an empty chain there by default)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def hooks_installed(knobs) -> bool:
    """A launch enter/exit hook is installed in Triton's runtime ``knobs`` (profilers): launches
    then go through Triton's own path, which calls them."""
    return knobs is not None and (_hook_set(knobs.launch_enter_hook)
                                  or _hook_set(knobs.launch_exit_hook))


def _triton_runtime_knobs():
    import triton
    knobs = getattr(triton, "knobs", None)
    return getattr(knobs, "runtime", None)


def launcher(fn) -> Launcher:
    """Decorator form of :class:`Launcher`, placed above ``@triton.jit``."""
    return Launcher(fn)
