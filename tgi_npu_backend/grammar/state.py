"""One request's position in its grammar: waits for the compiled grammar, writes the request's
row of allowed-token bits, advances by the chosen token."""

from __future__ import annotations

from concurrent.futures import Future

from loguru import logger
from torch import Tensor

from .spec import GrammarError


class GrammarState:
    """Created when the request's batch is built (the grammar compiling on a worker thread);
    lives on the request, so ``filter``/``concatenate`` and prefix caching (which only changes
    the prompt's KV) carry it unchanged.

    NOTE: as TGI's ``GrammarLogitProcessor`` (fsm state -1), a request whose matcher fails on a
    token stops being constrained instead of failing its batch; with the mask applied this only
    happens when a token the mask forbade is forced in (``ignore_eos_token`` past the grammar's
    end).
    """

    def __init__(self, request_id: int, compiled: Future):
        self.request_id = request_id
        self._compiled = compiled
        self._matcher = None
        self.broken = False

    @property
    def matcher(self):
        """The request's own matcher (a copy of the compiled grammar); waits for the compile.
        Raises :class:`GrammarError` naming the request when it failed."""
        if self._matcher is None:
            try:
                self._matcher = self._compiled.result().deep_copy()
            except GrammarError as e:
                raise GrammarError(f"request {self.request_id}: {e}") from None
        return self._matcher

    def fill(self, row: Tensor) -> None:
        """Write the allowed-token bits (bit ``t % 32`` of int32 word ``t // 32``) into ``row``,
        a contiguous host int32 tensor of the tokenizer's width; all ones once broken."""
        if self.broken:
            row.fill_(-1)
            return
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token: int) -> None:
        """Consume the chosen token."""
        if self.broken:
            return
        if not self.matcher.consume_token(token):
            self.broken = True
            logger.warning(
                f"request {self.request_id}: token {token} is outside its grammar "
                f"({self.matcher.get_error()}); the rest of the request is unconstrained"
            )

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (EOS allowed)."""
        return not self.broken and self.matcher.is_accepting()
