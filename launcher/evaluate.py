"""``tgi-npu-eval``: multiple-choice accuracy by log-likelihood through TGI's HTTP API.

Each line of a JSONL file is one question::

    {"question": "...", "choices": ["...", "..."], "answer": 1, "subject": "...", "passage": "..."}

``answer`` is the index of the right choice, its letter (``"B"``) or its text; ``subject`` and
``passage`` (BoolQ's context) are optional. Every choice is scored as the summed log-probability
of its continuation tokens after the prompt, read from ``/generate`` with
``decoder_input_details`` (the prompt logprobs the shard computes); the prediction is the best
choice (``acc``), or the best per continuation character (``acc_norm``, as lm-evaluation-harness).

Scoring styles (``--style``):

* ``letters`` (MMLU, CEval): the prompt lists the choices as ``A. ...``; continuations are
  `` A``, `` B``, ...
* ``choices`` (BoolQ and other cloze sets): ``passage\\nQuestion: question?\\nAnswer:``;
  continuations are `` choice`` (e.g. `` no`` / `` yes``).

The continuation's tokens are the last ``len(tokenize(prompt + continuation)) -
len(tokenize(prompt))`` prompt tokens (``/tokenize``), so a truncated prompt still scores right.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import string
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

LETTERS = string.ascii_uppercase


@dataclass
class Item:
    question: str
    choices: list[str]
    answer: int
    subject: str
    passage: str = ""


@dataclass
class Scored:
    item: Item
    logprobs: list[float] = field(default_factory=list)  # per choice: summed continuation logprob
    lengths: list[int] = field(default_factory=list)  # per choice: continuation characters
    tokens: list[int] = field(default_factory=list)  # per choice: continuation tokens

    @property
    def pred(self) -> int:
        return max(range(len(self.logprobs)), key=lambda i: self.logprobs[i])

    @property
    def pred_norm(self) -> int:
        return max(range(len(self.logprobs)), key=lambda i: self.logprobs[i] / max(self.lengths[i], 1))


def load_items(path: Path, limit: int | None = None) -> list[Item]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        choices = [str(c) for c in row["choices"]]
        answer = row["answer"]
        if isinstance(answer, bool):  # BoolQ: choices ["no", "yes"]
            answer = int(answer)
        elif isinstance(answer, str):
            if answer in choices:
                answer = choices.index(answer)
            elif len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
                answer = LETTERS.index(answer.upper())
            else:
                raise ValueError(f"{path}:{n}: answer {answer!r} is neither a choice nor its letter")
        if not 0 <= int(answer) < len(choices) or len(choices) < 2:
            raise ValueError(f"{path}:{n}: answer {answer} must index one of >= 2 choices")
        items.append(
            Item(
                question=str(row["question"]),
                choices=choices,
                answer=int(answer),
                subject=str(row.get("subject") or path.stem),
                passage=str(row.get("passage") or row.get("context") or ""),
            )
        )
        if limit is not None and len(items) >= limit:
            break
    return items


def prompt_and_continuations(item: Item, style: str) -> tuple[str, list[str]]:
    context = f"{item.passage}\n" if item.passage else ""
    if style == "letters":
        subject = item.subject.replace("_", " ")
        lines = [f"The following is a multiple choice question about {subject}.", "", context + item.question]
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
        return "\n".join(lines) + "\nAnswer:", [f" {LETTERS[i]}" for i in range(len(item.choices))]
    question = item.question.rstrip("?")
    return f"{context}Question: {question}?\nAnswer:", [f" {c}" for c in item.choices]


class Client:
    def __init__(self, session: aiohttp.ClientSession, url: str, add_special_tokens: bool):
        self.session = session
        self.url = url.rstrip("/")
        self.add_special_tokens = add_special_tokens
        self.prompt_tokens = 0

    async def _post(self, path: str, body: dict):
        async with self.session.post(self.url + path, json=body) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"POST {path} answered {resp.status}: {data}")
            return data

    async def num_tokens(self, text: str) -> int:
        body = {"inputs": text, "add_special_tokens": self.add_special_tokens}
        return len(await self._post("/tokenize", body))

    async def prompt_logprobs(self, text: str) -> list[float]:
        """Logprob of every prompt token given the ones before (the first: NaN)."""
        body = {
            "inputs": text,
            "add_special_tokens": self.add_special_tokens,
            "parameters": {"max_new_tokens": 1, "decoder_input_details": True, "details": True},
        }
        data = await self._post("/generate", body)
        prefill = data["details"]["prefill"]
        self.prompt_tokens += len(prefill)
        return [math.nan if t["logprob"] is None else float(t["logprob"]) for t in prefill]

    async def score(self, item: Item, style: str) -> Scored:
        prompt, continuations = prompt_and_continuations(item, style)
        scored = Scored(item)
        n_prompt = await self.num_tokens(prompt)
        for cont in continuations:
            full = prompt + cont
            n = await self.num_tokens(full) - n_prompt
            if n < 1:
                raise RuntimeError(f"continuation {cont!r} adds no token to the prompt")
            logprobs = await self.prompt_logprobs(full)
            scored.logprobs.append(sum(logprobs[-n:]))
            scored.lengths.append(len(cont))
            scored.tokens.append(n)
        return scored


async def evaluate(url: str, items: list[Item], style: str, concurrency: int,
                   add_special_tokens: bool = True, progress: bool = True) -> tuple[list[Scored], dict]:
    from tqdm import tqdm

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = Client(session, url, add_special_tokens)
        gate = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(items), desc="tgi-npu-eval", file=sys.stderr, disable=not progress)

        async def one(item: Item) -> Scored:
            async with gate:
                result = await client.score(item, style)
                bar.update(1)
                return result

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in items))
        elapsed = time.perf_counter() - start
        bar.close()
    requests = sum(len(i.choices) for i in items)
    stats = {"seconds": elapsed, "requests": requests, "requests_per_s": requests / elapsed,
             "prompt_tokens_per_s": client.prompt_tokens / elapsed}
    return list(results), stats


def summary(results: list[Scored]) -> dict:
    by_subject: dict[str, list[Scored]] = defaultdict(list)
    for r in results:
        by_subject[r.item.subject].append(r)

    def acc(rs: list[Scored]) -> dict:
        n = len(rs)
        return {"n": n, "acc": sum(r.pred == r.item.answer for r in rs) / n,
                "acc_norm": sum(r.pred_norm == r.item.answer for r in rs) / n}

    return {"all": acc(results), "subjects": {s: acc(rs) for s, rs in sorted(by_subject.items())}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tgi-npu-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, nargs="+", help="JSONL files (question, choices, answer[, subject, passage])")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="TGI-compatible HTTP server")
    p.add_argument("--style", choices=["letters", "choices"], default="letters")
    p.add_argument("--limit", type=int, default=None, help="questions per file")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--no-special-tokens", action="store_true", help="tokenize without BOS etc.")
    p.add_argument("--output", type=Path, default=None, help="write scores and accuracy as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    items = [i for path in args.data for i in load_items(path, args.limit)]
    results, stats = asyncio.run(
        evaluate(args.url, items, args.style, args.concurrency, not args.no_special_tokens,
                 progress=not args.no_progress)
    )
    acc = summary(results)
    print(f"{len(items)} questions, style {args.style}: acc {acc['all']['acc']:.4f}, "
          f"acc_norm {acc['all']['acc_norm']:.4f}")
    print("| subject | n | acc | acc_norm |\n|---|---|---|---|")
    for s, a in acc["subjects"].items():
        print(f"| {s} | {a['n']} | {a['acc']:.4f} | {a['acc_norm']:.4f} |")
    print(f"throughput: {stats['requests_per_s']:.2f} scoring requests/s, "
          f"{stats['prompt_tokens_per_s']:.1f} prompt tokens/s ({stats['seconds']:.1f} s)")
    if args.output:
        args.output.write_text(json.dumps({
            "accuracy": acc, "throughput": stats, "style": args.style,
            "items": [{"subject": r.item.subject, "answer": r.item.answer, "pred": r.pred,
                       "pred_norm": r.pred_norm, "logprobs": r.logprobs, "tokens": r.tokens}
                      for r in results],
        }, indent=1))


if __name__ == "__main__":
    main()
