"""Collect activations at TransformerLens hook points, with pad and special rows masked out.

One forward pass serves any set of hook points: forward hooks added through
``model.hooks(...)`` copy each hook's output, and the pass stops with ``stop_at_layer`` just
past the last block needed (``run_with_cache`` would also work; plain hooks avoid building an
``ActivationCache`` and let the forward end early without computing logits). It runs under
``torch.inference_mode`` and, for ``forward_dtype`` bfloat16 / float16, under ``torch.autocast``
on the model's device type, so the weights stay float32 and only the matmuls run in low precision.

Packed batches (several windows in a row, ``WindowBatch.segment``) run with two more hooks, both
TransformerLens hook points: ``hook_attn_scores`` of every block sets the scores between cells of
different windows to -inf (block-diagonal on top of the causal mask), and, for learned absolute
position embeddings, ``hook_pos_embed`` restarts positions at each window. Rotary and ALiBi
scores depend only on the distance between two positions, so a window placed further along a
row attends exactly as it would at the start. Each window's activations are then those it has
alone, up to float rounding (tested against unpacked batches). TransformerLens's own
``attention_mask`` is per token, not per pair of tokens, so it cannot express this. Rows of
documents run together (``WindowBatch.joined``) run as plain rows: the documents attend to
each other and positions run on along the row, as in SAELens's contexts.

``compile=True`` runs the same TransformerLens forward, with the same hook points, with each
transformer block through ``torch.compile`` (inductor; regional compilation, as PyTorch's own
recipe for repeated layers). It fuses the elementwise work around the matmuls (norms, rotary,
masking, softmax, autocast casts; graph passes: :mod:`sae_core.compile_passes`, among them float32
CPU matmuls on oneDNN), which on CPU makes the forward ~1.1-1.3x faster in float32 and ~1.5-1.8x in bfloat16. Blocks with the same hooks share one graph, so the one-off compile is that of
a block or two (~25 s per process on 2 cores, inductor caches it on disk), not of the whole
forward (~100-150 s). Dynamo guards every block's hooks, so a graph traced for one hook set, one
packing or one precision is never reused for another. ``static_shape``, the (rows, width) a packed
token-budget loader fills (:func:`sae_core.loader.packed_shape`), gets a static-shape graph (less to
compile and faster than a dynamic-shape one); smaller batches are padded up to it (right padding under
the causal mask leaves the real cells unchanged) and other shapes share one dynamic-shape graph. Which
graph runs a batch depends on its shape and the config only, so a resumed run repeats the choice.
Activations equal the eager ones up to float rounding (tested). It
falls back to the eager forward, with a log message, when other hooks are registered on the model
(a compiled graph would not see later changes to them), under ``torch.inference_mode`` (dynamo
cannot guard inference tensors here), for models split over several devices, and when compiling
fails (e.g. no C++ compiler): results are the same, only slower.

Which rows are kept is a :class:`TokenPolicy`: pad rows (``attention_mask == 0``) are always
dropped; BOS, EOS and the tokenizer's other special tokens are dropped or kept by flags; the
policy is recorded as JSON in every run's metadata. Kept rows carry their token id, document
index and position in the document, so any activation maps back to the text it came from.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_core.compile_passes import COMPILE_OPTIONS
from sae_core.config import KEEP_ALL_BUT_PAD, TokenPolicy
from sae_core.data import WindowBatch, pad_id_of
from sae_core.hooks import stop_layer_for, validate_hook
from sae_core.model_loading import resolve_dtype
from sae_core.precision import AUTO, auto_dtype

logger = logging.getLogger(__name__)


def forward_context(device: torch.device | str, forward_dtype: str | torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast for low-precision forwards (weights stay in their dtype), else a no-op."""
    dtype = resolve_dtype(auto_dtype(device) if forward_dtype == AUTO else forward_dtype)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


PACKABLE_POSITIONS = ("rotary", "alibi", "standard", "shortformer")
_LOGGED_BLOCKERS: set[str] = set()


def _packing_hooks(model: HookedTransformer, stop: int | None) -> tuple[list[str], bool]:
    """The score hook points to mask in a packed batch, and whether positions must restart per window."""
    kind = model.cfg.positional_embedding_type
    if kind not in PACKABLE_POSITIONS or model.cfg.attention_dir != "causal":
        raise NotImplementedError(
            f"packing windows needs a causal model with {' / '.join(PACKABLE_POSITIONS)} positions; this model "
            f"has {kind!r} positions and {model.cfg.attention_dir!r} attention. Set pack_windows=False.")
    n_blocks = model.cfg.n_layers if stop is None else stop
    return [f"blocks.{layer}.attn.hook_attn_scores" for layer in range(n_blocks)], kind in ("standard", "shortformer")


