"""The ``activation`` scorer through nnsight, for models that live behind an nnsight ``LanguageModel``
(local, or remote via NDIF).

Same method and normalisation as ``headscope.patching.activation.activation_scores``: the per-head
attention output is the input of the attention output projection (``o_proj`` / ``c_proj``); each head of
a layer becomes one ``tracer.invoke`` of a single trace, so one forward patches all heads of a layer
(nnsight batches the invokes). The clean and corrupt runs are traced once to cache head outputs and the
baseline logit differences. nnsight compiles trace bodies from source, so this code must stay in a file.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from headscope.heads import HeadScores, HeadscopeError
from headscope.models import LoadedModel, arch_spec, weights_digest
from headscope.patching.common import MIN_GAP
from headscope.probes.base import Probe


def _envoy(root, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _out_proj_envoy(nn_model, spec, layer: int):
    return _envoy(_envoy(_envoy(nn_model, spec.layers)[layer], spec.attention), spec.out_proj)


def _last_logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return (logits[rows, answer] - logits[rows, wrong]).float()


def nnsight_activation_scores(nn_model, probe: Probe, *, noising: bool = False, progress: bool = True) -> HeadScores:
    """Total-effect activation patching of every head through an nnsight ``LanguageModel``.

    Args:
        nn_model: an nnsight ``LanguageModel`` (or ``TransformersModel``) wrapping a supported HF causal LM.
        probe: clean/corrupt prompt pairs.
        noising: patch corrupt into clean instead of clean into corrupt.
        progress: progress bar over layers.
    Returns:
        ``HeadScores`` ``(n_layers, n_heads)``, normalised as the native scorer.
    """
    hf_model = nn_model._module
    lm = LoadedModel(hf_model)
    spec = arch_spec(hf_model.config.model_type)
    fp = lm.fingerprint
    probe.check_fits(lm.max_context, getattr(hf_model.config, "vocab_size", None))
    tensors = probe.tensors(lm.device)
    answer, wrong = tensors["answer"], tensors["wrong"]
    unembed = _envoy(nn_model, spec.unembed)

    z_cache: dict[str, list] = {}
    baseline: dict[str, torch.Tensor] = {}
    for which in ("clean", "corrupt"):
        saved: list = []
        last_logits: list = []
        with torch.no_grad(), nn_model.trace(tensors[which]):
            for layer in range(fp.n_layers):
                saved.append(_out_proj_envoy(nn_model, spec, layer).input.save())
            last_logits.append(unembed.output[:, -1].save())
        z_cache[which] = saved
        baseline[which] = _last_logit_diff(last_logits[0], answer, wrong).mean()
    ld_clean, ld_corrupt = float(baseline["clean"]), float(baseline["corrupt"])
    if abs(ld_clean - ld_corrupt) < MIN_GAP:
        raise HeadscopeError(f"probe {probe.name}: clean and corrupt logit differences are equal; nothing to attribute")

    base_ids = tensors["clean" if noising else "corrupt"]
    source = z_cache["corrupt" if noising else "clean"]
    d = fp.head_dim
    values = torch.zeros(fp.n_layers, fp.n_heads)
    for layer in tqdm(range(fp.n_layers), desc=f"nnsight activation {probe.name}", disable=not progress):
        head_logits = []
        with torch.no_grad(), nn_model.trace() as tracer:
            for head in range(fp.n_heads):
                with tracer.invoke(base_ids):
                    z = _out_proj_envoy(nn_model, spec, layer).input
                    z[:, :, head * d : (head + 1) * d] = source[layer][:, :, head * d : (head + 1) * d]
                    head_logits.append(unembed.output[:, -1].save())
        for head, logits in enumerate(head_logits):
            values[layer, head] = _last_logit_diff(logits, answer, wrong).mean().cpu()
    scores = (ld_clean - values) / (ld_clean - ld_corrupt) if noising else (values - ld_corrupt) / (ld_clean - ld_corrupt)
    return HeadScores(
        values=scores,
        probe=probe.name,
        method="activation",
        fingerprint=fp,
        capability=probe.capability,
        meta={"backend": "nnsight", "n_pairs": len(probe), "length": probe.length, "weights_digest": weights_digest(lm.model),
              "direction": "noising" if noising else "denoising", "ld_clean": ld_clean, "ld_corrupt": ld_corrupt},
    )
