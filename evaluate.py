"""Judge trained runs on a text: `python evaluate.py --run-dir DIR [--data FILE]`."""

from transformer_jax.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
