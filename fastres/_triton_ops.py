"""The Triton backend's ops as ``torch.library.triton_op``: kernels inductor can see.

``fastres::triton_*`` (fastres/ops.py, fastres/conv_ops.py) are ``torch.library.custom_op``s:
torch.compile keeps each as one opaque call. Their twins ``fastres::tritonop_*`` here
run the *same launchers* (``fastres.kernels``), with every kernel launched through
``torch.library.wrap_triton`` (``kernels._launch.launching``), and are registered with
``torch.library.triton_op``: under torch.compile, AOTAutograd decomposes each into its
allocations, its small aten ops (statistics merges, casts) and one user-defined Triton
kernel node per launch, which inductor compiles, schedules and may fuse around (it
cannot fuse *into* a user kernel). Same schemas, same autograd formulas (the ones of
ops.py / conv_ops.py), same results bit for bit. In eager each op calls the launchers
directly (``triton_op`` turns ``wrap_triton`` off there): no cost over the custom op.

Which family ``ops.family("triton")`` / ``conv_ops.family("triton")`` return is chosen by
``FASTRES_TRITON_OP`` (read at import) or :func:`set_triton_op`:

* ``auto`` (default): the custom ops, until a GPU measurement shows the triton_op
  variant faster (``benchmarks/bench_triton_op.py``, docs/GPU.md) - none has yet;
* ``1``: the triton_op variant; ``0``: the custom ops.

The switch is read when a fused op is called (and is a guard of a compiled graph: a
compiled function recompiles after it changes). Both variants' fake kernels are their
Python bodies run on fake tensors (``triton_op`` registers the body as the fake), so the
launchers' shape logic must stay traceable: static shapes (``torch.compile`` specialises
each op's shape arguments; a dynamic dimension is specialised by the first ``int()``).

Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.jit`` gives interpreter functions that
``wrap_triton`` refuses (torch 2.11) or passes through untraced (torch 2.14); there each
kernel is traced as a ``JITFunction`` twin (:class:`_Twins`) that launches through the
interpreter and whose writes torch analyses exactly, so ``aot_eager`` runs the very
graphs inductor would get, autograd included (tests/test_triton_op.py). Inductor itself
cannot compile a user-defined Triton kernel on CPU tensors ("triton not built with the
'cpu' backend"): the inductor checks run on the GPU.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import torch

Tensor = torch.Tensor

MODES = ("auto", "1", "0")
PREFIX = "tritonop_"
_ENV = "FASTRES_TRITON_OP"


def _parse(mode) -> str:
    if mode is None:
        return "auto"
    if isinstance(mode, bool):
        return "1" if mode else "0"
    m = str(mode).strip().lower()
    m = {"": "auto", "on": "1", "true": "1", "yes": "1", "off": "0", "false": "0", "no": "0"}.get(m, m)
    if m not in MODES:
        raise ValueError(f"fastres: {_ENV} must be one of auto, 1, 0 (or a bool), got {mode!r}")
    return m


_mode = _parse(os.environ.get(_ENV, "auto"))


def requested() -> str:
    """The switch as set: ``auto``, ``1`` or ``0``."""
    return _mode


def enabled() -> bool:
    """Whether the Triton backend runs through the triton_op variant. ``auto`` keeps the
    custom ops: no measurement has shown the triton_op variant faster (docs/GPU.md)."""
    return _mode == "1"


def cached_family(families: Dict[str, object], lock: threading.Lock, name: str, build):
    """The op family ``name`` from ``families`` (``fastres.ops`` / ``fastres.conv_ops``), built
    by ``build(name)`` once, under ``lock``, on first use; ``triton`` stands for the
    triton_op variant when the switch selects it (:func:`enabled`)."""
    if name == "triton" and enabled():
        name = "triton_op"
    fam = families.get(name)
    if fam is not None:
        return fam
    with lock:
        if name not in families:
            families[name] = build(name)
        return families[name]


def info() -> Dict[str, object]:
    """For :func:`fastres.backend_info`: the switch, whether the Triton backend runs through
    the triton_op variant, and why."""
    on = enabled()
    why = {"1": "FASTRES_TRITON_OP=1 / set_triton_op(True)", "0": "FASTRES_TRITON_OP=0 / set_triton_op(False)",
           "auto": "auto: the custom ops until a GPU measurement shows the triton_op variant faster "
                   "(run_gpu.sh full 13; none yet)"}[_mode]
    return {"requested": _mode, "enabled": on, "variant": "triton_op + wrap_triton" if on else "custom_op",
            "reason": why}


def set_triton_op(mode) -> str:
    """Choose the variant: ``True``/``"1"``, ``False``/``"0"``, ``None``/``"auto"``.
    Returns the previous setting. Registers the variant's ops now when it is switched on
    (registration cannot happen inside a torch.compile trace)."""
    global _mode
    prev, new = _mode, _parse(mode)
    if new == "1":
        from . import backends, conv_ops, ops
        if any(backends.available("triton", d)[0] for d in _device_types()):
            ops.family("triton_op")
            conv_ops.family("triton_op")
    _mode = new
    return prev


@contextlib.contextmanager
def use_triton_op(mode) -> Iterator[None]:
    """``with use_triton_op(True): ...`` — :func:`set_triton_op` for a block."""
    prev = set_triton_op(mode)
    try:
        yield
    finally:
        set_triton_op(prev)


def _device_types() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------- launch hook
def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported Triton has it
        return False
    return isinstance(kernel, InterpretedFunction)


class _Twins:
    """Under ``TRITON_INTERPRET=1``: each interpreter kernel as a ``JITFunction`` twin that
    torch's Triton HOP can trace (it reads a ``JITFunction``'s arguments and constexprs)
    and that launches through the interpreter.

    Torch finds the tensors a kernel writes by compiling it to Triton IR
    (``identify_accessed_tensors``); without that, every argument counts as written and
    AOTAutograd sees a backward "writing" the forward's saved inputs. Under the
    interpreter every ``@triton.jit`` function is an interpreter function - fastres's
    helpers and Triton's own (``tl.zeros`` …) - which the code generator would *call*
    (leaking the interpreter's patches of ``triton.language``). So a twin's globals are
    its module's with every interpreter function replaced by its twin and every
    ``triton.language`` / ``fastres.kernels`` module by a copy that holds twins; and the
    IR is generated for a CUDA target (:class:`_AnalysisDriver`: code generation only,
    nothing compiles to a binary or runs)."""
    lock = threading.RLock()
    twins: Dict[int, object] = {}
    scopes: Dict[int, dict] = {}
    modules: Dict[str, object] = {}
    cls = None
    PROXIED = ("triton.language", __package__ + ".kernels")

    @classmethod
    def _class(cls):
        if cls.cls is None:
            from triton.runtime.jit import JITFunction

            class InterpretedJIT(JITFunction):
                def __init__(self, f):
                    super().__init__(f.fn)
                    self.interpreted = f
                    # the JIT cache key hashes the helpers a kernel calls (interpreter
                    # functions, which it refuses): key on the kernel itself
                    self.hash = f"fastres-interpreted:{f.fn.__module__}.{f.fn.__qualname__}"

                def __getitem__(self, grid):
                    return self.interpreted[grid]

                def run(self, *args, **kwargs):
                    return self.interpreted.run(*args, **kwargs)

            cls.cls = InterpretedJIT
        return cls.cls

    @classmethod
    def get(cls, interp):
        twin = cls.twins.get(id(interp))
        if twin is None:
            with cls.lock:
                twin = cls.twins.get(id(interp))
                if twin is None:
                    twin = cls.twins[id(interp)] = cls._class()(interp)
                    twin.__globals__ = cls._scope(interp.fn.__globals__)
        return twin

    @classmethod
    def _scope(cls, g: dict) -> dict:
        import types
        scope = cls.scopes.get(id(g))
        if scope is None:
            scope = cls.scopes[id(g)] = dict(g)  # registered first: functions of g refer to it
            for k, v in g.items():
                if _interpreted(v):
                    scope[k] = cls.get(v)
                elif isinstance(v, types.ModuleType) and v.__name__.startswith(cls.PROXIED):
                    scope[k] = cls._module(v)
        return scope

    @classmethod
    def _module(cls, mod):
        import types
        proxy = cls.modules.get(mod.__name__)
        if proxy is None:
            proxy = cls.modules[mod.__name__] = types.ModuleType(mod.__name__)
            proxy.__dict__.update(cls._scope(vars(mod)))
        return proxy


class _AnalysisDriver:
    """The target Triton generates IR for while torch analyses an interpreter kernel's
    accesses (under the interpreter no GPU driver is active)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


class _InterpretedLaunch:
    """A twin's traceable launch (``TraceableTritonKernelWrapper``), traced with
    :class:`_AnalysisDriver` active."""

    def __init__(self, kernel):
        from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper
        self.wrapped = TraceableTritonKernelWrapper(_Twins.get(kernel), None, None)

    def __getitem__(self, grid):
        call = self.wrapped[grid]

        def launch(*args, **kwargs):
            from triton.runtime import driver
            prev = driver._active  # None under the interpreter (reset_active() would look for a GPU)
            driver.set_active(_AnalysisDriver())
            try:
                return call(*args, **kwargs)
            finally:
                driver._active = prev
        return launch


def wrap_kernel(kernel):
    """How the triton_op bodies launch ``kernel``: the kernel itself where ``triton_op``
    calls its body on real tensors (wrap_triton disabled), else a traceable launch
    (``torch.library.wrap_triton``; the interpreter's twin on CPU)."""
    from torch._library.triton import is_wrap_triton_enabled
    if not is_wrap_triton_enabled():
        return kernel
    if _interpreted(kernel):
        return _InterpretedLaunch(kernel)
    return torch.library.wrap_triton(kernel)


def _tracing(tensors) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return any(isinstance(t, Tensor) and is_fake(t) for t in tensors)


def _fresh(outs, inputs, unalias):
    """Outputs that alias no input and no other output. Real tensors: ``unalias`` (the
    custom ops' storage check, so both variants copy the same outputs); traced tensors
    have no storage address: an output that *is* an input or an earlier output is copied."""
    return unalias(outs, inputs, storage=not _tracing(outs))


# ----------------------------------------------------------------------------- BN(+add)+ReLU ops
def define_bn_ops(K) -> None:
    """``fastres::tritonop_{bn_act_train, affine_act}`` and their backward ops around the
    launchers of ``K`` (``fastres.kernels``), with ops.py's autograd formulas."""
    from . import ops
    from .kernels import launching
    lib = torch.library

    @lib.triton_op(f"fastres::{PREFIX}bn_act_train", mutates_args=())
    def bn_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     residual: Optional[Tensor], eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
        with launching(wrap_kernel):
            outs = K.bn_act_train(x, weight, bias, residual, eps, relu)
        return _fresh(outs, (x, weight, bias, residual), ops._unalias)

    @lib.triton_op(f"fastres::{PREFIX}bn_act_train_backward", mutates_args=())
    def bn_act_train_backward(grad_y: Tensor, x: Tensor, y: Tensor, weight: Optional[Tensor],
                              mean: Tensor, var: Tensor, eps: float, relu: bool,
                              need_grad_z: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        with launching(wrap_kernel):
            outs = K.bn_act_train_backward(grad_y, x, y, weight, mean, var, eps, relu, need_grad_z)
        return _fresh(outs, (grad_y, x, y, weight, mean, var), ops._unalias)

    @lib.triton_op(f"fastres::{PREFIX}affine_act", mutates_args=())
    def affine_act(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                   residual: Optional[Tensor], relu: bool) -> Tensor:
        with launching(wrap_kernel):
            y = K.affine_act(x, scale, shift, residual, relu)
        return _fresh((y,), (x, scale, shift, residual), ops._unalias)[0]

    @lib.triton_op(f"fastres::{PREFIX}affine_act_backward", mutates_args=())
    def affine_act_backward(grad_y: Tensor, x: Tensor, y: Tensor, scale: Optional[Tensor], relu: bool,
                            need_grad_z: bool, need_param_grads: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        with launching(wrap_kernel):
            outs = K.affine_act_backward(grad_y, x, y, scale, relu, need_grad_z, need_param_grads)
        return _fresh(outs, (grad_y, x, y, scale), ops._unalias)

    ns = torch.ops.fastres
    (bn_bw, bn_setup), (af_bw, af_setup) = ops._make_autograd(getattr(ns, f"{PREFIX}bn_act_train_backward"),
                                                              getattr(ns, f"{PREFIX}affine_act_backward"))
    bn_act_train.register_autograd(bn_bw, setup_context=bn_setup)
    affine_act.register_autograd(af_bw, setup_context=af_setup)


# ----------------------------------------------------------------------------- fused conv ops
def on_real_standins(fn, args):
    """``fn(*args)`` outside every tracing mode, each tensor of ``args`` replaced by a real
    one of the same shape, strides, dtype and device (random values)."""
    from torch.utils._python_dispatch import _disable_current_modes

    def real(t):
        if not isinstance(t, Tensor):
            return t
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).normal_()

    with _disable_current_modes():
        return fn(*(real(a) for a in args))


def _pretune_conv(args) -> None:
    """The fused conv forward picks its tiling by timing candidates (kernels/_conv.py's
    ``_pick_config``), which cannot run on fake tensors: while tracing on a GPU, tune this
    problem once on real stand-ins, so that the traced launch finds its tiling chosen
    (the custom op's choice for the same problem)."""
    from .kernels import _conv
    from .kernels._launch import concrete
    if args[0].device.type != "cuda" or _conv.INTERPRETED:
        return
    if not concrete(v for a in args if isinstance(a, Tensor) for v in (*a.shape, *a.stride())):
        return  # symbolic sizes (dynamic shapes): nothing concrete to tune; the launch takes the default tiling
    on_real_standins(_conv.conv2d_act, args)


def define_conv_ops(fwd_impl, bwd_impl) -> Tuple[object, object]:
    """``fastres::tritonop_conv2d_act`` and its backward around the Triton conv's
    forward/backward (conv_ops.py's ``_triton_forward`` / ``conv2d_act_backward_triton``),
    with conv_ops.py's autograd formula. Returns the two ops."""
    from . import conv_ops
    from .kernels import launching
    lib = torch.library

    @lib.triton_op(f"fastres::{PREFIX}conv2d_act_backward", mutates_args=())
    def conv2d_act_backward(grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor], x: Tensor,
                            weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                            y: Optional[Tensor], mean: Optional[Tensor], stride: List[int], padding: List[int],
                            dilation: List[int], groups: int, in_relu: bool, relu: bool,
                            need: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        with launching(wrap_kernel):
            outs = bwd_impl(grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean, stride, padding,
                            dilation, groups, in_relu, relu, need)
        return _fresh(outs, (grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean),
                      conv_ops._unalias)

    @lib.triton_op(f"fastres::{PREFIX}conv2d_act", mutates_args=())
    def conv2d_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                   in_shift: Optional[Tensor], residual: Optional[Tensor], stride: List[int], padding: List[int],
                   dilation: List[int], groups: int, in_relu: bool, relu: bool,
                   stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
        args = (x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups, in_relu, relu,
                stats)
        if _tracing((x,)):
            _pretune_conv(args)
        with launching(wrap_kernel):
            outs = fwd_impl(*args)
        return _fresh(outs, (x, weight, bias, in_scale, in_shift, residual), conv_ops._unalias)

    ns = torch.ops.fastres
    bw, setup = conv_ops._make_autograd(getattr(ns, f"{PREFIX}conv2d_act_backward"))
    conv2d_act.register_autograd(bw, setup_context=setup)
    return getattr(ns, f"{PREFIX}conv2d_act"), getattr(ns, f"{PREFIX}conv2d_act_backward")
