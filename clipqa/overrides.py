"""Command-line group choices that a later config replaced: ``freeze=staged +paper=V2`` runs the paper's V2 (one
phase, text frozen) because V1's file spells its freeze policy out, so that it wins. That is by design, but a
researcher who typed ``freeze=staged`` must be told, or "staged is no better" gets published from a V2 run.

Found by composing: what each choice sets on its own (its keys that differ from the base config), compared with the
config that runs. Only ablation axes (``conf/<group>/``) chosen on the command line are checked, against the files
that set keys across groups (experiment, paper, sweep). Hydra has no record of which file last set a key, hence this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from clipqa.paths import CONF_DIR

# The files that set keys of other groups: a choice of theirs may replace a group choice.
CROSS_CUTTING = ("experiment", "paper", "sweep")
NOT_AXES = (*CROSS_CUTTING, "optuna_space", "hydra")

log = logging.getLogger(__name__)


def warn_replaced_choices(final: DictConfig) -> None:
    """From inside a Hydra job (train.py): one warning per replaced command-line group choice, in the run's log."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    name = hc.job.config_name
    for message in replaced_choices(list(hc.overrides.task), final, lambda o: compose(name, overrides=o)):
        log.warning("%s", message)


def replaced_choices(overrides: list[str], final: DictConfig, compose: Callable[[list[str]], DictConfig]) -> list[str]:
    """One message per command-line group choice whose keys a later config replaced (empty: none).

    ``overrides``: the command line's (Hydra's ``overrides.task``); ``final``: the composed config that runs;
    ``compose(overrides)``: the main config composed with those overrides (no Hydra keys).
    """
    choices, keys = _parse(overrides)
    axes = [o for o in choices if o[0] not in NOT_AXES]
    crossing = [o for o in choices if o[0] in CROSS_CUTTING]
    if not axes or not crossing:
        return []  # nothing to replace, or nothing to replace it: no composing
    base = _leaves(compose([]))
    ran = _leaves(final)
    messages = []
    for *_, text in axes:
        chosen = _delta(_leaves(compose([text])), base)  # what the choice sets, on its own
        lost = {
            k: v
            for k, v in chosen.items()
            if ran.get(k) != v and not any(k == key or k.startswith(f"{key}.") for key in keys)
        }
        if not lost:
            continue
        # which of the cross-cutting files, composed with the choice alone, undo it
        by = [o[2] for o in crossing if any(_leaves(compose([text, o[2]])).get(k) != v for k, v in lost.items())]
        by = by or [o[2] for o in crossing]
        shown = "; ".join(f"{k}={_show(ran.get(k))} (not {_show(v)})" for k, v in sorted(lost.items())[:4])
        more = f" and {len(lost) - 4} more" if len(lost) > 4 else ""
        messages.append(
            f"{text} on the command line was replaced by {' and '.join(by)}: what ran has {shown}{more}. This run "
            f"is not {text}. To run it, leave {' and '.join(by)} out, or set the keys on the command line "
            f"({', '.join(f'{k}=...' for k in sorted(lost)[:2])}), which wins over every file."
        )
    return messages


def _parse(overrides: list[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(group choices as (group, choice, the override's text), the keys set by key=value overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices, keys = [], []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_delete() or o.is_sweep_override():
            continue
        name = o.key_or_group
        if (CONF_DIR / name).is_dir():
            choices.append((name, str(o.value()), o.input_line or f"{name}={o.value()}"))
        else:
            keys.append(name)
    return choices, keys


def _leaves(cfg: DictConfig) -> dict[str, object]:
    """``{"freeze.text": True, "trainer.phases": [...], ...}``: every leaf by its dotted key (lists whole)."""
    out: dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def _delta(chosen: dict, base: dict) -> dict:
    return {k: v for k, v in chosen.items() if base.get(k, object()) != v}


def _show(value) -> str:
    text = "null" if value is None else str(value).replace("True", "true").replace("False", "false")
    return text if len(text) <= 60 else text[:57] + "..."
