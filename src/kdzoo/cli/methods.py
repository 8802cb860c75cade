"""``kdzoo methods``: the registered methods (or models, datasets, condensers), as a table or one by one."""
from __future__ import annotations

import argparse
import shutil
import textwrap

from ..condense import CONDENSERS
from ..data.datasets import DATASETS
from ..errors import ConfigError
from ..methods import METHODS
from ..models import MODELS
from ..registry import CLIP_METHODS, DIFFUSION_METHODS, LM_LOSSES, describe_type
from ..tasks import TASKS
from ..tasks.lm import create_lm_loss  # noqa: F401  (the LM losses register on import)


def add_methods_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("methods", help="list the registered distillation methods, or describe one",
                       description="Without NAME: a table of every registered method (family, whether it needs a "
                                   "teacher, whether it suits pairs of different architectures, what it does). "
                                   "With NAME: its description, options with defaults and meanings, the layers "
                                   "it reads by default and its paper.")
    p.add_argument("name", nargs="?", default=None, help="a method (or, with --models/--datasets/--condensers/--lm/--diffusion/"
                                                          "--clip, an entry of that list) to describe")
    p.add_argument("--models", action="store_true", help="list registered models instead")
    p.add_argument("--datasets", action="store_true", help="list registered datasets instead")
    p.add_argument("--condensers", action="store_true", help="list dataset-distillation methods instead")
    p.add_argument("--tasks", action="store_true", help="list the tasks (kinds of model) kdzoo distils instead")
    p.add_argument("--lm", action="store_true", help="list the language-model losses (kdzoo lm) instead")
    p.add_argument("--diffusion", action="store_true", help="list the diffusion distillation methods instead")
    p.add_argument("--clip", action="store_true", help="list the CLIP (dual encoder) distillation methods instead")
    p.set_defaults(func=cmd_methods)
    return p


LIST_FLAGS = ("models", "datasets", "condensers", "tasks", "lm", "diffusion", "clip")


def cmd_methods(args) -> int:
    chosen = [f"--{flag}" for flag in LIST_FLAGS if getattr(args, flag)]
    if len(chosen) > 1:  # one list at a time: which one was meant is not for us to guess
        raise ConfigError(f"{' and '.join(chosen)}: give one of them (one list at a time)")
    registry = (MODELS if args.models else DATASETS if args.datasets else CONDENSERS if args.condensers
                else TASKS if args.tasks else LM_LOSSES if args.lm else DIFFUSION_METHODS if args.diffusion
                else CLIP_METHODS if args.clip else METHODS)
    width = _terminal_width()
    if args.name is not None:
        print("\n".join(describe_entry(registry.get(args.name), registry is METHODS, width)))
        return 0
    if registry is METHODS:
        rows = [(e.name, e.meta.get("family", ""), _cross_arch(e.meta), "yes" if e.obj.needs_teacher else "no",
                 e.description) for e in registry]
        headers = ("name", "family", "cross-arch", "teacher", "description")
    elif registry is TASKS:
        rows = [(e.name, e.meta.get("family", ""), e.description) for e in registry]
        headers = ("name", "family", "description")
    else:
        rows = [(e.name, e.meta.get("family", ""), "; ".join(x for x in (_defaults(e.defaults), e.paper) if x))
                for e in registry]
        headers = ("name", "family", "defaults; paper")
    print("\n".join(format_table(headers, rows, width)))
    if registry is METHODS:
        print(textwrap.fill("cross-arch: yes = made for pairs of different families (CNN/ViT/MLP), logits = reads "
                            "logits only (any pair), no = features of one family.  'kdzoo methods NAME' describes "
                            "one method.", width))
    return 0


def _terminal_width() -> int:
    """The terminal's columns (COLUMNS when set), at most 100 so a copied table stays readable."""
    return max(60, min(100, shutil.get_terminal_size((100, 24)).columns))


def format_table(headers: tuple[str, ...], rows: list[tuple[str, ...]], width: int) -> list[str]:
    """Left-aligned columns two spaces apart; the last column is cut (with "...") to fit `width`."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    room = max(width - sum(widths) - 2 * len(widths), 10)

    def line(cells: tuple[str, ...]) -> str:
        last = cells[-1] if len(cells[-1]) <= room else cells[-1][:room - 3] + "..."
        return ("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + last).rstrip()

    return [line(headers)] + [line(row) for row in rows]


def describe_entry(entry, is_method: bool, width: int) -> list[str]:
    """`kdzoo methods NAME`: what the entry does, its options (default, allowed values, meaning), the layers
    it reads by default and its paper."""
    def wrapped(label: str, text: str) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=label, subsequent_indent=" " * len(label)) or [label]

    family = entry.meta.get("family", "")
    summary = entry.description or " ".join((entry.obj.__doc__ or "").strip().split("\n\n")[0].split())
    lines = [f"{entry.name}{f' ({family})' if family else ''}: {summary or '(no description)'}"]
    if entry.paper:
        lines += wrapped("paper: ", entry.paper)
    if entry.meta.get("scope"):  # where the method is part of its paper, or our reading of it
        lines += wrapped("implements: ", entry.meta["scope"])
    if is_method:
        cross = {"yes": "yes, made for pairs of different families (CNN, ViT, MLP)",
                 "logits": "any pair (reads logits only)", "no": "features of one family (same-family pairs)"}
        lines.append(f"needs a teacher: {'yes' if entry.obj.needs_teacher else 'no'}")
        lines.append(f"cross-architecture: {cross[_cross_arch(entry.meta)]}")
        lines += wrapped("layers by default: ", entry.meta.get("layers", "(not stated)"))
        if entry.obj.ce_weight is not None:
            lines.append(f"cross-entropy weight its paper pairs it with: {entry.obj.ce_weight:g}")
    if not entry.defaults:
        lines.append("options: none")
        return lines
    example = f"{{name: {entry.name}, OPTION: VALUE}}" if is_method else "OPTION=VALUE"
    lines.append(f"options (set as {example}):")
    meanings, hints = entry.option_meanings(), entry.hints()
    name_width = max(len(k) for k in entry.defaults)
    for key, default in entry.defaults.items():
        head = f"  {key.ljust(name_width)}  default {_show_default(default)}"
        lines.append(f"{head}  ({describe_type(hints[key])})" if hints.get(key) is not None else head)
        lines += wrapped(" " * (name_width + 4), meanings.get(key, "(no description)"))
    return lines


def _show_default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return str(list(value))
    return str(value)


def _cross_arch(meta: dict) -> str:
    """"yes": designed for pairs of different families (CNN <-> ViT <-> MLP); "logits": reads only logits, so any
    pair works; "no": features of one family (same-family pairs).  A registration's ``cross_arch`` says so
    (True or "logits"); else the logit family reads logits only."""
    if meta.get("cross_arch"):
        return "logits" if meta["cross_arch"] == "logits" else "yes"
    return "logits" if meta.get("family") == "logit" else "no"


def _defaults(defaults: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in defaults.items())
