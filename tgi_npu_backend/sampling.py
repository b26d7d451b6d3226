"""Next-token choice for a batch of requests with heterogeneous parameters (TGI's token chooser).

Follows TGI's ``HeterogeneousNextTokenChooser`` (``server/text_generation_server/utils/tokens.py``,
``logits_process.py``, ``watermark.py``): watermark -> repetition penalty -> frequency penalty ->
grammar mask -> warpers (temperature, top-k, top-p, typical-p) -> choice, and returns
``log_softmax`` of the *warped* scores as TGI does (for a grammar request: of the masked
scores, so forbidden tokens have logprob ``-inf``). Everything is batched over the vocabulary; the only loops are over
requests that need their own random generator (sampling rows, watermark rows). The reductions over
the vocabulary (argmax, ``log_softmax``) and what the generator reads of the result (the chosen
tokens' logprobs, the top-n) are in ``logprobs.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor

from . import warpers
from .grammar import GrammarMasks, GrammarState
from .logprobs import greedy

# NOTE: TGI utils/watermark.py: "a large prime number to create a rng seed with sufficient bit
# width".
WATERMARK_HASH_KEY = 15485863


@dataclass(frozen=True)
class SamplingParams:
    """One request's ``NextTokenChooserParameters`` as plain Python values.

    The defaults are what TGI's router sends when a request sets nothing: greedy decoding, no
    penalties, no watermark (the router always sends a seed; 0 here).
    """

    temperature: float = 1.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # 1.0 = disabled
    typical_p: float = 1.0  # 1.0 = disabled
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0  # 1.0 = disabled
    frequency_penalty: float = 0.0  # 0.0 = disabled
    watermark: bool = False

    @property
    def is_sampling(self) -> bool:
        """TGI's rule: any active warper switches a request from greedy to sampling."""
        return (
            self.do_sample
            or self.temperature != 1.0
            or self.top_k != 0
            or self.top_p < 1.0
            or self.typical_p < 1.0
        )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the parameter when a value is impossible."""
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (1.0 disables it)")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k} (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p} (1.0 disables it)")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p} (1.0 disables it)")
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty} (1.0 disables it)"
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty} "
                "(0 disables it)"
            )
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an unsigned 64-bit integer, got {self.seed}")


def _seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _clone_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A new generator in the same state: the clone continues the same random stream."""
    if generator is None:
        return None
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


