"""The ``cepo`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cepo import __version__
from cepo.config import ConfigError, dump_config, load_config

app = typer.Typer(
    help="CEPO: RL with verifiable rewards and contrastive token-level credit.", no_args_is_help=True
)
config_app = typer.Typer(help="Inspect and validate run configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Run configuration (YAML). Omit for the paper's defaults."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: dotted.key=value (YAML value). Repeatable."),
]


def _load(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
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
    """Check a configuration; exit 2 with every problem named if it is invalid."""
    cfg = _load(config, set_)
    console.print(
        f"ok: {cfg.name} ({cfg.algorithm.method}, {cfg.algorithm.steps} steps, lr {cfg.learning_rate:g})"
    )


if __name__ == "__main__":
    app()
