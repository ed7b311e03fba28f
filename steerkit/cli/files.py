"""``steerkit`` commands on what is on disk and on the Hub: models, push and clean."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerkit.cli._common import (
    _human,
    app,
)

PANEL = "Models and files"


@app.command(rich_help_panel=PANEL)
def models() -> None:
    """List the embedded offline models: whether each is installed and cached, and their sizes."""
    from steerkit.models import model_info

    for row in model_info():
        typer.echo(f"{row['name']}: {row['description']}")
        if row["installed"]:
            typer.echo(f"  installed: yes (GGUF {_human(row['gguf_bytes'])})")
        else:
            typer.echo(f"  installed: no  -> {row['install']}")
        cached = f"yes ({_human(row['cache_bytes'])})" if row["cached"] else "no (converted on first load)"
        typer.echo(f"  cached:    {cached} at {row['cache_dir']}")


@app.command(rich_help_panel=PANEL)
def push(
    path: Annotated[
        Path,
        typer.Argument(help="A vector file, or a folder steerkit wrote: SAE, task vector, LoRA adapter or checkpoint."),
    ],
    repo_id: Annotated[str, typer.Argument(help="The Hub repo to create or update, organisation/name.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
) -> None:
    """Upload to the Hugging Face Hub with a model card (YAML metadata linking the base model); a vector also
    travels as a llama.cpp .gguf. Needs a token (huggingface-cli login or HF_TOKEN)."""
    from steerkit.hub import push_to_hub

    if not path.exists():
        raise FileNotFoundError(f"nothing to push at {path}")
    typer.echo(f"pushed {path} to {repo_id}: {push_to_hub(path, repo_id, private=private)}")


@app.command(rich_help_panel=PANEL)
def clean(
    folder: Annotated[Path, typer.Argument(help="The folder an interrupted steerkit command was writing into.")],
) -> None:
    """Remove the temporary files an interrupted (killed) steerkit command left in FOLDER.

    Temporaries are named .NAME.steerkit-tmp-PID-XXXX; an old output set aside for --force
    (.NAME.steerkit-old-...) is put back when its replacement never arrived. Running commands' files stay.
    """
    from steerkit._io import clean as clean_folder

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    done = clean_folder(folder)
    for path, action in done:
        typer.echo(f"{action} {path}")
    if not done:
        typer.echo(f"no stale steerkit temporaries in {folder}")
