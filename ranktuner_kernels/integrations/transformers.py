"""Hugging Face ``transformers`` integration: token-reweighted losses for causal LMs.

    import ranktuner_kernels as rk
    from ranktuner_kernels.integrations.transformers import patch_model, add_nll_logging

    patch_model(model, weighting="ranktuner")        # model(input_ids, labels=labels).loss is fused
                                                     # (the default weighting is "sft": plain CE)
    trainer = Trainer(model=model, args=args, ...)
    add_nll_logging(trainer)                         # logs "nll" / "eval_nll" next to "loss"

Three pieces, usable separately (``docs/integrations.md`` has the recipes):

* :func:`patch_model` / :func:`unpatch_model`: replace one model instance's ``forward`` so
  that a call with ``labels`` computes its loss with :func:`ranktuner_kernels.linear_cross_entropy`
  from the final hidden states and the LM head, without materialising the logits. Calls
  without labels (evaluation that wants logits, ``generate``) run the original forward. Which
  models is read from the class's own ``forward`` (:func:`check_model`); what it does between
  the head and the loss is reproduced or the model is refused by name.
* :func:`make_compute_loss_func`: a ``Trainer(compute_loss_func=...)`` that applies
  :func:`ranktuner_kernels.cross_entropy` to ``outputs.logits`` (any model with logits).
* :class:`NLLLoggingCallback` / :func:`add_nll_logging`: the plain mean NLL of the kept tokens
  in Trainer's train and eval logs, next to the objective's ``loss``.

``transformers`` is imported only inside these functions: importing this module (or
:mod:`ranktuner_kernels`) never imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import types
import warnings

import torch

import ranktuner_kernels as rk
import ranktuner_kernels.distributed  # noqa: F401 - rk.distributed.head_cross_entropy

from . import _heads, class_built_on_first_use

__all__ = [
    "check_model",
    "patch_model",
    "unpatch_model",
    "is_patched",
    "make_compute_loss_func",
    "NLLMeter",
    "NLLLoggingCallback",
    "add_nll_logging",
]

_PATCH_ATTR = "_ranktuner_patch"
_MARK = "_ranktuner_patched_forward"
# arguments of the core losses that the integration sets itself (or that make no sense here)
_RESERVED_LINEAR = {"input", "linear_weight", "target", "linear_bias", "weighting", "reduction", "ignore_index",
                    "num_items_in_batch", "return_stats", "token_weight", "sequence_weight"}
_RESERVED_LOGITS = {"input", "target", "weighting", "reduction", "ignore_index", "num_items_in_batch",
                    "return_stats", "token_weight", "sequence_weight", "size_average", "reduce"}


# ----------------------------------------------------------------------------- helpers


def _weighting_name(weighting) -> str:
    """``"ranktuner"`` for ``"ranktuner"`` or ``rk.RankTuner(...)`` (the registry's name)."""
    return rk.weightings.resolve(weighting).name


def _check_weighting(weighting) -> None:
    """Raise the core's ValueError/TypeError for an unknown weighting now, not at the first
    training step (the registry resolves the name; a config validated its options when made)."""
    if weighting is None:
        raise TypeError("weighting: expected a name such as 'ranktuner' or a config such as rk.RankTuner(), got None")
    rk.weightings.resolve(weighting)


def _check_options(options: dict, fn, reserved: set, fn_name: str) -> None:
    """Every option must be a named parameter of ``fn`` that the integration does not set."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = {k for k, p in inspect.signature(fn).parameters.items() if p.kind in named}
    for key in options:
        if key in reserved:
            raise TypeError(f"{key}: set by the integration itself, it cannot be passed as an option")
        if key not in params:
            raise TypeError(f"{key}: not an option of {fn_name} (options: {', '.join(sorted(params - reserved))})")


def _check_ignore_index(ignore_index) -> int:
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels[..., 1:]`` padded with ``ignore_index`` back to the input's length, as
    transformers' ``ForCausalLMLoss`` does: position ``t`` predicts token ``t + 1``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a tensor, got {type(labels).__name__}")
    if labels.dim() < 1:
        raise ValueError("labels: expected [B, T] (or [T]) token ids, got a scalar")
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _keeps_all(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep == 0


def _slice_to_keep(x: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' ``slice_logits_to_keep`` on ``[B, T, ...]``: an int keeps the last
    ``logits_to_keep`` positions (0: all), a 1-D tensor those positions, a 2-D integer tensor
    per-sample positions, a 2-D bool tensor the True positions (flattened to ``[K, ...]``)."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() == 2:
            if logits_to_keep.dtype == torch.bool:
                return x[logits_to_keep]
            idx = logits_to_keep.reshape(*logits_to_keep.shape, *([1] * (x.dim() - 2)))
            return torch.take_along_dim(x, idx, dim=1)
        if logits_to_keep.dim() != 1:
            raise ValueError(f"logits_to_keep: expected an int or a 1-D/2-D tensor, got {logits_to_keep.dim()}-D")
        return x[:, logits_to_keep]
    if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep: expected an int >= 0 or a tensor, got {logits_to_keep!r}")
    return x[:, -logits_to_keep:] if logits_to_keep else x


def _align_targets(shift_labels: torch.Tensor, full_shape, kept_shape, logits_to_keep) -> torch.Tensor:
    """The next-token targets of the kept positions.

    ``shift_labels`` shaped like the kept positions is used as is; shaped like the whole
    sequence (``[B, T]``) while ``logits_to_keep`` keeps fewer positions, it is sliced the same
    way as the hidden states (transformers itself raises there); any other layout with as many
    elements is flattened onto the kept positions, like ``ForCausalLMLoss``'s ``view(-1)``."""
    kept_shape = tuple(kept_shape)
    if tuple(shift_labels.shape) == kept_shape:
        return shift_labels
    if not _keeps_all(logits_to_keep) and tuple(shift_labels.shape) == tuple(full_shape):
        return _slice_to_keep(shift_labels.unsqueeze(-1), logits_to_keep).squeeze(-1)
    if shift_labels.numel() == int(torch.Size(kept_shape).numel()):
        return shift_labels.reshape(kept_shape)
    raise ValueError(f"labels: shape {tuple(shift_labels.shape)} does not match the {kept_shape} positions whose "
                     f"logits are kept (sequence {tuple(full_shape)}, logits_to_keep={logits_to_keep!r})")


def _nll_terms(logp_t: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """``(sum of -logp_t over kept tokens, kept count)``, float32, detached. Ignored positions
    are masked here, whatever the statistics hold there (zero or NaN)."""
    keep = target != ignore_index
    neg = torch.where(keep, -logp_t.detach().float(), torch.zeros((), dtype=torch.float32, device=logp_t.device))
    return neg.sum(), keep.sum().to(torch.float32)


def _token_metrics(stats: dict, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[sum of entropy, correct, kept]`` over the kept tokens of one call (float32, detached):
    what TRL's ``entropy`` and ``mean_token_accuracy`` average (``integrations.trl``)."""
    keep = target != ignore_index
    zero = torch.zeros((), device=keep.device)
    entropy, correct = (torch.where(keep, stats[k].detach().float(), zero).sum() for k in ("entropy", "accuracy"))
    return torch.stack([entropy, correct, keep.sum().float()])


def _mean_nll(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count``; NaN when every token is ignored (like ``F.cross_entropy``'s mean)."""
    return total / count


# ----------------------------------------------------------------------------- the NLL meter


class NLLMeter:
    """Running sums of the plain NLL for logging: ``(sum of -log p_t, kept tokens)``.

    The patched forward (and the function from :func:`make_compute_loss_func`) feed it once per
    call with labels, into ``"train"`` or ``"eval"``; :class:`NLLLoggingCallback` reads it. The
    sums stay on the model's device (no host sync per step); the train side is grouped by
    optimizer step (:meth:`end_step`) so that :meth:`pop_train` averages per-step means, the way
    Trainer averages its logged ``loss`` over the steps of a logging interval. Memory is O(1)
    per step between two logs. The callback takes eval calls one by one
    (:meth:`take_last_eval`, once per evaluation batch); :meth:`pop_eval` is the token mean of
    every eval call since the last pop, for use without Trainer.
    """

    def __init__(self):
        self._current = {"train": None, "eval": None}
        self._steps = []
        self._last_eval = None
        from .. import _ops

        self._id = _ops.register_meter(self)  # how compiled code names this meter (record)

    def __setstate__(self, state):  # a copy (deepcopy, pickle) is a meter of its own
        from .. import _ops

        self.__dict__.update(state)
        self._id = _ops.register_meter(self)

    def record(self, mode: str, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """:meth:`add`, and return the batch's mean NLL ``total / count``. Inside
        ``torch.compile`` the meter is updated by a custom op when the compiled code runs, so
        that its state (None before the first batch, the running sums after) is never read
        while tracing: no guard on it, no recompilation on later steps."""
        if torch.compiler.is_compiling():
            if mode not in ("train", "eval"):  # not self._current: reading it would guard on its state
                raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
            from .. import _ops

            return _ops.nll_record_op(total, count, self._id, mode)
        self.add(mode, total, count)
        return _mean_nll(total, count)

    def add(self, mode: str, total: torch.Tensor, count: torch.Tensor) -> None:
        """Add one batch's ``total`` (sum of NLL) and ``count`` (kept tokens) to ``mode``."""
        if mode not in self._current:
            raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
        dtype = torch.float32 if total.device.type == "mps" else torch.float64
        pair = torch.stack([total.detach().to(dtype), count.detach().to(dtype)])
        cur = self._current[mode]
        self._current[mode] = pair if cur is None else cur + pair
        if mode == "eval":
            self._last_eval = pair

    def take_last_eval(self) -> torch.Tensor | None:
        """The ``[sum, count]`` of the latest eval-mode call, once (None if taken or none)."""
        pair, self._last_eval = self._last_eval, None
        return pair

    def end_step(self) -> None:
        """Close the current optimizer step of the train side."""
        cur = self._current["train"]
        if cur is not None:
            self._steps.append(cur)
            self._current["train"] = None

    def reset(self, mode: str | None = None) -> None:
        """Drop what was recorded (of ``mode`` only, if given)."""
        if mode == "eval":
            self._current["eval"] = self._last_eval = None
            return
        if mode == "train":
            self._current["train"] = None
            self._steps = []
            return
        if mode is not None:
            raise ValueError(f"mode: expected 'train', 'eval' or None, got {mode!r}")
        self._current = {"train": None, "eval": None}
        self._steps = []
        self._last_eval = None

    def pop_train(self) -> float | None:
        """Mean over the closed steps (and an open one) of each step's mean NLL, then reset the
        train side; None if nothing was recorded. Summed across ranks under torch.distributed."""
        self.end_step()
        steps, self._steps = self._steps, []
        if not steps:
            return None
        sums = _all_reduce(torch.stack(steps))  # [steps, 2]
        sums = sums[sums[:, 1] > 0]
        if sums.shape[0] == 0:
            return None
        return float((sums[:, 0] / sums[:, 1]).mean())

    def pop_eval(self) -> float | None:
        """Token-weighted mean NLL of every eval-mode call since the last pop, then reset the
        eval side; None if nothing was recorded."""
        cur, self._current["eval"] = self._current["eval"], None
        if cur is None:
            return None
        return _token_mean(cur)


def _token_mean(pair: torch.Tensor | None) -> float | None:
    """``sum / count`` of a ``[sum, count]`` pair summed across ranks; None if no token."""
    if pair is None:
        return None
    pair = _all_reduce(pair)
    return float(pair[0] / pair[1]) if float(pair[1]) > 0 else None


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------- the model's head


class _Refused(Exception):
    """Why a model's forward cannot be reproduced (the text goes into patch_model's ValueError)."""


class _HeadPlan:
    """What a causal LM's ``forward`` does from its decoder to its loss, read from its source
    once per class by :func:`_read_forward`: the decoder call (attribute and arguments), the
    transforms of the logits (as scale / soft-cap functions of the model), the router
    auxiliary loss and the output class."""

    def __init__(self):
        self.resolve = []        # [(param, fn(self) -> default)] for `x = x if x is not None else ...`
        self.fixed = {}          # forward parameter -> value it is set to when labels are given
        self.base_attr = None    # the decoder's attribute path (self.<base_attr>, e.g. "model.decoder")
        self.base_args = []      # forward parameters passed positionally to the decoder
        self.base_kw = {}        # decoder keyword -> forward parameter
        self.base_var_kw = False  # the decoder gets **kwargs
        self.base_const = {}     # decoder keyword -> constant
        self.head_attr = None
        self.transforms = []     # [("scale", fn) | ("softcap", fn)]: logits * fn(self) / c*tanh(logits/c)
        self.scales_hidden = False  # a scale is applied to the hidden states (exact only without a head bias)
        self.aux = None          # (flag param, fn(self, outputs, attention_mask), coef fn(self))
        self.output_cls = None
        self.defaults = {}       # forward parameter -> default
        self.named = set()       # the forward's named parameters
        self.var_kw = None       # the forward's **kwargs name


def _compile_expr(text: str, params: str, module_globals: dict):
    """``lambda <params>: <text>`` compiled in the model's module (the model's own expression)."""
    return eval(compile(f"lambda {params}: ({text})", "<ranktuner_kernels: model expression>", "eval"), module_globals)


@functools.lru_cache(maxsize=None)
def _read_forward(cls) -> _HeadPlan:
    """Read ``cls.forward``'s source into a :class:`_HeadPlan`; raise :class:`_Refused` naming
    the first statement that is not one the fused loss reproduces."""
    import ast
    import re
    import sys
    import textwrap

    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError) as exc:
        raise _Refused(f"the source of {cls.__name__}.forward is not available ({exc})") from None
    fn = ast.parse(source).body[0]
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise _Refused(f"{cls.__name__}.forward is not a plain function")
    module_globals = vars(sys.modules[cls.__module__])
    plan = _HeadPlan()
    sig = inspect.signature(cls.forward)
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            plan.var_kw = name
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
            plan.named.add(name)
            plan.defaults[name] = None if p.default is inspect.Parameter.empty else p.default
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    text = [ast.unparse(s) for s in body]

    def refuse(i, why):
        raise _Refused(f"{cls.__name__}.forward: {why}: `{text[i].splitlines()[0][:160]}`")

    def compile_self(expr):
        return _compile_expr(expr, "self", module_globals)

    i = 0
    # 1. defaults resolved from the config before the decoder call
    while i < len(body) and not _is_base_call(body[i]):
        m = re.fullmatch(r"(\w+) = \(?\1 if \1 is not None else (self\.[\w.]+)\)?", text[i])
        if m is not None and m.group(1) in plan.named:
            plan.resolve.append((m.group(1), compile_self(m.group(2))))
        elif (m := re.fullmatch(r"if labels is not None:\n    (\w+) = (False|True|None)", text[i])) and m.group(1) in plan.named:
            plan.fixed[m.group(1)] = ast.literal_eval(m.group(2))  # e.g. use_cache = False when training
        else:
            refuse(i, "a statement before the decoder call that the fused loss does not reproduce")
        i += 1
    if i == len(body):
        raise _Refused(f"{cls.__name__}.forward: no decoder call `outputs = self.<decoder>(...)` found")
    # 2. the decoder call
    stmt = body[i]
    outputs = (stmt.targets[0] if isinstance(stmt, ast.Assign) else stmt.target).id
    call = stmt.value
    plan.base_attr = ast.unparse(call.func)[len("self."):]
    for arg in call.args:
        if not isinstance(arg, ast.Name) or arg.id not in plan.named:
            refuse(i, "the decoder gets a positional argument that is not one of the forward's")
        plan.base_args.append(arg.id)
    for kw in call.keywords:
        if kw.arg is None:
            if not (isinstance(kw.value, ast.Name) and kw.value.id == plan.var_kw):
                refuse(i, "the decoder gets a ** argument that is not the forward's **kwargs")
            plan.base_var_kw = True
        elif isinstance(kw.value, ast.Name) and kw.value.id in plan.named:
            plan.base_kw[kw.arg] = kw.value.id
        elif isinstance(kw.value, ast.Constant):
            plan.base_const[kw.arg] = kw.value.value  # e.g. return_dict=True
        else:
            refuse(i, f"the decoder's argument {kw.arg}= is computed in the forward")
    i += 1
    # 3. the final hidden states, sliced to logits_to_keep
    hidden = None
    sliced = False
    while i < len(body):
        t = text[i]
        m = re.fullmatch(rf"(\w+)(?:: [\w.\[\], ]+)? = {outputs}(?:\.last_hidden_state|\[0\])", t)
        if m:
            hidden = m.group(1)
        elif m := re.fullmatch(rf"(\w+) = slice_logits_to_keep\({outputs}\.last_hidden_state, logits_to_keep\)", t):
            hidden, sliced = m.group(1), True
        elif hidden and re.fullmatch(rf"{hidden} = slice_logits_to_keep\({hidden}, logits_to_keep\)", t):
            sliced = True
        elif hidden and re.fullmatch(rf"if {hidden}\.shape\[1\] == \(input_ids if input_ids is not None else "
                                     rf"inputs_embeds\)\.shape\[1\]:\n    {hidden} = slice_logits_to_keep\({hidden}, "
                                     rf"logits_to_keep\)", t):
            # Gemma 4: sliced unless its decoder already did (KV-shared layers, an int logits_to_keep);
            # the patched forward keeps logits_to_keep from the decoder and slices once itself
            sliced = True
        elif hidden and (m := re.fullmatch(rf"{hidden} = {hidden} ([*/]) (self\.[\w.]+)", t)):
            # a scale of the hidden states is a scale of the logits of a head without bias
            plan.transforms.append(("scale", compile_self(m.group(2) if m.group(1) == "*" else f"1.0 / {m.group(2)}")))
            plan.scales_hidden = True
        elif re.fullmatch(r"slice_indices = slice\(-logits_to_keep, None\) if isinstance\(logits_to_keep, int\) "
                          r"else logits_to_keep", t):
            sliced = True
        else:
            break
        i += 1
    if hidden is None:
        raise _Refused(f"{cls.__name__}.forward: the final hidden states are not `{outputs}.last_hidden_state`")
    if "logits_to_keep" in plan.named and not sliced:
        raise _Refused(f"{cls.__name__}.forward: takes logits_to_keep but does not slice the hidden states with it")
    # 4. the head
    h = rf"{hidden}(?:\[:, slice_indices, :\])?(?:\.to\([^()]*(?:\([^()]*\))?[^()]*\))?"
    m = re.fullmatch(rf"(\w+) = self\.(\w+)\({h}\)((?:\.float\(\)|\.contiguous\(\))?)(?: \* (.+))?", text[i]) if i < len(body) else None
    if m is None:
        raise _Refused(f"{cls.__name__}.forward: after the hidden states, expected the head call "
                       f"`logits = self.lm_head(hidden_states)`, got `{text[i].splitlines()[0][:160] if i < len(body) else ''}`")
    logits, plan.head_attr = m.group(1), m.group(2)
    if m.group(4):
        plan.transforms.append(("scale", compile_self(m.group(4))))
    i += 1
    # 5. the transforms of the logits, up to `loss = None`
    aliases = {}  # `cap = <expression of self>` read by the next statements

    def resolve(expr):
        for name, value in aliases.items():
            expr = re.sub(rf"\b{name}\b", f"({value})", expr)
        return expr

    while i < len(body) and text[i] != "loss = None":
        t = text[i]
        if ((m := re.fullmatch(r"(\w+) = ((?:self|getattr\(self)\b.*)", t))
                and m.group(1) not in plan.named | {logits, hidden, outputs, "loss", "self"}
                and not re.search(rf"\b{logits}\b", m.group(2))):
            aliases[m.group(1)] = resolve(m.group(2))
        elif (m := re.fullmatch(rf"{logits} = {logits} \* (.+)", t)) and not re.search(rf"\b{logits}\b", m.group(1)):
            plan.transforms.append(("scale", compile_self(resolve(m.group(1)))))
        elif (cap := _softcap_steps(text[i : i + 3], logits)) is not None:
            # the soft-cap as three statements (Mistral Large 4): logits / c, tanh, * c
            plan.transforms.append(("softcap", compile_self(resolve(cap))))
            i += 2
        elif (m := re.fullmatch(rf"{logits} = {logits} / (.+)", t)) and not re.search(rf"\b{logits}\b", m.group(1)):
            plan.transforms.append(("scale", compile_self(f"1.0 / ({resolve(m.group(1))})")))
        elif t in (f"{logits} = {logits}.float()",):
            pass  # the fused loss computes in float32 anyway
        elif isinstance(body[i], ast.If) and not body[i].orelse and (cap := _softcap_block(body[i], logits)):
            plan.transforms.append(("softcap", compile_self(resolve(cap))))
        elif ((m := re.fullmatch(rf"{logits} = (?:nn\.functional|torch)\.tanh\({logits} / (\w+)\) \* (\w+)", t))
              and m.group(1) == m.group(2) and m.group(1) in aliases):
            plan.transforms.append(("softcap", compile_self(aliases[m.group(1)])))  # tanh(logits / cap) * cap
        else:
            refuse(i, "a transform of the logits that the fused loss does not reproduce")
        i += 1
    # 6. the loss: `loss = None; if labels is not None: loss = self.loss_function(logits, labels, ...)`
    if i + 1 >= len(body):
        raise _Refused(f"{cls.__name__}.forward: no `loss = self.loss_function(...)` found")
    m = re.fullmatch(rf"if labels is not None:\n    loss = self\.loss_function\((?:logits=)?{logits}, (?:labels=)?labels, "
                     rf"[^\n]*\*\*{plan.var_kw}\)", text[i + 1])
    if m is None:
        refuse(i + 1, "the loss is not `self.loss_function(logits, labels, ..., **kwargs)`")
    i += 2
    # 7. after the loss: the router auxiliary loss, tuple returns, the output
    while i < len(body):
        t = text[i]
        if t == "aux_loss = None":
            pass
        elif isinstance(body[i], ast.If) and (aux := _aux_block(body[i], text[i])) is not None:
            flag, call_text, coef_text = aux
            if flag not in plan.named:
                refuse(i, "the router auxiliary loss depends on something that is not an argument")
            plan.aux = (flag, _compile_expr(call_text, f"self, {outputs}, attention_mask=None", module_globals),
                        compile_self(coef_text))
        elif re.fullmatch(r"if not return_dict:\n(    .*\n)*    return .*", t):
            pass  # the tuple output: return_dict=False is handled by the integration
        elif isinstance(body[i], ast.Return) and isinstance(body[i].value, ast.Call) and i == len(body) - 1:
            try:  # the class the forward names (a global, or a dotted path from one)
                out_cls = _compile_expr(ast.unparse(body[i].value.func), "", module_globals)()
            except Exception:  # noqa: BLE001 - refused below
                out_cls = None
            if not (isinstance(out_cls, type) and {"loss", "logits"} <= set(getattr(out_cls, "__dataclass_fields__", {}))):
                refuse(i, "the output is not a ModelOutput with loss and logits")
            plan.output_cls = out_cls
        else:
            refuse(i, "a statement after the loss that the fused loss does not reproduce")
        i += 1
    if plan.output_cls is None:
        raise _Refused(f"{cls.__name__}.forward: does not end with `return <ModelOutput>(loss=..., logits=...)`")
    return plan


def _is_base_call(stmt) -> bool:
    import ast

    value = stmt.value if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
    target = (stmt.targets[0] if len(stmt.targets) == 1 else None) if isinstance(stmt, ast.Assign) else getattr(stmt, "target", None)
    return (isinstance(value, ast.Call) and isinstance(target, ast.Name) and isinstance(value.func, ast.Attribute)
            and ast.unparse(value.func).startswith("self.") and value.func.attr not in ("loss_function", "get_decoder"))


def _softcap_steps(lines, logits: str) -> str | None:
    """The cap ``c`` of the three statements ``logits = logits / c`` (or ``logits.float() / c``),
    ``logits = torch.tanh(logits)`` (or ``nn.functional.tanh``), ``logits = logits * c``, else None."""
    import re

    if len(lines) != 3:
        return None
    m = re.fullmatch(rf"{logits} = {logits}(?:\.float\(\))? / (.+)", lines[0])
    if (m is None or re.search(rf"\b{logits}\b", m.group(1))
            or not re.fullmatch(rf"{logits} = (?:nn\.functional|torch)\.tanh\({logits}\)", lines[1])
            or lines[2] != f"{logits} = {logits} * {m.group(1)}"):
        return None
    return m.group(1)


def _softcap_block(stmt, logits: str) -> str | None:
    """The cap's expression of ``if CAP is not None:`` (or ``(c := CAP) is not None``) around the
    three soft-cap statements of :func:`_softcap_steps` by that cap, else None."""
    import ast
    import re

    test = ast.unparse(stmt.test)
    m = re.fullmatch(r"\((\w+) := (.+)\) is not None", test) or re.fullmatch(r"(.+) is not None", test)
    if m is None:
        return None
    name, expr = (m.group(1), m.group(2)) if m.re.groups == 2 else (m.group(1), m.group(1))
    return expr if _softcap_steps([ast.unparse(s) for s in stmt.body], logits) == name else None


def _aux_block(stmt, text: str):
    """``(flag, load_balancing_loss_func(...) text, coefficient text)`` of the router auxiliary
    loss block ``if FLAG: aux_loss = load_balancing_loss_func(...); if labels is not None: loss +=
    COEF * aux_loss.to(loss.device)``, else None."""
    import re

    m = re.fullmatch(r"if (\w+):\n    aux_loss = (load_balancing_loss_func\(.*\))\n    if labels is not None:\n"
                     r"        loss \+= (.+) \* aux_loss\.to\(loss\.device\)", text)
    if m is None:
        return None
    return m.group(1), m.group(2), m.group(3)


def _reduce_transforms(transforms, model, user_softcap, user_temperature):
    """Fold the model's logit transforms (then the caller's ``softcap`` / ``temperature``) into the
    core's ``c * tanh(z / c) / T``: a scale ``a`` before the cap becomes ``c / a`` (since
    ``c tanh(a z / c) = a (c/a) tanh(z / (c/a))``) and every scale ends up in ``T``. Returns
    ``(softcap or None, temperature)``; raises ValueError for two caps."""
    scale, cap = 1.0, None
    steps = [(kind, fn(model)) for kind, fn in transforms]
    if user_softcap is not None:
        steps.append(("softcap", user_softcap))
    for kind, value in steps:
        if value is None:
            continue  # `if config.final_logit_softcapping is not None`
        if isinstance(value, torch.Tensor) or not isinstance(value, numbers.Real):
            # a learned scale would lose its gradient as a float
            raise ValueError(f"its logit {kind} is a {type(value).__name__}, not a number")
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"its logit {kind} is {value}; expected a positive number")
        if kind == "scale":
            scale *= value
        else:
            if cap is not None:
                raise ValueError("softcap: the model's forward already soft-caps its logits; do not pass softcap=")
            cap = value / scale
    return cap, float(user_temperature) / scale


# ----------------------------------------------------------------------------- patch_model


class _PatchState:
    """What :func:`patch_model` stored on the model (as ``model._ranktuner_patch``)."""

    def __init__(self, original, had_instance_forward, instance_forward, config, plan):
        self.original = original  # the bound forward at patch time (what calls without labels run)
        self.had_instance_forward = had_instance_forward
        self.instance_forward = instance_forward  # model.__dict__["forward"] before patching, if any
        self.config = config
        self.plan = plan  # what the model's forward does from its decoder to its loss
        self.active = True
        self.meter = NLLMeter()
        self.weighting = None
        self.options = {}
        self.ignore_index = -100
        self.eval_logits = False
        self.token_metrics = None  # [entropy sum, correct, kept] of the latest call with labels

    @property
    def objective(self) -> str:
        return _weighting_name(self.weighting)


def _unwrap(model):
    """A PEFT model's inner transformers model (PEFT's forward calls the inner model's
    ``forward``, so patching that instance is enough); any other model as is."""
    get_base_model = getattr(type(model), "get_base_model", None)
    if callable(get_base_model) and not hasattr(type(model), "get_output_embeddings"):
        return model.get_base_model()
    return model


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"model: expected a transformers causal LM with a config, got {type(model).__name__}")
    return model_type


def _plan(model) -> _HeadPlan:
    """The :class:`_HeadPlan` of ``model``'s class, checked against this instance (its head is
    ``get_output_embeddings()``, its decoder a module, its loss ``ForCausalLMLoss``); raises the
    ValueError that names the model type and what cannot be reproduced."""
    model_type = _model_type(model)
    cls = type(model)

    def refuse(why):
        return ValueError(f"model: model_type {model_type!r} ({cls.__name__}) cannot be patched: {why}. "
                          "make_compute_loss_func works with any model that returns logits.")

    for attr in ("get_output_embeddings", "forward"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"model: {cls.__name__} has no `{attr}`; expected a transformers causal LM")
    # the class whose forward runs (FSDP2's fully_shard makes a subclass that only adds hooks)
    owner = next((c for c in cls.__mro__ if "forward" in c.__dict__), cls)
    try:
        plan = _read_forward(owner)
    except _Refused as exc:
        raise refuse(str(exc)) from None
    head = model.get_output_embeddings()
    if head is None or getattr(model, plan.head_attr, None) is not head:
        raise refuse(f"its forward's head `self.{plan.head_attr}` is not its get_output_embeddings()")
    if isinstance(head, torch.nn.Linear) and getattr(type(head), "forward", None) is not torch.nn.Linear.forward:
        raise refuse(f"its head {type(head).__name__} overrides Linear.forward (e.g. a learned logit scale)")
    if not isinstance(_decoder(model, plan), torch.nn.Module):
        raise refuse(f"its forward's decoder `self.{plan.base_attr}` is not a module")
    if plan.scales_hidden and getattr(head, "bias", None) is not None:
        raise refuse("its forward scales the hidden states before a head with a bias")
    from transformers.loss.loss_utils import LOSS_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_function = model.loss_function
    if loss_function is not LOSS_MAPPING["ForCausalLM"]:
        raise refuse(f"its loss_function is {getattr(loss_function, '__name__', loss_function)!r}, "
                     "not transformers' ForCausalLMLoss")
    return plan


def _decoder(model, plan):
    module = model
    for part in plan.base_attr.split("."):
        module = getattr(module, part, None)
    return module


def check_model(model) -> None:
    """Raise the ValueError :func:`patch_model` would raise for ``model`` (naming its
    ``model_type`` and the part of its ``forward`` the fused loss cannot reproduce); return None
    if it can be patched. A PEFT model is checked through its inner model."""
    _plan(_unwrap(model))


def patch_model(model, weighting="sft", *, ignore_index: int = -100, eval_logits: bool = False, **options):
    """Make ``model(..., labels=labels)`` compute its loss with :func:`rk.linear_cross_entropy`.

    Only this model instance is changed (its ``forward`` attribute; the class is untouched);
    :func:`unpatch_model` restores it. Patch before handing the model to Trainer (accelerate
    wraps the forward it finds). A PEFT model is unwrapped: its inner transformers model is
    patched (PEFT calls that model's forward), and the PEFT model is returned.

    Which models: any whose ``forward`` follows transformers' causal-LM layout, read from the
    class's own source at patch time (``docs/integrations.md`` lists the families): a decoder
    call ``outputs = self.<decoder>(...)`` (``model``, ``transformer``, ``gpt_neox``,
    ``model.decoder``, a vision-language ``model``, ...), its ``last_hidden_state`` sliced by
    ``logits_to_keep``, the head ``get_output_embeddings()``, then only transforms the core
    reproduces (scales ``logits * s`` / ``logits / s``, soft-caps ``c * tanh(logits / c)``, folded
    into the core's ``softcap=`` / ``temperature=``), ``self.loss_function`` being transformers'
    ``ForCausalLMLoss``, and an MoE router auxiliary loss (``router_aux_loss_coef *
    load_balancing_loss_func(...)``, added with ``output_router_logits``, returned as
    ``aux_loss``). Anything else is refused with a ValueError naming the model type and the
    statement (:func:`check_model` tells without patching).

    A call with ``labels`` (``[B, T]`` token ids, ``-100`` ignored) or ``shift_labels`` runs the
    decoder as the model's forward does to the final hidden states ``[B, T, D]``, keeps the positions
    ``logits_to_keep`` selects, and returns the loss of the head ``model.get_output_embeddings()``
    (``[V, D]``, tied or not, with its bias if any) on the next-token targets:

    * the causal shift of transformers' ``ForCausalLMLoss``: position ``t`` predicts
      ``labels[t + 1]``, the last position is ignored; a ``shift_labels`` keyword (already
      shifted, e.g. from a context-parallel collator) is used as is;
    * ``reduction="mean"``: the sum over kept tokens divided by ``num_items_in_batch`` when the
      call passes it (Trainer does, for gradient accumulation), else by the kept count;
    * the model's logit transforms (Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale``,
      Granite's ``logits_scaling``, ...) as ``softcap=`` / ``temperature=`` (a caller's
      ``temperature`` divides the model's logits; a second soft-cap is refused);
    * under ``torch.autocast`` the head runs in the autocast dtype, as ``lm_head`` would;
    * ``logits_to_keep``: labels shaped like the kept positions are used as is; full-length
      labels are sliced like the hidden states.

    The output is the model's own output class (``CausalLMOutputWithPast``, ``MoeCausalLMOutputWithPast``
    with ``aux_loss`` and ``router_logits``, a VLM's output, ...) with ``loss`` (float32 scalar, differentiable),
    ``logits=None`` (the logits are never materialised), the base model's ``cache``,
    ``hidden_states`` and ``attentions``, and two attributes (not keys, so ``to_tuple()`` and
    Trainer's evaluation loop see the standard fields): ``outputs.nll``, the plain mean NLL of the
    kept tokens (float32, detached; NaN if every token is ignored) and ``outputs.objective``,
    the weighting's name. ``return_dict=False`` gives ``(loss, ...)`` without the logits.

    A call without labels runs the original forward unchanged (logits as usual). With
    ``eval_logits=True``, calls with labels in eval mode (``model.eval()``) also run the
    original forward and compute the same objective with :func:`rk.cross_entropy` on its
    logits (for ``compute_metrics`` that needs the logits); the output then has the logits.

    Args:
        model: a transformers causal LM (or a PEFT model around one), see above.
        weighting: ``"sft"`` (plain cross-entropy, the default), another name (``"ranktuner"``,
            ``"dft"``, ...) or a config such as ``rk.RankTuner(xi="geo")``.
        ignore_index: the label that marks ignored positions (transformers uses -100).
        eval_logits: see above.
        **options: further keyword options of :func:`rk.linear_cross_entropy` (``chunk_size``,
            ``impl``, and what the core offers, e.g. ``temperature``, ``label_smoothing``,
            ``z_loss``); with ``eval_logits``, those :func:`rk.cross_entropy` takes are passed to it.

    Returns:
        ``model`` (patched in place). Patching a patched model replaces its options.

    Raises:
        ValueError: a model whose forward cannot be reproduced (the message names its
            ``model_type`` and the statement), or a ``softcap=`` on a model that soft-caps.
        TypeError: not a transformers model; an unknown option or weighting.
    """
    wrapper, model = model, _unwrap(model)
    if not isinstance(eval_logits, bool):
        raise TypeError(f"eval_logits: expected a bool, got {type(eval_logits).__name__}")
    ignore_index = _check_ignore_index(ignore_index)
    _check_weighting(weighting)
    _check_options(options, rk.linear_cross_entropy, _RESERVED_LINEAR, "rk.linear_cross_entropy")
    plan = _plan(model)
    _heads.check_head(model.get_output_embeddings())  # an adapted head PEFT wraps: refused here, not at a step
    try:  # the model's logit transforms with the caller's softcap / temperature: one cap at most
        _reduce_transforms(plan.transforms, model, options.get("softcap"), options.get("temperature", 1.0))
    except ValueError as exc:
        raise ValueError(f"model: model_type {model.config.model_type!r} ({type(model).__name__}): {exc}") from None

    state = getattr(model, _PATCH_ATTR, None)
    if state is None or not state.active:
        had = "forward" in model.__dict__
        state = _PatchState(model.forward, had, model.__dict__.get("forward"), model.config, plan)
        cls_forward = type(model).forward

        @functools.wraps(cls_forward)  # keeps the signature: Trainer and generate() inspect it
        def forward(self, *args, **kwargs):
            return _patched_forward(self, *args, **kwargs)

        setattr(forward, _MARK, True)
        object.__setattr__(model, _PATCH_ATTR, state)
        model.forward = types.MethodType(forward, model)
    state.plan = plan
    state.weighting = weighting
    state.options = dict(options)
    state.ignore_index = ignore_index
    state.eval_logits = eval_logits
    return wrapper


def is_patched(model) -> bool:
    """Whether :func:`patch_model` is in effect on ``model``."""
    state = getattr(_unwrap(model), _PATCH_ATTR, None)
    return state is not None and state.active


def unpatch_model(model):
    """Undo :func:`patch_model`: ``model.forward`` is again exactly what it was before (the
    class's forward, or the instance attribute that was there). If something wrapped the
    patched forward afterwards (the wrapper is kept), the patch is switched off instead: every
    call then goes straight to the original forward. Returns ``model``; a model that is not
    patched is returned unchanged."""
    wrapper, model = model, _unwrap(model)
    state = getattr(model, _PATCH_ATTR, None)
    if state is None or not state.active:
        return wrapper
    current = model.__dict__.get("forward")
    if getattr(getattr(current, "__func__", None), _MARK, False):
        if state.had_instance_forward:
            model.__dict__["forward"] = state.instance_forward
        else:
            del model.__dict__["forward"]
        object.__delattr__(model, _PATCH_ATTR)
    else:
        warnings.warn("unpatch_model: model.forward was wrapped after patching; the patch is switched off and "
                      "calls pass through to the original forward", stacklevel=2)
    state.active = False
    return wrapper


@functools.lru_cache(maxsize=None)
def _signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _bind(self, args, kwargs) -> dict:
    """The call's arguments by name (``**kwargs`` flattened in), following the class's
    signature, so that ``labels`` is found whether passed by keyword or by position."""
    sig = _signature(type(self))
    arguments = dict(sig.bind(self, *args, **kwargs).arguments)
    arguments.pop(next(iter(sig.parameters)))  # self
    for name, p in sig.parameters.items():
        if name not in arguments:
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            if arguments.pop(name):
                raise TypeError(f"{type(self).__name__}.forward: unexpected extra positional arguments")
    return arguments


def _patched_forward(self, *args, **kwargs):
    state = getattr(self, _PATCH_ATTR, None)
    if state is None:
        raise RuntimeError("patched forward called on a model without ranktuner patch state")
    if not state.active:
        return state.original(*args, **kwargs)
    arguments = _bind(self, args, kwargs)
    labels = arguments.pop("labels", None)
    shift_labels = arguments.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return state.original(*args, **kwargs)
    if state.eval_logits and not self.training:
        return _logits_loss(self, state, arguments, labels, shift_labels)
    return _fused_loss(self, state, arguments, labels, shift_labels)


def _loss_args(state, arguments) -> tuple:
    """Pop what belongs to the loss from the call's arguments: ``(logits_to_keep,
    num_items_in_batch, ignore_index, return_dict)``; the rest goes to the model."""
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    ignore_index = _check_ignore_index(arguments.pop("ignore_index", state.ignore_index))
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(state.config, "return_dict", True)
    return logits_to_keep, num_items_in_batch, ignore_index, True if return_dict is None else bool(return_dict)


def _targets(labels, shift_labels, ignore_index, full_shape, kept_shape, logits_to_keep) -> torch.Tensor:
    if shift_labels is None:
        shift_labels = _shift(labels, ignore_index)
    elif not isinstance(shift_labels, torch.Tensor):
        raise TypeError(f"shift_labels: expected a tensor, got {type(shift_labels).__name__}")
    return _align_targets(shift_labels, full_shape, kept_shape, logits_to_keep)


def _output_fields(output_cls) -> tuple:
    """``output_cls``'s field names but ``loss`` and ``logits``. Marked as having a constant
    result (what ``torch._dynamo.assume_constant_result`` sets, without importing dynamo):
    ``torch.compile`` calls it at trace time instead of tracing ``dataclasses.fields`` (a graph
    break)."""
    return tuple(f.name for f in dataclasses.fields(output_cls) if f.name not in ("loss", "logits"))


_output_fields._dynamo_marked_constant = True


def _finish(self, state, base, loss, logits, nll_total, nll_count, return_dict, extra=None):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    nll = state.meter.record("train" if self.training else "eval", nll_total, nll_count)
    output_cls = state.plan.output_cls or CausalLMOutputWithPast  # the class the model's forward returns
    fields = {name: getattr(base, name, None) for name in _output_fields(output_cls)}
    fields.update(extra or {})
    out = output_cls(loss=loss, logits=logits, **fields)
    # attributes, not keys: to_tuple() and Trainer's prediction_step see only the standard fields
    object.__setattr__(out, "nll", nll)
    object.__setattr__(out, "objective", state.objective)
    return out if return_dict else out.to_tuple()


def _run_decoder(self, plan, arguments):
    """Call the decoder as the model's forward does: the same arguments (the defaults it resolves
    from the config resolved here), ``**kwargs`` if it passes them."""
    for name, default in plan.resolve:
        if arguments.get(name) is None:
            arguments[name] = default(self)
    arguments.update(plan.fixed)
    args = [arguments.get(n, plan.defaults.get(n)) for n in plan.base_args]
    kwargs = {k: arguments.get(v, plan.defaults.get(v)) for k, v in plan.base_kw.items()}
    kwargs.update(plan.base_const)
    if plan.base_var_kw:
        kwargs.update((k, v) for k, v in arguments.items() if k not in plan.named)
    return _decoder(self, plan)(*args, **kwargs)


def _router_aux(self, plan, arguments, base):
    """``(coef * aux_loss, aux_loss)`` of an MoE model's router auxiliary loss, computed as its
    forward does when ``output_router_logits`` is on; ``(None, None)`` otherwise."""
    if plan.aux is None:
        return None, None
    flag, aux_fn, coef_fn = plan.aux
    if not arguments.get(flag):
        return None, None
    aux_loss = aux_fn(self, base, arguments.get("attention_mask"))
    return coef_fn(self) * aux_loss, aux_loss


def _fused_loss(self, state, arguments, labels, shift_labels):
    plan = state.plan
    logits_to_keep, num_items_in_batch, ignore_index, return_dict = _loss_args(state, arguments)
    base = _run_decoder(self, plan, arguments)
    hidden = getattr(base, "last_hidden_state", None)
    if hidden is None and isinstance(base, (tuple, list)) and base:
        hidden = base[0]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"model: {type(self).__name__}.{plan.base_attr} returned {type(base).__name__} without "
                        "last_hidden_state; expected the decoder's BaseModelOutputWithPast")
    kept = _slice_to_keep(hidden, logits_to_keep)
    target = _targets(labels, shift_labels, ignore_index, hidden.shape[:-1], kept.shape[:-1], logits_to_keep)
    # the model's logit transforms (soft-cap, scales) with the caller's, as the core's softcap / temperature
    softcap, temperature = _reduce_transforms(plan.transforms, self, state.options.get("softcap"),
                                              state.options.get("temperature", 1.0))
    options = {**state.options, "softcap": softcap, "temperature": temperature,
               "weighting": state.weighting, "ignore_index": ignore_index, "reduction": "mean",
               "num_items_in_batch": num_items_in_batch, "return_stats": True}
    head = self.get_output_embeddings()
    if rk.distributed.is_fsdp_module(head):
        # the head is its own FSDP2 unit: outside its forward its weight is a sharded DTensor; the
        # loss runs as one of its FSDP forward methods (gathered before, resharded after)
        loss, stats = rk.distributed.head_cross_entropy(head, kept, target, **options)
    else:
        kept, weight, bias = _heads.linear_operands(head, kept)
        kept = kept.to(weight.device)  # a model split across devices can end elsewhere than its head
        target = target.to(weight.device)
        device_type = weight.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        with torch.autocast(device_type, enabled=False):  # the dtype is explicit: the one lm_head would use
            loss, stats = rk.linear_cross_entropy(
                kept.to(dtype), weight.to(dtype), target,
                linear_bias=None if bias is None else bias.to(dtype), **options)
    total, count = _nll_terms(stats["logp_t"], target, ignore_index)
    state.token_metrics = _token_metrics(stats, target, ignore_index)
    aux_term, aux_loss = _router_aux(self, plan, arguments, base)
    if aux_term is not None:
        loss = loss + aux_term.to(loss.device)
    extra = {} if aux_loss is None else {"aux_loss": aux_loss}
    return _finish(self, state, base, loss, None, total, count, return_dict, extra)


def _logits_loss(self, state, arguments, labels, shift_labels):
    """``eval_logits=True`` in eval mode: the original forward's logits, then rk.cross_entropy."""
    logits_to_keep, num_items_in_batch, ignore_index, return_dict = _loss_args(state, arguments)
    out = state.original(**arguments, logits_to_keep=logits_to_keep, return_dict=True)
    logits = out.logits
    source = arguments.get("input_ids")
    if source is None:
        source = arguments.get("inputs_embeds")
    target = _targets(labels, shift_labels, ignore_index, tuple(source.shape[:2]), logits.shape[:-1],
                      logits_to_keep).to(logits.device)
    params = inspect.signature(rk.cross_entropy).parameters
    options = {k: v for k, v in state.options.items() if k in params}
    loss, stats = rk.cross_entropy(logits, target, weighting=state.weighting, ignore_index=ignore_index,
                                   reduction="mean", num_items_in_batch=num_items_in_batch, return_stats=True,
                                   **options)
    total, count = _nll_terms(stats["logp_t"], target, ignore_index)
    state.token_metrics = _token_metrics(stats, target, ignore_index)
    aux_loss = getattr(out, "aux_loss", None)
    if aux_loss is not None and state.plan.aux is not None:  # the forward adds it only with labels
        loss = loss + state.plan.aux[2](self) * aux_loss.to(loss.device)
    return _finish(self, state, out, loss, logits, total, count, return_dict)


# ----------------------------------------------------------------------------- compute_loss_func


def make_compute_loss_func(weighting="sft", *, ignore_index: int = -100, **options):
    """A ``Trainer(compute_loss_func=...)`` computing the objective on ``outputs.logits``.

    The returned ``loss_func(outputs, labels, num_items_in_batch=None)`` (the signature
    transformers 5's ``Trainer.compute_loss`` calls) takes ``outputs.logits`` ``[B, T, V]`` and
    ``labels`` ``[B, T]``, shifts the labels as ``ForCausalLMLoss`` does (position ``t``
    predicts ``labels[t + 1]``), and returns ``rk.cross_entropy(logits, shifted, weighting=...,
    num_items_in_batch=num_items_in_batch)`` (a float32 scalar; the mean over kept tokens, or
    their sum over ``num_items_in_batch``). Trainer pops ``labels`` before calling the model, so
    the model (patched or not) returns its logits. Works with any causal LM that returns logits.

    The plain NLL of each call is recorded in ``loss_func.nll_meter`` (an :class:`NLLMeter`;
    ``"train"`` when autograd is enabled, ``"eval"`` under ``torch.no_grad()`` as in Trainer's
    evaluation), which :func:`add_nll_logging` finds on ``trainer.compute_loss_func``.

    Args:
        weighting: ``"sft"`` (the default), another name or a config such as ``rk.RankTuner()``.
        ignore_index: the ignored label (-100).
        **options: further keyword options of :func:`rk.cross_entropy` (``impl``,
            ``inplace_backward``, ...).
    """
    ignore_index = _check_ignore_index(ignore_index)
    _check_weighting(weighting)
    _check_options(options, rk.cross_entropy, _RESERVED_LOGITS, "rk.cross_entropy")
    meter = NLLMeter()

    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.get("logits") if hasattr(outputs, "get") else getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, (tuple, list)) and outputs:
            logits = outputs[0]
        if logits is None:
            raise ValueError("outputs: no logits (a patched model called with labels returns logits=None; "
                             "Trainer(compute_loss_func=...) calls the model without labels)")
        if labels is None:
            raise ValueError("labels: compute_loss_func needs the labels (the batch has no 'labels')")
        target = _align_targets(_shift(labels, ignore_index).to(logits.device), logits.shape[:-1],
                                logits.shape[:-1], 0)
        loss, stats = rk.cross_entropy(logits, target, weighting=weighting, ignore_index=ignore_index,
                                       reduction="mean", num_items_in_batch=num_items_in_batch,
                                       return_stats=True, **options)
        total, count = _nll_terms(stats["logp_t"], target, ignore_index)
        meter.record("train" if torch.is_grad_enabled() else "eval", total, count)
        return loss

    compute_loss_func.nll_meter = meter
    compute_loss_func.objective = _weighting_name(weighting)
    return compute_loss_func


# ----------------------------------------------------------------------------- logging


def _find_meter(source) -> NLLMeter | None:
    if source is None:
        return None
    if isinstance(source, NLLMeter):
        return source
    meter = getattr(source, "nll_meter", None)
    if isinstance(meter, NLLMeter):
        return meter
    if isinstance(source, torch.nn.Module):
        for module in source.modules():
            state = getattr(module, _PATCH_ATTR, None)
            if state is not None and state.active:
                return state.meter
    return None


@class_built_on_first_use
def _callback_class():
    from transformers import TrainerCallback

    class NLLLoggingCallback(TrainerCallback):
        """Adds the plain mean NLL of the kept tokens to Trainer's logs: ``nll`` next to the
        train ``loss`` (the mean over the logging interval's optimizer steps of each step's
        token mean, as Trainer averages ``loss``) and ``eval_nll`` next to ``eval_loss`` (the
        token-weighted mean over the evaluation; ``{prefix}_nll`` for another
        ``metric_key_prefix``), in ``trainer.state.log_history``, in the dict ``evaluate()``
        returns, and for the callbacks after this one (use :func:`add_nll_logging` to run it
        before the reporting integrations); ``predict()``'s metrics get ``test_nll``.

        Args:
            source: where the NLL is recorded: a model patched with :func:`patch_model`, the
                function from :func:`make_compute_loss_func`, or an :class:`NLLMeter`. Default:
                the patched model (or a patched submodule) Trainer passes to the callbacks.
        """

        def __init__(self, source=None):
            if source is not None and _find_meter(source) is None and not isinstance(source, torch.nn.Module):
                raise TypeError(f"source: expected a patched model, a make_compute_loss_func function or an NLLMeter, "
                                f"got {type(source).__name__}")
            self.source = source
            self._eval = None  # [sum, count] of the current evaluation's prediction steps

        def _meter(self, model):
            return _find_meter(self.source if self.source is not None else model)

        def _pop_eval(self):
            pair, self._eval = self._eval, None
            return _token_mean(pair)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            meter = self._meter(model)
            if meter is not None:
                meter.reset()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            meter = self._meter(model)
            if meter is not None:
                meter.end_step()

        def on_prediction_step(self, args, state, control, model=None, **kwargs):
            # Trainer's evaluation loop calls the model once per batch: take that call's NLL
            # (eval-mode calls made outside the loop are not counted)
            meter = self._meter(model)
            pair = None if meter is None else meter.take_last_eval()
            if pair is not None:
                self._eval = pair if self._eval is None else self._eval + pair

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            meter = self._meter(model)
            if meter is None or logs is None:
                return
            added = {}
            if "loss" in logs:
                value = meter.pop_train()
                if value is not None:
                    added["nll"] = value
            prefixes = [k[:-len("_loss")] for k in logs if k.endswith("_loss") and k != "train_loss"]
            if prefixes and f"{prefixes[0]}_runtime" in logs:
                value = self._pop_eval()
                if value is not None:
                    added[f"{prefixes[0]}_nll"] = value
            if not added:
                return
            history = state.log_history[-1] if state.log_history else None
            if history is not None and all(history.get(k) == v for k, v in logs.items()):
                history.update(added)
            logs.update(added)

        def on_evaluate(self, args, state, control, **kwargs):
            self._eval = None  # on_log took it; nothing carries over to the next evaluation

        def on_predict(self, args, state, control, metrics=None, **kwargs):
            value = self._pop_eval()
            prefixes = [k[:-len("_loss")] for k in (metrics or {}) if k.endswith("_loss")]
            if value is not None and prefixes:
                metrics[f"{prefixes[0]}_nll"] = value  # the dict predict() returns

    return NLLLoggingCallback


def __getattr__(name):  # PEP 562: the TrainerCallback subclass is built on first use
    if name == "NLLLoggingCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_nll_logging(trainer, source=None):
    """Add a :class:`NLLLoggingCallback` to ``trainer`` as its first callback, so that every
    logger after it (console, TensorBoard, W&B, ...) sees ``nll`` / ``eval_nll``. ``source``
    defaults to ``trainer.compute_loss_func`` when it is one of :func:`make_compute_loss_func`'s,
    else the patched ``trainer.model``. Returns the callback."""
    handler = getattr(trainer, "callback_handler", None)
    if handler is None:
        raise TypeError(f"trainer: expected a transformers Trainer, got {type(trainer).__name__}")
    if source is None:
        source = trainer.compute_loss_func if _find_meter(getattr(trainer, "compute_loss_func", None)) else None
    if source is None and _find_meter(trainer.model) is None:
        raise ValueError("trainer: its model is not patched (patch_model) and its compute_loss_func is not from "
                         "make_compute_loss_func, so no NLL is recorded")
    callback = _callback_class()(source)
    handler.callbacks.insert(0, callback)
    return callback
