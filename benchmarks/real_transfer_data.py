"""Transfer data for a real model, offline: teacher samples, the essay haystack and retrieval tasks, in natural text.

    python benchmarks/real_transfer_data.py --model /tmp/smol --out smol_transfer.jsonl     # GPU: ~2 min for 2M tokens
    python benchmarks/real_transfer_data.py --model DIR --out data.jsonl --quick            # CPU: tiny sizes, seconds

Writes one ``.jsonl`` of documents, ``{"text": ..., "kind": ...}`` per line (``headscope.transfer.data``
reads ``text``; ``benchmarks/hybrid_quality.py --data OUT`` trains on it), mixed by token shares
(``--mix sampled=0.5,essay=0.2,tasks=0.3``, tokens counted with the model's tokenizer) up to ``--tokens``:

* ``sampled``: the teacher's own text: temperature / top-p samples (``--temperature``, ``--top-p``, up to
  ``--new-tokens`` tokens, batched generation with left padding, ``--batch`` prompts at a time, bf16 on
  CUDA) continuing varied prompts: the first sentences of an essay window in NATURAL wording,
  instruction-style questions (in the tokenizer's chat template when it has one, as an instruct model
  saw them), and open beginnings of ordinary text. A document is the prompt and its continuation up to
  the first end token (the eos ids and the special tokens other than bos);
* ``essay``: windows of the project's essay haystack in NATURAL wording (``headscope.probes.surface``),
  ``--min-words`` to ``--max-words`` words;
* ``tasks``: ``sample_task_text(name, rng, n_filler_words, surface=NATURAL)`` for the ``--tasks`` (default
  the retrieval tasks and ioi, the probes a small model solves), filler words log-uniform in
  [``--min-words``, ``--max-words``]; the document is the prompt, a space and the answer.

Documents are shuffled (seeded) so that the hash split and the packing mix the kinds. The sidecar
``OUT`` with suffix ``.mix.json`` records the settings, the mix asked for and obtained (tokens and
documents per kind, prompt kinds), the seconds and the start of one document per kind. Both files are
written atomically; a rerun with the same settings keeps them (a no-op), other settings need ``--force``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

KINDS = ("sampled", "essay", "tasks")
DEFAULT_TASKS = ("needle_single", "needle_multikey", "kv_recall", "induction", "ioi")
QUESTIONS = (
    "Explain how a {thing} works, step by step.",
    "Write a short story about {name}, who finds a {thing} near the {place}.",
    "What are the advantages and disadvantages of living close to a {place}?",
    "Describe a typical day at the {place}.",
    "Give me three tips for taking care of a {thing}.",
    "Why do people enjoy going to the {place}? Answer in a few paragraphs.",
    "Write a letter from {name} to a friend about a visit to the {place}.",
    "Summarise the history of the {thing} for a student.",
    "What is the difference between a {thing} and a {other}?",
    "Write a poem about a {animal} that lives near the {place}.",
    "How would you teach a child to use a {thing}?",
    "Plan a weekend trip to the {place} for {name} and {friend}.",
)
OPENINGS = (
    "The history of the {thing} begins", "In this article, we look at", "Once upon a time, {name}", "Dear {name},",
    "Here is a list of things to bring to the {place}:", "Many people believe that the {animal}", "Yesterday at the {place},",
    "The main reason why", "Chapter 1\n\n", "Step 1:", "Frequently asked questions about the {thing}\n\n", "{name} had never seen a",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="teacher: a Hugging Face directory or a .gguf file")
    p.add_argument("--out", required=True, help="output .jsonl (the sidecar is OUT with suffix .mix.json)")
    p.add_argument("--tokens", type=int, default=None, help="total tokens (default 2,000,000; --quick 3,000)")
    p.add_argument("--mix", default="sampled=0.5,essay=0.2,tasks=0.3", help="token shares KIND=SHARE of sampled, essay, tasks")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="task documents to write (headscope.probes task names)")
    p.add_argument("--min-words", type=int, default=None, help="shortest essay window / task filler (default 64; --quick 8)")
    p.add_argument("--max-words", type=int, default=None, help="longest essay window / task filler (default 1536; --quick 96)")
    p.add_argument("--new-tokens", type=int, default=None, help="longest teacher continuation (default 1024; --quick 24)")
    p.add_argument("--batch", type=int, default=None, help="prompts per generate call (default 384 on CUDA, 8 on the CPU)")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--force", action="store_true", help="overwrite an output made with other settings")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    sizes = dict(tokens=3000, min_words=8, max_words=96, new_tokens=24, batch=4) if args.quick else \
        dict(tokens=2_000_000, min_words=64, max_words=1536, new_tokens=1024, batch=384 if cuda else 8)
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.mix = {kind: float(share) for kind, _, share in (part.partition("=") for part in args.mix.split(","))}
    except ValueError:
        p.error(f"--mix {args.mix!r}: expected KIND=SHARE,... e.g. sampled=0.5,essay=0.2,tasks=0.3")
    if not set(args.mix) <= set(KINDS) or min(args.mix.values()) < 0 or not math.isclose(sum(args.mix.values()), 1.0, abs_tol=1e-6):
        p.error(f"--mix takes shares of {', '.join(KINDS)} that sum to 1, got {args.mix}")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.tokens < 1 or args.new_tokens < 1 or args.batch < 1 or not 1 <= args.min_words <= args.max_words:
        p.error("--tokens, --new-tokens, --batch must be positive and 1 <= --min-words <= --max-words")
    return args


def settings_of(args) -> dict:
    keys = ("model", "tokens", "mix", "tasks", "min_words", "max_words", "new_tokens", "temperature", "top_p", "seed")
    return {key: getattr(args, key) for key in keys}


# --- prompts and synthetic documents ---------------------------------------------------------------
def essay_sentences() -> list[str]:
    """The essay haystack's sentences in NATURAL wording."""
    from headscope.probes.haystack import haystack_sentences
    from headscope.probes.surface import NATURAL

    return [" ".join(NATURAL.sentence(tuple(s))) for s in haystack_sentences("essay")]


