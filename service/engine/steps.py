"""The jitted step bodies: prefill (chunks of several sequences in one call), decode, writing
a slot's sampling row. The KV cache and sampling state are donated to
every step, so XLA updates them in place; anything that changes per request is an array
argument, never a static one (``span`` is a bucket; the block tables are an array)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from model import lora, transformer
from model.backends import Backend
from model.config import ModelConfig
from service import sampling as smp
from service.engine.step_io import DecodeInputs, PrefillInputs


@dataclasses.dataclass(frozen=True, eq=False)
class Steps:
    cfg: ModelConfig
    backend: Backend
    slots: int
    top_n: int  # top logprobs computed per row
    plan: Any = None  # sharding.Plan, or None on one device
    adapters: lora.BankSpec | None = None  # the adapter bank's shape; None: no adapters

    def lora(self, bank, slots: jax.Array | None) -> tuple | None:
        """What ``transformer.forward`` takes for tokens of these adapter ``slots`` (-1: none;
        None: no token has one, and the step is the base model's)."""
        if self.adapters is None or slots is None:
            return None
        spec = self.adapters
        return bank, lora.select(slots, spec.slots, spec.rank, spec.dtype)

    def gathered(self, logits: jax.Array) -> jax.Array:
        """Logits whole on every device (vocab-split lm_head) before sampling."""
        if self.plan is None:
            return logits
        # Computed split over vocab where the head is (so no device gathers the head's weight),
        # then gathered: (b, V) logits are far smaller than the (D, V) head.
        logits = jax.lax.with_sharding_constraint(logits, self.plan.sharding((None, "vocab")))
        return jax.lax.with_sharding_constraint(logits, self.plan.replicated)

    def prefill(self, params, cache, sampling, rope, eos_mask, tables, bank, inp: PrefillInputs):
        """Chunks of several sequences packed into one row of tokens (``PrefillInputs`` says
        what each array holds); tables (groups, slots, max blocks): every KV group's block
        tables; bank: the adapter slots (None without adapters).

        Returns the token sampled at each sampling row (P,) with its logprobs, and the final
        hidden states (T, D) for ``score``. Only a row that ends its prompt (``last``) really
        emits its token; only those are accounted for penalties.
        """
        hidden, cache = transformer.forward(params, self.cfg, inp.tokens, inp.positions, cache, span=inp.span,
                                            rows=inp.rows, backend=self.backend, rope=rope, live=inp.live,
                                            tables=tables, lora=self.lora(bank, inp.adapters),
                                            images=None if inp.images is None else (
                                                inp.images.embeds, inp.images.use, inp.images.limits))
        final = jnp.take(hidden[0], inp.ends, axis=0)  # (P, D)
        logits = self.gathered(transformer.logits(params, self.cfg, final))  # (P, V)
        out = smp.sample(logits, sampling, inp.steps, eos_mask, self.top_n, rows=inp.slots, allowed=inp.allowed)
        sampling = smp.record(sampling, out[0], jnp.where(inp.last > 0, inp.slots, self.slots))
        return cache, sampling, (out, hidden[0])

    def score(self, params, hidden, following, live):
        """A scored prefill call's prompt logprobs: for each position of hidden (T, D), the
        logprob of the token after it (following (1, T)) and the top alternatives (T, K) ids
        and logprobs, of the model's own distribution (before penalties and temperature). A
        program of its own: the (T, V) logits it needs would otherwise burden every prefill."""
        logits = self.gathered(transformer.logits(params, self.cfg, hidden, live))  # (T, V)
        lse = jax.nn.logsumexp(logits, axis=-1)
        chosen = jnp.take_along_axis(logits, following[0][:, None], axis=-1)[:, 0] - lse
        top, ids = jax.lax.top_k(logits, max(self.top_n, 1))
        return chosen, ids.astype(jnp.int32), top - lse[:, None]

    def decode(self, params, cache, sampling, rope, eos_mask, tables, bank, inp: DecodeInputs):
        """One token for each batch row (``DecodeInputs``). The batch is a bucket of the live
        slot count, so the step costs what the live requests need, not what
        ``max_batch_size`` allows. Padding rows name slot ``slots`` (out of range): their
        cache and sampling-state writes are dropped. In full-width mode ``rows`` is None and
        batch row i is slot i.
        """
        hidden, cache = transformer.forward(params, self.cfg, inp.tokens[:, None], inp.positions[:, None], cache,
                                            span=inp.span, rows=inp.rows, backend=self.backend, rope=rope,
                                            live=inp.live, tables=tables, lora=self.lora(bank, None if inp.adapters is None else inp.adapters[:, None]))
        logits = self.gathered(transformer.logits(params, self.cfg, hidden[:, 0], inp.live))  # (b, V)
        out = smp.sample(logits, sampling, inp.steps, eos_mask, self.top_n, rows=inp.rows, allowed=inp.allowed)
        sampling = smp.record(sampling, out[0], inp.rows)
        return cache, sampling, out

    def describe(self) -> str:
        """Everything besides the code and the arguments that the traced steps depend on (what
        ``programs.Program`` keys a stored executable by)."""
        b = self.backend
        settings = {k: v for k, v in sorted(vars(b).items()) if isinstance(v, (bool, int, float, str, type(None)))}
        plan = None if self.plan is None else (repr(self.plan.mesh), sorted(self.plan.rules.items()))
        return repr((self.cfg, type(b).__qualname__, b.describe(), settings, self.slots, self.top_n, plan,
                     self.adapters))

    def jitted(self, cache_sh=None, sampling_sh=None, out_sh=None):
        """(prefill, decode, set_row, score) jitted, with the state donated and, on
        a mesh, every output committed to its placement."""
        step_out = None if self.plan is None else (cache_sh, sampling_sh, out_sh)
        # ``span`` is a static (meta) field of the inputs: one program per span bucket.
        prefill = jax.jit(self.prefill, donate_argnums=(1, 2), out_shardings=step_out)
        decode = jax.jit(self.decode, donate_argnums=(1, 2), out_shardings=step_out)
        set_row = jax.jit(smp.set_row, donate_argnums=(0,), out_shardings=sampling_sh)
        score = jax.jit(self.score, out_shardings=out_sh)
        return prefill, decode, set_row, score

    def jitted_write_slot(self, bank_sh=None):
        """Rewrite one adapter slot of the bank in place (the slot an array: one program)."""
        rank = self.adapters.rank
        return jax.jit(lambda bank, slot, columns: lora.write_slot(bank, slot, rank, columns),
                       donate_argnums=(0,), out_shardings=bank_sh)
