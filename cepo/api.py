"""The Python API: configure, train and evaluate from a script or a notebook (``import cepo``).

    import cepo

    cfg = cepo.load_config("configs/tiny.yaml", rollout__group_size=4, verifier__reward_fn="my_rewards:exact")
    summary = cepo.train(cfg, "runs/demo", steps=10, callbacks=[lambda report: print(report.reward_mean)])
    results = cepo.evaluate(cfg, adapter="runs/demo")

``cepo.train`` is ``cepo train`` (:func:`cepo.run.train`) with step callbacks, a reward function given as a
function, and the local Ray it started shut down afterwards. Everything here is imported on first use, so
``import cepo`` itself stays fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from cepo.config import RunConfig
    from cepo_proto.pipeline import StepReport

__all__ = ["StopTraining", "evaluate", "load_config", "train"]

# fields whose value may be given as a function: it is turned into its "module:function" path (cepo.hooks)
FUNCTION_FIELDS = ("verifier.reward_fn", "data.loader")


class StopTraining(Exception):
    """Raise it in a step callback to end the run after that step: checkpointed, evaluated and summarised, as if
    the step had been the last. (Returning False from the callback does the same.)"""


def _yaml_value(value: Any) -> str:
    """``value`` as the YAML text of a ``dotted.key=value`` override (safe_dump/safe_load round-trip it)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=2**31, allow_unicode=True).rstrip("\n")
    return text.removesuffix("\n...").rstrip("\n")


def _override_texts(settings: Mapping[str, Any]) -> list[str]:
    """``{"rollout__group_size": 4, "verifier.reward_fn": fn}`` → ``["rollout.group_size=4", ...]``."""
    from cepo.config import ConfigError
    from cepo.hooks import target_of

    texts = []
    for name, value in settings.items():
        key = name.replace("__", ".")
        if key in FUNCTION_FIELDS and value is not None and not isinstance(value, str):
            try:
                value = target_of(value, key)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        texts.append(f"{key}={_yaml_value(value)}")
    return texts


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] | None = None, **settings: Any
) -> RunConfig:
    """The run configuration in ``path`` (YAML; None: the paper's defaults), with overrides applied in order:
    ``overrides`` as ``cepo --set`` takes them (``"learner.lr=1e-4"``, the value parsed as YAML), then
    ``settings`` as Python values, the dots of a key written ``__`` (``learner__lr=1e-4``) or given as
    ``**{"learner.lr": 1e-4}``. ``verifier__reward_fn`` and ``data__loader`` also take the function itself
    (module-level, importable; see :mod:`cepo.hooks`). Raises :class:`cepo.config.ConfigError` naming every
    offending key, as ``cepo config validate`` does."""
    from cepo.config import load_config as load

    texts = [*(overrides or []), *_override_texts(settings)]
    return load(path, texts)


def _as_config(config: RunConfig | str | Path | None) -> RunConfig:
    from cepo.config import RunConfig

    return config if isinstance(config, RunConfig) else load_config(config)


