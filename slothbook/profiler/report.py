"""The profiler's results as a DataFrame and as a text table (what the CLI prints)."""

from __future__ import annotations

from .samples import CATEGORIES, CPU_REST_LABEL, LABELS, SAMPLE_COLUMNS, Sample, format_bytes


def to_dataframe(samples: list[Sample]):
    import pandas as pd

    return pd.DataFrame([s.as_row() for s in samples], columns=SAMPLE_COLUMNS)


def category_label(category: str, cpu: bool) -> str:
    return CPU_REST_LABEL if cpu and category == "rest" else LABELS[category]


def summary_table(steps: list[Sample], meter, steps_started: int) -> str:
    """Categories at the step with the highest peak, and each category's largest value over the run."""
    if not steps:
        return f"slothbook memory profile: no finished step yet ({steps_started} started)."
    cpu = meter.kind == "cpu"
    top = max(steps, key=lambda s: s.peak)
    where = f"{meter.name}, {format_bytes(meter.capacity)}"
    lines = [f"slothbook memory profile: {len(steps)} steps on {where}",
             f"{'category':<30} {f'at peak (step {top.step})':>20} {'largest':>12}"]
    for cat in CATEGORIES:
        largest = max(getattr(s, cat) for s in steps)
        at_top = format_bytes(getattr(top, cat))
        lines.append(f"{category_label(cat, cpu):<30} {at_top:>20} {format_bytes(largest):>12}")
    lines.append("-" * 64)
    held = "process resident memory" if cpu else "reserved by the allocator"
    for label, attr in (("peak allocated", "peak"), (held, "held")):
        lines.append(f"{label:<30} {format_bytes(getattr(top, attr)):>20} "
                     f"{format_bytes(max(getattr(s, attr) for s in steps)):>12}")
    lines.append(f"{'share of device memory':<30} {top.peak / top.capacity:>20.1%}")
    rates = [s.tokens_per_s for s in steps if s.tokens_per_s]
    losses = [s.loss for s in steps if s.loss is not None]
    if rates:
        lines.append(f"{'tokens/s (mean)':<30} {sum(rates) / len(rates):>20.1f}")
    if losses:
        lines.append(f"{'loss (last step)':<30} {losses[-1]:>20.4f}")
    if cpu and getattr(meter, "mode", "") == "saved":
        lines.append("CPU: activations are the tensors autograd saves for backward; backward's transient working "
                     "set is not seen (cpu_mode='exact' sees it).")
    return "\n".join(lines)
