"""Model-level training objectives of the three stages, and which parameters each stage trains.

Stage 1 (``align``) compares each decoder layer's output ``H^(l)`` of the student (the hybrid) with the
teacher's. Both models' layer outputs are read with forward hooks on their decoder layers. Two input
modes (``stages[i].align_inputs``):

* ``teacher`` (default, teacher forcing): a forward pre-hook replaces the *input* of student layer ``l``
  with the teacher's input to layer ``l`` (detached). Every student layer then sees exactly the teacher's
  residual stream, the loss of layer ``l`` trains only layer ``l``'s attention, and errors of earlier
  layers do not compound (layer-local alignment, the reading of the paper's "layer-wise alignment").
* ``student`` (end-to-end): the student runs on its own hidden states; the loss of layer ``l`` also
  trains the attention of layers ``< l``.

Stage 2 (``distill``) adds KL to the teacher's logits and cross-entropy; stage 3 (``long_context``) is
next-token cross-entropy alone. Every objective returns the loss, a dict of float parts for the log,
and the student's logits when asked (held-out evaluation reports the student's cross-entropy in every
stage).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from headscope.heads import HeadscopeError
from headscope.models import ARCHITECTURES, takes_logits_to_keep
from headscope.transfer.losses import distillation_kl, layer_alignment_loss, next_token_loss


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (FSDP2 shards in place; nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (a table architecture, or any ``model.model.layers``)."""
    model = unwrap(model)
    spec = ARCHITECTURES.get(getattr(model.config, "model_type", ""))
    path = spec.layers if spec is not None else "model.layers"
    found: object = model
    for part in path.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, nn.ModuleList):
        raise HeadscopeError(f"cannot find the decoder layers of {type(model).__name__} at '{path}'")
    return found


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer (``self_attn``, or ``attn`` for GPT-2)."""
    modules = []
    for index, layer in enumerate(decoder_layers(model)):
        module = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        if module is None:
            raise HeadscopeError(f"decoder layer {index} of {type(unwrap(model)).__name__} has no self_attn/attn module")
        modules.append(module)
    return modules


def set_trainable(model: nn.Module, which: str) -> int:
    """Freeze all parameters but ``which`` ("attention": the attention modules; "all": everything).

    Returns:
        The number of trainable parameter elements.
    """
    model = unwrap(model)
    if which == "all":
        model.requires_grad_(True)
    elif which == "attention":
        model.requires_grad_(False)
        for module in attention_modules(model):
            module.requires_grad_(True)
    else:
        raise HeadscopeError(f"unknown trainable set {which!r} (use 'attention' or 'all')")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def layer_io(model: nn.Module, replace_inputs: list[torch.Tensor] | None = None) -> Iterator[tuple[list, list]]:
    """Record every decoder layer's input and output hidden states during the forwards inside the block.

    Args:
        model: a causal LM (or its DDP wrapper).
        replace_inputs: per layer, a ``(B, T, d)`` tensor fed to that layer *instead of* its own input
            (teacher forcing); None keeps the model's own inputs.
    Yields:
        ``(inputs, outputs)``: lists filled with one ``(B, T, d)`` tensor per layer, in layer order.
    """
    layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    handles = []

    def pre_hook(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if replace_inputs is not None:
                hidden = replace_inputs[index].to(hidden.dtype)
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs = dict(kwargs, hidden_states=hidden)
            inputs.append(hidden)
            return args, kwargs

        return hook

    def post_hook(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook))
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


def _forward_kwargs(model: nn.Module, keep_logits: bool) -> dict:
    """``use_cache=False``, plus ``logits_to_keep=1`` when logits are not needed and the model supports it."""
    kwargs: dict = {"use_cache": False}
    if not keep_logits and takes_logits_to_keep(unwrap(model)):
        kwargs["logits_to_keep"] = 1
    return kwargs


@dataclass
class ObjectiveOutput:
    """One forward of an objective: the scalar ``loss``, float ``parts`` for the log, optional logits."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # (B, T, V) student logits when asked for
    layer_mse: torch.Tensor | None = None  # (L,) per-layer alignment error (align only)


class AlignObjective:
    """Stage 1: ``sum_l mean (H_teacher^(l) - H_student^(l))^2`` with teacher-forced or own inputs."""

    uses_teacher = True

    def __init__(self, align_inputs: str = "teacher", normalize: bool = False) -> None:
        if align_inputs not in ("teacher", "student"):
            raise HeadscopeError(f"align_inputs must be 'teacher' or 'student', got {align_inputs!r}")
        self.teacher_forced = align_inputs == "teacher"
        self.normalize = normalize

    def __call__(self, student: nn.Module, teacher: nn.Module, ids: torch.Tensor, need_logits: bool = False) -> ObjectiveOutput:
        with torch.no_grad(), layer_io(teacher) as (teacher_in, teacher_out):
            teacher(input_ids=ids, **_forward_kwargs(teacher, keep_logits=False))
        if len(teacher_out) != len(decoder_layers(student)):
            raise HeadscopeError(f"teacher has {len(teacher_out)} layers, student {len(decoder_layers(student))}")
        replace = [h.detach() for h in teacher_in] if self.teacher_forced else None
        with layer_io(student, replace_inputs=replace) as (_, student_out):
            result = student(input_ids=ids, **_forward_kwargs(student, keep_logits=need_logits and not self.teacher_forced))
        loss, per_layer = layer_alignment_loss(student_out, teacher_out, self.normalize)
        logits = None
        if need_logits:  # the student's own: a teacher-forced forward ends in the teacher's stream plus one student layer
            logits = student(input_ids=ids, **_forward_kwargs(student, keep_logits=True)).logits if self.teacher_forced else result.logits
        return ObjectiveOutput(loss, {"align": loss.detach()}, logits, per_layer)


class DistillObjective:
    """Stage 2: ``kl_weight * T^2 KL(teacher || student) + ce_weight * CE``."""

    uses_teacher = True

    def __init__(self, temperature: float = 1.0, kl_weight: float = 1.0, ce_weight: float = 0.0) -> None:
        self.temperature, self.kl_weight, self.ce_weight = temperature, kl_weight, ce_weight

    def __call__(self, student: nn.Module, teacher: nn.Module, ids: torch.Tensor, need_logits: bool = False) -> ObjectiveOutput:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
        logits = student(input_ids=ids, use_cache=False).logits  # (B, T, V)
        kl = distillation_kl(logits, teacher_logits, self.temperature)
        ce = next_token_loss(logits, ids)
        loss = self.kl_weight * kl + self.ce_weight * ce
        return ObjectiveOutput(loss, {"kl": kl.detach(), "ce": ce.detach()}, logits if need_logits else None)


class NextTokenObjective:
    """Stage 3: next-token cross-entropy (the teacher is not used)."""

    uses_teacher = False

    def __call__(self, student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, need_logits: bool = False) -> ObjectiveOutput:
        logits = student(input_ids=ids, use_cache=False).logits  # (B, T, V)
        ce = next_token_loss(logits, ids)
        return ObjectiveOutput(ce, {"ce": ce.detach()}, logits if need_logits else None)


def make_objective(stage) -> AlignObjective | DistillObjective | NextTokenObjective:
    """The objective of a ``StageConfig``."""
    if stage.kind == "align":
        return AlignObjective(stage.align_inputs, stage.align_normalize)
    if stage.kind == "distill":
        return DistillObjective(stage.temperature, stage.kl_weight, stage.ce_weight)
    if stage.kind == "long_context":
        return NextTokenObjective()
    raise HeadscopeError(f"unknown stage kind {stage.kind!r}")