def _with_settings(cfg: RunConfig, settings: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with ``settings`` (dotted keys → Python values) applied and the whole validated again."""
    if not settings:
        return cfg
    from cepo.config import _validate, apply_overrides

    texts = _override_texts(settings)
    data = apply_overrides(cfg.model_dump(mode="json"), texts)
    return _validate(data, "the configuration with " + " ".join(texts))


def _console(console: Console | None, quiet: bool) -> Console:
    from rich.console import Console

    return console if console is not None else Console(quiet=quiet, soft_wrap=True)


def train(
    config: RunConfig | str | Path | None = None,
    run_dir: str | Path | None = None,
    *,
    steps: int | None = None,
    callbacks: Iterable[Callable[[StepReport], Any]] = (),
    reward_fn: Callable[..., Any] | str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train as ``cepo train`` does and return the run's summary (what ``summary.json`` holds: ``run_dir``,
    ``run_id``, ``steps``, ``policy_version``, held-out accuracy ``base`` / ``trained`` per suite, stage
    timings).

    Args:
        config: a :class:`~cepo.config.RunConfig` (:func:`load_config`), or a YAML path (None: the defaults).
        run_dir: the run folder (default ``logging.run_dir``, else ``runs/<name>-<time>``); one that already
            holds a run is refused unless ``overwrite`` (or ``resume``: continue it from its last checkpoint).
        steps: steps in all (default ``algorithm.steps``; a resumed run continues to that total).
        callbacks: called in order after every step with its :class:`cepo_proto.pipeline.StepReport` (the
            line ``metrics.jsonl`` gets: ``step`` from 0, ``reward_mean``, ``accuracy``, ``stage_seconds``, …).
            A callback that returns False or raises :class:`StopTraining` ends the run after that step —
            checkpointed, evaluated and summarised as if it had been the last (the other callbacks still see
            the step). Any other exception ends the run with that exception.
        reward_fn: sets ``verifier.reward_fn``: a module-level function ``(response, reference) → float in
            [0, 1] or bool``, or its ``"module:function"`` path. A lambda, a nested function or one defined in
            ``__main__`` is a :class:`~cepo.config.ConfigError` (the verifier's worker process imports it by
            name).
        quiet: no console output (step lines, evaluations); ``console``: print to this one instead.

    A Ctrl-C (or SIGTERM) in the main thread finishes the step, checkpoints and raises
    :class:`cepo.controller.RunInterrupted` (a KeyboardInterrupt); a second one interrupts at once. A local Ray
    started here is shut down before returning.
    """
    cfg = _as_config(config)
    if reward_fn is not None:
        cfg = _with_settings(cfg, {"verifier.reward_fn": reward_fn})
    callbacks = list(callbacks)
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"callbacks: {callback!r} is not callable")
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir, the folder of the run to continue")
    if run_dir is None:
        run_dir = cfg.logging.run_dir or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    import ray

    from cepo.run import train as run_train

    def on_step(report: StepReport) -> bool:
        go_on = True
        for callback in callbacks:
            try:
                go_on = callback(report) is not False and go_on
            except StopTraining:
                go_on = False
        return go_on

    ray_was_up = ray.is_initialized()
    try:
        return run_train(
            cfg,
            Path(run_dir),
            steps=steps,
            console=_console(console, quiet),
            resume=resume,
            overwrite=overwrite,
            on_step=on_step,
        )
    finally:
        if not ray_was_up and cfg.resources.ray_address is None:
            ray.shutdown()  # the local Ray this call started: no raylet or worker outlives it


def evaluate(
    config: RunConfig | str | Path | None = None,
    adapter: str | Path | None = None,
    *,
    suites: Iterable[str] | None = None,
    samples: int | None = None,
    size: int | None = None,
    greedy: bool = True,
    backend: str = "vllm",
    quiet: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Held-out accuracy of ``model.path`` (with ``adapter``) as ``cepo eval`` measures it, outside a run.

    ``adapter`` is a PEFT adapter folder, or a run folder (its ``adapter/``). ``suites``, ``samples`` and
    ``size`` replace ``data.eval_suites``, ``data.eval_samples`` and ``data.eval_size``. Returns, per suite,
    ``sampled`` (and with ``greedy`` ``greedy``) accuracy with standard errors ``*_se``, ``n`` and
    ``train_overlap``, and their ``average`` over the suites. Grading is the verifier's (with
    ``verifier.timeout_s`` and ``verifier.max_response_chars``), through ``verifier.reward_fn`` when one is set,
    as in training."""
    from cepo.evaluate import evaluate_model

    cfg = _as_config(config)
    settings: dict[str, Any] = {}
    if suites is not None:
        settings["data.eval_suites"] = [suites] if isinstance(suites, str) else list(suites)
    if samples is not None:
        settings["data.eval_samples"] = samples
    if size is not None:
        settings["data.eval_size"] = size
    cfg = _with_settings(cfg, settings)
    if adapter is not None:
        folder = Path(adapter)
        if (
            not (folder / "adapter_config.json").is_file()
            and (folder / "adapter" / "adapter_config.json").is_file()
        ):
            folder = folder / "adapter"  # a run folder
        adapter = folder
    from rich.console import Console

    shown = console if console is not None else Console(stderr=True, quiet=quiet)
    return evaluate_model(cfg, adapter=adapter, backend=backend, greedy=greedy, console=shown)
