"""One look per algorithm in every plot: a colour and a line style of its own.

The style is fixed by the algorithm's place in the registry, so an algorithm looks the same in
the demo, the benchmark plots and the notebooks, and no two of the 15 share a colour (a
10-colour cycle would pair them up); the line style tells neighbouring colours apart in
greyscale too.
"""

from __future__ import annotations

from typing import Any

from rlx_optax._src import registry

# 15 looks, one per registered algorithm in registry order: matplotlib's tab10 (its grey, the
# target line's colour, swapped for a teal) and five dark tones, with line styles chosen so that
# the closest colours (navy/blue, browns, black/navy) never share a style.
LOOKS = (
    ("#1f77b4", "-"),  # sgd
    ("#ff7f0e", "--"),  # adam
    ("#2ca02c", "-."),  # adamw
    ("#d62728", ":"),  # nadamw
    ("#9467bd", "-"),  # radam
    ("#8c564b", "--"),  # qhadamw
    ("#e377c2", "-."),  # lamb
    ("#00a087", ":"),  # lion
    ("#bcbd22", "-"),  # sophia
    ("#17becf", "--"),  # muon
    ("#393b79", "-."),  # soap
    ("#637939", ":"),  # adafactor
    ("#8c6d31", "-"),  # mars
    ("#7b4173", "--"),  # stiefel
    ("#000000", "-"),  # kron_psgd
)
COLOURS = tuple(c for c, _ in LOOKS)
TARGET = {"color": "0.55", "linewidth": 2.0, "linestyle": (0, (8, 3)), "alpha": 0.8}


def style(name: str) -> dict[str, Any]:
    """``ax.plot`` keywords for algorithm `name` (a registered factory name; others share the
    cycle after the registered ones)."""
    names = registry.names()
    i = names.index(name) if name in names else len(names) + sum(map(ord, name))
    colour, linestyle = LOOKS[i % len(LOOKS)]
    return {"color": colour, "linestyle": linestyle}


def target_line(ax: Any, target: float, what: str = "loss") -> None:
    """A horizontal line at `target` (grey, long dashes: no algorithm uses grey), labelled
    ``target <what> = <value>`` in the legend."""
    ax.axhline(target, label=f"target {what} = {target:g}", **TARGET)
