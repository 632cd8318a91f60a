"""``reid-search train``: the strong-baseline recipe, resumable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from reid_search.app.cli._common import App, pass_app, run_training

if TYPE_CHECKING:
    from trainer.config import TrainConfig


@click.command()
@click.option("--data", "data_root", type=click.Path(path_type=Path), required=False,
              help="Market-1501-layout root (bounding_box_train/, query/, bounding_box_test/).")
@click.option("--recipe", default="softmax_triplet_with_center", show_default=True,
              help="baseline, softmax_triplet or softmax_triplet_with_center.")
@click.option("-o", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field (repeatable), e.g. -o epochs=2 -o warmup=false.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder [default: WORKSPACE/runs/RECIPE].")
@click.option("--resume", is_flag=True,
              help="Continue the run in the output folder from latest.pt, with its saved config (-o still applies).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--print-config", is_flag=True, help="Print the resolved config as JSON and exit.")
@pass_app
def train(app: App, data_root: Path | None, recipe: str, overrides: tuple[str, ...], output: Path | None,
          resume: bool, device: str, print_config: bool) -> None:
    """Train the BNNeck ResNet feature extractor and make it the workspace's model.

    Writes train.log, config.json, latest.pt (every epoch), epoch_N.pt (every
    save_period) and model.pt into the run folder. Multi-GPU: launch the same
    command with `torchrun --nproc_per_node N -m reid_search train ...`.

    \b
    Examples:
      reid-search train --data Market-1501 --recipe softmax_triplet_with_center
      reid-search train --data data/synth -o epochs=4 -o arch=resnet18 -o eval_period=2
      reid-search train --data Market-1501 --resume -o epochs=160
      reid-search train --recipe baseline --print-config
    """
    from trainer.config import config_to_dict, resolve_config

    out = output or app.workspace.runs_dir / recipe
    recipe_given = click.get_current_context().get_parameter_source("recipe") is not ParameterSource.DEFAULT
    # A resume continues the run's own config; -o changes it (e.g. more epochs). A ConfigError
    # is a ReidSearchError: the CLI group prints it as one line.
    cfg = _resume_config(out, recipe if recipe_given else None, overrides) if resume else None
    if cfg is None:
        cfg = resolve_config(recipe, list(overrides))
    if print_config:
        click.echo(json.dumps(config_to_dict(cfg), indent=2))
        return
    if data_root is None:
        raise click.ClickException("pass --data ROOT, a Market-1501-layout folder (or make one with `reid-search make-synthetic`)")
    run_training(app, cfg, data_root, out, resume=resume, device=device)


def _resume_config(out: Path, recipe: str | None, overrides: tuple[str, ...]) -> "TrainConfig | None":
    """The run's saved config with ``overrides`` on top; None when ``out`` holds no config.json.

    Raises:
        ConfigError: an unreadable config.json, or ``recipe`` differs from the run's.
    """
    from trainer.config import ConfigError, resolve_config

    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        saved_recipe = saved.pop("recipe")
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"cannot read the run's config {path} ({exc}); start a new run with --output DIR") from None
    if recipe is not None and recipe != saved_recipe:
        raise ConfigError(
            f"cannot resume {out} with --recipe {recipe}: it was trained with recipe {saved_recipe!r}; "
            f"drop --recipe, or start a new run with --output DIR"
        )
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        saved[key.strip()] = value
    return resolve_config(saved_recipe, saved)
