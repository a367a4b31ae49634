"""`python -m captioning.runtime.convert_checkpoint FILE.pt [FILE.pt ...]`: rewrite a checkpoint once so that it
holds tensors and plain data only, and loads with `torch.load(weights_only=True)`.

Converting trusts the file: it is read with weights_only=False, which runs whatever code is pickled into it. Run
it only on a checkpoint whose origin you trust (one written by an older version of this project: numpy random
states, OmegaConf configs). Each file is rewritten in place, atomically; `--output` writes elsewhere (one input).
Exit status 0 when every file converted, 2 otherwise, with one line per file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from captioning.runtime.checkpoint import load_checkpoint, save_checkpoint

PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def to_plain(value, where: str = "checkpoint"):
    """`value` with numpy arrays as tensors, numpy scalars as Python numbers, OmegaConf containers as dicts and
    lists; anything else that is not a tensor or plain data is a ValueError naming where it is."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint32:  # numpy's random key: torch's uint32 supports few operations
            return torch.from_numpy(value.astype(np.int64))
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, dict):
        return {to_plain(k, where): to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise ValueError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint cannot "
        "hold as plain data"
    )


def convert(path: Path, output: Path | None = None) -> Path:
    """Read `path` trusting it, write it back as plain data (to `output`, default in place), and check that the
    result loads under the weights-only rule."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # the explicit trust
    except Exception as e:
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a captioning checkpoint (a {type(checkpoint).__name__}, not a dict)")
    target = save_checkpoint(to_plain(checkpoint), output or path)
    load_checkpoint(target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint files to rewrite in place")
    parser.add_argument("--output", type=Path, default=None, help="write the converted checkpoint here (one input)")
    args = parser.parse_args(argv)
    if args.output and len(args.checkpoints) != 1:
        print("convert_checkpoint: error: --output takes exactly one input checkpoint", file=sys.stderr)
        return 2
    failed = 0
    for path in args.checkpoints:
        try:
            target = convert(path, args.output)
        except (ValueError, OSError) as e:
            print(f"convert_checkpoint: error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"converted {path} -> {target}: it now loads without running code")
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
