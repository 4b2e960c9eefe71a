"""Inductor graph passes for the compiled forward: ``isnan(x)`` as ``x != x``; float32 CPU matmuls by oneDNN.

1. TransformerLens zeroes NaN attention probabilities (the rows whose every score is masked) with
   ``torch.where(torch.isnan(pattern), 0, pattern)`` after the softmax. Inductor's CPU code generator
   vectorises ``ne`` but evaluates ``isnan`` one element at a time inside the vectorised loop: about
   half of the fused softmax kernel's time (a SmolLM2 block, 32 x 128 cells, bf16: 12.0 ms without
   the pass, 6.2 ms with it, medians of 6 interleaved profiles). ``x != x`` is true exactly for NaN
   (IEEE 754), so the rewrite changes no value, and inductor does not fold it away (tested with fully
   masked rows).
2. A float32 matmul on the CPU (``aten.mm`` / ``aten.addmm``: the projections and the MLP) goes to
   oneDNN's linear (``mkldnn._linear_pointwise``, the kernel inductor itself uses for a frozen
   model's linears) instead of ATen's BLAS call. Both are full float32 (errors against a float64
   product ~2-5e-6 of the result's scale on a 4096 x 576 @ 576 x 1536 product); on this project's
   AMD EPYC CI machine oneDNN ran these shapes at ~200-220 GFLOP/s against ~130-190 for ATen's
   ``linear``, and the compiled SmolLM2 forward to block 10 in float32 ran 1.16-1.24x faster.
   Inductor's own route to that kernel (``freezing``) bakes the weights into the graph as constants,
   so every block would compile a graph of its own (11 instead of 1 for SmolLM2 to block 10); this
   pass keeps the weights graph inputs. bfloat16 matmuls already run on oneDNN in ATen and are left
   alone, as is every matmul off the CPU.

No library offers these rewrites; inductor's documented hook for them is a post-grad custom pass
(``torch._inductor.config.post_grad_custom_pre_pass``), which is a
:class:`~torch._inductor.custom_graph_pass.CustomGraphPass` so that inductor's on-disk graph cache
keys on it (``uuid``: this file's hash). oneDNN's linear is wrapped in a custom op so that inductor
calls it as one external kernel, with its inputs' shapes checked by the fake implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten


@torch.library.custom_op("sae_core::onednn_mm", mutates_args=())
def onednn_mm(x: Tensor, mat2: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ mat2 (+ bias)`` (2-D float32 on the CPU) by oneDNN's linear, which takes ``mat2`` transposed."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), mat2.t().contiguous(), bias, "none", [], "")


@onednn_mm.register_fake
def _(x: Tensor, mat2: Tensor, bias: Tensor | None) -> Tensor:
    torch._check(x.shape[1] == mat2.shape[0], lambda: f"onednn_mm: {tuple(x.shape)} @ {tuple(mat2.shape)}")
    return x.new_empty((x.shape[0], mat2.shape[1]))


class ForwardGraphPass(CustomGraphPass):
    """Both rewrites of the module docstring, on a post-grad graph; counters say what they rewrote."""

    def __init__(self) -> None:  # nodes rewritten so far (by graphs compiled in this process)
        self.isnan_rewritten, self.matmuls_rewritten = 0, 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.find_nodes(op="call_function", target=aten.isnan.default):
            (tensor,) = node.args
            self._replace(graph, node, aten.ne.Tensor, (tensor, tensor))
            self.isnan_rewritten += 1
        if not torch.backends.mkldnn.is_available():
            return
        for node in [*graph.find_nodes(op="call_function", target=aten.mm.default),
                     *graph.find_nodes(op="call_function", target=aten.addmm.default)]:
            args = _onednn_args(node)
            if args is not None:
                self._replace(graph, node, torch.ops.sae_core.onednn_mm.default, args)
                self.matmuls_rewritten += 1

    @staticmethod
    def _replace(graph: torch.fx.Graph, node: torch.fx.Node, target: Any, args: tuple[Any, ...]) -> None:
        with graph.inserting_before(node):
            new = graph.call_function(target, args)
        new.meta.update(node.meta)  # same shape, dtype and device
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


def _onednn_args(node: torch.fx.Node) -> tuple[Any, ...] | None:
    """``(x, mat2, bias)`` for :func:`onednn_mm` if ``node`` (an mm / addmm) is a float32 CPU matmul it serves."""
    if node.kwargs:  # addmm's beta / alpha
        return None
    if node.target is aten.mm.default:
        (x, mat2), bias = node.args, None
    else:
        bias, x, mat2 = node.args
    values = [arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None for arg in (x, mat2, bias)]
    if values[0] is None or values[1] is None or (bias is not None and values[2] is None):
        return None
    if any(value.dtype != torch.float32 or value.device.type != "cpu" for value in values if value is not None):
        return None
    if bias is not None and tuple(values[2].shape) != (values[1].shape[1],):  # a row-broadcast bias only
        return None
    return x, mat2, bias


FORWARD_GRAPH_PASS = ForwardGraphPass()
COMPILE_OPTIONS = {"post_grad_custom_pre_pass": FORWARD_GRAPH_PASS}  # torch.compile(options=...)
