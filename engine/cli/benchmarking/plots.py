"""PNG plots of ``engine bench`` records (matplotlib, Agg: no display needed)."""
import os

__all__ = ["plot"]


def plot(kind, record, path, *, title):
    """Draw ``record`` of ``kind`` ("sync", "scaling" or "step") into the PNG ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    figure = {"sync": _sync, "scaling": _scaling, "step": _step}[kind](pyplot, record)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def _sync(pyplot, record):
    sizes = record["sizes"]
    values = [r["num_values"] for r in sizes]
    figure, (times, ratios) = pyplot.subplots(1, 2, figsize=(10, 4))
    times.loglog(values, [r["sync_s_median"] * 1e3 for r in sizes], "o-", label="engine sync "
                 "(average + update)")
    times.loglog(values, [r["floor_s_median"] * 1e3 for r in sizes], "s--", label="memory-copy "
                 "floor, same bytes")
    times.set(xlabel="values averaged (P, float32)", ylabel="ms per step (median)",
              title=f"{record['num_processes']} processes")
    if record.get("model_num_values"):
        for axes in (times, ratios):
            axes.axvline(record["model_num_values"], color="tab:green", linestyle=":",
                         label=f"the model ({record['model_num_values']:,} values)")
    times.grid(True, which="both", alpha=0.3)
    times.legend(fontsize=8)
    ratios.semilogx(values, [r["ratio_to_floor"] for r in sizes], "o-")
    ratios.axhline(1.0, color="grey", linestyle=":", label="the floor")
    ratios.set(xlabel="values averaged (P, float32)", ylabel="sync time / floor",
               title="overhead over the memory-copy floor")
    ratios.set_ylim(bottom=0)
    ratios.grid(True, which="both", alpha=0.3)
    ratios.legend(fontsize=8)
    return figure


def _scaling(pyplot, record):
    configurations = record["configurations"]
    counts = [c["num_processes"] for c in configurations]
    figure, (rates, efficiency) = pyplot.subplots(1, 2, figsize=(10, 4))
    rates.plot(counts, [c["samples_per_s_median"] for c in configurations], "o-",
               label="measured (median)")
    single = configurations[0]["samples_per_s_median"]
    rates.plot(counts, [single * n for n in counts], ":", color="grey", label="linear from 1p")
    ceiling = record.get("host_ceiling")
    if ceiling:  # what processes that exchange nothing reach: the most any split can
        rates.plot([ceiling["num_processes"]], [ceiling["samples_per_s_median"]], "s",
                   color="tab:green", label="host ceiling (nothing exchanged)")
    rates.set(xlabel="processes", ylabel="training samples/s",
              title=f"batch {record['batch_size']}")
    rates.set_xticks(counts)
    rates.set_ylim(bottom=0)
    rates.grid(True, alpha=0.3)
    rates.legend(fontsize=8)
    efficiency.plot(counts, [100 * c["parallel_efficiency"] for c in configurations], "o-")
    efficiency.axhline(100, color="grey", linestyle=":")
    efficiency.set(xlabel="processes", ylabel="parallel efficiency (%)",
                   title="rate / (processes x 1-process rate)")
    efficiency.set_xticks(counts)
    efficiency.set_ylim(0, 110)
    efficiency.grid(True, alpha=0.3)
    return figure


def _step(pyplot, record):
    configurations = record["configurations"]
    labels = [f"{c['num_processes']}p" for c in configurations]
    figure, axes = pyplot.subplots(figsize=(6, 4))
    bottom = [0.0] * len(configurations)
    for key, colour in (("compute_s", "tab:blue"), ("sync_s", "tab:red"),
                        ("wait_s", "tab:orange"), ("other_s", "tab:grey")):
        heights = [c[f"{key}_median"] * 1e3 for c in configurations]
        axes.bar(labels, heights, bottom=bottom, color=colour, label=key[:-2])
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes.set(xlabel="processes", ylabel="ms per step (median)",
             title=f"where a step goes, batch {record['batch_size']}")
    axes.legend(fontsize=8)
    axes.grid(True, axis="y", alpha=0.3)
    return figure
