"""The forward reader: what a causal LM's ``forward`` does from its decoder to its loss, read
once per class from its source (:func:`_read_forward` -> :class:`_HeadPlan`) and checked
against an instance (:func:`_plan`); the model's logit transforms folded into the core's
``softcap`` / ``temperature`` (:func:`_reduce_transforms`). A forward the fused loss cannot
reproduce is refused with the statement that is not understood."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import warnings

import torch

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

