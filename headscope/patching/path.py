"""Path patching from sender heads into receiver heads' q/k/v inputs (Wang et al. 2022, the IOI paper).

For a receiver set ``R`` (heads, each with the inputs ``q``, ``k`` and/or ``v`` that count) the score of a
sender head ``S`` is the effect of ``S`` on the metric routed *only* through those receiver inputs:

1. Stage 1: run the base prompt with ``S`` patched (its clean output in the corrupt run when denoising)
   and every other attention head frozen to its base output; MLPs recompute. Recompute each receiver's
   output with its chosen inputs projected from this patched residual stream and its other inputs from
   the base run's (``attention(q_patched, k_base, v_base)`` for a ``:q`` receiver).
2. Stage 2: run the base prompt with only the receivers' outputs replaced by their stage-1 values;
   everything downstream of them recomputes and the logit difference is read.

The score is that logit difference, normalised as every other scorer (``common``). Conventions:

* A sender reaches only receivers in strictly later layers. Heads with no receiver after them (every
  head in the last receiver layer and beyond) are no senders and score exactly 0; ``meta["sender_layers"]``
  says how many leading layers hold senders.
* A receiver's output is set to its stage-1 value in stage 2, so the path ``S -> R1 -> R2`` between two
  receivers is not counted (each receiver sees ``S`` only through its own inputs).
* Receivers are recomputed by calling the model's own attention module with the base layer input and
  forward hooks that swap the chosen parts of the q/k/v projection outputs for the projections of the
  patched input. With grouped-query attention, swapping ``k`` or ``v`` changes the receiver's whole
  KV group, but only the receiver head's output is read, so nothing leaks into other query heads.

Fast and exact: stage 1 starts from the cached base residual at the sender layer and stops after the
last receiver layer, stage 2 starts from the cached residual at the first receiver layer, both compute
only the positions after the prefix the pair's prompts share (receivers are recomputed over the same
positions, against the same cached prefix keys/values), and senders x pairs of one layer share a batch. ``reference.path_reference`` is the slow twin (full
``model(ids)`` forwards, one sender at a time, receiver inputs swapped at the projection outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from headscope.heads import Head, HeadScores, HeadscopeError, ModelFingerprint
from headscope.models import LoadedModel
from headscope.patching.activation import _scan
from headscope.patching.batching import AdaptiveBatcher, default_batch_size, whole_units
from headscope.patching.common import ProbeRun, prepare
from headscope.patching.engine import PatchFn, head_view, hooked, overwrite_heads, replace_all_heads, then, write_heads
from headscope.patching.sharding import all_heads, map_heads, per_layer
from headscope.probes.base import Probe

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Receiver:
    """A receiver head and which of its inputs (``"q"``, ``"k"``, ``"v"``) the senders may reach."""

    head: Head
    inputs: frozenset[str] = frozenset(QKV)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", frozenset(self.inputs))
        if not self.inputs or not self.inputs <= set(QKV):
            raise HeadscopeError(f"receiver {self.head}: inputs must be a non-empty subset of q, k, v; got {sorted(self.inputs)}")

    def __str__(self) -> str:
        """``LAYER.HEAD`` plus ``:q``/``:k``/``:v``-style suffix unless all three inputs count."""
        text = f"{self.head.layer}.{self.head.head}"
        return text if self.inputs == frozenset(QKV) else f"{text}:{''.join(i for i in QKV if i in self.inputs)}"


def merge_receivers(receivers: list[Receiver]) -> list[Receiver]:
    """One receiver per head (inputs united), sorted by (layer, head)."""
    inputs: dict[Head, set[str]] = {}
    for receiver in receivers:
        inputs.setdefault(receiver.head, set()).update(receiver.inputs)
    return [Receiver(head, frozenset(chosen)) for head, chosen in sorted(inputs.items())]


def parse_receivers(text: str) -> list[Receiver]:
    """Parse ``"1.3:k,2.5"`` into receivers: comma-separated ``LAYER.HEAD`` with an optional ``:q``, ``:k``,
    ``:v`` (or a combination such as ``:qk``); no suffix means all three inputs. Repeated heads merge.

    Raises:
        HeadscopeError: empty text, a bad head, or an input letter other than q, k, v.
    """
    receivers = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise HeadscopeError(f"cannot parse receivers {text!r}: empty item; expected e.g. 1.3:k,2.5")
        head_text, _, inputs_text = item.partition(":")
        inputs = frozenset(inputs_text.strip().lower()) if inputs_text.strip() else frozenset(QKV)
        if not inputs <= set(QKV):
            raise HeadscopeError(f"cannot parse receiver {item!r}: inputs must be letters from q, k, v (e.g. 1.3:k)")
        receivers.append(Receiver(Head.parse(head_text), inputs))
    return merge_receivers(receivers)


def check_receivers(receivers: list[Receiver], fingerprint: ModelFingerprint) -> list[Receiver]:
    """Merge receivers and check them against the model. Raises ``HeadscopeError`` naming the bad one."""
    if not receivers:
        raise HeadscopeError("path patching needs at least one receiver head")
    for receiver in receivers:
        if not fingerprint.has_head(receiver.head):
            raise HeadscopeError(f"receiver {receiver} is outside the model ({fingerprint.n_layers} layers x {fingerprint.n_heads} heads)")
        if receiver.head.layer == 0:
            raise HeadscopeError(f"receiver {receiver} is in layer 0: no head sends into it")
    return merge_receivers(receivers)


def qkv_parts(lm: LoadedModel, layer: int) -> list[tuple[nn.Module, dict[str, slice]]]:
    """The q/k/v projections of ``layer`` and which output columns of each belong to q, k and v.

    Returns:
        ``[(projection, {input: column slice})]``: three projections owning all their columns, or one fused
        projection (GPT-2's ``c_attn``) whose output is ``[q (H*D) | k (KV*D) | v (KV*D)]``.
    """
    projections = lm.qkv_projs(layer)
    if len(projections) == 3:
        return [(proj, {name: slice(None)}) for proj, name in zip(projections, QKV)]
    fp = lm.fingerprint
    q, kv = fp.n_heads * fp.head_dim, fp.n_kv_heads * fp.head_dim
    return [(projections[0], {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)})]


@dataclass
class AttentionCall:
    """One call of an attention module: its input hidden states and the other arguments."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict

    @classmethod
    def from_hook(cls, args: tuple, kwargs: dict) -> "AttentionCall":
        if args:
            return cls(args[0], tuple(args[1:]), dict(kwargs))
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return cls(kwargs["hidden_states"], (), rest)

    def __call__(self, module: nn.Module, hidden: torch.Tensor):
        return module(hidden, *self.args, **self.kwargs)


def attention_calls(engine_run, layers: list[int], lm: LoadedModel) -> dict[int, AttentionCall]:
    """Run ``engine_run()`` and return the attention-module call of each of ``layers`` it made."""
    calls: dict[int, AttentionCall] = {}

    def grab(layer: int):
        def hook(module, args, kwargs):
            calls[layer] = AttentionCall.from_hook(args, kwargs)

        return hook

    with hooked([(lm.attention(layer), "pre_kwargs", grab(layer)) for layer in layers]):
        engine_run()
    return calls


def mixed_head_outputs(lm: LoadedModel, layer: int, call: AttentionCall, patched: torch.Tensor, inputs: frozenset[str]) -> torch.Tensor:
    """Every head's output of ``layer`` with the ``inputs`` projected from ``patched``, the rest from ``call.hidden``.

    Args:
        call: the base run's attention call (``call.hidden`` ``(B, T, d_model)``: the normed base input).
        patched: ``(B, T, d_model)`` the attention input of the patched run.
        inputs: which of q, k, v come from ``patched``.
    Returns:
        ``(B, T, H * D)`` per-head attention outputs (the output projection's input).
    """
    captured: list[torch.Tensor] = []

    def swap(parts: dict[str, slice]):
        chosen = [cols for name, cols in parts.items() if name in inputs]

        def hook(module, args, output):
            from_patched = module.forward(patched)  # .forward: no hooks, no recursion
            mixed = output.clone()
            for cols in chosen:
                mixed[..., cols] = from_patched[..., cols]
            return mixed

        return hook

    def grab(module, args):
        captured.append(args[0])

    registrations = [(lm.out_proj(layer), "pre", grab)]
    if inputs == frozenset(QKV):
        hidden = patched
    else:
        hidden = call.hidden
        registrations += [(proj, "post", swap(parts)) for proj, parts in qkv_parts(lm, layer) if inputs & parts.keys()]
    with hooked(registrations):
        call(lm.attention(layer), hidden)
    return captured[0]


def _sender_layer_effects(run: ProbeRun, layer: int, heads: torch.Tensor, receivers: list[Receiver], base_hidden: dict[int, torch.Tensor],
                          batcher: AdaptiveBatcher, bar) -> torch.Tensor:
    """Mean stage-2 logit difference for the sender heads ``heads`` ``(K,)`` of layer ``layer``; ``(K,)`` float32.

    Args:
        base_hidden: per receiver layer, the base run's attention input ``(N, T, d_model)``.
    """
    fp, engine = run.lm.fingerprint, run.engine
    n_pairs = run.n_pairs
    device = run.base_ids.device
    receiver_layers = sorted({r.head.layer for r in receivers})
    items = torch.arange(len(heads) * n_pairs, device=device)  # ordered (sender head, pair), pair fastest
    pair_of, head_of = items % n_pairs, heads.to(device)[items // n_pairs]

    def run_batch(rows: torch.Tensor, start: int) -> torch.Tensor:
        pairs, senders = pair_of[rows], head_of[rows]
        # Stage 1: sender patched, every other head frozen, up to the last receiver layer.
        freeze: dict[int, PatchFn] = {l: replace_all_heads(run.base.z[l][:, start:], pairs) for l in range(layer, receiver_layers[-1])}
        freeze[layer] = then(freeze[layer], overwrite_heads(run.source.z[layer][:, start:], pairs, senders, None, fp.n_heads))
        resid = run.base.resid_pre[layer][pairs, start:]  # (B, T - start, d_model)
        patched_calls = attention_calls(lambda: engine.run_layers(layer, receiver_layers[-1] + 1, resid, freeze, pairs, start), receiver_layers, run.lm)
        # Receivers' outputs with their chosen inputs from the patched stream; the base run's call has
        # the patched run's arguments (same rows and positions, the same cached prefix).
        stage2: dict[int, PatchFn] = {}
        for receiver_layer in receiver_layers:
            here = [r for r in receivers if r.head.layer == receiver_layer]
            patched_call = patched_calls[receiver_layer]
            base_call = AttentionCall(base_hidden[receiver_layer][pairs, start:], patched_call.args, patched_call.kwargs)
            outputs = []
            for inputs in sorted({r.inputs for r in here}, key=sorted):
                z = head_view(mixed_head_outputs(run.lm, receiver_layer, base_call, patched_call.hidden, inputs), fp.n_heads)
                outputs += [(r.head.head, z[:, :, r.head.head]) for r in here if r.inputs == inputs]
            heads = [h for h, _ in outputs]
            stage2[receiver_layer] = write_heads(torch.stack([v for _, v in outputs], dim=2), heads, fp.n_heads)  # (B, T - start, k, D)
        # Stage 2: base run with only the receivers' outputs replaced.
        first = receiver_layers[0]
        return engine.run_from(first, run.base.resid_pre[first][pairs, start:], pairs, stage2, start)

    patched = engine.run_items(batcher, pair_of, run_batch, whole_units(bar, n_pairs))
    return patched.view(len(heads), n_pairs).mean(-1)


def default_receivers(run: ProbeRun, n_receivers: int, batch_size: int | None, progress: bool) -> list[Receiver]:
    """The ``n_receivers`` heads of largest |direct score| outside layer 0, all inputs."""
    direct = _scan(run, positions=False, freeze_later=True, batch_size=batch_size, progress=progress, desc=f"direct {run.probe.name} (receivers)")
    direct[0] = 0.0
    flat = torch.argsort(direct.abs().flatten(), descending=True, stable=True)[:n_receivers]
    n_heads = run.lm.fingerprint.n_heads
    return merge_receivers([Receiver(Head(int(i) // n_heads, int(i) % n_heads)) for i in flat])


@torch.no_grad()
def path_scores(
    lm: LoadedModel,
    probe: Probe,
    *,
    receivers: list[Receiver] | None = None,
    n_receivers: int = 4,
    noising: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
) -> HeadScores:
    """Path-patching score of every sender head into ``receivers``.

    Args:
        lm: the model (any attention implementation).
        probe: clean/corrupt prompt pairs.
        receivers: receiver heads and their inputs; default: the ``n_receivers`` heads with the largest
            |direct score| on ``probe`` outside layer 0, all of q, k, v.
        n_receivers: how many default receivers.
        noising, batch_size, progress: as ``activation_scores``.
    Returns:
        ``HeadScores`` ``(n_layers, n_heads)``; 0 for heads in or after the last receiver layer.
        ``meta["receivers"]`` lists the receivers as ``parse_receivers`` reads them.
    """
    fp = lm.fingerprint
    run = prepare(lm, probe, noising)
    if receivers is None:
        if n_receivers < 1:
            raise HeadscopeError(f"n_receivers must be at least 1, got {n_receivers}")
        receivers = default_receivers(run, n_receivers, batch_size, progress)
        chosen_by = f"top-{n_receivers} |direct| outside layer 0"
    else:
        chosen_by = "given"
    receivers = check_receivers(list(receivers), fp)
    last_receiver_layer = max(r.head.layer for r in receivers)
    receiver_layers = sorted({r.head.layer for r in receivers})
    base_calls = attention_calls(
        lambda: [run.engine.run_layers(l, l + 1, run.base.resid_pre[l], {}) for l in receiver_layers], receiver_layers, lm
    )
    base_hidden = {l: call.hidden for l, call in base_calls.items()}
    batcher = AdaptiveBatcher(batch_size or default_batch_size(lm, probe.length))

    def effects(senders: list[Head]) -> torch.Tensor:  # (len(senders),)
        with tqdm(total=len(senders), desc=f"path {probe.name}", unit="head", disable=not progress) as bar:
            return per_layer(senders, lambda layer, heads: _sender_layer_effects(
                run, layer, heads, [r for r in receivers if r.head.layer > layer], base_hidden, batcher, bar))

    def cost(sender: Head) -> float:  # stage 1 up to the last receiver layer, stage 2 from the first receiver after it
        first = min(l for l in receiver_layers if l > sender.layer)
        return float(last_receiver_layer + 1 - sender.layer + fp.n_layers - first)

    means = torch.full((fp.n_layers, fp.n_heads), float(run.base.metric.mean()))
    means[:last_receiver_layer] = map_heads(all_heads(fp, last_receiver_layer), effects, cost).view(last_receiver_layer, fp.n_heads)
    values = run.normalise(means)
    values[last_receiver_layer:] = 0.0
    return run.to_scores(values, "path", receivers=[str(r) for r in receivers], receivers_chosen_by=chosen_by, sender_layers=last_receiver_layer)
