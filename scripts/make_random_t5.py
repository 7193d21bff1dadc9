"""Save a T5 with t5-small's config resized, seeded random weights and the real tokenizer: the small
backbone of the sweep benchmark and the store-size study, for machines without pretrained T5 weights
(the shared t5-small folder has its config and tokenizer but no weights).

    python scripts/make_random_t5.py --base ../shared/data/t5/t5-small --out models/small-t5
"""
from __future__ import annotations

import click
import torch


@click.command()
@click.option("--base", required=True, help="A folder with a T5 config.json and tokenizer (e.g. t5-small's).")
@click.option("--out", required=True)
@click.option("--d-model", type=int, default=128, show_default=True)
@click.option("--d-kv", type=int, default=32, show_default=True)
@click.option("--d-ff", type=int, default=256, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--layers", type=int, default=4, show_default=True)
@click.option("--decoder-layers", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(base, out, d_model, d_kv, d_ff, heads, layers, decoder_layers, seed):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    config = T5Config.from_pretrained(base)
    config.update(dict(d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=heads, num_layers=layers,
                       num_decoder_layers=decoder_layers))
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
