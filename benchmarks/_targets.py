"""The issues' performance targets and one run's verdict on each: met, not met, or beyond the host.

A data-parallel engine cannot beat processes that never exchange anything: the benchmarks run such
processes (``engine/cli/benchmarking/ceiling.py``: the same model code, the same split, no
synchronization) as the host's own ceiling. When that ceiling is below a target in a run, no exact
data-parallel engine could have met the target there; the verdict says so instead of "not met", so a
report tells the host's limits apart from the engine's. A target without a ceiling (a one-process
ratio, memory, start time) is met or not.
"""
import math

MET, NOT_MET, BEYOND_HOST, NOT_MEASURED = ("met", "not met", "beyond the host's ceiling",
                                           "not measured")
VERDICTS = (MET, NOT_MET, BEYOND_HOST, NOT_MEASURED)


def verdict(measured, target, ceiling=None, *, at_most=False):
    """``MET`` if ``measured`` reaches ``target`` (``<=`` with ``at_most``, else ``>=``);
    ``BEYOND_HOST`` if it does not and ``ceiling``, the host's own limit for the same figure, is
    below the target too; else ``NOT_MET``. ``NOT_MEASURED`` for a nan (a peer not installed)."""
    if measured is None or not math.isfinite(measured):
        return NOT_MEASURED
    if (measured <= target) if at_most else (measured >= target):
        return MET
    if not at_most and ceiling is not None and math.isfinite(ceiling) and ceiling < target:
        return BEYOND_HOST
    return NOT_MET


def target_row(name, measured, target, ceiling=None, *, at_most=False, unit="x"):
    """One target as the JSON keeps it: ``measured`` and ``host_ceiling`` None when not measured
    or when the figure has no ceiling (JSON null, not NaN); ``unit``: "x" (a speedup), "" (a
    plain ratio), "MB" or "s"."""
    return dict(name=name, measured=_finite_or_none(measured), target=target, at_most=at_most,
                unit=unit, host_ceiling=_finite_or_none(ceiling),
                verdict=verdict(measured, target, ceiling, at_most=at_most))


def _finite_or_none(value):
    return float(value) if value is not None and math.isfinite(value) else None


_FORMATS = {"x": "{:.2f}x", "": "{:.2f}", "MB": "{:,.0f} MB", "s": "{:.2f} s"}


def print_targets(rows, source):
    """The targets as a table: figure, target, the host's ceiling for it, verdict."""
    print(f"targets ({source}):")
    print(f"  {'figure':<44} {'measured':>9} {'target':>9} {'host ceiling':>13}  verdict")
    for row in rows:
        number = _FORMATS[row["unit"]].format
        ceiling = "-" if row["host_ceiling"] is None else number(row["host_ceiling"])
        measured = "-" if row["measured"] is None else number(row["measured"])
        sign = "<=" if row["at_most"] else ">="
        print(f"  {row['name']:<44} {measured:>9} {sign + ' ' + number(row['target']):>9} "
              f"{ceiling:>13}  {row['verdict']}")
