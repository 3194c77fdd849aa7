"""``cepo compare``: every method × seed on one configuration, then the paper-shaped report.

Layout: ``OUT/<label>/seed<k>/`` is an ordinary run folder (``cepo train`` writes the same files). A run whose
``summary.json`` exists is finished and is never redone, so an interrupted comparison resumes where it stopped;
an unfinished folder is cleared and run again. ``OUT/compare.json`` records the command, the resolved
configuration and every variant; a second invocation with a different configuration, or a variant label reused
with other settings, refuses to mix results.

``--methods`` lists methods and variants, separated by commas. A method is its registered name (``cepo``, its
folder is ``OUT/cepo``); a variant is ``LABEL=METHOD:KEY=VALUE[;KEY=VALUE…]`` — the method under other settings,
run into ``OUT/LABEL``, each ``KEY=VALUE`` a ``--set`` override applied on top of the configuration::

    grpo,rlsd,cepo,cepo-rollout=cepo:teacher.negative_scope=rollout
    cepo,cepo-l0=cepo:algorithm.lambda0=0.0;algorithm.lambda_schedule=constant

Commas and semicolons inside brackets, braces or quotes belong to the value (``data.eval_suites=[test, hard]``).
The label names the folder and the report's row (upper-cased, as the figures show it); it may not be a
method's name. The overrides are validated like ``--set`` before anything runs; ``algorithm.method``,
``seed`` and ``data.seed`` are set by the comparison and cannot be overridden.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from cepo.algorithm.methods import method_names
from cepo.config import ConfigError, RunConfig, _validate, apply_overrides, dump_config, parse_override

__all__ = ["Entry", "parse_methods", "resolve_entry", "run_compare"]

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SET_BY_COMPARE = ("algorithm.method", "seed", "data.seed")
_SYNTAX = "METHOD or LABEL=METHOD:KEY=VALUE[;KEY=VALUE…]"


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: ``label`` (its folder under OUT and its row), the registered ``method`` and
    the ``--set``-style ``overrides`` of a variant (none for a plain method, whose label is its name)."""

    label: str
    method: str
    overrides: tuple[str, ...] = field(default=())

    @property
    def is_variant(self) -> bool:
        return self.label != self.method


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets, braces and quotes (YAML flow values stay whole)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _parse_entry(text: str, known: tuple[str, ...]) -> Entry:
    allowed = ", ".join(known)
    head, eq, rest = text.partition("=")
    if not eq:
        if ":" in text:
            raise ValueError(f"--methods: {text!r} has settings but no label; write {_SYNTAX}")
        if text not in known:
            raise ValueError(f"--methods: unknown {[text]}; allowed: {allowed}")
        return Entry(text, text)
    label = head.strip()
    if ":" in label:
        raise ValueError(f"--methods: {text!r} has settings but no label; write {_SYNTAX}")
    if not _LABEL.match(label):
        raise ValueError(
            f"--methods: variant label {label!r} must be a folder name (letters, digits, '_', '.', '+', '-')"
        )
    if label.lower() in {m.lower() for m in known}:
        raise ValueError(f"--methods: variant label {label!r} is a method's name; choose another label")
    method, _, settings = rest.partition(":")
    method = method.strip()
    if method not in known:
        raise ValueError(f"--methods: variant {label!r}: unknown method {method!r}; allowed: {allowed}")
    overrides = tuple(o.strip() for o in _split_top(settings, ";") if o.strip())
    for override in overrides:
        try:
            key = ".".join(parse_override(override)[0])
        except ConfigError as exc:
            raise ValueError(f"--methods: variant {label!r}: {exc}") from None
        if key in _SET_BY_COMPARE:
            raise ValueError(
                f"--methods: variant {label!r}: {key} is set by the comparison "
                "(the method before the ':', the seed by --seeds)"
            )
    return Entry(label, method, overrides)


def parse_methods(text: str) -> list[Entry]:
    """The rows of ``--methods`` (see the module docstring for the syntax); ValueError naming what is wrong."""
    known = method_names()
    entries = [_parse_entry(t.strip(), known) for t in _split_top(text, ",") if t.strip()]
    if not entries:
        raise ValueError(f"--methods: unknown {text!r}; allowed: {', '.join(known)}")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--methods lists a method twice: {text!r}")
    return entries


