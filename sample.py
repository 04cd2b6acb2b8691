"""Sample text from a trained run: `python sample.py --run-dir DIR --prompt TEXT`."""

from transformer_jax.cli import sample_main

if __name__ == "__main__":
    sample_main()
