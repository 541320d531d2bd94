"""A tiny GPT-style causal LM and a character tokenizer, in plain torch.

Used by ``examples/finetune.py``; nothing here downloads anything. The model is built from
a :class:`TinyLMConfig`; ``model(ids)`` returns logits ``[B, T, V]`` and
``model.hidden(ids)`` the final (layer-normed) hidden states ``[B, T, D]`` that
``rk.linear_cross_entropy(hidden, model.lm_head.weight, target, ...)`` takes, so training
never materialises the logits.

Checkpoints (:func:`save_checkpoint`) hold the config, the tokenizer's alphabet and the
weights. :func:`load_checkpoint` is also the loader that the token inspector's command line
uses::

    python -m ranktuner_kernels.analysis.cli --model examples/tiny_lm.py:load_checkpoint \\
        --checkpoint examples/results/tiny_lm_ranktuner.pt --prompt "12+7-3=?" --text "..."
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
ALPHABET = string.digits + string.ascii_letters + " +-*=?.,:;!'\n"


class CharTokenizer:
    """One token per character of ``alphabet``, after three specials: ``<pad>``=0,
    ``<bos>``=1, ``<eos>``=2. ``encode`` adds no specials; an unknown character raises."""

    def __init__(self, alphabet: str = ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet: repeated characters")
        self.alphabet = alphabet
        self.itos = [PAD, BOS, EOS, *alphabet]
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer: character {e.args[0]!r} is not in the alphabet") from None

    def decode(self, ids) -> str:
        """Text of ``ids`` (an int or a sequence); specials are dropped."""
        if isinstance(ids, int):
            ids = [ids]
        return "".join(self.itos[int(i)] for i in ids if int(i) > 2)

    def token_strings(self, ids) -> list[str]:
        """One string per id, specials included (for display)."""
        return [self.itos[int(i)] for i in ids]


@dataclass
class TinyLMConfig:
    vocab_size: int
    d_model: int = 128
    n_layer: int = 3
    n_head: int = 4
    d_ff: int = 512
    max_len: int = 128
    dropout: float = 0.0


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x, cache: list | None = None):
        """``cache``: ``[k, v]`` of the earlier positions, extended in place (decoding one
        token at a time needs no causal mask against them)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2] and t > 1, dropout_p=p)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, t, d)), p, self.training)
        return x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), p, self.training)


class TinyLM(nn.Module):
    """Token + learned position embeddings, ``n_layer`` blocks, a final LayerNorm and an
    untied, bias-free LM head (``lm_head.weight`` is ``[V, D]``)."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError("d_model must be a multiple of n_head")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for blk in self.blocks:  # GPT-2's scaled init of the residual projections
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
            nn.init.normal_(blk.out.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden(self, ids: torch.Tensor, caches: list | None = None, start: int = 0) -> torch.Tensor:
        """Final hidden states ``[B, T, D]`` of ``ids`` ``[B, T]`` at positions
        ``start, ..., start + T - 1`` (``<= max_len``); ``caches``: one list per block for
        incremental decoding (see :meth:`generate_greedy`)."""
        t = ids.shape[1]
        if start + t > self.cfg.max_len:
            raise ValueError(f"sequence of {start + t} tokens is longer than max_len={self.cfg.max_len}")
        x = self.tok(ids) + self.pos(torch.arange(start, start + t, device=ids.device))
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.ln_f(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]``: row ``t`` predicts token ``t + 1``."""
        return self.lm_head(self.hidden(ids))

    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
        """Greedy continuations (up to and excluding ``eos_id``) of each prompt."""
        return self.generate(prompts, max_new_tokens, eos_id)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Continuations (up to and excluding ``eos_id``) of each prompt, with a key/value
        cache; prompts of the same length are decoded together, so no padding or attention
        mask is needed. ``temperature=0``: greedy; ``> 0``: sampled from
        ``softmax(logits / temperature)`` with ``generator`` (on the model's device)."""
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature}")
        was_training = self.training
        self.eval()
        device = self.lm_head.weight.device
        out: list[list[int]] = [[] for _ in prompts]
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        for length, idx in by_len.items():
            ids = torch.tensor([prompts[i] for i in idx], device=device)
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            caches = [[] for _ in self.blocks]
            h = self.hidden(ids, caches)
            steps = min(max_new_tokens, self.cfg.max_len - length + 1)
            for step in range(steps):
                logits = self.lm_head(h[:, -1]).float()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
                else:
                    nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                done |= nxt == eos_id
                if bool(done.all()) or step + 1 == steps:
                    break
                h = self.hidden(nxt[:, None], caches, start=ids.shape[1] - 1)
            for row, i in enumerate(idx):
                gen = ids[row, length:].tolist()
                out[i] = gen[: gen.index(eos_id)] if eos_id in gen else gen
        self.train(was_training)
        return out


def save_checkpoint(path, model: TinyLM, tokenizer: CharTokenizer, **extra) -> None:
    torch.save({"config": asdict(model.cfg), "alphabet": tokenizer.alphabet,
                "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """``{"model", "tokenizer", "encode", "decode", "token_strings", "bos_id"}`` from a file
    written by :func:`save_checkpoint`; the dict is the loader protocol of
    ``python -m ranktuner_kernels.analysis.cli --model examples/tiny_lm.py:load_checkpoint``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no checkpoint {str(path)!r}: the example checkpoints are written by a full run of the example "
            "(`python examples/finetune.py --out DIR` writes DIR/tiny_lm_{pretrained,sft,ranktuner,dft}.pt; "
            "without --out, to the scratch folder it prints). Run it first, or pass --checkpoint a file it wrote.")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    tok = CharTokenizer(ckpt["alphabet"])
    model = TinyLM(TinyLMConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return {"model": model, "tokenizer": tok, "encode": tok.encode, "decode": tok.decode,
            "token_strings": tok.token_strings, "bos_id": tok.bos_id}