def _window_mask(segment: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch 1 pos pos"]:
    """True where query and key cells belong to different windows of a packed row."""
    return (segment[:, :, None] != segment[:, None, :])[:, None]


def _segment_hooks(model: HookedTransformer, segment: Int[Tensor, "batch pos"],
                   offsets: Int[Tensor, "batch pos"], stop: int | None) -> list[tuple[str, Any]]:
    """Hooks keeping the windows of a packed batch apart (see the module docstring)."""
    score_hooks, restart = _packing_hooks(model, stop)
    apart = _window_mask(segment)
    on_device: dict[torch.device, Tensor] = {}  # blocks may sit on several devices (n_devices > 1)

    def mask_scores(scores: Tensor, hook: Any) -> Tensor:
        if scores.device not in on_device:
            on_device[scores.device] = apart.to(scores.device)
        return scores.masked_fill_(on_device[scores.device], float("-inf"))

    hooks: list[tuple[str, Any]] = [(name, mask_scores) for name in score_hooks]
    if restart:
        table = model.pos_embed.W_pos
        index = offsets.to(table.device)

        def restart_positions(pos_embed: Tensor, hook: Any) -> Tensor:
            return table[index].to(pos_embed.dtype)

        hooks.append(("hook_pos_embed", restart_positions))
    return hooks


class _CompiledForward:
    """A model's forward to a set of hook points with its blocks ``torch.compile``d (see the module docstring).

    Regional compilation: each transformer block runs through ``torch.compile`` (a static-shape
    graph for the caller's ``static_shape``, a dynamic-shape one for others: :meth:`_static_for`)
    while the embedding and the loop over blocks stay eager. The blocks of a model share one code
    object and dynamo inlines their parameters as inputs, so blocks with the same hooks share one
    compiled graph: a 30-layer model compiles about as fast as a 2-layer one (SmolLM2 to block 10,
    bf16: ~25 s to the first batch against ~100 s for the whole forward as one graph, the same
    speed after). The hooks are this object's bound methods and read their per-batch tensors
    (window mask, position index) from attributes, so those tensors are graph inputs, not constants
    baked into the graph. The compiled blocks are installed for the call only
    (``Module._compiled_call_impl``) and removed after it, so the model stays eager for everyone else.
    """

    def __init__(self, model: HookedTransformer) -> None:
        self.model = model
        self.slots: dict[str, Tensor] = {}
        self.apart: Tensor | None = None
        self.pos_index: Tensor | None = None
        self.disabled: str | None = None  # why the eager forward is used from now on
        self.compiled_calls = 0
        self.compiler: Any = lambda call, dynamic: torch.compile(call, dynamic=dynamic, options=COMPILE_OPTIONS)
        self.blocks: dict[tuple[int, bool], Any] = {}  # (block index, static) -> its compiled call, made on first use
        self.static_calls, self.padded_cells = 0, 0  # calls on a static-shape graph; pad cells they added

    def _capture(self, tensor: Tensor, hook: Any) -> None:
        self.slots[hook.name] = tensor

    def _mask(self, scores: Tensor, hook: Any) -> Tensor:
        return scores.masked_fill(self.apart, float("-inf"))

    def _positions(self, pos_embed: Tensor, hook: Any) -> Tensor:
        return self.model.pos_embed.W_pos[self.pos_index].to(pos_embed.dtype)

    def _static_for(self, hooks: Sequence[str], input_ids: Tensor, shape: tuple[int, int] | None) -> tuple[int, int] | None:
        """``shape`` if this call is padded up to it for the static-shape graph; None: the dynamic one serves it."""
        rows, width = input_ids.shape
        if shape is None or rows > shape[0] or width > shape[1]:
            return None
        if self.model.cfg.attention_dir != "causal" or any(name.endswith(_NOT_CELL_MAJOR) for name in hooks):
            return None  # right padding changes a bidirectional forward; these hooks' outputs are not (rows, pos, ...)
        return shape

    @contextlib.contextmanager
    def _compiled_blocks(self, stop: int | None, static: bool) -> Iterator[None]:
        """The first ``stop`` blocks (all: None) run compiled inside the context, eagerly again after it."""
        blocks = list(self.model.blocks)[:stop]
        before = [block._compiled_call_impl for block in blocks]
        try:
            for index, block in enumerate(blocks):
                if (index, static) not in self.blocks:
                    call = _static_shape_call(block) if static else _dynamic_shape_call(block)
                    self.blocks[index, static] = self.compiler(call, not static)
                block._compiled_call_impl = self.blocks[index, static]
            yield
        finally:
            for block, previous in zip(blocks, before, strict=True):
                block._compiled_call_impl = previous

    def __call__(self, hooks: Sequence[str], input_ids: Tensor, forward_dtype: str, batch: WindowBatch | None,
                 static_shape: tuple[int, int] | None = None) -> dict[str, Tensor] | None:
        """The hooks' outputs, or None when compiling failed (the caller then runs eagerly)."""
        model, device = self.model, self.model.cfg.device
        stop = stop_layer_for(list(hooks), model.cfg.n_layers)
        rows, width = input_ids.shape
        shape = self._static_for(hooks, input_ids, static_shape)
        padded = shape is not None and shape != (rows, width)
        if padded:  # right padding under the causal mask: the real cells' activations are unchanged
            pad = pad_id_of(model.tokenizer) if model.tokenizer is not None else 0
            input_ids = _pad_cells(input_ids, shape, pad)
        fwd_hooks: list[tuple[str, Any]] = []
        if batch is not None and batch.segment is not None and not batch.joined:
            # Always masked when packed, even if no row holds two windows: one graph, not two.
            score_hooks, restart = _packing_hooks(model, stop)
            segment, offsets = batch.segment, batch.cell_offsets()
            if padded:  # the new cells are pad cells (window -1), each new row starting at offset 0
                segment, offsets = _pad_cells(segment, shape, -1), _pad_cells(offsets, shape, 0)
            self.apart = _window_mask(segment).to(device)
            fwd_hooks += [(name, self._mask) for name in score_hooks]
            if restart:
                self.pos_index = offsets.to(device)
                fwd_hooks.append(("hook_pos_embed", self._positions))
        fwd_hooks += [(name, self._capture) for name in hooks]
        try:
            # Dynamo guards each block's hooks (``skip_nnmodule_hook_guards=False``), so blocks or hook
            # sets with other hooks get graphs of their own, never one traced for other hooks.
            with (torch.no_grad(), forward_context(device, forward_dtype), model.hooks(fwd_hooks=fwd_hooks),
                  torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True,
                                              skip_nnmodule_hook_guards=False),
                  self._compiled_blocks(stop, shape is not None)):
                model(input_ids.to(device), stop_at_layer=stop, return_type=None)
            self.compiled_calls += 1
            if shape is not None:  # counted once the call has run on the static-shape graph
                self.static_calls += 1
                self.padded_cells += shape[0] * shape[1] - rows * width
            return {name: self.slots[name][:rows, :width] for name in hooks}
        except Exception as error:  # noqa: BLE001 - the eager forward re-raises any error that is not the compiler's
            self.disabled = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            logger.warning("torch.compile failed (%s); using the eager forward from now on", self.disabled)
            return None
        finally:
            self.slots, self.apart, self.pos_index = {}, None, None


