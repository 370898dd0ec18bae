"""What every exporter shares: the registry, the options model, the output checks and the one call that runs an export
(`export`), used by `domainprune export RUN --to NAME` and by prune's `--export NAME[:VALUE]` stage alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import DomainpruneError
from ..outputs import check_output
from ..registry import Registry

EXPORTERS = Registry("exporter")


class NoOptions(BaseModel):
    """Options of an exporter that takes none; every options model refuses names it does not declare."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Exported:
    path: Path
    summary: str  # one line: what was written, for the console
    notes: list[str] = field(default_factory=list)  # further lines: how to run it, what fell back


class Exporter:
    """Writes a model folder (a `domainprune prune` output or any HF model folder) in another format."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    output: ClassVar[str] = "folder"  # what --out names: "folder" or "file"
    suffix: ClassVar[str] = ""  # a file output's required extension (".gguf")
    spec_option: ClassVar[str | None] = None  # the option that `--export NAME:VALUE` sets (gguf: quant)
    stage_defaults: ClassVar[dict[str, Any]] = {}  # options prune's --export stage uses unless given

    def check(self, options: Any) -> None:
        """Refuse, before any work, what the options alone show cannot run (e.g. a missing optional package)."""

    def export(self, run: Path, out: Path, options: Any, *, force: bool) -> Exported:
        raise NotImplementedError

    def tag(self, options: Any) -> str:
        """What names the stage's output beside OUT: OUT.TAG plus the suffix."""
        return self.name


def options_of(exporter: Exporter, given: dict[str, Any]) -> BaseModel:
    """`given` validated as the exporter's options; an error is one line naming the option and the ones it has."""
    what = f"--to {exporter.name}"
    try:
        return exporter.Options(**given)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(exporter.Options.model_fields)) or "none"
            raise DomainpruneError(f"{what}: {loc} is not one of its options ({known})") from None
        raise DomainpruneError(f"{what}: {loc} {err['msg'].removeprefix('Value error, ')}") from None


def check_target(exporter: Exporter, out: Path, *, force: bool, inputs: list[Path] | tuple = ()) -> Path:
    """`out` may be written by this exporter: the right kind (file or folder, extension), never an input, replaced
    only with force."""
    out = check_output(Path(out), force=force, inputs=inputs, kind=exporter.output)
    if exporter.suffix and out.suffix != exporter.suffix:
        raise DomainpruneError(f"--out {out} must name a {exporter.suffix} file for --to {exporter.name}")
    return out


def export(run: str | Path, out: str | Path, to: str, *, force: bool = False, **options: Any) -> Exported:
    """Write the model folder `run` to `out` with the exporter registered as `to`; bad input is refused before any
    work is done."""
    exporter = EXPORTERS.lookup(to)()
    opts = options_of(exporter, options)
    run = Path(run)
    if not (run / "config.json").is_file():
        raise DomainpruneError(f"{run} is not a model folder (no config.json); give a `domainprune prune` output")
    out = check_target(exporter, Path(out), force=force, inputs=[run.resolve()])
    exporter.check(opts)
    return exporter.export(run, out, opts, force=force)


@dataclass
class ExportStage:
    """prune's `--export NAME[:VALUE]`: the exporter and its options, run on OUT once it is written."""

    exporter: Exporter
    options: BaseModel

    def beside(self, out: Path) -> Path:
        """Where the stage writes: beside OUT, never inside it (OUT is replaced as a whole)."""
        return out.parent / f"{out.name}.{self.exporter.tag(self.options)}{self.exporter.suffix}"

    def check(self, out: Path, *, force: bool) -> None:
        check_target(self.exporter, self.beside(out), force=force)

    def run(self, out: Path, *, force: bool) -> Exported:
        return export(out, self.beside(out), self.exporter.name, force=force, **self.options.model_dump())


def parse_spec(text: str) -> ExportStage:
    """`--export NAME[:VALUE]` -> the stage, its options checked (and the exporter's own checks run) before any
    pruning is done."""
    name, _, value = text.partition(":")
    name = name.lower()
    if name not in EXPORTERS:
        raise DomainpruneError(
            f"--export {text!r}: unknown exporter {name!r}; available: {', '.join(sorted(EXPORTERS))} "
            "(NAME or NAME:VALUE, e.g. gguf:q4_k_m)"
        )
    exporter = EXPORTERS[name]()
    given = dict(exporter.stage_defaults)
    if value:
        if exporter.spec_option is None:
            raise DomainpruneError(f"--export {text!r}: {name} takes no :VALUE; write --export {name}")
        given[exporter.spec_option] = value
    options = options_of(exporter, given)
    exporter.check(options)
    return ExportStage(exporter, options)
