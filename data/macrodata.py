"""Writes the US macroeconomic quarterly data that statsmodels ships (1959-2009) as a CSV of
rates, for series models: `python data/macrodata.py [--out PATH]` (default data/macrodata.csv).

Needs the optional extra: pip install 'transformer-jax[macro]' (statsmodels). Columns, one row
per quarter from 1959Q2 (the first quarter has no predecessor to difference):
  date        first day of the quarter (ISO)
  infl        inflation, annualised % change of the CPI (statsmodels' own column)
  dunemp      change of the unemployment rate from the previous quarter (percentage points)
  gdp_growth  annualised growth of real GDP, 400 log(GDP_t / GDP_t-1) (%)
  tbilrate    3-month treasury bill rate (%)
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def rates() -> dict[str, list]:
    """The columns above, from statsmodels' copy of the data."""
    from statsmodels.datasets import macrodata

    d = macrodata.load_pandas().data
    date = [f"{int(y)}-{3 * int(q) - 2:02d}-01" for y, q in zip(d["year"], d["quarter"])]
    gdp = np.log(d["realgdp"].to_numpy())
    return {"date": date[1:], "infl": d["infl"].to_numpy()[1:].tolist(),
            "dunemp": np.diff(d["unemp"].to_numpy()).round(6).tolist(),
            "gdp_growth": (400 * np.diff(gdp)).round(6).tolist(),
            "tbilrate": d["tbilrate"].to_numpy()[1:].tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent /
                        "macrodata.csv", help="where to write the CSV")
    args = parser.parse_args(argv)
    try:
        columns = rates()
    except ImportError:
        print("error: the macro data comes with statsmodels: pip install "
              "'transformer-jax[macro]'", file=sys.stderr)
        return 2
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values()))
    print(f"{args.out}: {len(columns['date'])} quarters, {columns['date'][0]} to "
          f"{columns['date'][-1]}; columns {', '.join(columns)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