_NOT_CELL_MAJOR = ("hook_attn_scores", "hook_pattern")  # (batch, head, query, key): run on the dynamic graph


def _pad_cells(cells: Tensor, shape: tuple[int, int], value: int) -> Tensor:
    """``cells`` (rows, pos) padded with ``value`` on the right and below to ``shape``."""
    return F.pad(cells, (0, shape[1] - cells.shape[1], 0, shape[0] - cells.shape[0]), value=value)


# Two definitions on purpose: dynamo keeps compiled code per code object, so a static-shape graph and a
# dynamic-shape one of the same block never serve each other's calls. The blocks of a model (and of
# models of one shape) share each code object and so each graph.
def _static_shape_call(block: torch.nn.Module) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return block._call_impl(*args, **kwargs)
    return call


def _dynamic_shape_call(block: torch.nn.Module) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return block._call_impl(*args, **kwargs)
    return call


_COMPILED_ATTRIBUTE = "_sae_core_compiled_forward"  # on the model: lives and dies with it


def _compile_blocker(model: HookedTransformer) -> str | None:
    """Why the compiled forward cannot serve this call (None: it can)."""
    if torch.is_inference_mode_enabled():
        return "called under torch.inference_mode"
    if model.cfg.n_devices > 1:
        return "the model is split over several devices"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "other hooks are registered on the model"
    compiled = model.__dict__.get(_COMPILED_ATTRIBUTE)
    return compiled.disabled if compiled is not None else None


def compiled_forward(model: HookedTransformer) -> _CompiledForward:
    """The model's compiled forward (made on first use, kept while the model lives)."""
    if _COMPILED_ATTRIBUTE not in model.__dict__:
        model.__dict__[_COMPILED_ATTRIBUTE] = _CompiledForward(model)
    return model.__dict__[_COMPILED_ATTRIBUTE]


