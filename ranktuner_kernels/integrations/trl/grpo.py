"""``GRPOTrainer``: TRL's GRPO on this library's fused head, with two options of our own.

    from ranktuner_kernels.integrations.trl import GRPOTrainer, EASTOptions, THROptions

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                          east=EASTOptions(a=1.0, extract_answer=lambda c: c.strip()),
                          thr=THROptions(p=0.1, correct=0.5))

* ``east=`` (EAST: Wang et al., "Entropy-Based Adaptive Weighting for Self-Training"): the
  completions of each prompt are clustered by their final answer (``extract_answer``); the
  entropy ``h`` of that clustering gives the prompt the weight ``f(h) = h^a · N / Σ_j h_j^a``
  (:func:`rk.rl.east_weights`, mean 1 over the ``N`` prompts of the generation batch), which
  multiplies the advantages of all its completions.
* ``thr=`` (THR, arXiv 2510.03669): the advantages become per-token by the THR-guided rule
  (:func:`rk.rl.linear_thr_guided_advantages`), from the completion hidden states and the LM
  head that the fused head hands out (:func:`.head.head_inputs_captured`), never the logits.

Both act where TRL forms the advantages, at the end of ``_generate_and_score_completions``
(once per generation batch, on whole groups), so every loss type, importance sampling level and
metric of TRL's stays as it is. ``docs/rl.md`` ("GRPOTrainer options") has the papers' settings.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

import ranktuner_kernels.rl as rl

from .. import class_built_on_first_use
from .head import head_inputs_captured
from .trainers import heads_substituted, import_trl

__all__ = ["EASTOptions", "THROptions", "grpo_trainer_class"]

#: the keyword arguments of TRL's ``_compute_loss`` forward that a THR pass of our own passes on
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _number(name, value, *, low=-math.inf, high=math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name}: expected a finite number in [{low}, {high}], got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class EASTOptions:
    """EAST question weights for :class:`GRPOTrainer` (``east=``).

    Args:
        a: the exponent of ``f(h) = h^a · N / Σ_j h_j^a`` (any finite number; the paper searches
            ``[-3, 3]`` and finds its best results with ``a > 0``: uncertain prompts weigh more).
        extract_answer: the final answer of one completion, as TRL's reward functions receive it
            (a string, or the list of messages of a conversational completion), as a hashable
            value; completions with equal answers form one cluster.
        eps: entropies are clamped to at least ``eps`` first (``rk.rl.east_weights``); 0 keeps
            the paper's formula (a prompt whose completions all agree gets weight 0 when
            ``a > 0``).
    """

    a: float
    extract_answer: Callable[[Any], Any]
    eps: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "a", _number("a", self.a))
        object.__setattr__(self, "eps", _number("eps", self.eps, low=0.0))
        if not callable(self.extract_answer):
            raise TypeError(f"extract_answer: expected a callable (completion -> answer), got "
                            f"{type(self.extract_answer).__name__}")


@dataclasses.dataclass(frozen=True)
class THROptions:
    """THR-guided token advantages for :class:`GRPOTrainer` (``thr=``): the rule of
    :func:`rk.rl.thr_advantages` (docs/rl.md).

    Args:
        p: ``> 0`` amplifies positive-THR tokens (exploitation), ``< 0`` negative-THR ones
            (exploration); in ``[-1, 1]``. The paper: ±0.1 (Qwen2.5-Math), ±0.2 (Qwen2.5-0.5B,
            Llama-3.2-3B).
        tau: the ``|THR|`` threshold: ``"nthr"`` (per group, ``beta`` times the smallest mean THR
            of its correct responses) or a number.
        beta: the factor of ``tau="nthr"``.
        entropy_top: the fraction of highest-entropy tokens that keep their advantage when not
            above ``tau`` (the paper: 0.2); the other tokens of groups with a correct response
            get advantage 0.
        correct: which completions count as correct (THR sums over the correct responses of a
            group): ``None`` (default) a reward above the mean reward of its group, i.e. a
            positive GRPO advantage (for the paper's 0/1 verifiable reward: the correct responses
            of every group with both); a number: a reward above it; or a callable called like a
            TRL reward function, ``correct(prompts=, completions=, completion_ids=, rewards=,
            **dataset columns)``, returning one bool per completion. The reward is TRL's
            (the weighted sum of the reward functions).
        normalize: ``"none"`` (each correct token counts 1) or ``"length"`` (each correct
            response counts 1).
        keep_low: keep the advantage of the tokens below ``tau`` (reweighting only).
    """

    p: float
    tau: float | str = "nthr"
    beta: float = 1.0
    entropy_top: float = 0.2
    correct: float | Callable | None = None
    normalize: str = "none"
    keep_low: bool = False

    def __post_init__(self):
        object.__setattr__(self, "p", _number("p", self.p, low=-1.0, high=1.0))
        if isinstance(self.tau, str):
            if self.tau != "nthr":
                raise ValueError(f"tau: expected 'nthr' or a number, got {self.tau!r}")
        else:
            object.__setattr__(self, "tau", _number("tau", self.tau))
        object.__setattr__(self, "beta", _number("beta", self.beta))
        object.__setattr__(self, "entropy_top", _number("entropy_top", self.entropy_top, low=0.0, high=1.0))
        if self.correct is not None and not callable(self.correct):
            object.__setattr__(self, "correct", _number("correct", self.correct))
        if self.normalize not in ("none", "length"):
            raise ValueError(f"normalize: expected 'none' or 'length', got {self.normalize!r}")
        if not isinstance(self.keep_low, bool):
            raise TypeError(f"keep_low: expected a bool, got {type(self.keep_low).__name__}")


class _Rollout(NamedTuple):
    """What TRL's ``_calculate_rewards`` saw: this process's rows, and the rewards of all."""

    inputs: list
    prompts: list
    completions: list
    completion_ids: list
    rewards_per_func: torch.Tensor  # [B_all, reward functions], gathered across processes


def _option(name, value, cls):
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name}: expected a {cls.__name__} (or None), got {type(value).__name__}")
    return value


@class_built_on_first_use
def grpo_trainer_class():
    trl = import_trl("GRPOTrainer")
    from accelerate.utils import gather_object

    base = trl.GRPOTrainer

    class GRPOTrainer(base):
        """TRL's ``trl.GRPOTrainer`` (every argument and metric of TRL's) whose fused LM head, on
        the policy (or its PEFT base model) and on the reference model, is
        :func:`ranktuner_kernels.integrations.trl.add_fused_lm_head`; TRL's chunked kernel never
        runs. Two further keyword arguments (module docstring, docs/rl.md):

        Args:
            east: an :class:`EASTOptions`: per prompt, the entropy of its completions' answer
                clusters and the EAST weight (mean 1 over the generation batch's prompts), which
                multiplies the advantages of its completions. Logged: ``east/answer_entropy``
                (mean over prompts), ``east/weight_min``, ``east/weight_max``.
            thr: a :class:`THROptions`: per-token advantages by the THR-guided rule, from the
                completion hidden states and the LM head of the policy that sampled them. Logged:
                ``thr/mean`` and ``thr/positive_frac`` (over the tokens of groups with a correct
                completion: "active"), ``thr/tau`` (mean over active completions),
                ``thr/high_frac``, ``thr/entropy_frac``, ``thr/zeroed_frac`` (shares of the
                active tokens: advantage times ``1 ± p``, kept, set to 0), ``thr/active_frac``
                and ``thr/adjusted_frac`` (shares of all completion tokens: active; advantage
                changed).

        With both, the advantage is TRL's times THR's factor times the prompt's EAST weight.
        The advantages in TRL's completions log are TRL's own (before either option).
        """

        def __init__(self, *args, east: EASTOptions | None = None, thr: THROptions | None = None, **kwargs):
            self._rk_east = _option("east", east, EASTOptions)
            self._rk_thr = _option("thr", thr, THROptions)
            self._rk_rollout = None
            self._rk_capture = None  # a list while THR wants the policy's head inputs
            with heads_substituted(base):
                base.__init__(self, *args, **kwargs)

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            if self._rk_east is not None or self._rk_thr is not None:
                self._rk_rollout = _Rollout(inputs, prompts, completions, completion_ids_list, rewards_per_func)
            return rewards_per_func

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                               **kwargs):
            if self._rk_capture is None or model is not self.model:
                return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                  *args, **kwargs)
            with head_inputs_captured(self.model) as captured:
                out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                 *args, **kwargs)
            self._rk_capture.append((out[0], captured, logits_to_keep))
            return out

        def _generate_and_score_completions(self, inputs):
            if self._rk_east is None and self._rk_thr is None:
                return super()._generate_and_score_completions(inputs)
            self._rk_capture = [] if self._rk_thr is not None else None
            self._rk_rollout = None
            try:
                output = super()._generate_and_score_completions(inputs)
                rollout, captures = self._rk_rollout, self._rk_capture
            finally:
                self._rk_rollout = self._rk_capture = None
            if rollout is None:
                raise RuntimeError("GRPOTrainer: TRL did not score the completions through _calculate_rewards; "
                                   "east= and thr= are written for TRL 1.16's GRPOTrainer")
            mode = "train" if self.model.training else "eval"
            size = self.num_generations if mode == "train" else self.num_generations_eval
            advantages = output["advantages"]
            if self._rk_thr is not None:
                advantages = self._rk_thr_advantages(output, rollout, captures, size, mode)
            if self._rk_east is not None:
                weights = self._rk_east_weights(rollout, size, mode).to(advantages.device, advantages.dtype)
                advantages = advantages * (weights[:, None] if advantages.dim() == 2 else weights)
            output["advantages"] = advantages
            return output

        # ------------------------------------------------------------------ the two options

        def _rk_rows(self, rollout, size):
            """``(first global row of this process, group index [B] of its rows)``."""
            local = len(rollout.prompts)
            if self.accelerator.num_processes > 1 and local % size:
                raise ValueError(f"east/thr: each process must hold whole groups: its {local} completions per "
                                 f"generation are not a multiple of num_generations = {size}")
            start = self.accelerator.process_index * local
            device = self.accelerator.device
            return start, torch.div(torch.arange(start, start + local, device=device), size, rounding_mode="floor")

        def _rk_east_weights(self, rollout, size, mode):
            """EAST weight of each of this process's rows (its prompt's), from the answers of all."""
            options = self._rk_east
            answers = [options.extract_answer(c) for c in rollout.completions]
            for a in answers:
                try:
                    hash(a)
                except TypeError:
                    raise TypeError(f"east: extract_answer returned an unhashable {type(a).__name__}; return a "
                                    "hashable answer (a str, a number, a tuple)") from None
            if self.accelerator.num_processes > 1:
                answers = gather_object(answers)
            groups = [answers[i:i + size] for i in range(0, len(answers), size)]
            device = self.accelerator.device
            entropy = rl.answer_entropy(groups, device=device)
            weights = rl.east_weights(entropy, options.a, eps=options.eps)
            metrics = self._metrics[mode]
            metrics["east/answer_entropy"].append(entropy.mean().item())
            metrics["east/weight_min"].append(weights.min().item())
            metrics["east/weight_max"].append(weights.max().item())
            _, group = self._rk_rows(rollout, size)
            return weights[group]

        def _rk_correct(self, rollout, size, start):
            """Whether each of this process's completions is correct (``THROptions.correct``)."""
            rule = self._rk_thr.correct
            per_func = rollout.rewards_per_func
            rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)
            rewards[torch.isnan(per_func).all(dim=1)] = math.nan  # unscorable: never correct
            local = slice(start, start + len(rollout.prompts))
            if rule is None:
                mean = torch.nanmean(rewards.view(-1, size), dim=1).repeat_interleave(size)
                return (rewards > mean)[local]
            if not callable(rule):
                return (rewards > rule)[local]
            keys = [k for k in rollout.inputs[0] if k not in ("prompt", "completion", "completion_ids")]
            columns = {k: [row[k] for row in rollout.inputs] for k in keys}
            got = list(rule(prompts=rollout.prompts, completions=rollout.completions,
                            completion_ids=rollout.completion_ids, rewards=rewards[local].tolist(), **columns))
            if len(got) != len(rollout.prompts) or not all(isinstance(c, (bool, int)) for c in got):
                raise ValueError(f"thr: correct returned {got!r:.80}; expected one bool per completion "
                                 f"({len(rollout.prompts)})")
            return torch.tensor([bool(c) for c in got], device=rewards.device)

        def _rk_head_inputs(self, output, captures, mode):
            """The policy's hidden states at the completion tokens and its head: from TRL's own
            old-log-probability pass when it ran one, else from one forward without gradient."""
            old = output.get("old_per_token_logps")
            found = [c for logps, c, _ in captures if logps is old] if old is not None else []
            if not found:
                self._rk_capture = captures = []
                prompt_ids, completion_ids = output["prompt_ids"], output["completion_ids"]
                batch = (self.args.per_device_train_batch_size if mode == "train"
                         else self.args.per_device_eval_batch_size)
                try:
                    with torch.no_grad():
                        self._get_per_token_logps_and_entropies(
                            self.model, torch.cat([prompt_ids, completion_ids], dim=1),
                            torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
                            completion_ids.size(1), batch_size=batch,
                            **{k: output[k] for k in _FORWARD_KEYS if k in output})
                finally:
                    self._rk_capture = None
                found = [c for _, c, _ in captures]
            chunks = found[0]
            keep = output["completion_ids"].size(1)
            hidden = torch.cat([c.hidden[:, -keep:] for c in chunks], dim=0)
            return hidden, chunks[0]

        def _rk_thr_advantages(self, output, rollout, captures, size, mode):
            options = self._rk_thr
            start, group = self._rk_rows(rollout, size)
            correct = self._rk_correct(rollout, size, start)
            hidden, head = self._rk_head_inputs(output, captures, mode)
            mask = output["completion_mask"]
            if "tool_mask" in output:
                mask = mask * output["tool_mask"]
            adjusted, info = rl.linear_thr_guided_advantages(
                hidden, head.weight, output["completion_ids"], output["advantages"], correct, group,
                linear_bias=head.bias, mask=mask, p=options.p, tau=options.tau, beta=options.beta,
                entropy_top=options.entropy_top, keep_low=options.keep_low, normalize=options.normalize,
                temperature=head.temperature, softcap=head.softcap)
            self._rk_log_thr(info, mask.bool(), mode)
            return adjusted

        def _rk_log_thr(self, info, kept, mode):
            """THR's metrics over all processes' tokens (sums gathered, then divided)."""
            active, high, high_ent = info["active"], info["high_thr"], info["high_entropy"]
            zeroed = active & ~high & ~high_ent if not self._rk_thr.keep_low else torch.zeros_like(active)
            changed = zeroed | (high if self._rk_thr.p != 0 else torch.zeros_like(high))
            tau = info["tau"]
            thr = info["thr"].float()
            sums = torch.stack([kept.sum(), active.sum(), torch.where(active, thr, 0.0).sum(),
                                (active & (thr > 0)).sum(), high.sum(), high_ent.sum(), zeroed.sum(), changed.sum(),
                                torch.nan_to_num(tau.float(), nan=0.0).sum(), torch.isfinite(tau).sum()]).float()
            sums = self.accelerator.gather(sums[None]).sum(dim=0).tolist()
            n_kept, n_active, thr_sum, positive, n_high, n_ent, n_zero, n_changed, tau_sum, n_tau = sums
            metrics = self._metrics[mode]
            if n_kept > 0:
                metrics["thr/active_frac"].append(n_active / n_kept)
                metrics["thr/adjusted_frac"].append(n_changed / n_kept)
            if n_active > 0:
                metrics["thr/mean"].append(thr_sum / n_active)
                metrics["thr/positive_frac"].append(positive / n_active)
                metrics["thr/high_frac"].append(n_high / n_active)
                metrics["thr/entropy_frac"].append(n_ent / n_active)
                metrics["thr/zeroed_frac"].append(n_zero / n_active)
            if n_tau > 0:
                metrics["thr/tau"].append(tau_sum / n_tau)

    return GRPOTrainer


def __getattr__(name):  # PEP 562: TRL is imported when the class is first asked for (pickle finds it here)
    if name == "GRPOTrainer":
        return grpo_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
