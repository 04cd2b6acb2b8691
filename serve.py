"""Serve a trained run over HTTP, OpenAI's API and a page: `python serve.py --run-dir DIR`."""

from transformer_jax.cli import serve_main

if __name__ == "__main__":
    serve_main()