def run_to_hooks(model: HookedTransformer, hooks: Sequence[str], input_ids: Int[Tensor, "batch pos"],
                 forward_dtype: str | torch.dtype = "float32", batch: WindowBatch | None = None,
                 compile: bool = False, static_shape: tuple[int, int] | None = None,
                 ) -> dict[str, Float[Tensor, "batch pos d"]]:
    """One forward pass, stopped after the last needed block; returns each hook's output.

    ``batch`` (the :class:`WindowBatch` of ``input_ids``) is needed only when it is packed: its
    windows are then kept from attending to each other. ``compile=True`` runs the forward
    through ``torch.compile`` when it can (see the module docstring), else eagerly; batches that
    fit in ``static_shape`` (rows, width) then run padded to it on a static-shape graph.
    """
    for name in hooks:
        validate_hook(model, name)
    if compile:
        blocker = _compile_blocker(model)
        if blocker is None:
            chosen = auto_dtype(model.cfg.device) if forward_dtype == AUTO else forward_dtype
            dtype_name = str(resolve_dtype(chosen)).removeprefix("torch.")
            out = compiled_forward(model)(hooks, input_ids, dtype_name, batch, static_shape)
            if out is not None:
                return out
        elif blocker not in _LOGGED_BLOCKERS:
            _LOGGED_BLOCKERS.add(blocker)
            logger.info("running the eager forward, not the compiled one: %s", blocker)
    captured: dict[str, Tensor] = {}

    def save(tensor: Tensor, hook: Any) -> None:
        captured[hook.name] = tensor.detach()

    stop = stop_layer_for(list(hooks), model.cfg.n_layers)
    fwd_hooks: list[tuple[str, Any]] = []
    if batch is not None and batch.segment is not None and not batch.joined and batch.n_windows > batch.input_ids.shape[0]:
        fwd_hooks += _segment_hooks(model, batch.segment, batch.cell_offsets(), stop)
    fwd_hooks += [(name, save) for name in hooks]
    with torch.inference_mode(), forward_context(model.cfg.device, forward_dtype), model.hooks(fwd_hooks=fwd_hooks):
        # Right padding under a causal mask: real tokens never attend to the pads after them,
        # so no attention mask is needed (and none is passed: it would cost a masked softmax).
        model(input_ids.to(model.cfg.device), stop_at_layer=stop, return_type=None)
    return {name: captured[name] for name in hooks}


class ActivationBatch(NamedTuple):
    """Kept rows of one batch, flattened in token order (batch-major, then position)."""

    acts: dict[str, Float[Tensor, "rows d"]]  # per hook point
    token_ids: Int[Tensor, " rows"]
    doc_index: Int[Tensor, " rows"]
    position: Int[Tensor, " rows"]  # position in the document's tokens; -1 for a prepended BOS
    n_tokens_seen: int  # non-pad tokens in the batch, kept or not


def select_positions(keep: Bool[Tensor, "batch pos"], positions: str | Sequence[int],
                     batch: WindowBatch | None = None) -> Bool[Tensor, "batch pos"]:
    """Restrict a keep-mask to ``"all"``, ``"last"`` (last kept token per window) or listed window positions.

    Listed positions count from a window's first cell (a prepended BOS is position 0); negative
    ones from its last token. Without ``batch`` every row is one window as wide as the row.
    """
    if positions == "all":
        return keep
    if isinstance(positions, str) and positions != "last":
        raise ValueError(f"positions must be 'all', 'last' or a list of ints, got {positions!r}")
    rows, width = keep.shape
    if batch is None:
        windows = torch.arange(rows)[:, None].expand(rows, width)
        offsets = torch.arange(width).expand(rows, width)
        lengths = torch.full((rows,), width)
    else:
        windows, offsets, lengths = batch.cell_windows(), batch.cell_offsets(), batch.window_lengths()
    out = torch.zeros_like(keep)
    if positions == "last":
        flat = torch.arange(keep.numel()).view_as(keep)
        owner = windows[keep]
        last = torch.full((int(lengths.numel()),), -1).scatter_reduce(0, owner, flat[keep], "amax")
        out.view(-1)[last[last >= 0]] = True
        return out
    length = lengths[windows.clamp(min=0)]
    for p in positions:
        out |= offsets == (p if p >= 0 else length + p)
    return out & keep


