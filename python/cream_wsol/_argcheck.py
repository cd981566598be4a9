"""Command-line argument checks shared by the ``cream-wsol`` subcommands.

Two kinds:

* argparse ``type=`` converters (:func:`int_at_least`, :func:`number_in`,
  :func:`sigma_value`): a malformed or out-of-range value stops the parse with
  argparse's usual exit 2 and one ``error: argument --NAME: ...`` line that says
  what is accepted;
* checks run by a subcommand before anything slow (:func:`name_list`,
  :func:`key_values`, :func:`existing_dir`, ...): they raise :class:`ArgError`,
  which ``cli.main`` prints as one ``error: --NAME ...`` line with exit 2.

Cheap checks (names, counts, ranges) come first, then paths, then files that
must be opened (a checkpoint's format), then the slow work.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence

__all__ = ["ArgError", "int_at_least", "number_in", "sigma_value", "name_list", "int_list", "number_list",
           "key_values", "existing_dir", "existing_file", "checkpoint_file", "training_checkpoint"]


class ArgError(ValueError):
    """A command-line mistake; ``cli.main`` prints ``error: <message>`` and exits 2."""


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``lo``."""
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return v
    conv.__name__ = f"integer >= {lo}"
    return conv


def _interval(lo, hi, lo_open, hi_open) -> str:
    if hi is None:
        return f"> {lo:g}" if lo_open else f">= {lo:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _in_range(v: float, lo, hi, lo_open, hi_open) -> bool:
    if not math.isfinite(v):
        return False
    if lo is not None and (v < lo or (lo_open and v == lo)):
        return False
    if hi is not None and (v > hi or (hi_open and v == hi)):
        return False
    return True


def number_in(lo: float, hi: Optional[float] = None, *, lo_open: bool = False,
              hi_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in the interval (``hi`` None: no upper bound)."""
    want = f"a number {_interval(lo, hi, lo_open, hi_open)}"

    def conv(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not _in_range(v, lo, hi, lo_open, hi_open):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v
    conv.__name__ = want
    return conv


def sigma_value(text: str):
    """argparse type: ``auto`` or a finite number > 0 (em_reactivate's sigma)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}")
    return v


def _items(text: str) -> List[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def name_list(arg: str, text: str, choices: Sequence[str]) -> List[str]:
    """A comma list of names, each one of ``choices`` (at least one)."""
    names = _items(text)
    bad = [n for n in names if n not in choices]
    if bad or not names:
        got = f"unknown name(s) {bad}" if bad else f"no name in {text!r}"
        raise ArgError(f"{arg}: {got}; expected a comma list of {', '.join(choices)}")
    return names


def int_list(arg: str, text: str, lo: int = 0) -> List[int]:
    """A comma list of integers >= ``lo`` (at least one)."""
    out = []
    for x in _items(text):
        try:
            v = int(x)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise ArgError(f"{arg}: expected a comma list of integers >= {lo}, got {x!r} in {text!r}")
        out.append(v)
    if not out:
        raise ArgError(f"{arg}: expected a comma list of integers >= {lo}, got {text!r}")
    return out


def number_list(arg: str, text: str, lo: float = 0.0, *, lo_open: bool = True) -> List[float]:
    """A comma list of finite numbers above ``lo`` (at least one)."""
    want = f"a comma list of numbers {_interval(lo, None, lo_open, False)}"
    out = []
    for x in _items(text):
        try:
            v = float(x)
        except ValueError:
            v = float("nan")
        if not _in_range(v, lo, None, lo_open, False):
            raise ArgError(f"{arg}: expected {want}, got {x!r} in {text!r}")
        out.append(v)
    if not out:
        raise ArgError(f"{arg}: expected {want}, got {text!r}")
    return out


def key_values(arg: str, items: Iterable[str], allowed: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """``KEY=VALUE`` items with numeric values; ``allowed``: the accepted keys."""
    accepted = f" (keys: {', '.join(allowed)})" if allowed is not None else ""
    out: Dict[str, float] = {}
    for item in items:
        if "=" not in item:
            raise ArgError(f"{arg}: expected KEY=VALUE with a number as VALUE{accepted}, got {item!r}")
        k, v = (s.strip() for s in item.split("=", 1))
        if not k:
            raise ArgError(f"{arg}: expected KEY=VALUE with a number as VALUE{accepted}, got {item!r}")
        if allowed is not None and k not in allowed:
            raise ArgError(f"{arg}: unknown key {k!r}; accepted keys: {', '.join(allowed) or 'none'}")
        try:
            num = float(v)
        except ValueError:
            num = float("nan")
        if not math.isfinite(num):
            raise ArgError(f"{arg}: {k}={v!r} is not a finite number; expected KEY=VALUE with a number "
                           f"as VALUE, e.g. {k}=0.5")
        out[k] = num
    return out


def existing_dir(arg: str, path: Optional[str], what: str = "folder") -> Optional[str]:
    if path is None:
        return None
    if not os.path.isdir(path):
        kind = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise ArgError(f"{arg}: {path!r} {kind}; expected the {what}")
    return path


def existing_file(arg: str, path: Optional[str], what: str = "file") -> Optional[str]:
    if path is None:
        return None
    if not os.path.isfile(path):
        kind = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise ArgError(f"{arg}: {path!r} {kind}; expected the {what}")
    return path


def checkpoint_file(arg: str, path: str, name: str = "checkpoint.pt") -> str:
    """``path`` itself (a file) or ``path/name`` (a run folder); ArgError if neither exists."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        inner = os.path.join(path, name)
        if os.path.isfile(inner):
            return inner
        raise ArgError(f"{arg}: folder {path!r} holds no {name}; expected a checkpoint file or the run "
                       "folder `cream-wsol train --out` wrote")
    raise ArgError(f"{arg}: {path!r} does not exist; expected a checkpoint file or the run folder "
                   "`cream-wsol train --out` wrote")


TRAIN_FORMAT = "cream_wsol.checkpoint/1"


def training_checkpoint(arg: str, path: str):
    """The loaded dict of a ``cream-wsol train`` checkpoint; ArgError for a missing
    file or another kind of file (a regressor checkpoint, an ImageNet state dict)."""
    from .train import load_checkpoint

    path = checkpoint_file(arg, path)
    try:
        ck = load_checkpoint(path)
    except Exception as exc:  # not a torch file at all
        raise ArgError(f"{arg}: {path!r} is not a readable torch checkpoint ({type(exc).__name__}: {exc}); "
                       "expected the checkpoint.pt written by `cream-wsol train`") from None
    fmt = ck.get("format") if isinstance(ck, dict) else None
    if fmt != TRAIN_FORMAT:
        what = ("a box-regressor checkpoint (`cream-wsol regress`)" if fmt == "cream_wsol.regressor/1"
                else f"format {fmt!r}" if fmt else "a plain state dict or another program's file")
        raise ArgError(f"{arg}: {path!r} is {what}, not a training checkpoint (format {TRAIN_FORMAT!r}); "
                       "expected the checkpoint.pt written by `cream-wsol train`")
    return ck
