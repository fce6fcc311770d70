"""PyTorch's own test tables for BatchNorm2d, as plain data: ``python tests/torch_tables.py OUT``
writes them with ``torch.save`` (tensors, numbers, strings, lists, dicts only: loadable
with ``weights_only=True``).

Run in a child process on purpose: importing ``torch.testing._internal`` changes the
importing process -- it freezes ``torch.backends`` flags (``disable_global_flags``: any
later ``torch.backends.cudnn.allow_tf32 = ...`` raises), loads its own hypothesis
profile over the suite's, and patches TorchScript's call methods. The test process
reads the data and never imports it (tests/test_torch_module_db.py).

What is written:
* ``module_inputs[training]``: for each of module_db's ``nn.BatchNorm2d`` inputs, its
  ``desc``, constructor ``args``/``kwargs`` and forward ``input`` (float64, CPU);
* ``error_inputs[training]``: constructor args/kwargs, the forward input, ``error_on``
  ("construction" or "forward"), the exception's builtin name and the message regex;
* ``train_and_eval_differ``;
* ``op_samples``: op_db's ``nn.functional.batch_norm`` samples (input, args, kwargs).
"""
import os
import sys
import types
import unittest


def _tables():
    try:
        import expecttest  # noqa: F401  (torch.testing's TestCase base; not on the GPU machine)
    except ImportError:
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase
        sys.modules["expecttest"] = stub
    import torch
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

    info = next(m for m in module_db if m.module_cls is torch.nn.BatchNorm2d)
    f64 = dict(device="cpu", dtype=torch.float64, requires_grad=False)

    def fn_input(fi):
        return list(fi.args), dict(fi.kwargs)

    out = {"torch": str(torch.__version__), "train_and_eval_differ": bool(info.train_and_eval_differ),
           "module_inputs": {}, "error_inputs": {}}
    for training in (True, False):
        rows = []
        for mi in info.module_inputs_func(info, training=training, **f64):
            args, kwargs = fn_input(mi.constructor_input)
            (x,), fkw = fn_input(mi.forward_input)
            assert not fkw, fkw
            rows.append({"desc": mi.desc or "default", "args": args, "kwargs": kwargs, "input": x.detach()})
        out["module_inputs"][training] = rows
        errs = []
        for e in info.module_error_inputs_func(info, training=training, device="cpu", dtype=torch.float32,
                                               requires_grad=False):
            mi = e.module_error_input
            args, kwargs = fn_input(mi.constructor_input)
            (x,), _ = fn_input(mi.forward_input)
            errs.append({"args": args, "kwargs": kwargs, "input": x.detach(),
                         "error_on": "construction" if e.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR else "forward",
                         "error_type": e.error_type.__name__, "error_regex": e.error_regex})
        out["error_inputs"][training] = errs
    op = next(o for o in op_db if o.name == "nn.functional.batch_norm" and not o.variant_test_name)
    out["op_samples"] = [{"input": s.input.detach(),
                          "args": [a.detach() if isinstance(a, torch.Tensor) else a for a in s.args],
                          "kwargs": dict(s.kwargs)}
                         for s in op.sample_inputs("cpu", torch.float64, requires_grad=False)]
    return out


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the tables are built on the CPU
    import torch
    torch.save(_tables(), sys.argv[1])
