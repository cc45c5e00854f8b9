"""`python -m cspexp.convert`: an original LISA checkpoint → a cspexp model directory.

    python -m cspexp.convert /ckpt/LISA-7B-v1 /models/lisa-7b --vision-tower /ckpt/clip-vit-large-patch14
    python -m cspexp model=converted model.path=/models/lisa-7b model.dtype=bfloat16

The output (config.json + model.safetensors + the tokenizer in tokenizer/, `cspexp.models.saved`)
holds the CLIP tower too, so later runs need neither the CLIP directory nor the key conversion and
load with one memory-mapped read. The directory is written under a temporary name beside DST and
renamed when complete, so DST is either absent, the old one, or whole. Bad input ends in one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cspexp.utils.errors import CspexpError, MissingPathError, OutputError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cspexp.convert",
        description="Convert an original LISA checkpoint directory (dvlab-research/LISA layout) into a cspexp model "
                    "directory that `model=converted model.path=DST` loads.",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="the LISA checkpoint directory (config.json, weights, tokenizer files)")
    p.add_argument("dst", type=Path, metavar="DST", help="the cspexp model directory to write")
    p.add_argument("--vision-tower", type=Path, required=True, metavar="PATH",
                   help="the CLIP directory LISA was trained with (a local copy of openai/clip-vit-large-patch14); "
                        "LISA checkpoints do not contain it")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the written weights (default: bfloat16, as LISA's)")
    p.add_argument("--name", help="the model name stored in DST (default: SRC's directory name)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists and is not empty")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def convert(src: Path, dst: Path, *, vision_tower: Path, dtype: str = "bfloat16", name: str | None = None,
            force: bool = False, progress: bool = True) -> Path:
    """Load `src` with `load_lisa` and write it to `dst` atomically. Returns `dst`."""
    from cspexp.models.lisa_checkpoint import load_lisa, read_lisa_config, read_vision_config
    from cspexp.models.saved import save_model

    src, dst = Path(src), Path(dst)
    # A missing or foreign SRC or CLIP directory fails before anything is loaded or written.
    read_lisa_config(src, label="SRC")
    read_vision_config(vision_tower, label="--vision-tower")
    if dst.exists() and not dst.is_dir():
        raise CspexpError(f"DST {str(dst)!r} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise CspexpError(f"DST {str(dst)!r} exists and is not empty; pass --force to replace it")
    if not dst.parent.exists():
        raise MissingPathError(f"the parent directory of DST {str(dst.parent)!r} does not exist")
    if not dst.parent.is_dir():
        raise OutputError(f"DST {str(dst)!r} cannot be written: {dst.parent} is not a directory")

    # Written beside DST (same file system), so the final rename is atomic. Made before the (long)
    # load, so that a destination this process cannot write to fails at once.
    try:
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    except OSError as exc:
        raise OutputError(f"DST {str(dst)!r} cannot be written: {dst.parent} refuses a new directory "
                          f"({exc.strerror or exc}); choose a directory you can write to") from None
    try:
        loaded = load_lisa(path=str(src), vision_tower=str(vision_tower), dtype=dtype, device="cpu",
                           name=name or src.name, progress=progress)
        try:
            save_model(loaded, tmp)
            _share(tmp)
            _put_in_place(tmp, dst)
        except OSError as exc:  # a full disk, a file system gone read-only
            raise OutputError(f"cannot write DST {str(dst)!r}: {_reason(exc)}; DST was left as it was") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _put_in_place(tmp: Path, dst: Path) -> None:
    """Rename the finished `tmp` to `dst`; an existing `dst` (--force) is moved aside first and deleted
    after, or put back if the rename fails."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".old"))
        os.replace(dst, old / dst.name)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old / dst.name, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def _reason(exc: OSError) -> str:
    """What the OS said (for an OutputError from an atomic write: its cause), without temporary names."""
    cause = exc.__cause__ if isinstance(exc, OutputError) and isinstance(exc.__cause__, OSError) else exc
    return cause.strerror or str(cause) or type(cause).__name__


def _share(directory: Path) -> None:
    """The usual permissions (mkdtemp makes 0700, safetensors writes 0600): a model directory is meant to be shared."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dst = convert(args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype, name=args.name,
                      force=args.force, progress=not args.no_progress)
    except CspexpError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    print(f"converted {args.src} → {dst} (load it with: python -m cspexp model=converted model.path={dst})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
