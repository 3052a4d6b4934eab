"""fate-pack, fate-unpack, fate-verify: shipping an artifact as one checked file."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from fate.artifacts import Artifact, pack_artifact, unpack_artifact
from fate.artifacts.errors import USER_ERRORS, exit_with

from .clihelp import command


@command("fate-pack", examples=(("fate-pack out/tiny-moe -o tiny-moe.fate", "one file to publish, manifest first"),))
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Archive to write (model.fate).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is a Fate archive.")
def pack(artifact: Path, out: Path, force: bool) -> None:
    """Pack an ARTIFACT directory into one deterministic archive."""
    try:
        packed = pack_artifact(artifact, out, force=force)
        click.echo(f"{packed} sha256:{Artifact.open(packed).digest}")
    except USER_ERRORS as e:
        exit_with("fate-pack", e)


@command("fate-unpack", examples=(("fate-unpack tiny-moe.fate -o tiny-moe", "back to a folder"),))
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Directory to create.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is an artifact Fate wrote.")
def unpack(archive: Path, out: Path, force: bool) -> None:
    """Extract a Fate ARCHIVE into an artifact directory, checking every file first."""
    try:
        click.echo(unpack_artifact(archive, out, force=force))
    except USER_ERRORS as e:
        exit_with("fate-unpack", e)


@command("fate-verify", examples=(("fate-verify tiny-moe.fate --expect sha256:DIGEST", "every file, against the publisher's digest"),))
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--expect", default=None, metavar="DIGEST",
              help="The artifact's identity as its publisher gave it (sha256:..., printed by fate-pack, "
                   "fate-inspect and fate-verify): the manifest must have this SHA-256.")
def verify(artifact: Path, expect: str | None) -> None:
    """Check every file of an ARTIFACT (directory or archive) against its manifest: schema,
    sizes, SHA-256, and the graphs' operators. One line per problem; exit 0 only when all is well."""
    try:
        art = Artifact.open(artifact)
    except USER_ERRORS as e:
        exit_with("fate-verify", e)
    problems = art.verify()
    if not problems:
        problems = load_problems(art)
    if expect is not None and expect.lower().removeprefix("sha256:") != art.digest:
        problems.insert(0, f"{artifact}: identity sha256:{art.digest} is not the expected {expect} "
                           f"(a different or edited artifact)")
    for line in problems:
        click.echo(line)
    if problems:
        sys.exit(1)
    click.echo(f"{artifact}: ok ({len(art.manifest.files)} files, schema {art.manifest.schema_version}) "
               f"sha256:{art.digest}")


def load_problems(art: Artifact) -> list[str]:
    """What loading the artifact finds that its files' hashes cannot: graphs onnxruntime refuses or
    whose inputs and outputs are not the manifest's, decode steps whose numbers disagree with their
    graphs, combine graphs a layer needs and lacks, a tokenizer that cannot load or encode. Loaded as
    a run at the smallest budget does (every graph, one token's experts), not with every expert."""
    from fate.artifacts import FateError
    from fate.artifacts.budget import Budget

    from .experts.offload import OffloadOptions
    from .model import FateModel
    from .options import EngineOptions
    from .text import TextCodec

    share = max((layer.routing.top_k / layer.routing.num_experts for layer in art.manifest.moe_layers), default=1.0)
    try:
        FateModel.load(art.root, EngineOptions(offload=OffloadOptions(budget=Budget(share=min(1.0, share)), prefetch="none"))).close()
        TextCodec(art)
    except FateError as e:
        return [str(e)]
    return []

