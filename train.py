"""Train a character-level causal transformer: `python train.py --help`."""

from transformer_jax.cli import train_main

if __name__ == "__main__":
    train_main()
