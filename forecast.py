"""Forecast the series of a run trained on CSV data: `python forecast.py --help`."""

from transformer_jax.cli import forecast_main

if __name__ == "__main__":
    forecast_main()
