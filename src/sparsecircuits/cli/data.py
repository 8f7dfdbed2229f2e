"""Corpus commands: ``sparsecircuits corpus manifest`` (registered on the main app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

corpus_app = typer.Typer(no_args_is_help=True, help="Training corpora: what is in them.")


@corpus_app.command("manifest")
def manifest_cmd(
    spec: Annotated[str, typer.Argument(help="python-env, stdlib, a directory or a glob")] = (
        "python-env"
    ),
    tokenizer: Annotated[
        str, typer.Option(help="count tokens with this model's tokenizer (a shipped name or dir)")
    ] = "stdlib-sparse",
    tokens: Annotated[bool, typer.Option(help="tokenize (cached) and report token counts")] = True,
    out: Annotated[Path | None, typer.Option(help="also write the manifest as JSON here")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the JSON manifest")] = False,
    val_fraction: Annotated[float, typer.Option()] = 0.02,
    cache_dir: Annotated[Path | None, typer.Option(help="token cache directory")] = None,
) -> None:
    """Build a corpus and print its manifest: packages with versions and licences, each
    filter's and the deduplication's counts, the split, and the token count."""
    from sparsecircuits.console import status
    from sparsecircuits.data import Tokenizer, build_token_cache, load_corpus
    from sparsecircuits.fileio import atomic_write_json
    from sparsecircuits.model.io import resolve_model_dir
    from sparsecircuits.train.trainer import default_cache_dir

    with status(f"reading corpus {spec}"):
        corpus = load_corpus(spec, val_fraction=val_fraction)
    doc = dict(corpus.manifest or {"corpus": corpus.name, "fingerprint": corpus.fingerprint()})
    doc.setdefault(
        "split", {"train": {"files": len(corpus.train)}, "val": {"files": len(corpus.val)}}
    )
    if tokens:
        tok_dir = resolve_model_dir(tokenizer)
        tok = Tokenizer.load(tok_dir)
        with status(f"tokenizing with {tokenizer}'s tokenizer (cached after the first time)"):
            train, val = build_token_cache(
                corpus, tok, cache_dir=(cache_dir or default_cache_dir()) / "tokens"
            )
        doc["tokens"] = {
            "tokenizer": tokenizer,
            "tokenizer_fingerprint": tok.fingerprint(),
            "train": train.num_tokens,
            "val": val.num_tokens,
        }
    if out is not None:
        atomic_write_json(out, doc)
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
        return
    _print_summary(doc)


def _print_summary(doc: dict) -> None:
    echo = typer.echo
    echo(f"corpus {doc['corpus']}  fingerprint {doc['fingerprint'][:16]}")
    for row in doc.get("packages", []):
        drops = ", ".join(f"{k} {v}" for k, v in row["dropped"].items()) or "-"
        echo(
            f"  {row['name']:26s} {row['version']:18s} {row['kept_files']:5d}/{row['py_files']:<5d}"
            f" files {row['kept_bytes'] / 1e6:7.2f} MB  dropped: {drops}  [{row['license']}]"
        )
    if "stdlib" in doc:
        echo(f"standard library: {doc['stdlib']['py_files']} files (kept whole)")
    if "filters" in doc:
        echo("filters (files dropped): " + ", ".join(f"{k} {v}" for k, v in doc["filters"].items()))
    if "dedup" in doc:
        echo("deduplication: " + ", ".join(f"{k} {v:,}" for k, v in doc["dedup"].items()))
    for side, row in doc["split"].items():
        extra = "".join(f", {k} {v:,}" for k, v in row.items() if k != "files")
        echo(f"{side}: {row['files']:,} files{extra}")
    if "tokens" in doc:
        t = doc["tokens"]
        echo(f"tokens ({t['tokenizer']} tokenizer): train {t['train']:,}, val {t['val']:,}")


def register(app: typer.Typer) -> None:
    """Add the ``corpus`` command group to the main app."""
    app.add_typer(corpus_app, name="corpus")
