"""Time series to a PNG file, for `abuse top --plot` and `abuse account --plot`.

matplotlib is imported here, inside draw(), and only when a plot is asked for: it
takes about half a second to import, which every other command must not pay.  The
Agg backend draws without a display (servers have none).  matplotlib is an extra
(`pip install 'mailfc[plot]'`): without it, --plot fails before any query with a
message saying so (MISSING_PLOT), and the command exits non-zero.
"""

from __future__ import annotations

import datetime
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path

from mailfc.errors import InvalidInput

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
Series = Mapping[str, Sequence[tuple[datetime.datetime, float]]]
MISSING_PLOT = "matplotlib not installed: pip install 'mailfc[plot]'"


def check_path(path: str) -> Path:
    """Fail before any query when the file cannot be written as a PNG."""
    target = Path(path)
    if importlib.util.find_spec("matplotlib") is None:
        raise InvalidInput(f"--plot {path}: {MISSING_PLOT}")
    if target.suffix.lower() != ".png":
        raise InvalidInput(f"--plot {path}: the file name must end in .png")
    if not target.parent.exists():
        raise InvalidInput(f"--plot {path}: directory {target.parent} does not exist")
    return target


def draw(path: Path, series: Series, *, title: str, ylabel: str, bucket_s: int,
         start: datetime.datetime, end: datetime.datetime) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise InvalidInput(f"--plot {path}: {MISSING_PLOT} ({error})") from None

    figure, axes = plt.subplots(figsize=(11, 5), dpi=100)
    try:
        for name, points in series.items():
            filled = _zero_filled(points, bucket_s, start, end)
            axes.step([_num(p[0]) for p in filled], [p[1] for p in filled],
                      where="post", label=name, linewidth=1.4)
        axes.xaxis_date(tz=datetime.UTC)
        axes.set_title(title)
        axes.set_ylabel(ylabel)
        axes.set_xlabel(f"UTC, per {bucket_s // 60} min" if bucket_s < 3600
                        else f"UTC, per {bucket_s // 3600} h")
        axes.set_xlim(_num(start), _num(end))
        axes.grid(True, alpha=0.3)
        if series:
            axes.legend(loc="upper left", fontsize="small")
        figure.autofmt_xdate()
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path


def _num(moment: datetime.datetime) -> float:
    """matplotlib's date number (days since its default epoch, 1970-01-01 UTC)."""
    return (moment - EPOCH).total_seconds() / 86400.0


def _zero_filled(points: Sequence[tuple[datetime.datetime, float]], bucket_s: int,
                 start: datetime.datetime, end: datetime.datetime
                 ) -> list[tuple[datetime.datetime, float]]:
    # Buckets without activity are not in the query result; a step line needs them.
    known = {p[0]: p[1] for p in points}
    origin = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    step = datetime.timedelta(seconds=bucket_s)
    moment = origin + ((start - origin) // step) * step
    filled = []
    while moment < end:
        filled.append((moment, known.get(moment, 0.0)))
        moment += step
    return filled