def essay_window(rng: random.Random, sentences: list[str], n_words: int) -> str:
    """Consecutive essay sentences from a random start, about ``n_words`` words (whole sentences)."""
    start, words, out = rng.randrange(len(sentences)), 0, []
    while words < n_words:
        sentence = sentences[(start + len(out)) % len(sentences)]
        out.append(sentence)
        words += len(sentence.split())
    return " ".join(out)


def sample_prompt(rng: random.Random, sentences: list[str], tokenizer) -> tuple[str, str]:
    """(prompt kind, prompt text): an essay opening, an instruction question or an ordinary text opening."""
    from headscope.probes import vocab

    slots = {"thing": rng.choice(vocab.KEYS), "other": rng.choice(vocab.OBJECTS), "place": rng.choice(vocab.PLACES),
             "name": rng.choice(vocab.NAMES).capitalize(), "friend": rng.choice(vocab.NAMES).capitalize(), "animal": rng.choice(vocab.WORD_VALUES)}
    kind = rng.choice(("essay", "question", "opening"))
    if kind == "essay":
        return kind, essay_window(rng, sentences, rng.randint(8, 40))
    if kind == "opening":
        return kind, rng.choice(OPENINGS).format(**slots)
    question = rng.choice(QUESTIONS).format(**slots)
    if getattr(tokenizer, "chat_template", None):
        return kind, tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return kind, f"Question: {question}\nAnswer:"


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def synthetic_documents(kind: str, target: int, args, rng: random.Random, count, sentences: list[str]) -> list[dict]:
    """Essay windows or task documents until ``target`` tokens (``count(text)`` tokens each)."""
    from headscope.probes import sample_task_text
    from headscope.probes.surface import NATURAL

    docs, tokens = [], 0
    while tokens < target:
        words = log_uniform(rng, args.min_words, args.max_words)
        if kind == "essay":
            doc = {"text": essay_window(rng, sentences, words), "kind": "essay"}
        else:
            task = args.tasks[len(docs) % len(args.tasks)]
            prompt, answer = sample_task_text(task, rng, words, surface=NATURAL)
            doc = {"text": f"{prompt} {answer}", "kind": "tasks", "task": task}
        doc["tokens"] = count(doc["text"])
        tokens += doc["tokens"]
        docs.append(doc)
    return docs