def _entry(item: Entry | str) -> Entry:
    return item if isinstance(item, Entry) else Entry(item, item)


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def resolve_entry(cfg: RunConfig, entry: Entry) -> tuple[RunConfig, dict[str, Any]]:
    """The configuration of one row (``cfg`` with the variant's overrides, validated like ``--set``) and the
    resolved value of every overridden key (what ``compare.json`` records and the run folders are checked
    against). ConfigError names a bad key or value."""
    if not entry.overrides:
        return cfg, {}
    data = apply_overrides(cfg.model_dump(mode="json"), list(entry.overrides))
    resolved = _validate(data, f"--methods variant {entry.label}: {';'.join(entry.overrides)}")
    dumped = resolved.model_dump(mode="json")
    keys = [".".join(parse_override(o)[0]) for o in entry.overrides]
    return resolved, {key: _lookup(dumped, key) for key in keys}


def run_config(cfg: RunConfig, method: str, seed: int, label: str | None = None) -> RunConfig:
    """The row's configuration with this method and seed (engines, learner init and data order all follow)."""
    return cfg.model_copy(
        update={
            "name": f"{cfg.name}-{label or method}-seed{seed}",
            "seed": seed,
            "algorithm": cfg.algorithm.model_copy(update={"method": method}),
            "data": cfg.data.model_copy(update={"seed": seed}),
        }
    )


def _record_variants(
    out: Path, previous: dict[str, Any], variants: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Earlier variants merged with this invocation's; a label reused with other settings is refused."""
    before = previous.get("variants") or {}
    for label, now in variants.items():
        was = before.get(label)
        if was is not None and (was.get("method"), was.get("changes")) != (now["method"], now["changes"]):
            raise ValueError(
                f"{out} holds variant {label!r} run as {was.get('method')} with "
                f"{';'.join(was.get('overrides') or []) or 'no overrides'}, not "
                f"{';'.join(now['overrides']) or 'no overrides'}; use another label, another --out or delete "
                f"{out / label}"
            )
    return {**before, **variants}


def run_compare(
    cfg: RunConfig,
    out: Path,
    methods: list[Entry | str],
    seeds: int,
    *,
    command: str = "",
    steps: int | None = None,
    console: Console | None = None,
) -> dict[str, Path]:
    """Train every row × seed into ``OUT/<label>/seed<k>/`` (finished runs are kept) and write the report.

    ``methods`` are :class:`Entry` rows (:func:`parse_methods`) or plain method names. Every variant's
    overrides are resolved, and every finished run folder checked against its row, before anything is trained.
    """
    from cepo.report import check_run_folder, write_report
    from cepo.run import train

    console = console or Console()
    entries = [_entry(m) for m in methods]
    configs: dict[str, RunConfig] = {}
    variants: dict[str, dict[str, Any]] = {}
    for e in entries:
        configs[e.label], changes = resolve_entry(cfg, e)
        if e.is_variant:
            variants[e.label] = {"method": e.method, "overrides": list(e.overrides), "changes": changes}
    out.mkdir(parents=True, exist_ok=True)
    record = out / "compare.json"
    resolved = dump_config(cfg)
    previous: dict[str, Any] = {}
    if record.exists():
        previous = json.loads(record.read_text())
        if previous.get("config") != resolved or previous.get("steps") != steps:
            raise ValueError(
                f"{out} holds a comparison made with another configuration or step count; "
                "use another --out or delete it"
            )
    all_variants = _record_variants(out, previous, variants)
    todo = [(e, s) for s in range(1, seeds + 1) for e in entries]
    for e, seed in todo:  # a kept run that is not what its row says fails now, not after hours of training
        run_dir = out / e.label / f"seed{seed}"
        if (run_dir / "summary.json").exists():
            for warning in check_run_folder(
                run_dir, e.method, variants.get(e.label, {}).get("changes"), seed
            ):
                console.print(f"warning: {warning}", highlight=False, markup=False)
    record.write_text(
        json.dumps(
            {
                "command": command,
                "steps": steps,
                "methods": [e.label for e in entries],
                "variants": all_variants,
                "config": resolved,
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    for k, (e, seed) in enumerate(todo, start=1):
        run_dir = out / e.label / f"seed{seed}"
        name = e.label if not e.is_variant else f"{e.label} ({e.method}: {';'.join(e.overrides)})"
        if (run_dir / "summary.json").exists():
            console.print(f"[{k}/{len(todo)}] {name} seed {seed}: finished earlier, kept", markup=False)
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run starts over: no half-written results
        console.rule(escape(f"[{k}/{len(todo)}] {name} seed {seed}"))
        started = time.perf_counter()
        train(run_config(configs[e.label], e.method, seed, e.label), run_dir, steps=steps, console=console)
        console.print(f"{e.label} seed {seed} done in {time.perf_counter() - started:.0f}s", markup=False)
    paths = write_report(out, [e.label for e in entries], seeds, variants=all_variants)
    console.print((out / "table.md").read_text(), highlight=False, markup=False)
    for name, path in paths.items():
        console.print(f"{name}: {path}")
    return paths
