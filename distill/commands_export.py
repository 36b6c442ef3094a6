"""``gtnkit export``: a set written for other tools (safetensors, npz or an image folder), its
card with it (:mod:`distill.exports`)."""

from __future__ import annotations

import click

from .commandline import claim_out, handle_errors, set_argument, write_run
from .exports import EXPORT_FORMATS, export_set

__all__ = ["export"]


@click.command()
@set_argument
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="safetensors: set.safetensors (tensors + card in its header); npz: set.npz "
                   "(images, labels, lr, card as JSON text; numpy reads it without pickle); "
                   "imagefolder: a folder of 8-bit PNGs per class (<index>_<name>) that "
                   "torchvision ImageFolder and Hugging Face imagefolder read, with card.json "
                   "and the exact tensors in set.safetensors.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Output folder.")
@click.option("--force", is_flag=True, help="Overwrite an output folder that holds a run.")
@handle_errors
def export(set_path, set_dataset, normalization, fmt, out, force) -> None:
    """Export a set (any SET evaluate reads, another tool's included) for other tools.

    Every format reads back (`gtnkit evaluate OUT`, `distill.load_set`) as the same images,
    labels and card, bit for bit. Images stay normalised as the card's "normalization" says
    (pixels = image * std + mean); the PNGs of an image folder hold the pixels.
    """
    from .store import load_set

    out_dir = claim_out(out, force)
    saved = load_set(set_path, dataset=set_dataset, normalization=normalization)
    written = export_set(saved, fmt, out_dir)
    write_run(out_dir, "export", {"set": str(set_path), "format": fmt},
              {"files": [str(p) for p in written], "sha256": saved.card["sha256"],
               "n_images": len(saved)})
    click.echo(f"exported {len(saved)} images of {saved.dataset} as {fmt} -> {out_dir}")