# --- teacher samples --------------------------------------------------------------------------------
def stop_ids(tokenizer, model) -> list[int]:
    """Tokens that end a document: the eos ids and every special token other than bos."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ends = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    ends |= set(tokenizer.all_special_ids) - ({tokenizer.bos_token_id} - ends)
    return sorted(i for i in ends if i is not None)


@torch.no_grad()
def sampled_documents(lm, target: int, args, rng: random.Random, count, sentences: list[str], log) -> list[dict]:
    """Teacher continuations of ``sample_prompt`` prompts, ``args.batch`` at a time, until ``target`` tokens."""
    from tqdm.auto import tqdm

    model, tokenizer = lm.model, lm.tokenizer
    tokenizer.padding_side = "left"
    ends = stop_ids(tokenizer, model)
    if tokenizer.pad_token_id is None:  # left padding needs a pad token; an end token is never attended to
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(ends[0])
    torch.manual_seed(args.seed)
    docs, tokens, started = [], 0, time.perf_counter()
    bar = tqdm(total=target, desc="teacher samples", unit="tok", disable=not sys.stderr.isatty())
    while tokens < target:
        prompts = [sample_prompt(rng, sentences, tokenizer) for _ in range(args.batch)]
        batch = tokenizer([text for _, text in prompts], return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        out = model.generate(**batch, do_sample=True, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens,
                             eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)  # (B, T_prompt + new)
        for (prompt_kind, text), row in zip(prompts, out[:, batch["input_ids"].shape[1]:].tolist()):
            cut = next((i for i, token in enumerate(row) if token in ends), len(row))
            doc = {"text": text + tokenizer.decode(row[:cut]), "kind": "sampled", "prompt": prompt_kind, "new_tokens": cut}
            doc["tokens"] = count(doc["text"])
            tokens += doc["tokens"]
            bar.update(doc["tokens"])
            docs.append(doc)
            if tokens >= target:
                break
        log(f"  teacher samples: {tokens:,} of {target:,} tokens, {len(docs)} documents, {time.perf_counter() - started:.0f} s")
    bar.close()
    return docs


# --- main ------------------------------------------------------------------------------------------------
def summary(docs: list[dict], args, seconds: dict) -> dict:
    total = sum(d["tokens"] for d in docs)
    obtained = {kind: {"tokens": sum(d["tokens"] for d in docs if d["kind"] == kind),
                       "documents": sum(d["kind"] == kind for d in docs)} for kind in KINDS}
    for kind in KINDS:
        obtained[kind]["share"] = obtained[kind]["tokens"] / total if total else 0.0
    prompts: dict[str, int] = {}
    tasks: dict[str, int] = {}
    for d in docs:
        if "prompt" in d:
            prompts[d["prompt"]] = prompts.get(d["prompt"], 0) + 1
        if "task" in d:
            tasks[d["task"]] = tasks.get(d["task"], 0) + 1
    sampled = [d for d in docs if d["kind"] == "sampled"]
    return {"schema": "headscope.real_transfer_data/1", "settings": settings_of(args), "tokens": total, "documents": len(docs),
            "mix_asked": args.mix, "mix_obtained": obtained, "prompt_kinds": prompts, "task_documents": tasks,
            "sampled_new_tokens_mean": sum(d["new_tokens"] for d in sampled) / len(sampled) if sampled else None,
            "surface": "natural", "seconds": seconds,
            "examples": {kind: next((d["text"][:400] for d in docs if d["kind"] == kind), None) for kind in KINDS}}


def main(argv=None) -> int:
    from headscope.heads import HeadscopeError, read_json, write_json_atomic, write_text_atomic
    from headscope.models import load_model
    from headscope.probes.tasks import get_task

    args = parse_args(argv)
    out = Path(args.out)
    sidecar = out.with_suffix(".mix.json")
    for task in args.tasks:
        get_task(task)
    if out.is_file() and sidecar.is_file():
        if read_json(sidecar, "mix")["settings"] == settings_of(args):
            print(f"{out} already holds this mix ({sidecar}); nothing to do")
            return 0
        if not args.force:
            raise HeadscopeError(f"{out} was made with other settings ({sidecar}); pass --force to overwrite it or choose another --out")
    log = lambda text: print(text, flush=True)  # noqa: E731
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    lm = load_model(args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    count = lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    sentences = essay_sentences()
    seconds = {"load": round(time.perf_counter() - started, 1)}
    docs = []
    for index, kind in enumerate(KINDS):
        target = int(round(args.mix.get(kind, 0.0) * args.tokens))
        if target == 0:
            continue
        rng = random.Random(args.seed * 1000 + index)
        begun = time.perf_counter()
        if kind == "sampled":
            docs += sampled_documents(lm, target, args, rng, count, sentences, log)
        else:
            docs += synthetic_documents(kind, target, args, rng, count, sentences)
        seconds[kind] = round(time.perf_counter() - begun, 1)
        log(f"{kind}: {sum(d['tokens'] for d in docs if d['kind'] == kind):,} tokens in {seconds[kind]} s")
    random.Random(args.seed).shuffle(docs)
    seconds["total"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    record = summary(docs, args, seconds)
    write_json_atomic(sidecar, record)
    shares = ", ".join(f"{k} {v['share']:.2f}" for k, v in record["mix_obtained"].items())
    log(f"wrote {out} ({record['tokens']:,} tokens, {len(docs)} documents; {shares}) and {sidecar} in {seconds['total']} s")
    return 0


if __name__ == "__main__":
    from headscope.cli import script_main

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    script_main(main)