class TokenChooser:
    """Chooses the next token of every request in a batch, each request with its own parameters.

    Each sampling request owns a ``torch.Generator`` seeded with its ``seed`` and consumed exactly
    once per step (one ``Exponential(1)`` draw over the vocabulary), so a request's token stream
    depends only on its own seed and logits: not on its batch neighbours, its row, or on
    ``filter``/``concatenate`` (which carry the generator *state*, never reseed).

    NOTE: as in TGI, the generators live on the model's device and the ``[sampling rows, vocab]``
    noise is drawn there: drawing ``S x V`` values on the host every step (V = 250k for BLOOM)
    would cost more than an NPU decode step. A seed therefore reproduces its tokens on one kind
    of device, not across CPU and NPU. Watermark permutations are drawn on the CPU (one
    ``randperm`` per watermarked row, seeded by the previous token, as TGI's green lists).
    """

    def __init__(
        self,
        params: list[SamplingParams],
        device: torch.device | str = "cpu",
        watermark_gamma: float = 0.5,
        watermark_delta: float = 2.0,
        *,
        generators: list[torch.Generator | None] | None = None,
        grammars: list[GrammarState | None] | None = None,
    ) -> None:
        if not params:
            raise ValueError("TokenChooser needs the SamplingParams of at least one request")
        for i, p in enumerate(params):
            try:
                p.validate()
            except ValueError as e:
                raise ValueError(f"request {i} of the batch: {e}") from None
        if not 0 < watermark_gamma <= 1:
            raise ValueError(f"watermark gamma must be in (0, 1], got {watermark_gamma}")
        if generators is None:
            generators = [_seeded_generator(p.seed, device) if p.is_sampling else None for p in params]
        if len(generators) != len(params) or any(
            (g is None) == p.is_sampling for g, p in zip(generators, params)
        ):
            raise ValueError("generators must hold one generator per sampling request, else None")
        if grammars is None:
            grammars = [None] * len(params)
        if len(grammars) != len(params):
            raise ValueError("grammars must hold one GrammarState or None per request")
        self.params = list(params)
        self.grammars = list(grammars)
        self.device = torch.device(device)
        self.watermark_gamma = watermark_gamma
        self.watermark_delta = watermark_delta
        self.generators = generators

        def column(values: list, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device).unsqueeze(1)  # [B, 1]

        self._temperature = column([p.temperature for p in params])
        self._top_k = column([p.top_k for p in params], torch.int64)
        self._top_k_on = column([p.top_k != 0 for p in params], torch.bool)
        # NOTE: 1 - top_p in float64 first, then float32: what HF's TopPLogitsWarper compares with.
        self._top_p_opposite = column([1.0 - p.top_p for p in params])
        self._top_p_on = column([p.top_p < 1.0 for p in params], torch.bool)
        self._typical_p = column([p.typical_p for p in params])
        self._typical_on = column([p.typical_p < 1.0 for p in params], torch.bool)
        self._repetition = column([p.repetition_penalty for p in params])
        self._frequency = column([p.frequency_penalty for p in params])
        self._sampling_rows = [i for i, p in enumerate(params) if p.is_sampling]
        self._sampling_index = torch.tensor(
            self._sampling_rows, dtype=torch.int64, device=self.device
        )
        # Which processors any row uses, decided once per batch (not once per step).
        self._watermark = any(p.watermark for p in params)
        self._repetition_on = any(p.repetition_penalty != 1.0 for p in params)
        self._frequency_on = any(p.frequency_penalty != 0.0 for p in params)
        self._temperature_on = any(p.temperature != 1.0 for p in params)
        self._max_top_k = max(p.top_k for p in params)
        self._top_p_any = any(p.top_p < 1.0 for p in params)
        self._typical_any = any(p.typical_p < 1.0 for p in params)
        # Requests with a grammar: their rows masked in one batched op; none: no mask code runs.
        grammar_rows = [i for i, g in enumerate(grammars) if g is not None]
        self._masks = (
            GrammarMasks(grammar_rows, [grammars[i] for i in grammar_rows], self.device)
            if grammar_rows else None
        )
        # The repetition/frequency penalties and the watermark read each request's tokens.
        self.uses_history = self._watermark or self._repetition_on or self._frequency_on
        # Greedy with nothing to apply: argmax and log_softmax of the logits, nothing else.
        self._plain_greedy = not (self._sampling_rows or self.uses_history)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def seeds(self) -> list[int]:
        return [p.seed for p in self.params]

    def __call__(
        self, logits: Tensor, input_ids: list[list[int]] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Choose one token per request.

        ``logits``: ``[B, V]`` (cast to float32); ``input_ids``: per request, the full sequence so
        far (prompt + generated), read only when ``uses_history`` (else it may be None). Returns
        ``next_ids: [B] int64`` and ``logprobs: [B, V] float32`` = ``log_softmax`` of the warped
        scores (TGI's returned logprobs).
        """
        batch, vocab = logits.shape
        if input_ids is None and self.uses_history:
            raise ValueError(
                "this batch has a repetition or frequency penalty or a watermark, which read each "
                "request's tokens: pass input_ids"
            )
        if batch != len(self.params) or (input_ids is not None and len(input_ids) != batch):
            raise ValueError(
                f"TokenChooser holds {len(self.params)} requests but got logits for {batch} and "
                f"input_ids for {'no' if input_ids is None else len(input_ids)}: "
                "filter/concatenate the chooser with the batch"
            )
        # [B, V]; every step below is out of place: the caller's logits are never modified.
        scores = logits.to(device=self.device, dtype=torch.float32)
        if self._masks is not None:
            # NOTE: TGI masks after the penalties; masking first gives the same scores (a -inf
            # logit stays -inf under +delta, *penalty, /penalty and -frequency) and lets the
            # all-greedy path below serve grammar requests too.
            scores = self._masks(scores)
        if self._plain_greedy:  # the all-greedy fast path: no processor, no warper applies
            return greedy(scores)
        if self._watermark:
            scores = scores + self.watermark_delta * self._green_mask(input_ids, vocab)
        if self._repetition_on or self._frequency_on:
            counts, lengths = self._token_counts(input_ids, vocab)  # [B, V], [B, 1]
            if self._repetition_on:
                # TGI/HF: a token already in the sequence: logit < 0 -> * penalty, else / penalty.
                penalised = torch.where(
                    scores < 0, scores * self._repetition, scores / self._repetition
                )
                scores = torch.where(counts > 0, penalised, scores)
            if self._frequency_on:
                # TGI HeterogeneousFrequencyPenaltyLogitsProcessor (utils/logits_process.py):
                # logit -= penalty * count / len. NOTE: TGI counts over the batch's padded
                # [B, max_len] tensor (len = the batch's width, padding counted as token 0); we
                # use each row's own sequence, so a request's result does not depend on its batch.
                scores = scores - counts / lengths * self._frequency
        scores = self._warp(scores)
        greedy_ids, logprobs = greedy(scores)  # [B], [B, V]: one pass for both where it is native
        return self._choose(scores, greedy_ids), logprobs

    def _green_mask(self, input_ids: list[list[int]], vocab: int) -> Tensor:
        """``[B, V]`` float: 1 on each watermarked row's green list (TGI utils/watermark.py: the
        first ``int(V * gamma)`` of ``randperm(V)`` seeded with ``15485863 * previous token``).
        NOTE: the row's real last token; TGI reads the last column of a padded tensor."""
        mask = torch.zeros(len(self.params), vocab)  # [B, V] on CPU, see the class NOTE
        green_size = int(vocab * self.watermark_gamma)
        for i, p in enumerate(self.params):
            if not p.watermark:
                continue
            if not input_ids[i]:
                raise ValueError(f"request {i}: the watermark needs at least one previous token")
            rng = _seeded_generator(WATERMARK_HASH_KEY * input_ids[i][-1])
            mask[i, torch.randperm(vocab, generator=rng)[:green_size]] = 1.0
        return mask.to(self.device)

    def _token_counts(self, input_ids: list[list[int]], vocab: int) -> tuple[Tensor, Tensor]:
        """How often each token occurs in each sequence (``[B, V]`` float32) and the sequence
        lengths (``[B, 1]``). One scatter-add on the device; nothing is padded, so no padding token
        is ever counted (ids outside ``[0, V)`` land in an extra column that is dropped)."""
        batch = len(input_ids)
        lengths = [len(ids) for ids in input_ids]
        flat = torch.tensor(list(chain.from_iterable(input_ids)), dtype=torch.int64)  # [sum(L)]
        rows = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths))  # [sum(L)]
        flat = torch.where((flat < 0) | (flat >= vocab), vocab, flat)
        index = (rows * (vocab + 1) + flat).to(self.device)  # [sum(L)] into a [B, V + 1] view
        counts = torch.zeros(batch * (vocab + 1), device=self.device)
        counts.scatter_add_(0, index, torch.ones(index.shape, device=self.device))
        counts = counts.view(batch, vocab + 1)[:, :vocab]  # [B, V]
        length = torch.tensor(lengths, dtype=torch.float32, device=self.device).clamp(min=1)
        return counts, length.unsqueeze(1)  # [B, V], [B, 1]

    def _warp(self, scores: Tensor) -> Tensor:
        """Temperature, top-k, top-p, typical-p; each only on the rows that set it."""
        if self._temperature_on:
            scores = scores / self._temperature
        if self._max_top_k:
            scores = warpers.top_k(scores, self._top_k, self._top_k_on, self._max_top_k)
        if self._top_p_any:
            scores = warpers.top_p(scores, self._top_p_opposite, self._top_p_on)
        if self._typical_any:
            scores = warpers.typical(scores, self._typical_p, self._typical_on)
        return scores

    def _choose(self, scores: Tensor, next_ids: Tensor) -> Tensor:
        """``next_ids``, every row's greedy argmax, with TGI's exponential trick for the sampling
        rows written over theirs: ``argmax(probs / q)``, ``q ~ Exponential(1)``, is a draw from
        ``probs`` without the device sync of ``torch.multinomial``."""
        if not self._sampling_rows:
            return next_ids
        vocab = scores.shape[-1]
        noise = torch.stack(
            [
                torch.empty(vocab, device=self.device).exponential_(1.0, generator=self.generators[i])
                for i in self._sampling_rows
            ]
        )  # [S, V]
        probs = torch.softmax(scores[self._sampling_index], dim=-1)  # [S, V]
        next_ids[self._sampling_index] = (probs / noise).argmax(dim=-1)
        return next_ids

    def rows(self, indices: list[int]) -> TokenChooser:
        """The requests at ``indices`` for one step, *sharing* their generators: a draw advances
        the request's own stream (``filter`` clones them instead). Used when only some requests
        of a batch yield a token in a pass (the others are mid-prompt)."""
        if not indices or any(not 0 <= i < len(self.params) for i in indices):
            raise ValueError(f"row indices {indices} must be non-empty and in [0, {len(self)})")
        return TokenChooser(
            [self.params[i] for i in indices],
            self.device,
            self.watermark_gamma,
            self.watermark_delta,
            generators=[self.generators[i] for i in indices],
            grammars=[self.grammars[i] for i in indices],
        )

    def filter(self, indices: list[int]) -> TokenChooser:
        """The requests at ``indices`` (in that order); their generators continue their streams."""
        if not indices or any(not 0 <= i < len(self.params) for i in indices):
            raise ValueError(f"filter indices {indices} must be non-empty and in [0, {len(self)})")
        return TokenChooser(
            [self.params[i] for i in indices],
            self.device,
            self.watermark_gamma,
            self.watermark_delta,
            generators=[_clone_generator(self.generators[i]) for i in indices],
            grammars=[self.grammars[i] for i in indices],
        )

    @classmethod
    def concatenate(cls, choosers: list[TokenChooser]) -> TokenChooser:
        """One chooser for the requests of ``choosers`` in order, generator states carried over."""
        if not choosers:
            raise ValueError("concatenate needs at least one TokenChooser")
        first = choosers[0]
        for c in choosers[1:]:
            if (c.device, c.watermark_gamma, c.watermark_delta) != (
                first.device,
                first.watermark_gamma,
                first.watermark_delta,
            ):
                raise ValueError(
                    "cannot concatenate TokenChoosers with different device or watermark "
                    f"gamma/delta: {c.device, c.watermark_gamma, c.watermark_delta} vs "
                    f"{first.device, first.watermark_gamma, first.watermark_delta}"
                )
        return cls(
            [p for c in choosers for p in c.params],
            first.device,
            first.watermark_gamma,
            first.watermark_delta,
            generators=[_clone_generator(g) for c in choosers for g in c.generators],
            grammars=[g for c in choosers for g in c.grammars],
        )