def batch_activations(model: HookedTransformer, batch: WindowBatch, hooks: Sequence[str],
                      policy: TokenPolicy = TokenPolicy(), forward_dtype: str | torch.dtype = "float32",
                      positions: str | Sequence[int] = "all", batch_number: int = 0,
                      compile: bool = False, static_shape: tuple[int, int] | None = None) -> ActivationBatch:
    """Activations of one padded (or packed) batch at ``hooks``, kept rows only, on the model's device
    (``compile`` / ``static_shape``: :func:`run_to_hooks`)."""
    keep = select_positions(policy.keep_mask(batch.input_ids, batch.attention_mask, model.tokenizer), positions,
                            batch)
    acts = run_to_hooks(model, hooks, batch.input_ids, forward_dtype, batch, compile, static_shape)
    keep_dev = keep.to(model.cfg.device)
    rows: dict[str, Tensor] = {}
    for name, tensor in acts.items():
        kept = tensor[keep_dev]  # (rows, d)
        if not torch.isfinite(kept).all():
            raise FloatingPointError(f"non-finite activations at {name} in batch {batch_number} "
                                     f"(documents {batch.doc_index.tolist()}); check forward_dtype and the model")
        rows[name] = kept
    position = batch.token_positions()[keep]
    doc = batch.cell_doc_index()[keep]
    return ActivationBatch(rows, batch.input_ids[keep], doc, position, int(batch.attention_mask.sum()))


def iter_activation_batches(model: HookedTransformer, batches: Iterable[WindowBatch], hooks: Sequence[str],
                            policy: TokenPolicy = TokenPolicy(), forward_dtype: str | torch.dtype = "float32",
                            positions: str | Sequence[int] = "all", start_batch: int = 0,
                            compile: bool = False) -> Iterator[ActivationBatch]:
    """Yield :class:`ActivationBatch` for each batch of a loader (batches before ``start_batch`` skipped)."""
    for number, batch in enumerate(batches):
        if number < start_batch:
            continue
        if batch.input_ids.numel() == 0:
            continue
        yield batch_activations(model, batch, hooks, policy, forward_dtype, positions, number, compile)


class ActivationCapture:
    """Accumulate one hook point's activations across forward passes, for hand-written loops.

    ``register(model)`` adds a hook that appends the kept rows of every forward pass; set
    ``attention_mask`` (and ``input_ids``, for the special-token policy) before each pass with
    :meth:`set_batch`, else every position is kept. Use as a context manager to remove the hook.
    """

    def __init__(self, hook: str, policy: TokenPolicy = KEEP_ALL_BUT_PAD, to_cpu: bool = True) -> None:
        self.hook = hook
        self.policy = policy
        self.to_cpu = to_cpu
        self._captured: list[Tensor] = []
        self._batch: tuple[Tensor, Tensor] | None = None
        self._model: HookedTransformer | None = None

    def set_batch(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Tell the capture which rows of the next forward pass are real tokens."""
        self._batch = (input_ids, attention_mask)

    def _hook_fn(self, tensor: Tensor, hook: Any) -> None:
        if self._batch is None:
            rows = tensor.detach().reshape(-1, tensor.shape[-1])  # (batch*pos, d)
        else:
            assert self._model is not None
            if tuple(self._batch[1].shape) != tuple(tensor.shape[:2]):
                raise ValueError(f"set_batch was given a {tuple(self._batch[1].shape)} batch but the forward pass "
                                 f"has {tuple(tensor.shape[:2])}; call set_batch before every forward pass")
            keep = self.policy.keep_mask(*self._batch, self._model.tokenizer).to(tensor.device)
            rows = tensor.detach()[keep]
        self._captured.append(rows.cpu() if self.to_cpu else rows.clone())

    def register(self, model: HookedTransformer) -> ActivationCapture:
        """Start capturing on ``model`` (the hook point name is validated)."""
        validate_hook(model, self.hook)
        self._model = model
        model.add_hook(self.hook, self._hook_fn)
        return self

    def remove(self) -> None:
        """Remove the hook (the captured rows stay)."""
        if self._model is not None:
            hook_point = self._model.hook_dict[self.hook]
            for handle in [h for h in hook_point.fwd_hooks if h.user_hook == self._hook_fn]:
                handle.hook.remove()
                hook_point.fwd_hooks.remove(handle)
            self._model = None

    def get_captured(self) -> Float[Tensor, "rows d"]:
        """All rows captured so far, concatenated."""
        if not self._captured:
            return torch.empty(0)
        return torch.cat(self._captured)

    def clear_captured(self) -> None:
        """Forget the captured rows."""
        self._captured.clear()

    def __enter__(self) -> ActivationCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
