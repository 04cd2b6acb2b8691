"""Export a trained run as a Hugging Face GPT-2: `python export.py --run-dir DIR --out DIR`."""

from transformer_jax.cli import export_main

if __name__ == "__main__":
    export_main()
